"""`ftdist sweep RECIPE`: hyperparameter search with Optuna, every trial a normal ftdist run.

Optuna is the search engine (samplers, pruners, storage, plots, importances). This module turns its
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
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftdist import config, yamlio
from ftdist.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT, FtdistError, RecipeError, did_you_mean
from ftdist.recipe import Recipe

log = logging.getLogger("ftdist")

MARKER = "ftdist-sweep.json"
HEARTBEAT_S = 30          # a running trial's heartbeat is written this often
STALE_AFTER_S = 180       # a trial of another host without a heartbeat for this long has lost its controller
STOP_GRACE_S = 600        # after SIGTERM, a run has this long to checkpoint and exit before it is killed
MAX_RETRIES = 5           # an interrupted trial is re-queued at most this often
MAX_FAILURES_IN_ROW = 3   # trials failing one after another stop the sweep: the recipe or data is likely broken
POLL_S = 0.5

SPACE_KEYS = ("params", "metric", "direction", "value", "n_trials", "pruner", "sampler", "storage", "study_name",
              "output_dir", "enqueue")
DIST_KEYS = {"float": ("type", "low", "high", "log", "step"), "int": ("type", "low", "high", "log", "step"),
             "categorical": ("type", "choices")}
NOT_SEARCHABLE = {"log.output_dir": "the sweep gives every trial its own run folder",
                  "checkpoint.resume": "the sweep resumes interrupted trials itself"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "percentile": "PercentilePruner",
           "hyperband": "HyperbandPruner", "asha": "SuccessiveHalvingPruner"}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler"}
FINISHED = ("COMPLETE", "PRUNED")


class SweepError(FtdistError):
    """A bad search-space file, sweep flag or sweep folder: one paragraph, exit 2."""


class TrialFailuresError(FtdistError):
    """Trials kept failing: exit 1, not bad input to the sweep itself."""

    exit_code = 1


# ------------------------------------------------------------------ the search space


@dataclass(frozen=True)
class Param:
    key: str
    kind: str                      # float | int | categorical
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices)}"
        extra = (" log" if self.log else "") + (f" step {self.step}" if self.step else "")
        return f"{self.kind} in [{self.low}, {self.high}]{extra}"

    def as_dict(self) -> dict:
        d = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return d


@dataclass
class Space:
    path: Path
    params: dict[str, Param]
    metric: str
    direction: str                 # maximize | minimize
    value: str = "final"           # final | best
    n_trials: int | None = None
    pruner: tuple[str, dict] = ("median", {})
    sampler: tuple[str, dict] = ("tpe", {})
    storage: str | None = None
    study_name: str | None = None
    output_dir: str | None = None
    enqueue: list[dict] = field(default_factory=list)

    def identity(self) -> dict:
        """What a resumed study must agree on (the budget, pruner and sampler may change)."""
        return {"params": {k: p.as_dict() for k, p in self.params.items()}, "metric": self.metric,
                "direction": self.direction, "value": self.value}


def recipe_key_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Recipe)
    return {f"{s.name}.{f.name}": typing.get_type_hints(hints[s.name])[f.name]
            for s in dataclasses.fields(Recipe) for f in dataclasses.fields(hints[s.name])}


def default_space_path(recipe_arg: str) -> Path | None:
    p = Path(recipe_arg)
    if p.suffix in (".yaml", ".yml"):
        return p.with_name(p.stem + ".sweep.yaml")
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _value_problem(key: str, value: Any, hint: Any) -> str | None:
    """Why `value` cannot be the recipe key's value (its type and range rule, as the recipe loader checks
    them), without the key prefix; None if it can. Cross-key rules are checked per trial by config.load."""
    errors: list[str] = []
    coerced = config._coerce(value, hint, key, errors)
    if not errors:
        rule = config._RANGES.get(key)
        if rule and not config._safe(rule[0], coerced):
            errors.append(f"{key}: {config._short(coerced)} is out of range; expected {rule[1]}")
    if not errors:
        return None
    msg = errors[0]
    return msg[len(key) + 2:] if msg.startswith(key + ": ") else msg


def _component(spec: Any, what: str, table: dict[str, str], default: str, errors: list[str]) -> tuple[str, dict]:
    """`pruner` / `sampler`: a name, or a mapping with `type` and the Optuna class's own arguments."""
    import optuna

    if spec is None:
        return default, {}
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict):
        kwargs = {str(k): v for k, v in spec.items()}
        name = kwargs.pop("type", None)
        if name is None:
            errors.append(f"{what}: a mapping needs `type` ({', '.join(table)}), e.g. {{type: {default}}}")
            return default, {}
    else:
        errors.append(f"{what}: {config._short(spec)} must be one of {', '.join(table)}, or a mapping "
                      f"{{type: NAME, ...Optuna arguments}}")
        return default, {}
    if name not in table:
        errors.append(f"{what}: {config._short(name)} is not one of {', '.join(table)}{did_you_mean(name, table)}")
        return default, {}
    cls = getattr(optuna.pruners if what == "pruner" else optuna.samplers, table[name])
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    bad = [k for k in kwargs if k not in accepted]
    for k in bad:
        errors.append(f"{what}.{k}: not an argument of optuna.{'pruners' if what == 'pruner' else 'samplers'}."
                      f"{table[name]}{did_you_mean(k, accepted)}; it takes {', '.join(accepted) or 'none'}")
    if not bad:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**kwargs)
        except Exception as e:  # Optuna's own argument checks: ValueError, TypeError, ...
            errors.append(f"{what}: optuna.{table[name]}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                          f"refused it: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return name, kwargs


def _param(key: str, spec: Any, hint: Any, errors: list[str]) -> Param | None:
    where = f"params.{key}"
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        errors.append(f"{where}: {config._short(spec)} is not a distribution; write {{type: float, low: L, high: H, "
                      "log: true}}, {type: int, low: L, high: H}, {type: categorical, choices: [...]} or a list of choices")
        return None
    kind = spec.get("type")
    if kind not in DIST_KEYS:
        errors.append(f"{where}.type: {config._short(kind)} is not a distribution type{did_you_mean(kind, DIST_KEYS)}; "
                      f"use float, int or categorical" if kind is not None else
                      f"{where}: needs `type` (float, int or categorical)")
        return None
    before = len(errors)
    for k in spec:
        if k not in DIST_KEYS[kind]:
            errors.append(f"{where}.{k}: unknown key for a {kind} distribution{did_you_mean(k, DIST_KEYS[kind])}; "
                          f"keys are {', '.join(DIST_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            errors.append(f"{where}.choices: needs a non-empty list of values, got {config._short(choices)}")
            return None
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                errors.append(f"{where}.choices: {config._short(c)} is not a scalar; choices are null, true/false, "
                              "numbers or strings (Optuna stores categorical values as they are)")
            elif (problem := _value_problem(key, c, hint)) is not None:
                errors.append(f"{where}.choices: {problem}")
        if len({(type(c).__name__, repr(c)) for c in choices}) != len(choices):
            errors.append(f"{where}.choices: {config._short(choices)} repeats a value")
        return Param(key, kind, choices=tuple(choices)) if len(errors) == before else None
    low, high, logscale, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    want = "an integer" if kind == "int" else "a number"
    for name, v in (("low", low), ("high", high)):
        if v is None:
            errors.append(f"{where}.{name}: missing; a {kind} distribution needs low and high")
        elif not _is_number(v) or (kind == "int" and not isinstance(v, int)):
            errors.append(f"{where}.{name}: expected {want}, got {config._short(v)}")
        elif (problem := _value_problem(key, float(v) if kind == "float" else v, hint)) is not None:
            errors.append(f"{where}.{name}: {problem}"
                          + (" (an integer key: use type: int)" if kind == "float" and "integer" in problem else ""))
    if not isinstance(logscale, bool):
        errors.append(f"{where}.log: expected true or false, got {config._short(logscale)}")
    if step is not None and (not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int))):
        errors.append(f"{where}.step: expected {'an integer >= 1' if kind == 'int' else 'a number > 0'} or null, "
                      f"got {config._short(step)}")
    if len(errors) != before:
        return None
    if not low < high:
        errors.append(f"{where}: low {low} must be below high {high}")
    elif logscale and low <= 0:
        errors.append(f"{where}: a log scale needs low > 0, got {low}")
    elif logscale and step not in (None, 1):
        errors.append(f"{where}: step and log: true cannot be combined (Optuna samples a log scale without steps)")
    if len(errors) != before:
        return None
    if kind == "float":
        low, high = float(low), float(high)
    return Param(key, kind, low, high, bool(logscale), step if kind == "float" or step not in (None, 1) else None)


def load_space(path: Path, recipe: Recipe) -> Space:
    """Read and check a search-space file; every problem is reported at once, naming the file and key."""
    import optuna  # noqa: F401  (a missing install is reported before anything else)

    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"search space {where!r} does not exist; write one (see README, Sweeps) or give --space FILE") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"search space {where!r} could not be read: {e}") from None
    if len(text) > 1_000_000:
        raise SweepError(f"search space {where!r} is {len(text)} bytes; a search space is a short YAML file (limit 1 MB)")
    try:
        raw = yamlio.load_no_alias(text, yaml12_floats=True)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise SweepError(f"search space {where!r} is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"search space {where!r} must be a mapping with `params:` (recipe key -> distribution), "
                         f"got {type(raw).__name__ if raw is not None else 'an empty file'}")
    errors: list[str] = []
    for k in raw:
        if k not in SPACE_KEYS:
            errors.append(f"{config._text(k)}: unknown key{did_you_mean(k, SPACE_KEYS)}; keys are {', '.join(SPACE_KEYS)}")
    types = recipe_key_types()
    params: dict[str, Param] = {}
    raw_params = raw.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        errors.append("params: needs a mapping of recipe keys to distributions, e.g. "
                      "params: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}}")
        raw_params = {}
    for key, spec in raw_params.items():
        key_text = config._text(key)
        if key_text not in types:
            errors.append(f"params.{key_text}: not a recipe key{did_you_mean(key_text, types)}; "
                          "search over keys like train.lr, train.epochs, unfreeze.lr_decay")
            continue
        if key_text in NOT_SEARCHABLE:
            errors.append(f"params.{key_text}: cannot be searched: {NOT_SEARCHABLE[key_text]}")
            continue
        p = _param(key_text, spec, types[key_text], errors)
        if p is not None:
            params[key_text] = p

    metric = raw.get("metric", recipe.eval.best_metric)
    from ftdist import metrics

    if not isinstance(metric, str) or not (metric == "loss" or metrics.reports(recipe.eval.metrics, metric)):
        errors.append(f"metric: {config._short(metric)} is not reported by the recipe's eval.metrics "
                      f"{config._short(recipe.eval.metrics)}{did_you_mean(metric, [*recipe.eval.metrics, 'loss'])}; "
                      "pick one of them or 'loss'")
    if "direction" in raw:
        direction = raw["direction"]
        if direction not in ("maximize", "minimize"):
            errors.append(f"direction: {config._short(direction)} must be maximize or minimize"
                          f"{did_you_mean(direction, ('maximize', 'minimize'))}")
    elif metric == recipe.eval.best_metric:
        direction = "maximize" if recipe.eval.greater_is_better else "minimize"
    else:
        direction = "minimize" if metric == "loss" else "maximize"
    value = raw.get("value", "final")
    if value not in ("final", "best"):
        errors.append(f"value: {config._short(value)} must be final (the metric at the end of training) or best "
                      f"(its best evaluation){did_you_mean(value, ('final', 'best'))}")
    n_trials = raw.get("n_trials")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        errors.append(f"n_trials: expected an integer >= 1, got {config._short(n_trials)}")
    for k in ("storage", "study_name", "output_dir"):
        if raw.get(k) is not None and not (isinstance(raw[k], str) and raw[k].strip()):
            errors.append(f"{k}: expected a non-empty string, got {config._short(raw[k])}")
    pruner = _component(raw.get("pruner"), "pruner", PRUNERS, "median", errors)
    sampler = _component(raw.get("sampler"), "sampler", SAMPLERS, "tpe", errors)
    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) and e for e in enqueue):
        errors.append(f"enqueue: expected a list of mappings (recipe key -> value), got {config._short(enqueue)}")
        enqueue = []
    for i, point in enumerate(enqueue):
        for k, v in point.items():
            if k not in raw_params:
                errors.append(f"enqueue[{i}].{config._text(k)}: not a key of params{did_you_mean(k, raw_params)}")
            elif k in params and not params[k].contains(v):
                errors.append(f"enqueue[{i}].{k}: {config._short(v)} is outside the distribution ({params[k].describe()})")
    d = recipe.data
    if d.validation_file is None and not d.validation_split:
        errors.append("the recipe has no validation set (data.validation_file, or data.validation_split > 0): a sweep "
                      "scores its trials on it")
    if errors:
        listed = "\n  - ".join(errors)
        raise SweepError(f"search space {where!r} has {len(errors)} problem{'' if len(errors) == 1 else 's'}:\n  - {listed}")
    return Space(path, params, metric, direction, value, n_trials, pruner, sampler, raw.get("storage"),
                 raw.get("study_name"), raw.get("output_dir"), [dict(e) for e in enqueue])


def override(key: str, value: Any) -> str:
    """A concrete `key=value` override that config.parse_override reads back as exactly `value`."""
    return f"{key}={json.dumps(value)}"


# ------------------------------------------------------------------ storage, lock, processes


def open_storage(spec: str | None, sweep_dir: Path):
    """(Optuna storage, lock file or None, what to print)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if spec is None or "://" not in spec:
        path = Path(spec) if spec else sweep_dir / "study.journal"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path))), Path(f"{path}.ftdist-lock"), f"journal file {path}"
        except OSError as e:
            raise SweepError(f"--storage: cannot create the journal file {str(path)!r}: {e}") from None
    kwargs = {}
    lock = None
    if spec.startswith("sqlite:///"):
        kwargs = {"connect_args": {"timeout": 60}}  # several writers wait for each other instead of failing
        lock = Path(spec[len("sqlite:///"):] + ".ftdist-lock")
    try:
        return RDBStorage(spec, engine_kwargs=kwargs), lock, f"database {config.redact_text(spec)}"
    except Exception as e:  # SQLAlchemy: unknown dialect, missing driver, unreachable server
        raise SweepError(f"--storage: cannot open {config.redact_text(spec)!r}: "
                         f"{config.redact_text(str(e).splitlines()[0] if str(e) else type(e).__name__)}. Give an RDB URL "
                         "(postgresql://..., mysql://..., sqlite:///path.db) or a journal file path") from None


@contextlib.contextmanager
def locked(path: Path | None):
    """An exclusive lock around reading the study and asking for a trial, shared by every controller."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


HOST = socket.gethostname()


def process_info(pid: int) -> dict:
    import psutil

    try:
        return {"host": HOST, "pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.NoSuchProcess:
        return {"host": HOST, "pid": pid, "started": 0.0}


def alive(info: dict | None) -> bool:
    import psutil

    try:
        p = psutil.Process(int(info["pid"]))
        return abs(p.create_time() - float(info["started"])) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _child_setup(parent: int, cpus: list[int] | None) -> None:
    """In the trial's launcher before exec: SIGTERM when the controller dies (the launcher then has the run
    checkpoint and stop), and the worker's CPU slice."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the controller died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(x for x in out.splitlines() if x.startswith("GPU "))]


@dataclass
class Slot:
    """Where one worker's trials run: its GPUs (round-robin; shared when workers outnumber GPUs) and CPU cores."""

    index: int
    gpus: list[str] | None
    cpus: list[int] | None

    def describe(self) -> str:
        parts = []
        if self.gpus is not None:
            parts.append(f"GPU {','.join(self.gpus)}")
        if self.cpus:
            parts.append(f"cores {_ranges(self.cpus)}")
        return f"worker {self.index}" + (f" ({', '.join(parts)})" if parts else "")


def _ranges(xs: list[int]) -> str:
    return ",".join(str(x) for x in xs) if len(xs) < 3 or xs[-1] - xs[0] != len(xs) - 1 else f"{xs[0]}-{xs[-1]}"


def make_slots(workers: int, gpus_per_trial: int | None) -> list[Slot]:
    gpus = _visible_gpus()
    per = gpus_per_trial or (max(1, len(gpus) // workers) if gpus else 0)
    if gpus and per > len(gpus):
        raise SweepError(f"--gpus-per-trial {per}: only {len(gpus)} GPU(s) visible")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slice_ = len(cores) // workers if workers > 1 else 0
    slots = []
    for i in range(workers):
        g = [gpus[(i * per + j) % len(gpus)] for j in range(per)] if gpus else None
        c = cores[i * slice_:(i + 1) * slice_] if slice_ else None
        slots.append(Slot(i, g, c))
    return slots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _eval_rows(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    f = Path(run_dir) / "metrics.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            v = row.get(f"eval/{metric}")
            if isinstance(row.get("step"), int) and _is_number(v):
                out.append((row["step"], float(v)))
    return out


def run_value(run_dir: Path, metric: str, mode: str, direction: str) -> float | None:
    """A finished run's objective: its final validation metric, or (mode best) its best evaluation."""
    try:
        final = json.loads((Path(run_dir) / "final_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    last = (final.get("validation") or {}).get(metric)
    values = [v for _, v in _eval_rows(run_dir, metric)] + ([float(last)] if _is_number(last) else [])
    if not values:
        return None
    if mode == "final":
        return float(last) if _is_number(last) else values[-1]
    return max(values) if direction == "maximize" else min(values)


@dataclass
class Running:
    trial: Any                       # optuna.Trial
    slot: Slot
    proc: subprocess.Popen
    run_dir: Path
    log_path: Path
    params: dict
    started: float = field(default_factory=time.monotonic)
    offset: int = 0
    reported: dict = field(default_factory=dict)
    stop_reason: str | None = None   # pruned | interrupted
    stop_sent: float | None = None
    heartbeat: float = field(default_factory=time.monotonic)


# ------------------------------------------------------------------ the controller


class Sweep:
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

    # ---------------------------------------------------------------- setup

    def claim_dir(self) -> None:
        d = self.dir
        if d.exists() and not d.is_dir():
            raise SweepError(f"--out: {str(d)!r} is a file; give a folder for the sweep")
        if d.is_dir() and not (d / MARKER).is_file() and any(d.iterdir()):
            shown = ", ".join(sorted(p.name for p in d.iterdir())[:5])
            raise SweepError(f"--out: {str(d)!r} already exists and is not an ftdist sweep folder (it holds {shown}); "
                             "give a new or empty folder")
        d.mkdir(parents=True, exist_ok=True)
        (d / "trials").mkdir(exist_ok=True)
        if not (d / MARKER).is_file():
            _atomic_write(d / MARKER, json.dumps({"created_by": "ftdist sweep", "recipe": self.recipe_arg}) + "\n")

    def open_study(self):
        import optuna

        storage_spec = self.args.storage or self.space.storage
        self.storage, self.lock, where = open_storage(storage_spec, self.dir)
        name = self.args.study_name or self.space.study_name or self.dir.resolve().name
        pruner_name, pruner_kw = self.space.pruner
        pruner = getattr(optuna.pruners, PRUNERS[pruner_name])(**pruner_kw)
        with locked(self.lock):
            study = optuna.create_study(study_name=name, storage=self.storage, direction=self.space.direction,
                                        load_if_exists=True, pruner=pruner)
            if list(study.directions) != [getattr(optuna.study.StudyDirection, self.space.direction.upper())]:
                raise SweepError(f"study {name!r} in {where} optimizes in the other direction; use another --out, "
                                 "--study-name or --storage")
            mine = {"space": self.space.identity(), "recipe": self._base_flat()}
            saved = study.user_attrs.get("ftdist")
            if saved is None:
                study.set_user_attr("ftdist", {**mine, "recipe_arg": self.recipe_arg, "overrides": self.overrides})
            else:
                self._check_same(saved, mine, name, where)
            existing = len(study.trials)
        sampler_name, sampler_kw = self.space.sampler
        kw = dict(sampler_kw)
        # a distinct stream per controller and per restart: two array tasks, or a resumed sweep, seeded alike
        # would propose the very same parameters again
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
        kw["seed"] = int(kw.get("seed", 0) or 0) + 7919 * task + existing
        if sampler_name == "tpe":
            kw.setdefault("constant_liar", True)  # concurrent trials: do not propose what is already running
        study.sampler = getattr(optuna.samplers, SAMPLERS[sampler_name])(**kw)
        self.study = study
        log.info("sweep %s: study %r (%s), %s, %d trial(s) to finish, %d worker(s), preset %s",
                 self.dir, name, where, self.space.direction + " " + self.space.metric, self.n_trials, len(self.slots),
                 self.preset)

    def _base_flat(self) -> dict:
        from ftdist.redaction import redact

        flat: dict = {}

        def walk(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict) and k != "config_overrides":
                    walk(v, f"{prefix}{k}.")
                elif not f"{prefix}{k}".startswith("log."):
                    flat[f"{prefix}{k}"] = v
        walk(json.loads(json.dumps(redact(self.base.to_dict()), default=str)))
        return flat

    def _check_same(self, saved: dict, mine: dict, name: str, where: str) -> None:
        changed = []
        if saved.get("space") != mine["space"]:
            a, b = saved.get("space", {}), mine["space"]
            changed += [f"space {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        old = saved.get("recipe", {})
        changed += [f"recipe {k}: {old.get(k)!r} -> {mine['recipe'].get(k)!r}"
                    for k in sorted(set(old) | set(mine["recipe"])) if old.get(k) != mine["recipe"].get(k)]
        if changed:
            raise SweepError(f"study {name!r} in {where} was started with another search space or recipe "
                             f"({'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''}). Its trials would "
                             "not be comparable; restore them, or start a new sweep with another --out")

    # ---------------------------------------------------------------- bookkeeping

    def _sys_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(trial_id, key, value)

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        return counts

    def _requeue(self, trial_id: int) -> None:
        from optuna import storages

        retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
        frozen = self.storage.get_trial(trial_id)
        retry(max_retry=MAX_RETRIES)(self.study, frozen)

    def reap(self) -> None:
        """Trials left RUNNING by a controller that is gone: record a run that finished, re-queue the others."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        mine = {r.trial.number for r in self.running}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in mine:
                continue
            owner = t.system_attrs.get("ftdist:owner")
            if owner and owner.get("host") == HOST:
                if alive(owner):
                    continue
            else:
                last = t.system_attrs.get("ftdist:heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else 0)
                if time.time() - float(last) < STALE_AFTER_S:
                    continue
            run = t.system_attrs.get("ftdist:run")
            if run and run.get("host") == HOST and alive(run):
                log.info("trial %d: its controller is gone; waiting for its run (pid %s) to checkpoint and stop",
                         t.number, run["pid"])
                self._wait_gone(run)
            run_dir = t.user_attrs.get("run_dir")
            value = run_value(Path(run_dir), self.space.metric, self.space.value, self.space.direction) if run_dir else None
            try:
                if value is not None:
                    for step, v in _eval_rows(Path(run_dir), self.space.metric):
                        if step not in t.intermediate_values:
                            self.storage.set_trial_intermediate_value(t._trial_id, step, v)
                    self.storage.set_trial_user_attr(t._trial_id, "note", "finished after its controller stopped")
                    self.study.tell(t.number, value)
                    log.info("trial %d: its run finished after its controller stopped: %s=%.6g", t.number,
                             self.space.metric, value)
                    continue
                self.storage.set_trial_user_attr(t._trial_id, "note", "interrupted; re-queued")
                if self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    self._requeue(t._trial_id)
                    log.info("trial %d: interrupted (its controller is gone); re-queued to resume from its last "
                             "checkpoint", t.number)
            except UpdateFinishedTrialError:
                continue  # another controller got there first

    def _wait_gone(self, info: dict) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        while alive(info) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if alive(info):
            from ftdist.launcher import _kill_tree

            _kill_tree(int(info["pid"]))

    # ---------------------------------------------------------------- starting trials

    def next_trial(self):
        """Under the lock: reap, then a trial to run (a re-queued one first, then the space's enqueue list, then
        the sampler), or None when the budget is taken."""
        from optuna.trial import TrialState

        with locked(self.lock):
            self.reap()
            c = self._counts()
            if c.get("COMPLETE", 0) + c.get("PRUNED", 0) + c.get("RUNNING", 0) >= self.n_trials:
                return None
            if not c.get("WAITING"):
                used = {t.user_attrs.get("enqueued") for t in self.study.get_trials(deepcopy=False)}
                todo = [i for i in range(len(self.space.enqueue)) if i not in used]
                if todo:
                    self.study.enqueue_trial(self.space.enqueue[todo[0]], user_attrs={"enqueued": todo[0]})
            trial = self.study.ask()
            self._sys_attr(trial._trial_id, "ftdist:owner", process_info(os.getpid()))
            self._sys_attr(trial._trial_id, "ftdist:heartbeat", time.time())
            assert self.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
            return trial

    def start(self, slot: Slot) -> str | None:
        """Start the next trial on `slot`: "started", "failed" (its recipe was refused), or None (budget taken)."""
        from optuna.trial import TrialState

        trial = self.next_trial()
        if trial is None:
            return None
        params = {k: p.suggest(trial) for k, p in self.space.params.items()}
        retry_of = self.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        run_dir = Path(trial.user_attrs.get("run_dir") or self.dir / "trials" / f"trial-{trial.number:04d}")
        trial.set_user_attr("run_dir", str(run_dir))
        for stale in ("note", "error"):  # a retry inherits its original's user attributes
            if stale in trial.user_attrs:
                trial.set_user_attr(stale, "")
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("slot", slot.describe())
        overrides = [*self.overrides, *(override(k, v) for k, v in params.items()), f"log.output_dir={run_dir}"]
        if retry_of is not None:
            overrides.append("checkpoint.resume=latest")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        try:
            config.load(self.recipe_arg, overrides)  # the trial's recipe, checked by ftdist's own loader
        except RecipeError as e:
            self._fail(trial, f"its recipe is invalid: {e}")
            log.warning("trial %d (%s): recipe refused: %s", trial.number, shown, e)
            return "failed"
        log_path = run_dir.with_suffix(".log")
        cmd = [sys.executable, "-m", "ftdist.launcher", self.preset, self.recipe_arg, *overrides,
               "--main-port", str(_free_port()), "--quiet", *(["--nproc", str(self.nproc)] if self.nproc else [])]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # ftdist importable from wherever the sweep runs
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if slot.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
        if len(self.slots) > 1 and not slot.cpus:
            env.setdefault("OMP_NUM_THREADS", "1")  # more workers than cores
        env["FTDIST_SWEEP_TRIAL"] = str(trial.number)
        with open(log_path, "ab") as out:
            out.write(f"\n### trial {trial.number} ({self.worker}, {slot.describe()}) {time.ctime()}\n".encode())
            out.flush()
            parent = os.getpid()
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=lambda: _child_setup(parent, slot.cpus))
        self._sys_attr(trial._trial_id, "ftdist:run", process_info(proc.pid))
        self.running.append(Running(trial, slot, proc, run_dir, log_path, params))
        what = f" (retry of trial {retry_of}, resuming its run)" if retry_of is not None else ""
        log.info("trial %d started on %s%s: %s", trial.number, slot.describe(), what, shown)
        assert self.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
        return "started"

    # ---------------------------------------------------------------- watching trials

    def poll(self, r: Running) -> None:
        """Report new evaluations; ask the run to stop when the pruner says so; keep the heartbeat."""
        f = r.run_dir / "metrics.jsonl"
        if f.is_file():
            size = f.stat().st_size
            if size < r.offset:  # the run truncated its log (a fresh start or a resume)
                r.offset = 0
            if size > r.offset:
                with open(f, "rb") as fh:
                    fh.seek(r.offset)
                    chunk = fh.read(size - r.offset)
                end = chunk.rfind(b"\n") + 1  # complete lines only
                r.offset += end
                for line in chunk[:end].decode(errors="replace").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    v, step = row.get(f"eval/{self.space.metric}"), row.get("step")
                    # after a prune decision nothing more is reported: a pruned trial's value is its value then
                    if isinstance(step, int) and _is_number(v) and step not in r.reported and r.stop_reason != "pruned":
                        r.reported[step] = float(v)
                        r.trial.report(float(v), step)
                        if r.stop_reason is None and r.trial.should_prune():
                            r.stop_reason = "pruned"
                            r.trial.set_user_attr("note", f"pruned at step {step}")
                            log.info("trial %d pruned at step %d (%s=%.6g)", r.trial.number, step, self.space.metric, v)
                            self._stop(r)
        if time.monotonic() - r.heartbeat > HEARTBEAT_S:
            r.heartbeat = time.monotonic()
            self._sys_attr(r.trial._trial_id, "ftdist:heartbeat", time.time())
        if r.stop_sent is not None and time.monotonic() - r.stop_sent > STOP_GRACE_S and r.proc.poll() is None:
            from ftdist.launcher import _kill_tree

            log.warning("trial %d: its run did not stop %d s after SIGTERM; killing it", r.trial.number, STOP_GRACE_S)
            _kill_tree(r.proc.pid)

    def _stop(self, r: Running) -> None:
        if r.stop_sent is None and r.proc.poll() is None:
            r.stop_sent = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                r.proc.send_signal(signal.SIGTERM)  # the launcher's stop file: checkpoint, then exit

    def _fail(self, trial, why: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("error", why[:2000])
        self.study.tell(trial, state=TrialState.FAIL)
        self.failures_in_row += 1
        self.last_error = f"trial {trial.number}: {why}"

    def finish(self, r: Running) -> None:
        from optuna.trial import TrialState

        self.poll(r)  # the last rows
        rc = r.proc.returncode
        n = r.trial.number
        secs = time.monotonic() - r.started
        if r.stop_reason == "pruned":
            self.study.tell(r.trial, state=TrialState.PRUNED)
            self.failures_in_row = 0
            self._cleanup(r.run_dir)
        elif r.stop_reason == "interrupted":
            r.trial.set_user_attr("note", "interrupted; re-queued")
            self.study.tell(r.trial, state=TrialState.FAIL)
            self._requeue(r.trial._trial_id)
            log.info("trial %d interrupted after %.0f s; re-queued (the same command resumes it from its checkpoint)",
                     n, secs)
        elif rc == 0 and (value := run_value(r.run_dir, self.space.metric, self.space.value, self.space.direction)) is not None:
            self.study.tell(r.trial, value)
            self.failures_in_row = 0
            log.info("trial %d finished in %.0f s: %s=%.6g", n, secs, self.space.metric, value)
            self._cleanup(r.run_dir)
        else:
            why = (f"its run exited {rc}" if rc else "its run wrote no final validation metric") + \
                f"; see {r.log_path}" + (f" ({_last_error(r.log_path)})" if _last_error(r.log_path) else "")
            self._fail(r.trial, why)
            log.warning("trial %d failed after %.0f s: %s", n, secs, why)

    def _cleanup(self, run_dir: Path) -> None:
        """A finished trial's checkpoints are only good for resuming it: dropped unless --keep-checkpoints
        (the run folder keeps its metrics, report, best/ and model/)."""
        if not self.args.keep_checkpoints:
            import shutil

            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    # ---------------------------------------------------------------- signals and the loop

    def _on_signal(self, signum, frame) -> None:
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
                        self._stop(r)
                if self.hard_stop:
                    from ftdist.launcher import _kill_tree

                    for r in self.running:
                        _kill_tree(r.proc.pid)
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
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
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

    # ---------------------------------------------------------------- the end

    def report(self) -> dict:
        trials = self.study.get_trials(deepcopy=False)
        keys = list(self.space.params)
        rows = []
        for t in trials:
            dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
            note = "" if t.state.name == "WAITING" else (t.user_attrs.get("note") or t.user_attrs.get("error") or "")
            retry_of = t.system_attrs.get("failed_trial")
            if retry_of is not None:
                note = f"retry of {retry_of}" + (f"; {note}" if note else "")
            rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                         **{k: t.params.get(k) for k in keys}, "duration_s": None if dur is None else round(dur, 1),
                         "worker": t.user_attrs.get("worker", ""), "run_dir": t.user_attrs.get("run_dir", ""),
                         "note": note})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["number", "state", "value", *keys, "duration_s", "worker", "run_dir", "note"])
        w.writeheader()
        w.writerows(rows)
        _atomic_write(self.dir / "trials.csv", buf.getvalue())
        print(render_table(rows, keys, self.space.metric), flush=True)
        c = self._counts()
        done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
        print(f"sweep: {done} of {self.n_trials} trials finished ({c.get('COMPLETE', 0)} complete, "
              f"{c.get('PRUNED', 0)} pruned), {c.get('FAIL', 0)} failed, {c.get('RUNNING', 0)} running, "
              f"{c.get('WAITING', 0)} waiting; table: {self.dir / 'trials.csv'}", flush=True)
        plots = self.plots()
        if plots:
            print("sweep: plots " + ", ".join(plots), flush=True)
        best = self.write_best()
        return {"done": done, "counts": c, "best": best}

    def plots(self) -> list[str]:
        """Optuna's own plots (optuna.visualization.matplotlib). Parameter importances need two complete trials
        and use fANOVA (scikit-learn) when installed, else PED-ANOVA (Optuna alone)."""
        import optuna

        complete = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as om

        try:
            import sklearn  # noqa: F401

            evaluator = None  # Optuna's default, fANOVA
        except ImportError:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        wanted = [("history.png", lambda: om.plot_optimization_history(self.study)),
                  ("parallel_coordinate.png", lambda: om.plot_parallel_coordinate(self.study))]
        if any(t.intermediate_values for t in self.study.get_trials(deepcopy=False)):  # the learning curves
            wanted.append(("intermediate_values.png", lambda: om.plot_intermediate_values(self.study)))
        if len(complete) >= 2:
            wanted.append(("importances.png", lambda: om.plot_param_importances(self.study, evaluator=evaluator)))
        made = []
        for name, fn in wanted:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = fn()
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    fig.savefig(self.dir / name, dpi=100, bbox_inches="tight")
                    plt.close(fig)
                made.append(name)
            except Exception as e:  # a plot Optuna cannot draw for this study (too few trials, one value only)
                log.info("sweep: %s skipped: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        plt.close("all")
        return made

    def recipe_for(self, trial, out: Path) -> str:
        """The base recipe with the trial's parameters, resolved (every key explicit) and checked by config.load."""
        overrides = [*self.overrides, *(override(k, v) for k, v in trial.params.items() if k in self.space.params),
                     f"log.output_dir={out}"]
        r = config.load(self.recipe_arg, overrides)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        head = (f"# ftdist sweep {self.dir}: trial {trial.number}, {self.space.metric}={trial.value:.6g} "
                f"({self.space.direction})\n# recipe {self.recipe_arg} {' '.join(self.overrides)}\n# params: {shown}\n"
                f"# run it: ./launch THIS_FILE   (or: ftdist train THIS_FILE)\n")
        return head + config.dump(r)

    def write_best(self) -> dict | None:
        import optuna

        complete = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return None
        best = self.study.best_trial
        path = self.dir / "best_recipe.yaml"
        _atomic_write(path, self.recipe_for(best, self.dir / "retrain" / f"trial-{best.number:04d}"))
        config.load(str(path))  # what ./launch will do with it
        print(f"sweep: best trial {best.number}: {self.space.metric}={best.value:.6g} "
              f"({', '.join(f'{k}={_fmt(v)}' for k, v in best.params.items())}); recipe: {path}", flush=True)
        return {"number": best.number, "value": best.value, "params": best.params, "recipe": str(path)}

    def rerun_top(self, summary: dict) -> None:
        """Re-train the top k trials' recipes over --seeds seeds (train.seed = the recipe's + 1..S) and report
        mean +- std; finished rerun folders are reused, so the command can be repeated."""
        import optuna

        c = summary["counts"]
        if c.get("RUNNING") or c.get("WAITING") or summary["done"] < self.n_trials:
            print("sweep: top-k reruns skipped: the study has unfinished trials; run the same command again when "
                  "they are done", flush=True)
            return
        complete = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        top = sorted(complete, key=lambda t: t.value, reverse=self.space.direction == "maximize")[:self.args.top_k]
        (self.dir / "reruns").mkdir(exist_ok=True)
        jobs = []
        for t in top:
            # the best trial's re-runs train best_recipe.yaml itself: the file a user will launch
            recipe_path = (self.dir / "best_recipe.yaml" if t.number == self.study.best_trial.number
                           else self.dir / "top" / f"trial-{t.number:04d}.yaml")
            if not recipe_path.is_file() or recipe_path.parent.name == "top":
                recipe_path.parent.mkdir(exist_ok=True)
                _atomic_write(recipe_path, self.recipe_for(t, self.dir / "retrain" / f"trial-{t.number:04d}"))
            for s in range(1, self.args.seeds + 1):
                seed = self.base.train.seed + s
                jobs.append((t, seed, recipe_path, self.dir / "reruns" / f"trial-{t.number:04d}-seed-{seed}"))
        pending = [j for j in jobs if not (j[3] / "final_metrics.json").is_file()]
        print(f"sweep: re-running the top {len(top)} trial(s) over {self.args.seeds} seed(s): {len(pending)} run(s)",
              flush=True)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        procs: list[tuple[subprocess.Popen, Slot, tuple]] = []
        failed = []
        try:
            while pending or procs:
                for p, slot, job in list(procs):
                    if p.poll() is not None:
                        procs.remove((p, slot, job))
                        if p.returncode != 0:
                            failed.append(f"{job[3]} (exit {p.returncode}; see {job[3].with_suffix('.log')})")
                if self.stop_signal is not None:
                    for p, _, _ in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                    for p, _, _ in procs:
                        p.wait()
                    return
                busy = {id(s) for _, s, _ in procs}
                for slot in self.slots:
                    if pending and id(slot) not in busy:
                        job = pending.pop(0)
                        procs.append((self._launch_rerun(job, slot), slot, job))
                time.sleep(POLL_S)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        rows, lines = [], []
        for t in top:
            vals = [run_value(j[3], self.space.metric, self.space.value, self.space.direction) for j in jobs if j[0] is t]
            tests = [_test_value(j[3], self.space.metric) for j in jobs if j[0] is t]
            vals = [v for v in vals if v is not None]
            tests = [v for v in tests if v is not None]
            row = {"trial": t.number, "sweep_value": t.value, "seeds": len(vals), "mean": _mean(vals), "std": _std(vals),
                   "test_mean": _mean(tests), "test_std": _std(tests), "values": json.dumps(vals),
                   "recipe": str(next(j[2] for j in jobs if j[0] is t))}
            rows.append(row)
            line = f"  trial {t.number}: validation {self.space.metric} {_pm(vals)} over {len(vals)} seed(s)"
            if tests:
                line += f"; test {_pm(tests)}"
            lines.append(line)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
        _atomic_write(self.dir / "reruns.csv", buf.getvalue())
        print("sweep: top trials re-run (mean ± std):\n" + "\n".join(lines) + f"\nsweep: {self.dir / 'reruns.csv'}",
              flush=True)
        if failed:
            raise TrialFailuresError(f"sweep: {len(failed)} rerun(s) failed: {'; '.join(failed[:3])}")

    def _launch_rerun(self, job, slot: Slot) -> subprocess.Popen:
        t, seed, recipe_path, run_dir = job
        cmd = [sys.executable, "-m", "ftdist.launcher", self.preset, str(recipe_path), f"train.seed={seed}",
               f"log.output_dir={run_dir}", "--main-port", str(_free_port()), "--quiet",
               *(["--nproc", str(self.nproc)] if self.nproc else [])]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if slot.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
        if len(self.slots) > 1 and not slot.cpus:
            env.setdefault("OMP_NUM_THREADS", "1")
        log.info("rerun of trial %d, seed %d on %s: %s", t.number, seed, slot.describe(), run_dir)
        with open(run_dir.with_suffix(".log"), "ab") as out:
            parent = os.getpid()
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=lambda: _child_setup(parent, slot.cpus))


# ------------------------------------------------------------------ small helpers


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _pm(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f} (one seed)"


def _test_value(run_dir: Path, metric: str) -> float | None:
    try:
        v = (json.loads((Path(run_dir) / "final_metrics.json").read_text()).get("test") or {}).get(metric)
    except (OSError, json.JSONDecodeError):
        return None
    return float(v) if _is_number(v) else None


def _last_error(log_path: Path) -> str:
    try:
        lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errs = [x for x in lines if "error" in x.lower()]
    return (errs or lines or [""])[-1][:300]


def render_table(rows: list[dict], keys: list[str], metric: str) -> str:
    head = ["#", "state", metric, *keys, "time (s)", "note"]
    body = [[str(r["number"]), r["state"], "-" if r["value"] is None else f"{r['value']:.6g}",
             *("-" if r[k] is None else _fmt(r[k]) for k in keys),
             "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}", " ".join((r["note"] or "").split())[:60]]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)])


def main(args) -> int:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError("ftdist sweep needs Optuna: pip install 'optuna>=4'") from None
    return Sweep(args).main()
