"""`train.lr: auto`: an LR range test before training picks the head's peak LR.

The test trains the recipe's first unfreeze stage (the head alone under gradual unfreezing, everything
under `full`) for up to STEPS optimizer steps, the LR growing exponentially from LOW to HIGH for every
optimizer group alike (so layer-wise decay keeps its ratios), and stops once the loss diverges. Each
step is the real training step (global batch, accumulation, any backend), so the loss it records is
the global one: every rank sees the same curve and takes the same decision, which rank 0's is then
broadcast to make certain of. The pick is a tenth of the LR at the lowest smoothed loss (fastai's
`lr_min` rule): the lowest point is already past the fastest descent.

Then everything the test touched is put back: the weights it started from, the RNG states, the run
state; the optimizer, its schedule and the backend's wrapping are built fresh, as for any run.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("ftdist")

STEPS = 100
LOW, HIGH = 1e-7, 1.0
SMOOTHING = 0.98   # exponential smoothing of the loss curve (bias-corrected)
DIVERGED = 4.0     # stop when the smoothed loss exceeds this many times its minimum
FILE = "lr_find.json"


@dataclass
class Found:
    lr: float
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    rule: str = "a tenth of the LR at the lowest smoothed loss"

    def to_dict(self) -> dict:
        return asdict(self)


def saved_lr(recipe) -> float | None:
    """The LR a run that is being resumed chose when it started (its checkpoint's recipe)."""
    import yaml

    from ftdist import checkpoint

    path = checkpoint.resolve_resume(recipe.log.output_dir, recipe.checkpoint.resume)
    if path is None or not (path / "recipe.yaml").is_file():
        return None
    lr = (yaml.safe_load((path / "recipe.yaml").read_text()) or {}).get("train", {}).get("lr")
    return lr if isinstance(lr, float) else None


def pick(lrs: list[float], losses: list[float]) -> tuple[float, list[float]]:
    """(the LR chosen, the smoothed curve) from a range test's (lr, loss) points."""
    smoothed, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smoothed.append(avg / (1 - SMOOTHING ** (i + 1)))
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    return lrs[best] / 10, smoothed


def range_test(run, train_step) -> Found:
    """Runs on every rank, between the run's setup and its first stage; leaves the run as it found it.
    `train_step(run, window) -> train.Step` is the loop's own optimizer step."""
    from ftdist.collectives import broadcast_float
    from ftdist.errors import NonFiniteError

    acc, st = run.acc, run.state
    start = {n: p.detach().clone() for n, p in run.net.named_parameters()}
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    run.enter_stage(run.stage_for(0), first=True)
    # every group's LR is its ratio to the head's (the recipe's lr is 1.0 here) times the LR under test
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.raw_optimizer, lambda i: LOW * (HIGH / LOW) ** (i / (STEPS - 1)))
    lrs, losses = [], []
    try:
        while len(losses) < STEPS:
            run.sampler.set_epoch(st.epoch, 0)
            for window in _windows(run):
                lr = run.scheduler.get_last_lr()[0]
                loss = train_step(run, window).loss
                st.step += 1
                if not math.isfinite(loss):
                    break
                lrs.append(lr)
                losses.append(loss)
                _, smoothed = pick(lrs, losses)
                if len(losses) >= STEPS or smoothed[-1] > DIVERGED * min(smoothed):
                    break
            else:
                st.epoch += 1
                continue
            break
    except NonFiniteError:
        pass  # DeepSpeed cannot skip a non-finite step: the LR under test had diverged
    if not losses:
        raise NonFiniteError(f"train.lr=auto: the LR range test had no finite loss, even at lr {LOW:g}; check the data, "
                             "or set train.lr")
    lr, smoothed = pick(lrs, losses)
    lr = broadcast_float(acc, lr)  # the same on every rank already (global losses); made certain
    run.backend.release(run)
    run.backend.restore_weights(run, start)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    run.state = type(st)(world_size=acc.num_processes)
    if acc.is_main_process:
        log.info("train.lr=auto: %.3g (LR range test: %d steps from %g; %s)", lr, len(losses), LOW, Found(lr).rule)
    return Found(lr, lrs, losses, smoothed)


def _windows(run):
    it = iter(run.train_loader)
    for _ in range(run.steps_per_epoch):
        yield [next(it) for _ in range(run.plan.accumulation)]


def write(run_dir: Path, found: Found) -> None:
    """lr_find.json and lr_find.png (the curve, with the pick) in the run folder, for the report."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run_dir / FILE).write_text(json.dumps(found.to_dict(), indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(found.lrs, found.losses, alpha=0.3, label="loss")
    ax.plot(found.lrs, found.smoothed, label="smoothed")
    ax.axvline(found.lr, color="k", linestyle="--", label=f"chosen {found.lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "lr_find.png", dpi=100)
    plt.close(fig)
