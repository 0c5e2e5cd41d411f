"""When things happen (METHOD.md §6). Steps are optimizer steps, counted from 0 over the run."""
from dataclasses import dataclass


@dataclass(frozen=True)
class PruneSchedule:
    steps_per_epoch: int
    start_epoch: int = 5        # warm-up: heads train, no masking; ΔΨ accumulates from here
    sparse_epoch: int = 25      # κ ramp done; sharpening of the soft masks starts
    finalize_epoch: int = 50    # last update, binarise, cut
    steps_update_mask: int = 100
    tau_max: float = 0.1
    tau_min: float = 0.0

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise ValueError(f'steps per epoch must be at least 1, got {self.steps_per_epoch}')
        if self.steps_update_mask < 1:
            raise ValueError(f'--prune-steps-update-mask must be at least 1, got {self.steps_update_mask}')
        if not 0 <= self.start_epoch <= self.sparse_epoch <= self.finalize_epoch:
            raise ValueError('pruning epochs must satisfy 0 <= --prune-start-epoch <= '
                             '--prune-sparse-epoch <= --prune-finalize-epoch, got '
                             f'{self.start_epoch}, {self.sparse_epoch}, {self.finalize_epoch}')
        if self.finalize_epoch < 1:
            raise ValueError('--prune-finalize-epoch must be at least 1')
        if not 0 <= self.tau_min <= self.tau_max:
            raise ValueError(f'need 0 <= --pr-tau-min <= --pr-tau-max, got {self.tau_min}, {self.tau_max}')

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
