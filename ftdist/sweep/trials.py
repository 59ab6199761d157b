"""One trial: its run as a `python -m ftdist.launcher` subprocess pinned to a worker's GPUs and cores, its eval
metrics read back from metrics.jsonl and reported to Optuna, pruning through the launcher's stop file (SIGTERM),
and its outcome told to the study."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftdist import config
from ftdist.errors import RecipeError
from ftdist.launcher import kill_tree
from ftdist.sweep.space import SweepError, fmt_value, is_number, override

log = logging.getLogger("ftdist")

HEARTBEAT_S = 30          # a running trial's heartbeat is written this often
STOP_GRACE_S = 600        # after SIGTERM, a run has this long to checkpoint and exit before it is killed
POLL_S = 0.5

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


def eval_rows(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    f = Path(run_dir) / "metrics.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            v = row.get(f"eval/{metric}")
            if isinstance(row.get("step"), int) and is_number(v):
                out.append((row["step"], float(v)))
    return out


def run_value(run_dir: Path, metric: str, mode: str, direction: str) -> float | None:
    """A finished run's objective: its final validation metric, or (mode best) its best evaluation."""
    try:
        final = json.loads((Path(run_dir) / "final_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    last = (final.get("validation") or {}).get(metric)
    values = [v for _, v in eval_rows(run_dir, metric)] + ([float(last)] if is_number(last) else [])
    if not values:
        return None
    if mode == "final":
        return float(last) if is_number(last) else values[-1]
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


def _last_error(log_path: Path) -> str:
    try:
        lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errs = [x for x in lines if "error" in x.lower()]
    return (errs or lines or [""])[-1][:300]


def run_env(slot: Slot, workers: int) -> dict[str, str]:
    """The environment of a run on `slot`: ftdist importable from wherever the sweep runs, the slot's GPUs, and
    one OpenMP thread each when the workers outnumber the cores."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if slot.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
    if workers > 1 and not slot.cpus:
        env.setdefault("OMP_NUM_THREADS", "1")  # more workers than cores
    return env


def spawn(cmd: list[str], env: dict[str, str], out, cpus: list[int] | None) -> subprocess.Popen:
    """Start a run in a session of its own, its output to `out`; it stops when this controller dies."""
    parent = os.getpid()
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: _child_setup(parent, cpus))


class TrialsMixin:
    """The controller's trial runs. Needs from the controller: args, recipe_arg, overrides, space, dir, slots,
    preset, nproc, worker, running, failures_in_row, last_error, study, storage; and from StudyMixin
    next_trial, sys_attr and requeue."""

    def launch_cmd(self, recipe: str, overrides: list[str]) -> list[str]:
        return [sys.executable, "-m", "ftdist.launcher", self.preset, recipe, *overrides, "--main-port",
                str(_free_port()), "--quiet", *(["--nproc", str(self.nproc)] if self.nproc else [])]

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
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in params.items())
        try:
            config.load(self.recipe_arg, overrides)  # the trial's recipe, checked by ftdist's own loader
        except RecipeError as e:
            self._fail(trial, f"its recipe is invalid: {e}")
            log.warning("trial %d (%s): recipe refused: %s", trial.number, shown, e)
            return "failed"
        log_path = run_dir.with_suffix(".log")
        cmd = self.launch_cmd(self.recipe_arg, overrides)
        env = run_env(slot, len(self.slots))
        env["FTDIST_SWEEP_TRIAL"] = str(trial.number)
        with open(log_path, "ab") as out:
            out.write(f"\n### trial {trial.number} ({self.worker}, {slot.describe()}) {time.ctime()}\n".encode())
            out.flush()
            proc = spawn(cmd, env, out, slot.cpus)
        self.sys_attr(trial._trial_id, "ftdist:run", process_info(proc.pid))
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
                    if isinstance(step, int) and is_number(v) and step not in r.reported and r.stop_reason != "pruned":
                        r.reported[step] = float(v)
                        r.trial.report(float(v), step)
                        if r.stop_reason is None and r.trial.should_prune():
                            r.stop_reason = "pruned"
                            r.trial.set_user_attr("note", f"pruned at step {step}")
                            log.info("trial %d pruned at step %d (%s=%.6g)", r.trial.number, step, self.space.metric, v)
                            self.stop_run(r)
        if time.monotonic() - r.heartbeat > HEARTBEAT_S:
            r.heartbeat = time.monotonic()
            self.sys_attr(r.trial._trial_id, "ftdist:heartbeat", time.time())
        if r.stop_sent is not None and time.monotonic() - r.stop_sent > STOP_GRACE_S and r.proc.poll() is None:
            log.warning("trial %d: its run did not stop %d s after SIGTERM; killing it", r.trial.number, STOP_GRACE_S)
            kill_tree(r.proc.pid)

    def stop_run(self, r: Running) -> None:
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
            self.requeue(r.trial._trial_id)
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

