"""The few collectives the loop needs (one number each), and what a failed collective means."""

from __future__ import annotations

import os
import re

import torch

from ftdist.errors import PeerFailureError


def world_from_env() -> tuple[int, int]:
    """(world size, node count) as set by accelerate launch / torchrun, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or world  # processes on this node
    return world, max(1, world // local)


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


def broadcast_float(acc, value: float, src: int = 0) -> float:
    """Rank `src`'s value on every rank."""
    if acc.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=acc.device)
    torch.distributed.broadcast(t, src)
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
