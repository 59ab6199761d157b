"""Fault injection for the reliability tests, driven by one environment variable.

FTDIST_FAULT is a comma-separated list of `KIND@STEP[:RANK]`:
    nan@3:1     rank 1's loss is NaN at optimizer step 3 (policy tests)
    raise@3:1   rank 1 raises at the start of step 3 (no-hang tests)
    kill@7      SIGKILL this process at the start of step 7 (exact-resume tests)
    hang@3:1    rank 1 sleeps forever at step 3 (collective timeout tests)
    slow@3      sleep 60 s at the start of step 3 (a second Ctrl-C must not wait for it)
    killsave@4  SIGKILL in the middle of the checkpoint save of step 4 (atomic-save tests)
Unset in normal use: each check is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time


def _parse() -> dict[tuple[str, int], int | None]:
    out = {}
    for item in filter(None, os.environ.get("FTDIST_FAULT", "").split(",")):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        out[(kind.strip(), int(step))] = int(rank) if rank else None
    return out


_FAULTS = _parse()


def _hit(kind: str, step: int, rank: int) -> bool:
    key = (kind, step)
    return key in _FAULTS and _FAULTS[key] in (None, rank)


def maybe_nan(loss, step: int, rank: int):
    return loss * float("nan") if _FAULTS and _hit("nan", step, rank) else loss


def maybe_fail(step: int, rank: int) -> None:
    if not _FAULTS:
        return
    if _hit("raise", step, rank):
        raise RuntimeError(f"injected failure on rank {rank} at step {step} (FTDIST_FAULT)")
    if _hit("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit("slow", step, rank):
        time.sleep(60)
    if _hit("hang", step, rank):
        while True:
            time.sleep(60)


def maybe_kill_in_save(step: int) -> None:
    if _FAULTS and ("killsave", step) in _FAULTS:
        os.kill(os.getpid(), signal.SIGKILL)
