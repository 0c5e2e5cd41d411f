"""The trainer of one run: the epoch loop (DeiT's), the cut inside it when a pruner's schedule
says so (METHOD.md §7), and the one-shot path of a one-shot pruner (SaViT)."""
import datetime
import gc
import time

import torch
from timm.utils import ModelEmaV3, NativeScaler

import utils
from errors import DiskFullError, RunStopped, UsageError, first_line
from engine import accumulate_scores, evaluate, readable_rows, train_one_epoch
from losses import DistillationLoss
from pruning import format_summary
from pruning.cost import count_flops
from pruning import PruneSchedule
from train import methods, run_dir
from train.recipe import build_criterion, build_optimizer, build_scheduler, scaled_lr, wrap


def check_mask_updates(args, pruner):
    """A method whose schedule updates masks every --prune-steps-update-mask steps (§6) needs at
    least one update between the start of pruning and the cut: with none (a --grad-accum-steps
    that leaves few steps per epoch, or a long update interval), it degenerates into one cut
    at finalize, silently. Refused with the numbers."""
    schedule = pruner.schedule
    if pruner.one_shot or PruneSchedule not in methods.family_of(args.prune_method).settings:
        return
    updates = (schedule.step_final - schedule.step_start) // schedule.steps_update_mask
    if updates < 1:
        raise UsageError(
            f'no mask update falls before the cut: {schedule.steps_per_epoch} optimizer step(s) per epoch '
            f'(--grad-accum-steps {args.grad_accum_steps}), a mask update every {schedule.steps_update_mask} '
            f'(--prune-steps-update-mask {args.prune_steps_update_mask}), pruning from epoch {schedule.start_epoch} '
            f'(step {schedule.step_start}) to the cut at epoch {schedule.finalize_epoch} (step {schedule.step_final}): '
            'use a smaller --grad-accum-steps or --prune-steps-update-mask, or a longer pruning window')


class Trainer:
    """The network (gated and with a pruner's modules while pruning, the cut model after), its
    optimizer, schedule, EMA and checkpoints. Nothing is built until `start` (the one-shot path
    trains nothing, so it builds no optimizer, schedule or EMA)."""

    def __init__(self, args, device, amp, model, pruner=None):
        if pruner is not None and not args.eval:
            check_mask_updates(args, pruner)
        self.args, self.device, self.amp = args, device, amp
        # what the pruner read from files (--latency-table), recorded in every checkpoint
        self.setting_digests = run_dir.setting_digests(args) if pruner is not None else None
        self.model, self.pruner = model, pruner
        self.criterion, self.mixup_fn = build_criterion(args, args.nb_classes, device)
        self.lr = scaled_lr(args)
        # DAP keeps the backbone's rate constant while pruning and after a cut before --epochs,
        # also when resumed after it (METHOD.md §6); WD-Prune follows DeiT's schedule throughout
        self.constant_lr = methods.keeps_lr_constant(args.prune_method)
        # float16 needs a loss scale against underflow; bfloat16 has float32's range and does not
        self.loss_scaler = NativeScaler(device='cuda') if amp == torch.float16 and device.type == 'cuda' else None
        self.max_accuracy = 0.0
        self.run = None
        self.last_checkpoint = None  # (path, epoch) of the newest checkpoint this run can go on from

    # ---- the network being trained ------------------------------------------------------------
    def start(self, checkpoint=None) -> int:
        """Optimizer, schedule and EMA for the model, restored from a --resume checkpoint;
        returns the first epoch to train. Called before the run folder is touched, so that a bad
        --opt or --sched fails first."""
        self.use(self.model, self.pruner, epoch=0)
        return self.resume(checkpoint)

    def use(self, model, pruner, epoch):
        """Train `model` from `epoch` on: DDP wrapper, a new optimizer, DeiT's schedule at that
        epoch unless the rate is constant, and EMA (EMA of a gated model would average masks as
        well as weights: it starts after the cut)."""
        args = self.args
        self.model, self.pruner = model, pruner
        if model.distilled:  # DeiT's loss reads both heads apart; without a teacher, their mean
            model.set_distilled_training(isinstance(self.criterion, DistillationLoss))
        self.n_parameters = model.num_parameters()
        print('number of params:', self.n_parameters)
        extra = pruner.param_groups(self.lr, args.weight_decay) if pruner is not None else ()
        # the optimizer recipe decides which parameters train (--attn-only turns requires_grad
        # off); DDP expects a gradient for every parameter that requires one when it wraps the
        # module, so it wraps after (before, the second step failed: "Expected to have finished
        # reduction in the prior iteration")
        self.optimizer = build_optimizer(args, model, self.lr, extra)
        self.net = wrap(args, self.device, pruner.module if pruner is not None else model)
        self.lr_scheduler = None
        if not self.constant_lr:  # a timm scheduler sets the optimizer's rate when it is built
            self.lr_scheduler = build_scheduler(args, self.optimizer)
            if epoch > 0:
                self.lr_scheduler.step(epoch)
        self.model_ema = None
        if args.model_ema and pruner is None:
            self.model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                                        device='cpu' if args.model_ema_force_cpu else None)

    def resume(self, checkpoint) -> int:
        """The optimizer, schedule, EMA and scaler states of a --resume checkpoint; the next epoch."""
        if checkpoint is None or 'optimizer' not in checkpoint:
            return self.args.start_epoch
        parts = [(self.optimizer, 'optimizer'), (self.lr_scheduler, 'lr_scheduler'),
                 (self.model_ema.module if self.model_ema is not None else None, 'model_ema'),
                 (self.loss_scaler, 'scaler')]
        for part, key in parts:
            if part is None or not checkpoint.get(key):
                continue
            try:
                part.load_state_dict(checkpoint[key])
            except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
                raise UsageError(f'--resume {self.args.resume}: its "{key}" does not fit this run (another '
                                 f'--opt, --sched or set of trained parameters): {first_line(e)}') from None
        self.max_accuracy = checkpoint.get('max_accuracy', 0.0)
        self.last_checkpoint = (self.args.resume, checkpoint['epoch'])
        print(f'Resumed from {self.args.resume} at epoch {checkpoint["epoch"] + 1}')
        return checkpoint['epoch'] + 1

    def attach(self, run):
        """Where the run writes; a pruner's records go to its pruning_log.jsonl."""
        self.run = run
        if self.pruner is not None:
            self.pruner.on_update = run.log_pruning

    # ---- the epoch loop -----------------------------------------------------------------------
    def fit(self, loader_train, loader_val, start_epoch, run):
        args = self.args
        self.attach(run)
        self.steps_per_epoch = len(loader_train) // args.grad_accum_steps
        self.global_step = start_epoch * self.steps_per_epoch
        print(f'Start training for {args.epochs} epochs')
        start_time = time.time()
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, args.epochs):
                self.train_epoch(epoch, loader_train, loader_val)
        except RunStopped as e:
            e.where = self.stopped_at(epoch)
            raise
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        print(f'[rank {utils.get_rank()}] parameter digest {utils.parameter_digest(self.model)}',
              flush=True, **({'force': True} if args.distributed else {}))
        run.close()
        return {'max_accuracy': self.max_accuracy}

    def train_epoch(self, epoch, loader_train, loader_val):
        """One epoch: train, step the schedule, cut or evaluate, log and save."""
        args = self.args
        # an epoch's randomness depends on (seed, epoch, rank) only: resuming repeats it exactly
        utils.seed_everything(args.seed + 1000 * epoch + utils.get_rank())
        loader_train.sampler.set_epoch(epoch)
        train_stats, self.global_step = train_one_epoch(
            self.net, self.criterion, loader_train, self.optimizer, self.device, epoch,
            self.loss_scaler, max_norm=args.clip_grad, model_ema=self.model_ema,
            mixup_fn=self.mixup_fn, accum_steps=args.grad_accum_steps, amp=self.amp,
            print_freq=args.print_freq, writer=self.run.writer, pruner=self.pruner,
            global_step=self.global_step, set_training_mode=args.train_mode,
            count_unreadable=args.skip_bad_images)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step(epoch + 1)
        if self.pruner is not None and epoch + 1 == self.pruner.schedule.finalize_epoch:
            cut, test_stats = self.cut(loader_val, epoch)
            self.use(cut, None, epoch + 1)  # training goes on with the cut model
        else:
            test_stats = self.evaluate(loader_val)
        print(f'Accuracy of the network on the {len(loader_val.dataset)} test images: {test_stats["acc1"]:.1f}%')
        self.end_epoch(epoch, train_stats, test_stats)

    def stopped_at(self, epoch) -> str:
        """Where a stopped run stood, and what continues it."""
        return f'in epoch {epoch} of {self.args.epochs}: {self.resume_hint()}'

    def resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return 'no checkpoint was written, nothing to resume: start it again'
        path, saved = self.last_checkpoint
        return f'--resume {path} continues it from epoch {saved + 1}'

    def evaluate_only(self, loader_val):
        """--eval: the model's accuracy; nothing is written."""
        try:
            return self.evaluate(loader_val)
        except RunStopped as e:
            e.where = 'during --eval: nothing was written'
            raise

    def evaluate(self, loader_val, model=None):
        """The model's accuracy (with a pruner, also its auxiliary heads')."""
        if model is None:
            model = self.pruner.module if self.pruner is not None else self.model
        return evaluate(loader_val, model, self.device, amp=self.amp, print_freq=self.args.print_freq,
                        count_unreadable=self.args.skip_bad_images)

    def end_epoch(self, epoch, train_stats, test_stats):
        """DeiT's log.txt line, checkpoint.pth (with the pruner's state while pruning) and
        best_checkpoint.pth. The log line comes first: a checkpoint records how many lines each
        log had when it was saved, and a run that continues from it cuts them back to that."""
        self.run.log({**{f'train_{k}': v for k, v in train_stats.items()},
                      **{f'test_{k}': v for k, v in test_stats.items()},
                      'epoch': epoch, 'n_parameters': self.n_parameters}, epoch)
        ckpt = {
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            'epoch': epoch,
            'scaler': self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            'args': vars(self.args),
            'max_accuracy': max(self.max_accuracy, test_stats['acc1']),
            'steps_per_epoch': self.steps_per_epoch,
            'log_lines': dict(self.run.lines),
        }
        if self.model_ema is not None:
            ckpt['model_ema'] = self.model_ema.module.state_dict()
        if self.model.is_cut:
            ckpt['arch'] = self.model.arch()
        if self.pruner is not None:
            ckpt['pruner'] = self.pruner.state_dict()
            ckpt['setting_digests'] = self.setting_digests
        try:
            self.run.save('checkpoint.pth', ckpt)
            if self.run.dir is not None:
                self.last_checkpoint = (self.run.dir / 'checkpoint.pth', epoch)
            if test_stats['acc1'] > self.max_accuracy:
                self.max_accuracy = test_stats['acc1']
                self.run.save('best_checkpoint.pth', ckpt)
        except DiskFullError as e:
            raise DiskFullError(f'{e}; {self.resume_hint()}') from None
        print(f'Max accuracy: {self.max_accuracy:.2f}%')

    # ---- the cut ------------------------------------------------------------------------------
    def cut(self, loader_val, epoch):
        """METHOD.md §7: binarise, cut, report, measure the cut model and write
        first_sparse_checkpoint.pth; (cut model, its test stats)."""
        args = self.args
        params_before = self.model.num_parameters()
        flops_before = count_flops(self.model, args.input_size, self.device)
        # the cut model is built while the gated one still exists: not also beside the DDP
        # wrapper (its gradient buckets) and the optimizer (AdamW: twice the trained weights)
        self.net = self.optimizer = self.lr_scheduler = self.model_ema = None
        self.release_memory()
        cut, rows = self.pruner.finalize()
        budget = self.pruner.final_budget
        # nor the new optimizer and wrapper beside the gated model and the pruner's heads
        self.model, self.pruner = cut, None
        self.release_memory()
        params_after = cut.num_parameters()
        flops_after = count_flops(cut, args.input_size, self.device)
        print(format_summary(rows, flops_before, flops_after, params_before, params_after, budget))
        summary = {'event': 'finalize', 'method': args.prune_method, 'epoch': epoch, 'sub_blocks': rows,
                   'params_dense': params_before, 'params_cut': params_after,
                   'flops_dense': flops_before, 'flops_cut': flops_after,
                   'depth': cut.depth, 'embed_dim': cut.embed_dim, **(budget or {})}
        self.run.log_pruning(summary)
        print('Accuracy of the cut model:')
        test_stats = self.evaluate(loader_val, cut)
        self.run.save('first_sparse_checkpoint.pth', {
            'model': cut.state_dict(), 'arch': cut.arch(), 'args': vars(args), 'epoch': epoch,
            'acc1': test_stats['acc1'], 'summary': summary})
        return cut, test_stats

    def release_memory(self):
        """Collect what was just let go of (modules hold reference cycles) and, on CUDA, hand
        its cached blocks back, so the next allocation finds them free."""
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()

    def prune_one_shot(self, loader_train, loader_val, run):
        """A one-shot pruner (SaViT, docs/BASELINES.md): scores over a share of an epoch without
        weight updates, its calibration, the cut. Fine-tuning is the second command."""
        try:
            return self._prune_one_shot(loader_train, loader_val, run)
        except RunStopped as e:
            e.where = f'while {self.args.prune_method} scored and cut (one shot): start it again'
            raise

    def readable_batches(self, loader):
        """(images, targets) of `loader` on the device without the rows of unreadable images
        (--skip-bad-images marks them with the target UNREADABLE, -1: a device-side assert in
        the loss on CUDA); a batch with none left is skipped."""
        for images, targets in loader:
            images, targets, _ = readable_rows(images, targets, fill=False)
            if len(targets):
                yield images.to(self.device), targets.to(self.device)

    def _prune_one_shot(self, loader_train, loader_val, run):
        args, pruner = self.args, self.pruner
        self.attach(run)
        steps = pruner.score_batches(len(loader_train))
        print(f'{args.prune_method}: scores over {steps} of {len(loader_train)} training batches')
        loader_train.sampler.set_epoch(0)
        # DDP gives every process rank 0's weights; the scores skip its all-reduce of the weight
        # gradients (accumulate_scores)
        accumulate_scores(wrap(args, self.device, pruner.module), self.criterion, loader_train, self.device,
                          pruner, steps, amp=self.amp, mixup_fn=self.mixup_fn, print_freq=args.print_freq,
                          set_training_mode=args.train_mode)
        pruner.calibrate(self.readable_batches(loader_train), torch.nn.CrossEntropyLoss())
        del pruner  # the cut lets go of it
        cut, test_stats = self.cut(loader_val, 0)
        run.log({**{f'test_{k}': v for k, v in test_stats.items()}, 'epoch': 0,
                 'n_parameters': cut.num_parameters()}, 0)
        run.close()
        return {'max_accuracy': test_stats['acc1']}
