"""Does `--bpi-mode fast` make the same κ decisions as the authors' ΔΨ heads? One pruning run,
both estimators side by side.

The faithful heads (METHOD.md §3) drive the masks, as in a normal DAP run. One or more sets of
fast patch heads (`--fast W:G:F ...`: width D/W, patch map pooled to at most G×G, the first F of
each batch) read the same detached residual stream, train on the same loss and keep their own
ΔΨ^p windows; `--fast copy` adds a second set of faithful patch heads with another
initialisation, which measures how far two faithful estimators agree (the noise floor). The
class heads are the same in both modes, so a fast run's ΔΨ^c is the faithful one: they are
shared. At every mask update the script records, for each estimator, the window's mean ΔΨ^c
and ΔΨ^p per sub-block and the κ that §4 would give from it (same kept parameters, each
estimator with its own momentum), and writes OUTPUT_DIR/bpi_agreement.json:

- `spearman_c`, `spearman_p`: median over mask updates of the rank correlation across
  sub-blocks between the fast and the faithful mean ΔΨ^c (ΔΨ^p);
- `kappa_mean_abs_diff`: mean over updates and sub-blocks of |κ_fast − κ_faithful|;
- the same for every fast configuration under `configs`, and the per-update values.

It takes main.py's data, model, schedule and pruning flags (--prune-method block_pr), e.g. the
12-layer transfer run of docs/RESULTS.md:

    python scripts/compare_bpi.py --model deit_micro12_patch4_32 --input-size 16 \
        --data-set DIGITS_TARGET --model-path output/compare/source/checkpoint.pth \
        --epochs 10 --prune-start-epoch 2 --prune-sparse-epoch 6 --batch-size 16 \
        --unscale-lr --lr 1e-3 --no-train-mode --aa none --mixup 0 --cutmix 0 --reprob 0 \
        --drop-path 0 --num_workers 0 --prune-round-to 1 --output_dir output/compare_bpi \
        --fast copy 2:7:1 4:7:1 8:7:1 4:7:0.5
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

import common  # noqa: F401  (first: it puts the repository root on sys.path)
import utils
from main import get_args_parser  # noqa: E402  (main.py's flags)
from pruning.delta_psi import DeltaPsi, DeltaPsiHeads, HeadShape  # noqa: E402
from pruning.gates import kept_params  # noqa: E402
from pruning.keep_ratio import KeepRatioFromDeltaPsi  # noqa: E402
from train import methods, recipe  # noqa: E402
from train.check_args import check_args  # noqa: E402


def spearman(a, b) -> float:
    """Rank correlation of two vectors (average ranks for ties); 0 where one is constant."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return 0.0
    return float(spearmanr(a, b).statistic)


class FastEstimator:
    """One more set of patch heads (fast, or a faithful copy) with its ΔΨ window and §4 state;
    its class heads are the faithful ones."""

    def __init__(self, spec, pruner, model, num_classes, device):
        self.name = spec
        if spec == 'copy':
            self.shape = HeadShape('faithful')
        else:
            w, g, f = spec.split(':')
            self.shape = HeadShape('fast', int(w), int(g), float(f))
        heads = DeltaPsiHeads(len(pruner.sbs), model.embed_dim, num_classes,
                              tuple(model.patch_embed.grid_size), self.shape).to(device)
        heads.cls = pruner.heads.cls  # shared: the same class heads in both modes
        self.heads = heads
        self.window = DeltaPsi(len(pruner.sbs), device)
        self.keep_ratio = KeepRatioFromDeltaPsi(pruner.dense, pruner.budget, pruner.cfg.block_imp_scale,
                                                pruner.cfg.gamma, pruner.cfg.alpha)


def agreement(updates, name):
    rows = [u for u in updates if u['window'] > 0]
    sc = [spearman(u['faithful']['delta_psi_cls'], u[name]['delta_psi_cls']) for u in rows]
    sp = [spearman(u['faithful']['delta_psi_patch'], u[name]['delta_psi_patch']) for u in rows]
    diffs = [abs(a - b) for u in rows for a, b in zip(u['faithful']['kappa'], u[name]['kappa'])]
    return {'spearman_c': statistics.median(sc), 'spearman_p': statistics.median(sp),
            'kappa_mean_abs_diff': sum(diffs) / len(diffs), 'kappa_max_abs_diff': max(diffs),
            'updates': len(rows)}


def train(args, model, pruner, fast, loader, device):
    """The pruning run; returns one record per mask update with every estimator's view."""
    criterion, mixup_fn = recipe.build_criterion(args, args.nb_classes)
    lr = recipe.scaled_lr(args)
    groups = pruner.param_groups(lr, args.weight_decay) + [
        {'params': list(e.heads.patch.parameters()), 'lr': args.lr_soft_head, 'weight_decay': args.weight_decay}
        for e in fast]
    optimizer = recipe.build_optimizer(args, model, lr, groups)
    updates = []
    for epoch in range(args.prune_finalize_epoch):
        utils.seed_everything(args.seed + 1000 * epoch)
        loader.sampler.set_epoch(epoch)
        model.train(args.train_mode)
        for e in [pruner.heads] + [e.heads for e in fast]:
            e.train(args.train_mode)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            logits, stream = model.forward_stream(x)
            loss = criterion(logits, y) + pruner.aux_loss(pruner.heads(stream), y, criterion)
            for e in fast:
                lc, lp = e.window.head_losses(e.heads(stream), y, criterion)
                if pruner.schedule.is_active(pruner.step_count):
                    e.window.add(lc, lp)
                loss = loss + lp.sum()  # the class heads are trained once, by the faithful loss
            loss.backward()
            optimizer.step()
            step = pruner.step_count
            if pruner.schedule.is_update(step):
                kept = torch.tensor(kept_params(model, pruner.sbs), dtype=torch.float64)
                views = {}
                for e in fast:
                    c, p = (m.cpu() for m in e.window.mean())
                    views[e.name] = {'delta_psi_cls': c.tolist(), 'delta_psi_patch': p.tolist(),
                                     'kappa': e.keep_ratio(c, p, kept).tolist()}
                    e.window.next_window()
                record = pruner.step()
                views['faithful'] = {'delta_psi_cls': record['delta_psi_cls'],
                                     'delta_psi_patch': record['delta_psi_patch'],
                                     'kappa': record['goal_keep_ratio']}
                updates.append({'step': step, 'epoch': record['epoch'], 'window': record['window'], **views})
                print(f'update at step {step}: ' + ', '.join(
                    f'{e.name} ρ_c {spearman(views["faithful"]["delta_psi_cls"], views[e.name]["delta_psi_cls"]):.2f}'
                    f' ρ_p {spearman(views["faithful"]["delta_psi_patch"], views[e.name]["delta_psi_patch"]):.2f}'
                    for e in fast), flush=True)
            else:
                pruner.step()
            optimizer.zero_grad(set_to_none=True)
    return updates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[get_args_parser()])
    parser.add_argument('--fast', nargs='+', default=['2:7:1'], metavar='W:G:F',
                        help='fast configurations (width divisor:pooled grid side:batch fraction), or copy')
    parser.set_defaults(prune_method='block_pr')
    args = check_args(parser.parse_args(argv))
    if not args.output_dir:
        sys.exit('error: --output_dir is required')
    if args.grad_accum_steps != 1 or args.prune_method != 'block_pr':
        sys.exit('error: compare_bpi.py runs --prune-method block_pr with --grad-accum-steps 1')
    utils.init_distributed_mode(args)
    device, _ = recipe.setup_device(args)
    dataset_train, dataset_val, nb_classes = recipe.build_datasets(args)
    args.nb_classes = nb_classes
    model = recipe.build_model(args, nb_classes).to(device)
    loader, _ = recipe.build_loaders(args, dataset_train, dataset_val)
    args.bpi_mode = 'faithful'  # the heads that drive the masks
    pruner = methods.build_pruner(args, model, nb_classes, recipe.steps_per_epoch(args, loader))
    fast = [FastEstimator(spec, pruner, model, nb_classes, device) for spec in args.fast]
    updates = train(args, model, pruner, fast, loader, device)
    configs = {e.name: {**agreement(updates, e.name), **vars(e.shape)} for e in fast}
    result = {**configs[fast[0].name], 'configs': configs, 'per_update': updates,
              'command': ' '.join(sys.argv)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'bpi_agreement.json').write_text(json.dumps(result, indent=1))
    for name, c in configs.items():
        print(f'{name}: spearman_c {c["spearman_c"]:.3f}, spearman_p {c["spearman_p"]:.3f}, '
              f'mean |Δκ| {c["kappa_mean_abs_diff"]:.3f} (max {c["kappa_max_abs_diff"]:.3f}) '
              f'over {c["updates"]} updates')
    print(f'wrote {out / "bpi_agreement.json"}')


if __name__ == '__main__':
    main()
