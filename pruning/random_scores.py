"""Random scores in place of trained ones: a pruner as after some training, so that a cut can be
made (and its size and speed measured) without training. Not part of the method: the cuts of
scripts/benchmark.py, scripts/latency_table.py and scripts/gpu_check.py, and the tests' pruners."""
import models
import torch

from .protocol import Pruner
from .pruner import DepthAwarePruner, PruneConfig
from .savit import SaViTConfig, SaViTPruner
from .schedule import PruneSchedule


def fill_random_scores(pruner: Pruner, seed: int = 0, heavy_tailed: bool = False) -> None:
    """Fill the pruner's score windows with uniform random numbers in [0, 1) drawn from `seed`:
    ΔΨ's (when the pruner has one, `pruner.performance`) and the Taylor scores, which are
    raised to the 4th power with `heavy_tailed` (positive and heavy-tailed, as real ones are).
    Each window then counts one step."""
    g = torch.Generator().manual_seed(seed)
    performance = getattr(pruner, 'performance', None)
    if performance is not None:
        for window in (performance.sum_c, performance.sum_p):
            window.copy_(torch.rand(window.shape, generator=g, dtype=torch.float64))
        performance.count.fill_(1)
    for s in pruner.taylor.sum.values():
        scores = torch.rand(s.shape, generator=g, dtype=torch.float64)
        s.copy_(scores ** 4 if heavy_tailed else scores)
    pruner.taylor.count = 1


def random_cut(name, prune_ratio, num_classes, img_size, seed=0, method='block_pr', round_to=None,
               budget='params', latency_table=None, attn_unit='head_dim'):
    """(dense, cut): the model `name` and a cut of it with the method's budget from random
    scores: for DAP random ΔΨ decide κ and random Taylor scores the elements; for SaViT random
    Taylor scores drive the search (heads, MLP neurons and embedding channels). `round_to` as
    --prune-round-to (None: its default); DAP's `budget` in params, flops or latency
    (`latency_table`, a file); `attn_unit` as --prune-attn-unit."""
    torch.manual_seed(seed)
    model = models.create_model(name, num_classes=num_classes, img_size=img_size)
    if method == 'savit':
        pruner = SaViTPruner(model, num_classes, SaViTConfig(prune_ratio=prune_ratio, seed=seed))
    else:
        schedule = PruneSchedule(steps_per_epoch=1, start_epoch=0, sparse_epoch=0,
                                 finalize_epoch=1, steps_update_mask=1)
        config = PruneConfig(prune_ratio=prune_ratio, method=method, budget=budget,
                             latency_table=latency_table, attn_unit=attn_unit,
                             **({} if round_to is None else {'round_to': round_to}))
        pruner = DepthAwarePruner(model, num_classes, config, schedule)
    fill_random_scores(pruner, seed)
    cut, _ = pruner.finalize()
    return model, cut
