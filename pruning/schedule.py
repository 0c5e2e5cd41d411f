"""When things happen (METHOD.md §6). Steps are optimizer steps, counted from 0 over the run."""
from dataclasses import dataclass

from .protocol import ConfigError, setting


@dataclass(frozen=True)
class PruneSchedule:
    steps_per_epoch: int
    # warm-up: heads train, no masking; ΔΨ accumulates from here
    start_epoch: int = setting(5, flag='--prune-start-epoch', kind='int',
                               help='warm-up epochs before masking starts')
    sparse_epoch: int = setting(25, flag='--prune-sparse-epoch', kind='int',
                                help='epoch at which the keep-ratio ramp ends and masks start to sharpen')
    finalize_epoch: int = 50    # last update, binarise, cut
    # the command line's auto: about 3 per epoch (the authors' advice), train/methods/dap.py
    steps_update_mask: int = setting(100, flag='--prune-steps-update-mask', kind='steps_or_auto', flag_default='auto',
                                     help='optimizer steps between mask updates, or "auto" for about 3 per epoch')
    tau_max: float = setting(0.1, flag='--pr-tau-max', kind='real', help='soft-mask temperature before sharpening')
    tau_min: float = setting(0.0, flag='--pr-tau-min', kind='real', help='soft-mask temperature at finalize')

    def __post_init__(self):
        for name in ('steps_per_epoch', 'steps_update_mask', 'finalize_epoch'):
            if getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        if self.start_epoch < 0:
            raise ConfigError('start_epoch', f'must not be negative, got {self.start_epoch}')
        if self.start_epoch > self.sparse_epoch:
            raise ConfigError('start_epoch', f'{self.start_epoch} is after the sparse epoch {self.sparse_epoch}')
        if self.sparse_epoch > self.finalize_epoch:
            raise ConfigError('sparse_epoch', f'{self.sparse_epoch} is after the finalize epoch {self.finalize_epoch}')
        if self.tau_min < 0:
            raise ConfigError('tau_min', f'must not be negative, got {self.tau_min}')
        if self.tau_min > self.tau_max:
            raise ConfigError('tau_min', f'{self.tau_min} is above the largest temperature {self.tau_max}')

    @property
    def step_start(self) -> int:
        return self.start_epoch * self.steps_per_epoch

    @property
    def step_sparse(self) -> int:
        return self.sparse_epoch * self.steps_per_epoch

    @property
    def step_final(self) -> int:
        return self.finalize_epoch * self.steps_per_epoch

    def is_active(self, step: int) -> bool:
        """Scores accumulate during [step_start, step_final)."""
        return self.step_start <= step < self.step_final

    def is_update(self, step: int) -> bool:
        """A mask update after every `steps_update_mask` active steps."""
        return self.is_active(step) and (step + 1 - self.step_start) % self.steps_update_mask == 0

    def ramp_progress(self, step: int) -> float:
        """ρ = clamp((step + 1 − step_start) / (step_sparse − step_start), 0, 1)."""
        span = self.step_sparse - self.step_start
        if span <= 0:
            return 1.0
        return min(max((step + 1 - self.step_start) / span, 0.0), 1.0)

    def tau(self, step: int) -> float:
        """τ_max until step_sparse, then linearly down to τ_min at step_final."""
        span = self.step_final - self.step_sparse
        if step + 1 <= self.step_sparse:
            return self.tau_max
        if span <= 0:
            return self.tau_min
        f = min((step + 1 - self.step_sparse) / span, 1.0)
        return self.tau_max + (self.tau_min - self.tau_max) * f
