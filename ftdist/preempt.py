"""Stop requests: a signal or the launcher's stop file becomes a checkpoint on every rank and a requeue."""

from __future__ import annotations

import os
import signal

from ftdist.collectives import any_rank


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
