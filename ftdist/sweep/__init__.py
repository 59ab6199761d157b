"""`ftdist sweep RECIPE`: hyperparameter search with Optuna, every trial a normal ftdist run.

Optuna is the search engine (samplers, pruners, storage, plots, importances). This package turns its
suggestions into ftdist runs and the runs' metrics back into Optuna reports; it searches nothing itself.

- **Trials.** One controller process (per machine, or per SLURM array task) talks to Optuna. It asks for
  a trial, turns the parameters into concrete `key=value` overrides, checks the trial's recipe with
  ftdist's own loader (`config.load`), and starts `python -m ftdist.launcher [PRESET] RECIPE overrides`,
  the `./launch` logic, with the trial's own run folder `<sweep>/trials/trial-NNNN`. Any preset works,
  DDP and DeepSpeed included.
- **No DDP desync.** Under HF Trainer's `hyperparameter_search` every rank samples its own parameters
  (transformers#18609, optuna-integration#59). Here no rank talks to Optuna: the values are fixed before
  any rank starts and reach every rank the same way, on the launch command line, so all ranks train the
  same trial and only the controller reports to the study.
- **Pruning.** The controller tails the trial's `metrics.jsonl`, reports each `eval/<metric>` row with
  `trial.report(value, step)` and, when `trial.should_prune()`, sends SIGTERM to the trial's launcher:
  its stop file makes every rank stop at the next step boundary (after a checkpoint, as for a
  preemption). The trial is told PRUNED; its value is its last report.
- **Workers.** `--workers N` runs N trials at once, each pinned: GPUs round-robin through
  CUDA_VISIBLE_DEVICES (several workers may share one GPU), and the CPU cores this process may use
  split into N slices (sched affinity, so ./launch gives each process its slice's cores as torch threads).
- **Storage.** By default Optuna's JournalStorage in `<sweep>/study.journal`, not SQLite: the sweep folder
  is where SLURM array tasks meet, usually a shared (NFS) file system, where SQLite's locking is unreliable
  (SQLite FAQ 5); Optuna's journal file is an append-only log with an NFS-safe lock, and a killed writer
  leaves at most a torn last line, which Optuna skips. `--storage URL` takes an RDB URL (postgresql://,
  mysql://, sqlite:///) for a cluster with a database server.
- **Resume.** The same command again loads the study and goes on until `n_trials` trials are finished
  (complete or pruned). Optuna's own heartbeat only exists for RDB storages inside `study.optimize`, so
  each trial records its controller (host, pid) and a heartbeat. A RUNNING trial whose controller is gone
  (this host: its process is dead; another host: no heartbeat for STALE_AFTER_S) is failed and re-queued
  with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback). The retry uses the same run folder,
  so it resumes from the run's last checkpoint: a controller that dies takes its runs down with SIGTERM
  (PR_SET_PDEATHSIG), which makes them checkpoint first. A run that finished after its controller died is
  recorded as it is.

Modules: `space` (the search-space YAML and its checks), `trials` (one trial's run, its reports and pruning,
the workers' slots), `study` (the sweep folder, storage, lock, trials of a gone controller), `results` (table,
plots, best recipe, top-k re-runs) and `controller` (the `ftdist sweep` command's loop).
"""

from ftdist.sweep.controller import MAX_FAILURES_IN_ROW, Sweep, main
from ftdist.sweep.results import render_table
from ftdist.sweep.space import (
    DIST_KEYS,
    NOT_SEARCHABLE,
    PRUNERS,
    SAMPLERS,
    SPACE_KEYS,
    Param,
    Space,
    SweepError,
    TrialFailuresError,
    default_space_path,
    load_space,
    override,
    recipe_key_types,
)
from ftdist.sweep.study import FINISHED, MARKER, MAX_RETRIES, STALE_AFTER_S, atomic_write, locked, open_storage
from ftdist.sweep.trials import (
    HEARTBEAT_S,
    HOST,
    POLL_S,
    STOP_GRACE_S,
    Running,
    Slot,
    alive,
    make_slots,
    process_info,
    run_value,
)

__all__ = [
    "DIST_KEYS", "FINISHED", "HEARTBEAT_S", "HOST", "MARKER", "MAX_FAILURES_IN_ROW", "MAX_RETRIES", "NOT_SEARCHABLE",
    "POLL_S", "PRUNERS", "SAMPLERS", "SPACE_KEYS", "STALE_AFTER_S", "STOP_GRACE_S", "Param", "Running", "Slot", "Space",
    "Sweep", "SweepError", "TrialFailuresError", "alive", "atomic_write", "default_space_path", "load_space", "locked",
    "main", "make_slots", "open_storage", "override", "process_info", "recipe_key_types", "render_table", "run_value",
]
