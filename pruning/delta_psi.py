"""ΔΨ (METHOD.md §3; the paper's Block Performance Indicator, the `bpi` of the flags).

Every sub-block i owns a class head ψ^c_i and a patch head ψ^p_i. Both read *detached*
features, so they never change the backbone. The same head is applied to the sub-block's
input x_i and output x_{i+1}; ΔΨ_i = ℓ(ψ_i(x_i)) − ℓ(ψ_i(x_{i+1})) is how much the sub-block
improved the features for the task.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from models import pool_tokens


class PatchHead(nn.Module):
    """Patch tokens as a D×h×w map → 2 × [Conv3×3, BatchNorm, ReLU] → global pool → Linear.

    With `width` < D and `grid` below the token grid it is the cheaper probe of
    `--bpi-mode fast`: the map average-pooled to at most grid × grid, convolutions D → width →
    width. The faithful head (METHOD.md §3) is width D, no pooling.
    """

    def __init__(self, dim: int, num_classes: int, grid: Tuple[int, int],
                 width: Optional[int] = None, pooled: Optional[int] = None):
        super().__init__()
        self.grid = grid
        width = width or dim
        pool = pooled is not None and pooled < max(grid)
        layers = [nn.AdaptiveAvgPool2d((min(pooled, grid[0]), min(pooled, grid[1])))] if pool else []
        for i in range(2):
            layers += [nn.Conv2d(dim if i == 0 else width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def patch_map(self, x):
        """The tokens x (B, prefix + h·w, D) as the map the convolutions read: (B, D, h, w),
        pooled in fast mode. Every head of one `HeadShape` makes the same map of the same x."""
        patches = x[:, x.shape[1] - self.grid[0] * self.grid[1]:]  # drop the class (and distillation) token
        B, N, D = patches.shape
        fmap = patches.transpose(1, 2).reshape(B, D, *self.grid)
        pool = self.convs[0]
        return pool(fmap) if isinstance(pool, nn.AdaptiveAvgPool2d) else fmap

    def forward_map(self, fmap, groups: int = 1):
        """Logits of `groups` applications stacked along the batch of `fmap` (a `patch_map`):
        one convolution call for all of them, BatchNorm statistics per application (in
        training mode each group is normalised, and updates the running statistics, as if
        it were called alone, in order)."""
        for layer in self.convs:
            if isinstance(layer, nn.AdaptiveAvgPool2d):
                continue  # patch_map pooled
            if isinstance(layer, nn.BatchNorm2d) and groups > 1:
                fmap = torch.cat([layer(g) for g in fmap.chunk(groups)])
            else:
                fmap = layer(fmap)
        return self.fc(fmap.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_map(self.patch_map(x))


@dataclass(frozen=True)
class HeadShape:
    """How the ΔΨ heads are built (`--bpi-mode`): faithful is the authors' heads; fast narrows
    the patch heads to width D // `width_div`, pools their map to at most `grid` × `grid`, and
    runs them on the first `fraction` of each batch (the batch is shuffled: a random subset)."""
    mode: str = 'faithful'
    width_div: int = 2
    grid: int = 7
    fraction: float = 1.0

    def patch_head(self, dim, num_classes, grid):
        if self.mode == 'faithful':
            return PatchHead(dim, num_classes, grid)
        return PatchHead(dim, num_classes, grid, width=max(1, dim // self.width_div), pooled=self.grid)


class DeltaPsiHeads(nn.Module):
    """The 2·(2L) auxiliary heads: `cls[i]` and `patch[i]` for sub-block i.

    A class head reads what the model's classifier pools (`pool`: the model's `global_pool`
    and prefix token count): the class token, or the patch tokens' mean in a model without
    one. A patch head reads the patch tokens only, never the registers (METHOD.md §3)."""

    def __init__(self, num_sub_blocks: int, dim: int, num_classes: int, grid: Tuple[int, int],
                 shape: HeadShape = HeadShape(), pool: Tuple[str, int] = ('token', 1)):
        super().__init__()
        self.pool = pool
        self.fraction = shape.fraction if shape.mode == 'fast' else 1.0
        self.cls = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(num_sub_blocks)])
        self.patch = nn.ModuleList([shape.patch_head(dim, num_classes, grid)
                                    for _ in range(num_sub_blocks)])

    def forward(self, stream: List[torch.Tensor]):
        """Head logits for each sub-block's input and output.

        Returns (cls, patch) of shapes (2L, 2, B, C) and (2L, 2, k, C): [:, 0] on x_i, [:, 1]
        on x_{i+1}; the patch heads see the first k = ⌈fraction · B⌉ samples.
        """
        stream = [x.detach() for x in stream]  # stop gradient: heads never train the backbone
        k = math.ceil(self.fraction * stream[0].shape[0])
        pooled = [pool_tokens(x, *self.pool) for x in stream]
        cls = [torch.stack([h(pooled[i]), h(pooled[i + 1])]) for i, h in enumerate(self.cls)]
        # x_i is read by patch head i - 1 (as its output) and i (as its input): its map is made
        # once; each head runs on its input and output in one call, as a batch of 2k
        maps = [self.patch[0].patch_map(x[:k]) for x in stream]
        patch = [h.forward_map(torch.cat([maps[i], maps[i + 1]]), groups=2).unflatten(0, (2, k))
                 for i, h in enumerate(self.patch)]
        return torch.stack(cls), torch.stack(patch)

    def forward_eval(self, stream: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Only what evaluation reports (§3): the last class and patch head on the final features."""
        x = stream[-1]
        return {'cls_head': self.cls[-1](pool_tokens(x, *self.pool)), 'patch_head': self.patch[-1](x)}


class DeltaPsi:
    """Sums and counts of ΔΨ^c and ΔΨ^p per sub-block over the current window (§3).

    `next_window()` after every mask update keeps the window just used as the previous one;
    the last update at finalize reads both (`mean(with_previous=True)`, METHOD.md §5 v2).
    """
    FIELDS = ('sum_c', 'sum_p', 'count', 'previous_sum_c', 'previous_sum_p', 'previous_count')
    PER_PROCESS = ('sum_c', 'sum_p', 'count')  # the current window, before its all-reduce

    def __init__(self, num_sub_blocks: int, device):
        self.sum_c = torch.zeros(num_sub_blocks, dtype=torch.float64, device=device)
        self.sum_p = torch.zeros_like(self.sum_c)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.previous_sum_c, self.previous_sum_p = torch.zeros_like(self.sum_c), torch.zeros_like(self.sum_c)
        self.previous_count = torch.zeros_like(self.count)

    def head_losses(self, aux, targets, criterion) -> Tuple[torch.Tensor, torch.Tensor]:
        """ℓ of every head on x_i and x_{i+1}: two tensors (2L, 2)."""
        cls, patch = aux
        lc = torch.stack([torch.stack([criterion(o, targets) for o in pair]) for pair in cls])
        sub = targets[:patch.shape[2]]  # the patch heads may see the first rows only
        lp = torch.stack([torch.stack([criterion(o, sub) for o in pair]) for pair in patch])
        return lc, lp

    def add(self, lc: torch.Tensor, lp: torch.Tensor):
        self.sum_c += (lc[:, 0] - lc[:, 1]).detach().double()
        self.sum_p += (lp[:, 0] - lp[:, 1]).detach().double()
        self.count += 1

    def all_reduce(self):
        """Sum the current window over processes (the previous one was summed when current)."""
        if _distributed():
            for k in self.PER_PROCESS:
                torch.distributed.all_reduce(getattr(self, k))

    def _window(self, with_previous: bool):
        if not with_previous:
            return self.sum_c, self.sum_p, self.count
        return (self.sum_c + self.previous_sum_c, self.sum_p + self.previous_sum_p,
                self.count + self.previous_count)

    def window_size(self, with_previous: bool = False) -> int:
        return int(self._window(with_previous)[2].item())

    def mean(self, with_previous: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step 1 of §4: the window's mean ΔΨ^c and ΔΨ^p."""
        sum_c, sum_p, count = self._window(with_previous)
        n = count.clamp_min(1)
        return sum_c / n, sum_p / n

    def next_window(self):
        for name in ('sum_c', 'sum_p', 'count'):
            getattr(self, f'previous_{name}').copy_(getattr(self, name))
            getattr(self, name).zero_()

    def state_dict(self):
        """The window sums. In a distributed run also every process's current window
        (`per_process`, one row per rank): each process sums ΔΨ over its own batches until the
        mask update all-reduces them, so a resumed run goes on from each one's own sums (with
        rank 0's alone, rank 1's steps since the last update were lost and rank 0's counted
        twice). A collective: every process calls it, as the trainer does for each checkpoint."""
        sd = {k: getattr(self, k).clone() for k in self.FIELDS}
        if _distributed():
            sd['per_process'] = {k: _gather(getattr(self, k)) for k in self.PER_PROCESS}
        return sd

    def load_state_dict(self, sd):
        for k in self.FIELDS:
            getattr(self, k).copy_(sd[k])
        rows = sd.get('per_process')
        if rows is None:  # written by one process
            return
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if _distributed() else (1, 0)
        for k in self.PER_PROCESS:
            if len(rows[k]) == world:
                getattr(self, k).copy_(rows[k][rank])
            else:
                # another number of processes (a pruning run refuses to resume so, --eval reads
                # no window): the sum of all on the first one, counted once by the all-reduce
                getattr(self, k).copy_(rows[k].sum(0) if rank == 0 else torch.zeros_like(rows[k][0]))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(t: torch.Tensor) -> torch.Tensor:
    """`t` of every process, stacked by rank."""
    rows = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, t)
    return torch.stack(rows)
