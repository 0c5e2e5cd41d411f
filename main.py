"""Fine-tune, prune (Depth Aware Pruning) and evaluate Vision Transformers, DeiT style.

Runs as a single process, under `torchrun` and under `python -m torch.distributed.launch --use_env`.
`main(args)` is the story of one run: validate, build, fit (cutting the model when the pruner's
schedule says so), save. What it is made of lives in train/ (docs/ARCHITECTURE.md); the method
itself in pruning/ and models/.
"""
import errno
import signal
import sys

import models
import utils
from datasets import UnreadableImageError
from train import methods, recipe, run_dir
from train.flags import ArgumentParser, add_deit_flags
from train.trainer import Trainer
from train.check_args import check_args
from errors import DiskFullError, NonFiniteLossError, RunStopped, UsageError


def get_args_parser():
    parser = ArgumentParser('DeiT training, Depth Aware Pruning and evaluation script', add_help=False)
    add_deit_flags(parser)
    methods.add_flags(parser)
    return parser


def main(args):
    stats = run(args)
    utils.leave_distributed()
    return stats


def run(args):
    args = check_args(args)
    run_dir.check_run_dir(args)
    utils.init_distributed_mode(args)
    print(args)
    device, amp = recipe.setup_device(args)

    # build: everything that can fail on bad input fails here, before --output_dir is touched
    dataset_train, dataset_val, args.nb_classes = recipe.build_datasets(args)
    checkpoint = run_dir.load_resume_checkpoint(args) if args.resume else None
    model = recipe.build_model(args, args.nb_classes, checkpoint)
    # a checkpoint written after the cut holds the cut model: the run goes on without a pruner
    pruning = args.prune_method is not None and not (checkpoint and checkpoint.get('arch'))
    if checkpoint is not None:
        run_dir.check_resume_kind(args, checkpoint, pruning)
    loader_train, loader_val = recipe.build_loaders(args, dataset_train, dataset_val)
    steps_per_epoch = recipe.steps_per_epoch(args, loader_train)
    if checkpoint is not None and pruning and not args.eval:
        run_dir.check_resume_steps(args, checkpoint, steps_per_epoch)
    model.to(device)
    pruner = methods.build_pruner(args, model, args.nb_classes, steps_per_epoch) if pruning else None
    if checkpoint is not None:
        run_dir.restore_weights(args, checkpoint, model, pruner)
    trainer = Trainer(args, device, amp, model, pruner)
    del model, pruner  # the trainer's from here on: the cut lets go of the gated model and the pruner

    if args.eval:
        print('number of params:', trainer.model.num_parameters())
        test_stats = trainer.evaluate_only(loader_val)
        print(f'Accuracy of the network on the {len(dataset_val)} test images: {test_stats["acc1"]:.1f}%')
        return test_stats
    one_shot = trainer.pruner is not None and trainer.pruner.one_shot
    start_epoch = None if one_shot else trainer.start(checkpoint)

    # fit, cut, save: from here on the run writes into --output_dir
    run = run_dir.open_run(args, checkpoint, steps_per_epoch)
    if one_shot:
        return trainer.prune_one_shot(loader_train, loader_val, run)
    return trainer.fit(loader_train, loader_val, start_epoch, run)


def stop(signum, frame):
    raise RunStopped(signum)


def cli(argv=None):
    """main.py as a command: every way a run ends early is one line on stderr and an exit status
    (2 bad input, 1 the run failed, 128 + N signal N)."""
    parser = ArgumentParser('DeiT training, Depth Aware Pruning and evaluation script',
                            parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.list_models is not None:
        return list_models(args.list_models)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        main(args)
    except UsageError as e:
        fail(f'error: {e}', 2)
    except (NonFiniteLossError, UnreadableImageError, DiskFullError) as e:
        fail(f'error: {e}', 1, every_process=True)  # may happen on one process only
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(f'error: the disk is full: {e.filename or "a file"} could not be written', 1)
    except RunStopped as e:
        fail(f'stopped by {signal.Signals(e.signum).name}' + (f' {e.where}' if e.where else ''), 128 + e.signum)


def list_models(pattern: str):
    """--list-models: the names matching `pattern` that --model takes, each with its family, then
    the timm VisionTransformers that it does not take and why."""
    supported, refused = models.supported_models(pattern)
    for name, config in supported.items():
        print(f'{name:<48} {config.describe()}')
    if refused:
        print(f'\nnot supported ({len(refused)}):')
        for name, why in refused.items():
            print(f'{name:<48} {why}')
    if not supported and not refused:
        fail(f'error: no model name matches {pattern!r}', 2)


def fail(line, status, every_process=False):
    """One line on stderr (from rank 0 only in a distributed run, unless `every_process`)."""
    force = {'force': True} if every_process and utils.is_dist_avail_and_initialized() else {}
    print(line, file=sys.stderr, flush=True, **force)
    sys.exit(status)


if __name__ == '__main__':
    cli()
