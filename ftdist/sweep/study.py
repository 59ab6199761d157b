"""The study: the sweep folder, Optuna's storage (a journal file by default, or an RDB URL) and the lock every
controller takes around it, the check that a resumed study matches its space and recipe, and the trials a gone
controller left RUNNING: recorded when their run finished, else re-queued to resume from their checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ftdist import config
from ftdist.sweep.space import PRUNERS, SAMPLERS, SweepError
from ftdist.sweep.trials import HOST, POLL_S, STOP_GRACE_S, alive, eval_rows, kill_tree, process_info, run_value

log = logging.getLogger("ftdist")

MARKER = "ftdist-sweep.json"
STALE_AFTER_S = 180       # a trial of another host without a heartbeat for this long has lost its controller
MAX_RETRIES = 5           # an interrupted trial is re-queued at most this often
FINISHED = ("COMPLETE", "PRUNED")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class StudyMixin:
    """The controller's study. Needs from the controller: args, recipe_arg, overrides, base, space, n_trials, dir,
    slots, preset, running; sets storage, lock and study."""

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
            atomic_write(d / MARKER, json.dumps({"created_by": "ftdist sweep", "recipe": self.recipe_arg}) + "\n")

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

    def sys_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(trial_id, key, value)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        return counts

    def requeue(self, trial_id: int) -> None:
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
                    for step, v in eval_rows(Path(run_dir), self.space.metric):
                        if step not in t.intermediate_values:
                            self.storage.set_trial_intermediate_value(t._trial_id, step, v)
                    self.storage.set_trial_user_attr(t._trial_id, "note", "finished after its controller stopped")
                    self.study.tell(t.number, value)
                    log.info("trial %d: its run finished after its controller stopped: %s=%.6g", t.number,
                             self.space.metric, value)
                    continue
                self.storage.set_trial_user_attr(t._trial_id, "note", "interrupted; re-queued")
                if self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    self.requeue(t._trial_id)
                    log.info("trial %d: interrupted (its controller is gone); re-queued to resume from its last "
                             "checkpoint", t.number)
            except UpdateFinishedTrialError:
                continue  # another controller got there first

    def _wait_gone(self, info: dict) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        while alive(info) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if alive(info):
            kill_tree(int(info["pid"]))

    def next_trial(self):
        """Under the lock: reap, then a trial to run (a re-queued one first, then the space's enqueue list, then
        the sampler), or None when the budget is taken."""
        from optuna.trial import TrialState

        with locked(self.lock):
            self.reap()
            c = self.counts()
            if c.get("COMPLETE", 0) + c.get("PRUNED", 0) + c.get("RUNNING", 0) >= self.n_trials:
                return None
            if not c.get("WAITING"):
                used = {t.user_attrs.get("enqueued") for t in self.study.get_trials(deepcopy=False)}
                todo = [i for i in range(len(self.space.enqueue)) if i not in used]
                if todo:
                    self.study.enqueue_trial(self.space.enqueue[todo[0]], user_attrs={"enqueued": todo[0]})
            trial = self.study.ask()
            self.sys_attr(trial._trial_id, "ftdist:owner", process_info(os.getpid()))
            self.sys_attr(trial._trial_id, "ftdist:heartbeat", time.time())
            assert self.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
            return trial

