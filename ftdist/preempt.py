"""Stop requests: a signal or the launcher's stop file becomes a checkpoint on every rank and an exit.

Two kinds, told apart by their exit status:
- preemption (SIGUSR1, SLURM's warning signal, or SIGTERM): checkpoint, exit PREEMPTED_EXIT (99) so
  the batch script requeues the job;
- an interactive Ctrl-C (SIGINT): checkpoint, exit INTERRUPTED_EXIT (130, the shell's status for
  SIGINT). A second Ctrl-C stops at once; checkpoints are published atomically, so the last complete
  one stays intact.

Under SLURM a rank sees one stop request several times: slurmstepd sends SIGTERM to every process of
the job, torchrun's agent passes its own SIGTERM on to the workers, the batch script relays the warning.
Those repeats keep the rank saving; only a second SIGINT (a user pressing Ctrl-C again) exits at once.
"""

from __future__ import annotations

import os
import signal

from ftdist.collectives import any_rank
from ftdist.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT


class Preemption:
    """A stop request: a signal to this process, or the node-local stop file that `launch` creates when
    it is signalled (signals do not reliably reach torchrun's workers). The loop checks between
    optimizer steps; ranks agree with one all-reduce, save a checkpoint on every rank, and exit."""

    def __init__(self):
        self.signal = None
        self.stop_file = os.environ.get("FTDIST_STOP_FILE")
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum
        elif signum == signal.SIGINT and self.signal == signal.SIGINT:
            # a second Ctrl-C: the user does not want to wait for the checkpoint
            os._exit(128 + signum)
        # else the same stop request again (SIGTERM from slurmstepd and from torchrun, a relayed USR1):
        # exiting here would lose the checkpoint SLURM gave KillWait seconds for

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT if self.signal == signal.SIGINT else PREEMPTED_EXIT

    def requested(self, acc) -> bool:
        local = bool(self.signal) or bool(self.stop_file and os.path.exists(self.stop_file))
        return any_rank(acc, local)

    def mark_done(self, acc) -> None:
        """Tell this node's launcher that the checkpoint is saved (it then exits 99, or 130 after a Ctrl-C)."""
        if self.stop_file and acc.is_local_main_process:
            with open(self.stop_file + ".preempted", "w") as f:
                f.write("checkpoint saved\n")
