"""The training recipe of a run, DeiT's: datasets and loaders, the model (dense, or rebuilt
from a cut checkpoint) with its starting weights, optimizer, scheduler, loss and device.
Scripts that train or measure like main.py build their parts here."""
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2

import models
import utils
from datasets import ShardSampler, build_dataset, build_transform
from losses import DistillationLoss
from errors import UsageError, first_line
from models.checkpoint import timm_pretrained_checkpoint
from train.checkpoints import load_checkpoint_file


def setup_device(args):
    """(device, amp): amp is the autocast dtype or None: --amp-dtype on CUDA (float16 by
    default, as DeiT), on the CPU only bfloat16 when asked for; seeds; flush float32
    denormals on the CPU."""
    device = torch.device(args.device)
    utils.seed_everything(args.seed + utils.get_rank())
    if device.type == 'cuda':
        cudnn.benchmark = True
    else:
        # masked paths and AdamW's decaying second moments underflow into float32 denormals,
        # which CPUs multiply about 10x slower (a pruning epoch went from 5 s to 50 s)
        torch.set_flush_denormal(True)
    dtype = getattr(torch, args.amp_dtype)
    if not args.amp or (device.type != 'cuda' and dtype != torch.bfloat16):
        print('autocast: off')
        return device, None
    if device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f'--amp-dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 '
                         '(use float16, the default)')
    print(f'autocast: {args.amp_dtype} ({"a loss scale" if dtype == torch.float16 else "no loss scale"})')
    return device, dtype


def build_datasets(args):
    try:
        dataset_train, nb_classes = build_dataset(is_train=True, args=args)
        dataset_val, _ = build_dataset(is_train=False, args=args)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e))
    return dataset_train, dataset_val, nb_classes


def build_loaders(args, dataset_train, dataset_val):
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed and args.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler_train = RepeatAugSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True)
    else:
        # also in a single process, so that the order of an epoch depends on (seed, epoch) only
        sampler_train = torch.utils.data.DistributedSampler(
            dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    if args.distributed and args.dist_eval:
        sampler_val = ShardSampler(dataset_val, num_replicas=world, rank=rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    pin = args.pin_mem and str(args.device).startswith('cuda')
    loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size,
        num_workers=args.num_workers, pin_memory=pin, drop_last=True,
        # not persistent: workers seed from the torch RNG, just reseeded for this epoch, when
        # the epoch's iterator starts; persistent ones keep the RNG of this process's first
        # epoch, and a resumed run would augment differently from the uninterrupted one
        persistent_workers=False)
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
        num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    if not args.eval and len(loader_train) < args.grad_accum_steps:
        raise UsageError(f'the training set gives {len(loader_train)} batches of {args.batch_size} '
                         f'per process, fewer than --grad-accum-steps {args.grad_accum_steps}')
    return loader_train, loader_val


def steps_per_epoch(args, loader_train) -> int:
    """Optimizer steps per epoch: the pruning schedule counts these (METHOD.md §6)."""
    return len(loader_train) // args.grad_accum_steps


def model_arch(args, model_path_checkpoint, resume_checkpoint):
    """The `arch` to rebuild (§7), or None for the dense model: always a --resume checkpoint's,
    a --model-path one's only with --resize-model-by-checkpoint."""
    if resume_checkpoint is not None and resume_checkpoint.get('arch') is not None:
        arch, source = resume_checkpoint['arch'], f'--resume {args.resume}'
    elif model_path_checkpoint is not None and model_path_checkpoint.get('arch') is not None:
        if args.prune_method is not None:  # (with --resize-model-by-checkpoint, check_args refused it)
            raise UsageError(f'--model-path {args.model_path} holds a cut model (it has "arch"): --prune-method '
                             f'{args.prune_method} needs an uncut one (its gates are sized by the dense ViT); '
                             'prune the dense weights, or fine-tune the cut model without --prune-method')
        if not args.resize_model_by_checkpoint:
            raise UsageError(f'--model-path {args.model_path} holds a cut model (it has "arch"): '
                             'add --resize-model-by-checkpoint to rebuild it')
        arch, source = model_path_checkpoint['arch'], f'--model-path {args.model_path}'
    elif args.resize_model_by_checkpoint:
        raise UsageError('--resize-model-by-checkpoint needs a --model-path with "arch" '
                         f'(a first_sparse_checkpoint.pth); {args.model_path or "no --model-path"} has none')
    else:
        return None
    try:
        models.check_arch(arch)
    except ValueError as e:
        raise UsageError(f'{source}: {e}') from None
    if arch['family'] != args.model:
        raise UsageError(f'{source} holds a cut {arch["family"]}, but --model is {args.model}')
    return arch


def build_model(args, nb_classes, resume_checkpoint=None):
    """The model to train: dense, or the cut architecture stored in a checkpoint, with the
    weights of --model-path, or timm's of --model with --pretrained, fitted to it (foreign
    layouts converted, classifier reset, pos_embed resampled)."""
    kwargs = dict(num_classes=nb_classes, img_size=args.input_size, drop_rate=args.drop,
                  drop_path_rate=args.drop_path)
    checkpoint = load_checkpoint_file(args.model_path, '--model-path') if args.model_path else None
    arch = model_arch(args, checkpoint, resume_checkpoint)
    model = models.load_model(None if arch is None else {'arch': arch}, args.model, weights=False, **kwargs)
    flag, weights = '--model-path', args.model_path
    if args.pretrained:
        checkpoint, flag, weights = pretrained_checkpoint(args), '--pretrained', f'timm\'s {args.model}'
    if checkpoint is not None:
        try:
            state_dict, notes = models.pretrained_state_dict(model, checkpoint)
        except ValueError as e:
            raise UsageError(f'{flag} {weights}: {e}')
        model.load_state_dict(state_dict)
        print(f'Loaded weights from {weights}' + ''.join(f'; {n}' for n in notes))
    return model


def pretrained_checkpoint(args) -> dict:
    """timm's pretrained weights of --model (`timm_pretrained_checkpoint`); UsageError (one line)."""
    if args.model_path:
        raise UsageError(f'--pretrained and --model-path {args.model_path} both name the starting weights: '
                         'give one')
    try:
        return timm_pretrained_checkpoint(args.model)
    except ValueError as e:
        raise UsageError(f'--pretrained: {first_line(e)}') from None
    except (RuntimeError, OSError) as e:  # a failed download, a damaged cached file
        raise UsageError(f'--pretrained {args.model}: timm could not load its weights: '
                         f'{type(e).__name__}: {first_line(e)}') from None


def wrap(args, device, net):
    """DDP in a distributed run (its gradients all-reduced), else the module itself."""
    if not args.distributed:
        return net
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[args.gpu] if device.type == 'cuda' else None)


def scaled_lr(args) -> float:
    """DeiT's linear scaling, lr · batch · world · accum / 512 (--lr-soft-head is used as given,
    as the authors do)."""
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * utils.get_world_size() * args.grad_accum_steps / 512.0


def _optimizer(args, param_groups, lr):
    kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas is not None:
        kwargs['betas'] = args.opt_betas
    return create_optimizer_v2(param_groups, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, **kwargs)


def attn_only(model):
    """DeiT's --attn-only: only the attention layers, the head and the position embedding
    train; the gates keep their gradients (the pruner scores them)."""
    for name, p in model.named_parameters():
        if not models.is_gate(name):
            p.requires_grad_('.attn.' in name or name.startswith(('head.', 'head_dist.')) or name == 'pos_embed')


def build_optimizer(args, model, lr, extra_param_groups=()):
    if args.attn_only:
        attn_only(model)
    # gates (METHOD.md §2) receive gradients but are set by the pruner only
    gates = {id(p) for p in model.gate_parameters()}
    groups = param_groups_weight_decay(model, args.weight_decay, model.no_weight_decay())
    for g in groups:
        g['params'] = [p for p in g['params'] if id(p) not in gates]
    return _optimizer(args, groups + list(extra_param_groups), lr)


def check_recipe(args):
    """The names timm takes (--opt, --opt-betas, --sched; --aa, --train-interpolation, --remode),
    tried on one parameter and on the transform alone before any data is read: timm's registries
    are the lists of names, and an unknown one would fail late, in a traceback."""
    try:
        build_transform(is_train=True, args=args)
    except Exception as e:  # timm asserts, or looks the name up in a dict
        raise UsageError(f'--aa {args.aa}, --train-interpolation {args.train_interpolation}, --remode '
                         f'{args.remode}: timm cannot build the training transform: {first_line(e)}') from None
    try:
        optimizer = _optimizer(args, [torch.nn.Parameter(torch.zeros(2))], args.lr)
    except Exception as e:  # timm raises ValueError, AssertionError, IndexError, ImportError ...
        betas = f' --opt-betas {" ".join(map(str, args.opt_betas))}' if args.opt_betas is not None else ''
        raise UsageError(f'--opt {args.opt}{betas}: timm cannot build it: {first_line(e)}') from None
    try:
        build_scheduler(args, optimizer)
    except Exception as e:
        raise UsageError(f'--sched {args.sched}: timm cannot build it: {first_line(e)}') from None


def build_scheduler(args, optimizer):
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, noise=args.lr_noise, noise_pct=args.lr_noise_pct,
        noise_std=args.lr_noise_std)
    return scheduler


def build_teacher(args, nb_classes, device):
    """The distillation teacher (DeiT's --teacher-model with --teacher-path's weights, or the
    cut or dense model of a checkpoint of this project, by its arch) in eval mode on the
    device; None without distillation. UsageError (one line) before anything is trained."""
    if args.distillation_type == 'none':
        return None
    if not args.teacher_path:
        raise UsageError(f'--distillation-type {args.distillation_type} needs --teacher-path: the teacher\'s '
                         'weights (a file, file:// or URL, or a checkpoint of this project)')
    ckpt = load_checkpoint_file(args.teacher_path, '--teacher-path')
    extra = {'img_size': args.input_size} if ckpt.get('arch') is None and models.is_supported(args.teacher_model) else {}
    try:
        teacher = models.load_model(ckpt, args.teacher_model, num_classes=nb_classes, **extra) \
            if ckpt.get('arch') is None else models.load_model(ckpt)
    except ValueError as e:
        what = 'its arch' if ckpt.get('arch') is not None else f'--teacher-model {args.teacher_model}'
        # a dense checkpoint of this project stores no arch, only the --model it was trained as
        saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
        recorded = saved.get('model') if isinstance(saved.get('model'), str) else None
        hint = f'; it is a dense checkpoint of --model {recorded}: pass --teacher-model {recorded}' \
            if ckpt.get('arch') is None and recorded and models.is_supported(recorded) and recorded != args.teacher_model else ''
        raise UsageError(f'--teacher-path {args.teacher_path} ({what}): {first_line(e)}{hint}') from None
    size = getattr(teacher, 'img_size', args.input_size)
    if size != args.input_size:  # its position embedding is for another grid: the forward would fail
        raise UsageError(f'--teacher-path {args.teacher_path}: the teacher was made at {size} px, this run\'s '
                         f'--input-size is {args.input_size}: it sees the student\'s images; use a teacher '
                         f'made at {args.input_size} px')
    classes = getattr(teacher, 'num_classes', nb_classes)
    if classes != nb_classes:
        raise UsageError(f'--teacher-path {args.teacher_path}: the teacher has {classes} classes, '
                         f'{args.data_set} has {nb_classes}')
    print(f'Teacher: {args.teacher_path} ({sum(p.numel() for p in teacher.parameters()):,} parameters), '
          f'{args.distillation_type} distillation, alpha {args.distillation_alpha}, tau {args.distillation_tau}')
    return teacher.to(device)


def build_criterion(args, nb_classes, device=None):
    """DeiT's loss and mixup: (criterion, mixup_fn or None); with --distillation-type, the loss
    wraps the teacher (losses.DistillationLoss)."""
    criterion, mixup_fn = _label_criterion(args, nb_classes)
    teacher = build_teacher(args, nb_classes, device or torch.device('cpu'))
    if teacher is None:
        return criterion, mixup_fn
    return DistillationLoss(criterion, teacher, args.distillation_type, args.distillation_alpha,
                            args.distillation_tau), mixup_fn


def _label_criterion(args, nb_classes):
    mixup = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=nb_classes) if mixup else None
    if args.bce_loss:
        # DeiT: targets.gt(0.0) after mixup; class indices become one-hot (--smoothing is 0)
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0), mixup_fn
    if not mixup:
        if args.smoothing > 0.:
            return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
        return torch.nn.CrossEntropyLoss(), None
    return SoftTargetCrossEntropy(), mixup_fn  # smoothing is folded into the mixup targets
