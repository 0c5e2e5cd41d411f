"""One pruner protocol (pruning/protocol.py): the README's loop runs every method unchanged."""
import pytest
import torch

import models
from conftest import micro
from families import FAMILIES, register
from pruning import Pruner, PruneConfig, PruneSchedule, Record, SaViTConfig, WDPruneConfig
from train import methods

CONFIGS = {  # each method's configuration, as its family (train/methods/) builds it from flags
    'block_pr': lambda: PruneConfig(prune_ratio=0.5),
    'uniform': lambda: PruneConfig(prune_ratio=0.5, method='uniform'),
    'global': lambda: PruneConfig(prune_ratio=0.5, method='global'),
    'wdprune': lambda: WDPruneConfig(prune_ratio=0.5, lr=0.5, classifiers=(2,)),
    'savit': lambda: SaViTConfig(prune_ratio=0.5, population=8, children=4, generations=3),
}


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def readme_loop(pruner, model, loader, epochs):
    """The loop of the README's "Use the pruner from your own loop", for any method."""
    gates = {id(g) for g in model.gate_parameters()}
    params = [p for p in model.parameters() if id(p) not in gates]
    optimizer = torch.optim.AdamW([{'params': params}] + pruner.param_groups(5e-4, 0.05), lr=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    net, records = pruner.module, []
    pruner.on_update = records.append
    for epoch in range(epochs):
        for x, y in (loader[:pruner.score_batches(len(loader))] if pruner.one_shot else loader):
            logits, aux = net(x)
            loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
            loss.backward()
            if not pruner.one_shot:
                optimizer.step()
            pruner.step()
            optimizer.zero_grad()
        if pruner.one_shot:
            break
    cut, rows = pruner.finalize()
    return cut, rows, records


def test_the_table_holds_every_method_and_nothing_else():
    assert set(methods.methods()) == set(CONFIGS)
    assert all(issubclass(f.pruner, Pruner) for f in methods.FAMILIES)


@pytest.mark.parametrize('method', list(CONFIGS))
@pytest.mark.parametrize('family', [None, *FAMILIES])
def test_readme_loop_prunes_with_every_method(method, family):
    """Every method on the micro model and on every timm family of tests/families.py."""
    model = micro(num_classes=10, img_size=16) if family is None else \
        models.create_model(register(family), num_classes=10, img_size=16)
    dense = model.num_parameters()
    loader = batches(4)
    schedule = PruneSchedule(steps_per_epoch=len(loader), start_epoch=0, sparse_epoch=1,
                             finalize_epoch=2, steps_update_mask=2)
    pruner = methods.family_of(method).pruner(model, 10, CONFIGS[method](), schedule)
    cut, rows, records = readme_loop(pruner, model, loader, epochs=2)
    assert cut.is_cut and not cut.gate_parameters() and not model.gate_parameters()
    assert cut.num_parameters() == pytest.approx(0.5 * dense, rel=0.1)
    assert sum(r['kept_params'] for r in rows) < sum(r['dense_params'] for r in rows)
    assert records and all(isinstance(r, Record) for r in records)  # each record logs itself
    with torch.no_grad():
        assert cut(batches(1, seed=1)[0][0]).shape == (8, 10)
