"""Block Performance Indicator ΔΨ (METHOD.md §3).

Every sub-block i owns a class head ψ^c_i and a patch head ψ^p_i. Both read *detached*
features, so they never change the backbone. The same head is applied to the sub-block's
input x_i and output x_{i+1}; ΔΨ_i = ℓ(ψ_i(x_i)) − ℓ(ψ_i(x_{i+1})) is how much the sub-block
improved the features for the task.
"""
from typing import List, Tuple

import torch
import torch.nn as nn


class PatchHead(nn.Module):
    """Patch tokens as a D×h×w map → 2 × [Conv3×3, BatchNorm, ReLU] → global pool → Linear."""

    def __init__(self, dim: int, num_classes: int, grid: Tuple[int, int]):
        super().__init__()
        self.grid = grid
        layers = []
        for _ in range(2):
            layers += [nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                       nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        patches = x[:, 1:]  # drop the class token
        B, N, D = patches.shape
        fmap = patches.transpose(1, 2).reshape(B, D, *self.grid)
        return self.fc(self.convs(fmap).mean(dim=(2, 3)))


class BlockPerformanceHeads(nn.Module):
    """The 2·(2L) auxiliary heads: `cls[i]` and `patch[i]` for sub-block i."""

    def __init__(self, num_sub_blocks: int, dim: int, num_classes: int, grid: Tuple[int, int]):
        super().__init__()
        self.cls = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(num_sub_blocks)])
        self.patch = nn.ModuleList([PatchHead(dim, num_classes, grid)
                                    for _ in range(num_sub_blocks)])

    def forward(self, stream: List[torch.Tensor]):
        """Head logits for each sub-block's input and output.

        Returns (cls, patch), each of shape (2L, 2, B, C): [:, 0] on x_i, [:, 1] on x_{i+1}.
        """
        stream = [x.detach() for x in stream]  # stop gradient: heads never train the backbone
        cls = [torch.stack([h(stream[i][:, 0]), h(stream[i + 1][:, 0])])
               for i, h in enumerate(self.cls)]
        patch = [torch.stack([h(stream[i]), h(stream[i + 1])]) for i, h in enumerate(self.patch)]
        return torch.stack(cls), torch.stack(patch)


class BlockPerformance:
    """Sums and counts of ΔΨ^c and ΔΨ^p per sub-block over the current window (§3).

    `next_window()` after every mask update keeps the window just used as the previous one;
    the last update at finalize reads both (`mean(with_previous=True)`, METHOD.md §5 v2).
    """
    FIELDS = ('sum_c', 'sum_p', 'count', 'previous_sum_c', 'previous_sum_p', 'previous_count')

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
        lp = torch.stack([torch.stack([criterion(o, targets) for o in pair]) for pair in patch])
        return lc, lp

    def add(self, lc: torch.Tensor, lp: torch.Tensor):
        self.sum_c += (lc[:, 0] - lc[:, 1]).detach().double()
        self.sum_p += (lp[:, 0] - lp[:, 1]).detach().double()
        self.count += 1

    def all_reduce(self):
        """Sum the current window over processes (the previous one was summed when current)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.sum_c, self.sum_p, self.count):
                torch.distributed.all_reduce(t)

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
        return {k: getattr(self, k).clone() for k in self.FIELDS}

    def load_state_dict(self, sd):
        for k in self.FIELDS:
            getattr(self, k).copy_(sd[k])
