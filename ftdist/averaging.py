"""Averaged weights: an exponential moving average (EMA) of the weights during training, and the mean of
the last k checkpoints at the end. Each gives a model exported and evaluated beside the plain final one.

Every rank keeps the average of the tensors it holds (`Backend.local_weights`): whole parameters on one
process, DDP and ZeRO-2 (one fp32 copy of the model per rank), this rank's slice under ZeRO-3 (1/world of
a copy). Whole tensors are gathered only to write them: at each checkpoint (`ema.safetensors`, by
parameter name, so the EMA resumes on any world size and backend) and at export, where the averaged
weights are swapped into the model, gathered the way the model itself is, and swapped back.

The EMA decay warms up as min(decay, (1 + t) / (10 + t)) at step t, so that a short fine-tune's average
is not dominated by the pretrained start; it is a function of the step, so a resumed EMA is exact.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ftdist.errors import CheckpointError, FtdistError

log = logging.getLogger("ftdist")

EMA_FILE = "ema.safetensors"


class EMA:
    def __init__(self, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    def start(self, run) -> None:
        self.shadow = {n: t.detach().float().clone() for n, t in run.backend.local_weights(run)}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, run, step: int) -> None:
        names, live = zip(*run.backend.local_weights(run))
        shadow = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadow, [t.float() for t in live], 1.0 - self.decay_at(step))

    def save(self, run, folder: Path) -> None:
        """Collective: every rank calls it; the main process writes the whole tensors."""
        from safetensors.torch import save_file

        whole = full_weights(run, self.shadow)
        if run.acc.is_main_process:
            save_file({n: t.contiguous() for n, t in whole.items()}, str(folder / EMA_FILE))

    def load(self, run, folder: Path) -> bool:
        """The EMA of checkpoint `folder`, on this rank's layout; False if the checkpoint has none."""
        f = folder / EMA_FILE
        if not f.is_file():
            return False
        from safetensors.torch import load_file

        try:
            whole = load_file(str(f))
        except Exception as e:  # noqa: BLE001  (a damaged file surfaces as several exception types)
            raise CheckpointError(f"checkpoint {str(folder)!r}: {EMA_FILE} could not be read ({e}). Resume from an "
                                  "older checkpoint, or turn train.ema_decay off for this run") from None
        local = dict(run.backend.local_weights(run))
        if set(whole) != set(local):
            raise CheckpointError(f"checkpoint {str(folder)!r}: {EMA_FILE} does not hold this model's parameters")
        check_layout(run)
        self.shadow = {n: run.backend.to_local(whole[n], t).float().clone() for n, t in local.items()}
        return True


@contextlib.contextmanager
def swapped(run, weights: dict[str, torch.Tensor]):
    """The model holds `weights` (this rank's tensors, as local_weights lays them out) inside the block."""
    saved = run.backend.swap(run, weights)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, old in saved:
                t.copy_(old)


def full_weights(run, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors on the CPU of this rank's `weights` (collective under ZeRO-3)."""
    return run.backend.whole(run, weights)


def check_layout(run) -> None:
    """Where the optimizer holds the weights in its own partitions (ZeRO), whole tensors built from this
    rank's slices must equal the optimizer's gathered ones: checked on the live weights before averaged
    weights are placed that way (a mismatch would scramble them silently)."""
    reference = run.backend.full_state(run)
    if reference is None:
        return
    local = dict(run.backend.local_weights(run))
    whole = full_weights(run, local)
    for n, t in local.items():
        if not torch.equal(whole[n].to(t.dtype), reference.weights[n].to(t.dtype)):
            raise FtdistError(f"averaged weights: parameter {n} is laid out on this rank differently from what ftdist "
                              "expects, so averaged weights cannot be placed safely. Turn train.ema_decay and "
                              "checkpoint.average_last off for this backend, and please report it with `ftdist env`")


def checkpoint_mean(run, folders: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of the weights of checkpoint `folders` (whole tensors, summed one checkpoint at a time:
    two copies of the model in memory), as this rank's tensors."""
    from ftdist import checkpoint, portable

    total: dict[str, torch.Tensor] = {}
    for f in folders:
        fs = portable.read(f, checkpoint.read_state(f))
        for n, t in fs.weights.items():
            total[n] = total[n].add_(t.float()) if n in total else t.float().clone()
    check_layout(run)
    return {n: run.backend.to_local(total[n] / len(folders), t).float()
            for n, t in run.backend.local_weights(run)}


def hook(run):
    """The per-step hook that moves the EMA (None when the recipe keeps none). It runs before the step's
    checkpoint, so a checkpoint's EMA includes its step."""
    if run.ema is None:
        return None
    return lambda run, out: run.ema.update(run, out.step)


def averaged_models(run) -> dict[str, dict]:
    """Each averaged model of the recipe evaluated like the final one and exported to <run>/model-<name>:
    {name: {"validation": ..., "test": ..., ...}}. Called after the final checkpoint is saved."""
    from ftdist import checkpoint, evaluation

    r, out = run.recipe, {}
    todo = []
    if run.ema is not None:
        todo.append(("ema", lambda: run.ema.shadow, {"decay": r.train.ema_decay}))
    if r.checkpoint.average_last:
        folders = checkpoint.complete_checkpoints(str(run.run_dir))[-r.checkpoint.average_last:]
        if len(folders) < r.checkpoint.average_last and run.acc.is_main_process:
            log.warning("checkpoint.average_last=%d: the run saved %d checkpoints; averaging those",
                        r.checkpoint.average_last, len(folders))
        todo.append(("avg", lambda: checkpoint_mean(run, folders), {"checkpoints": [f.name for f in folders]}))
    for name, weights, about in todo:
        with swapped(run, weights()):
            result = {**about, **evaluation.final(run)}
            if r.checkpoint.export:
                checkpoint.export(run.acc, run.model, run.tokenizer, run.run_dir / f"model-{name}", run.recipe_yaml, result)
        out[name] = result
    return out
