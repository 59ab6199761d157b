"""Clean stops stay quiet: a node's ./launch output under SLURM, less the tracebacks a stop signal causes.

slurm/train.sbatch pipes each node's output through `python quietstop.py`. SLURM signals every process
of a job, torchrun's agent included, and two of torchrun's reactions look like crashes although the ranks
saved a checkpoint and exited cleanly:

- the agent raises SignalException on SIGTERM and dies with its Python traceback;
- an agent whose workers all finished waits in an exit barrier on node 0's store; when node 0's agent has
  already left, it logs "Error waiting on exit barrier" with a Python traceback and the C++ frames of the
  store's socket error. torchrun reaches that barrier only after every local worker succeeded.

The first is dropped (a traceback whose exception is SignalException never reports a training error: the
ranks report their own), the second becomes one line. Every other line, every other traceback included,
passes unchanged, so a real failure keeps its first error. Standard library only: it starts in a blink and
works in any environment.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator

SIGNAL_EXCEPTION = re.compile(r"SignalException\b.*got signal")
EXIT_BARRIER = "Error waiting on exit barrier"
LOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # torch's own log lines (glog style)
BARRIER_NOTE = ("launch: note: torchrun's exit barrier ended with a store error after this node's processes "
                "had all finished (node 0 left first); nothing was lost\n")


def quiet(lines: Iterable[str]) -> Iterator[str]:
    held: list[str] | None = None  # a Python traceback, until its exception line says what it is
    barrier = False  # inside the exit barrier's error report
    for line in lines:
        if barrier:
            if not (LOG_PREFIX.match(line) or line.startswith("launch:")):
                continue
            barrier = False
        if held is not None:
            held.append(line)
            if line[:1] in (" ", "\t"):  # frames and source lines are indented; the exception line is not
                continue
            if not SIGNAL_EXCEPTION.search(line):
                yield from held
            held = None
            continue
        if line.startswith("Traceback (most recent call last):"):
            held = [line]
        elif EXIT_BARRIER in line:
            barrier = True
            yield BARRIER_NOTE
        else:
            yield line
    if held:
        yield from held


def main() -> int:
    for line in quiet(iter(sys.stdin.readline, "")):
        sys.stdout.write(line)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
