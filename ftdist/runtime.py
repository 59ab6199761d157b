"""Backend plumbing kept in one place: the Accelerator, (re-)preparing at unfreeze transitions, signals.

The training loop never branches on the backend; everything that differs between one process,
DDP and DeepSpeed ZeRO lives here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal

import torch

from ftdist.config import Recipe
from ftdist.errors import FtdistError, PeerFailureError

PREEMPTED_EXIT = 99  # distinct status: "checkpoint saved on a signal; requeue me"


def world_from_env() -> tuple[int, int]:
    """(world size, node count) as set by accelerate launch / torchrun, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or world  # processes on this node
    return world, max(1, world // local)


def make_accelerator(recipe: Recipe, accumulation: int, log_with=None, project_dir=None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = recipe.train.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise FtdistError("train.precision: fp16 needs a CUDA GPU and none is visible. On CPU use train.precision=bf16 "
                          "(or no)")
    # gloo on CPU: accelerate otherwise picks a backend that is not there and silently runs each
    # rank as its own one-process job (DEVELOPERS.md). The timeout bounds how long a dead rank can hang the rest.
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if on_cpu:
        # Before deepspeed is first imported: a ZeRO run needs it to form a CPU world, and any other run
        # imports deepspeed too (accelerate's unwrap_model, at export), which otherwise warns on every
        # CPU machine that it was "unable to detect" an accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # (only when there is a world to form: a backend given to a single process makes accelerate
    # believe it is distributed)
    backend = "gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    pg = InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=recipe.train.timeout_s))
    acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accumulation,
                      kwargs_handlers=[pg], log_with=log_with, project_dir=project_dir,
                      # cpu=True is what makes a CPU-only DDP world form (without it each rank runs alone);
                      # DeepSpeed must not get it (it would fall back to plain DDP), DS_ACCELERATOR does the job.
                      cpu=on_cpu and not deepspeed)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world_env:
        raise FtdistError(f"launcher asked for {world_env} processes but accelerate formed a world of {acc.num_processes}; "
                          "on CPU the processes need the gloo backend (set by ftdist) and, for DeepSpeed, DS_ACCELERATOR=cpu")
    return acc


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int | None:
    return acc.state.deepspeed_plugin.zero_stage if is_deepspeed(acc) else None


def configure_deepspeed(acc, recipe: Recipe, per_device: int) -> None:
    """Values the recipe owns go into DeepSpeed's config here; the preset has them as "auto"."""
    if not is_deepspeed(acc):
        return
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = per_device
    cfg["gradient_clipping"] = recipe.train.max_grad_norm or 0.0
    cfg["train_batch_size"] = per_device * acc.gradient_accumulation_steps * acc.num_processes
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def full_model_init(acc):
    """Build the model whole, outside ZeRO-3's zero.Init, so its seeded init equals one process's.

    accelerate registers the DeepSpeed config with transformers whenever ZeRO-3 is on (whatever
    zero3_init_flag says), and transformers then builds models partitioned under zero.Init.
    """
    if not is_deepspeed(acc):
        yield
        return
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


class Preemption:
    """A stop request: SIGUSR1 (SLURM's warning signal) or SIGTERM to this process, or the node-local
    stop file that `launch` creates when it is signalled (signals do not reliably reach torchrun's
    workers). The loop checks between optimizer steps; ranks agree with one all-reduce, save a
    checkpoint on every rank, and exit with PREEMPTED_EXIT."""

    def __init__(self):
        self.signal = None
        self.stop_file = os.environ.get("FTDIST_STOP_FILE")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            # a second signal: whoever sends it (torchrun tearing down a failed job) does not want a checkpoint
            os._exit(128 + signum)
        self.signal = signum

    def requested(self, acc) -> bool:
        local = bool(self.signal) or bool(self.stop_file and os.path.exists(self.stop_file))
        return any_rank(acc, local)

    def mark_done(self, acc) -> None:
        """Tell this node's launcher that the checkpoint is saved (it then exits 99 for a requeue)."""
        if self.stop_file and acc.is_local_main_process:
            with open(self.stop_file + ".preempted", "w") as f:
                f.write("checkpoint saved\n")


def any_rank(acc, local: bool) -> bool:
    """True on every rank if `local` is true on any rank (one tiny all-reduce; no device work alone)."""
    if acc.num_processes == 1:
        return bool(local)
    flag = torch.tensor([1.0 if local else 0.0], device=acc.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def all_sum(acc, value: float) -> float:
    if acc.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=acc.device)
    torch.distributed.all_reduce(t)
    return float(t.item())


# What gloo/NCCL say when a peer is gone or silent (the original text is kept in the message).
_PEER_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|communicator was aborted|"
                           r"watchdog|peer", re.IGNORECASE)


def peer_failure(exc: BaseException, timeout_s: int) -> PeerFailureError | None:
    """An ftdist error for a collective that failed because another rank hung or died, else None.

    Without this the user sees gloo's "Timed out waiting 600000ms for recv operation" traceback, which
    names neither the cause nor the knob."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(exc, RuntimeError):
        return None
    first = (str(exc).strip().splitlines() or [""])[0]
    if not _PEER_FAILURE.search(first):
        return None
    return PeerFailureError(
        f"a collective operation with the other ranks failed ({first[:300]}). Another rank has died or is "
        f"hung: its own error, if it printed one, is in the log above, prefixed with its rank. A silent rank is "
        f"given train.timeout_s={timeout_s} s; raise it if a step, an evaluation or a checkpoint save "
        "legitimately takes longer. The last complete checkpoint is kept; rerun to resume from it")
