"""The controller behind `ftdist sweep`: reads the recipe, the search space and the flags, then runs trials on its
workers until the study has n_trials finished, stopping cleanly on Ctrl-C, SIGTERM or SLURM's SIGUSR1."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from ftdist import config
from ftdist.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT
from ftdist.sweep.results import ResultsMixin
from ftdist.sweep.space import SweepError, TrialFailuresError, default_space_path, load_space
from ftdist.sweep.study import StudyMixin, locked
from ftdist.sweep.trials import HOST, POLL_S, Running, TrialsMixin, kill_tree, make_slots

log = logging.getLogger("ftdist")

MAX_FAILURES_IN_ROW = 3   # trials failing one after another stop the sweep: the recipe or data is likely broken


class Sweep(StudyMixin, TrialsMixin, ResultsMixin):
    """One controller: the study (StudyMixin), its trial runs (TrialsMixin) and the reports (ResultsMixin)."""

    def __init__(self, args):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.args = args
        self.recipe_arg = args.recipe
        self.overrides = list(args.overrides or [])
        for o in self.overrides:
            if o.split("=", 1)[0].strip() == "log.output_dir":
                raise SweepError("log.output_dir: a sweep gives every trial its own run folder; choose the sweep "
                                 "folder with --out (or output_dir in the search space)")
        self.base = config.load(self.recipe_arg, self.overrides)
        space_path = Path(args.space) if args.space else default_space_path(self.recipe_arg)
        if space_path is None:
            raise SweepError(f"no search space for the built-in recipe {self.recipe_arg!r}: give --space FILE")
        self.space = load_space(space_path, self.base)
        for flag in ("workers", "n_trials", "seeds"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise SweepError(f"--{flag.replace('_', '-')}: expected an integer >= 1, got {v}")
        if args.top_k is not None and args.top_k < 0:
            raise SweepError(f"--top-k: expected an integer >= 0, got {args.top_k}")
        self.n_trials = args.n_trials or self.space.n_trials or 20
        self.dir = Path(args.out or self.space.output_dir or f"{self.base.log.output_dir.rstrip('/')}-sweep")
        self.slots = make_slots(args.workers, args.gpus_per_trial)
        from ftdist import launcher, presets

        self.preset = args.preset or launcher.default_preset(len(self.slots[0].gpus or []), 1)
        info = presets.describe(presets.load(self.preset))
        # a multi-process GPU preset runs on the worker's GPUs, not on every GPU ./launch would count
        self.nproc = (len(self.slots[0].gpus) if self.slots[0].gpus and not info.use_cpu
                      and info.distributed_type != "NO" else None)
        self.worker = (f"slurm {os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
                       if os.environ.get("SLURM_ARRAY_JOB_ID") else f"{HOST}:{os.getpid()}")
        self.running: list[Running] = []
        self.stop_signal: int | None = None
        self.hard_stop = False
        self.forwarded = False
        self.failures_in_row = 0
        self.last_error = ""

    # ---------------------------------------------------------------- signals and the loop

    def on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:
            if signum == signal.SIGINT:
                self.hard_stop = True
            return
        self.stop_signal = signum
        how = "Ctrl-C" if signum == signal.SIGINT else f"signal {signum}"
        print(f"sweep: {how}: asking running trials to checkpoint and stop; they are re-queued for the next run"
              + ("; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def loop(self) -> None:
        while True:
            for r in list(self.running):
                self.poll(r)
                if r.proc.poll() is not None:
                    self.running.remove(r)
                    self.finish(r)
            if self.stop_signal is not None:
                if not self.forwarded:
                    self.forwarded = True
                    for r in self.running:
                        r.stop_reason = r.stop_reason or "interrupted"
                        self.stop_run(r)
                if self.hard_stop:
                    for r in self.running:
                        kill_tree(r.proc.pid)
                if not self.running:
                    return
            elif self.failures_in_row >= MAX_FAILURES_IN_ROW:
                if not self.running:
                    return
            else:
                busy = {id(r.slot) for r in self.running}
                for slot in [s for s in self.slots if id(s) not in busy]:
                    res = self.start(slot)
                    while res == "failed" and self.failures_in_row < MAX_FAILURES_IN_ROW:
                        res = self.start(slot)
                    if res != "started":
                        break
                if not self.running:
                    return
            time.sleep(POLL_S)

    def main(self) -> int:
        self.claim_dir()
        self.open_study()
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            self.loop()
            if self.stop_signal is None:
                with locked(self.lock):
                    self.reap()  # trials another controller left behind (e.g. a killed SLURM task)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        summary = self.report()
        if self.stop_signal is not None:
            return INTERRUPTED_EXIT if self.stop_signal == signal.SIGINT else PREEMPTED_EXIT
        if self.failures_in_row >= MAX_FAILURES_IN_ROW:
            raise TrialFailuresError(f"sweep stopped: {self.failures_in_row} trials in a row failed; the last: "
                                     f"{self.last_error}")
        if self.args.top_k:
            self.rerun_top(summary)
        return 0


def main(args) -> int:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError("ftdist sweep needs Optuna: pip install 'optuna>=4'") from None
    return Sweep(args).main()
