"""Progressive unfreezing: schedules as pure functions of the optimizer step.

A stage is the number of transitions done so far; stage s trains the top groups of
`trainable_groups(s)`. Because the stage depends only on the optimizer step (and, for the
epoch trigger, on steps per epoch, which every rank computes the same way), every rank
switches at the same step without talking to the others. Transitions are applied between
optimizer steps, so they always fall on an accumulation boundary.

The plateau trigger is the exception: it depends on a metric, so rank 0 decides and
broadcasts (see `decide_plateau`), and the stage is saved in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftdist.config import UnfreezeConfig
from ftdist.model import numel


@dataclass
class Schedule:
    cfg: UnfreezeConfig
    n_groups: int          # layer groups, bottom to top, head last
    steps_per_epoch: int

    @property
    def n_stages(self) -> int:
        if self.cfg.schedule == "full":
            return 1
        if self.cfg.schedule == "lp-ft":
            return 2
        below_head = self.n_groups - 1
        return 1 + -(-below_head // self.cfg.groups_per_stage)

    def stage_at(self, step: int) -> int:
        """Stage in force for optimizer step `step` (0-based: the step about to be taken)."""
        c = self.cfg
        if c.schedule == "full":
            return 0
        if c.schedule == "lp-ft":
            return 0 if step < c.lp_steps else 1
        if c.on_plateau:
            raise RuntimeError("plateau schedules are stateful; use the stage saved in the run state")
        every = self.steps_per_epoch if c.every_epoch else c.every_steps
        return min(step // every, self.n_stages - 1)

    def transition_step(self, stage: int) -> int | None:
        """First optimizer step of `stage` (None when it is metric-triggered)."""
        c = self.cfg
        if stage == 0:
            return 0
        if c.schedule == "lp-ft":
            return c.lp_steps
        if c.on_plateau:
            return None
        return stage * (self.steps_per_epoch if c.every_epoch else c.every_steps)

    def trainable_groups(self, stage: int) -> list[int]:
        """Indices (bottom = 0) of the groups trained in `stage`."""
        n = self.n_groups
        if self.cfg.schedule == "full" or (self.cfg.schedule == "lp-ft" and stage >= 1):
            return list(range(n))
        if self.cfg.schedule == "lp-ft":
            return [n - 1]
        top = min(n, 1 + stage * self.cfg.groups_per_stage)
        return list(range(n - top, n))

    def unfreeze_stage_of(self, group: int) -> int:
        """The first stage in which `group` trains."""
        return next(s for s in range(self.n_stages) if group in self.trainable_groups(s))


def apply_stage(model, groups, schedule: Schedule, stage: int) -> int:
    """Set requires_grad for `stage` on the (unwrapped) model; return the trainable parameter count.

    Frozen parameters get requires_grad=False, so autograd never computes their gradient and
    never builds a graph below the lowest trainable block (the real saving), and AdamW skips
    them (grad is None): no update, no weight decay, no moment warm-up. No lr=0 emulation.
    """
    trainable = set(schedule.trainable_groups(stage))
    named = dict(model.named_parameters())
    for i, g in enumerate(groups):
        for n in g.params:
            named[n].requires_grad_(i in trainable)
    return sum(numel(p) for p in model.parameters() if p.requires_grad)


def decide_plateau(accelerator, history: list[float], greater_is_better: bool, patience: int = 1) -> bool:
    """Rank 0 decides whether the metric has plateaued; the decision is broadcast so every rank agrees."""
    import torch
    from accelerate.utils import broadcast

    decision = 0
    if accelerator.is_main_process and len(history) > patience:
        best_before = max(history[:-patience]) if greater_is_better else min(history[:-patience])
        recent = history[-patience:]
        improved = any((v > best_before) if greater_is_better else (v < best_before) for v in recent)
        decision = int(not improved)
    flag = torch.tensor([decision], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())
