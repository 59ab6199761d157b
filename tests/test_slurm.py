"""slurm/train.sbatch on a real 2-node SLURM cluster (tests/slurm_fixture.py), and ./launch's signal exits.

- a 2-node job (one ./launch per node, DDP over gloo, one process per node) forms a world of 2 with
  node ranks 0 and 1, completes without a requeue, and ends with the weights of a local 2-process run;
- preemption: the batch shell's USR1 warning (what `--signal=B:USR1@120` sends) makes every rank save
  a checkpoint; the job requeues itself, resumes from that step, completes, and ends with the weights
  of an uninterrupted run;
- SIGTERM stops (scontrol requeue, plain scancel): every rank saves, the script's closing line says so and
  does not requeue; a requeued job comes back on one node and resumes the 2-node checkpoint;
- no SLURM: ./launch exits 99 with a complete checkpoint on SIGTERM, and 0 when the run ends normally.

The cluster fixture fails (never skips) when CI=true. Every wait is bounded.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from helpers import REPO, base_env, run_ftdist
from slurm_fixture import job_field, slurm_env, wait_for

from ftdist.errors import INTERRUPTED_EXIT as INTERRUPTED
from ftdist.errors import PREEMPTED_EXIT as PREEMPTED

SBATCH = REPO / "slurm" / "train.sbatch"
LAUNCH = REPO / "launch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}
TOL = 1e-6


# ------------------------------------------------------------------ helpers

def _trace(trace_dir: Path, rank: int = 0) -> list[dict]:
    f = trace_dir / f"rank{rank}.jsonl"
    if not f.exists():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return rows


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: parameter names differ"
    diffs = {k: (got[k].double() - want[k].double()).abs().max().item() for k in want}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{what}: max |diff| {diffs[worst]:.3g} at {worst} (tolerance {TOL})"


def _complete_checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "COMPLETE").is_file()) \
        if root.is_dir() else []


class Job:
    """One `sbatch slurm/train.sbatch ...` submitted from `tmp` (its log: tmp/logs/ftdist-JOBID.out)."""

    def __init__(self, cluster: dict, tmp: Path, args: list[str], env: dict | None = None, cpus: int | None = 1,
                 sbatch: list[str] = ()):
        self.env = slurm_env(cluster["slurm_conf"], base=base_env())
        self.env.update({"FTDIST_NPROC": "1", "FTDIST_TRACE_DIR": str(tmp / "job-trace"),
                         "FTDIST_PYTHON": sys.executable, **(env or {})})
        self.env.pop("FTDIST_HOME", None)  # the script must find the checkout itself
        self.trace_dir = tmp / "job-trace"
        (tmp / "logs").mkdir(exist_ok=True)
        # submitted from tmp (not the checkout) with the script's default --output=logs/%x-%j.out;
        # cpus=None keeps the script's own --cpus-per-task
        flags = [*([f"--cpus-per-task={cpus}"] if cpus else []), *sbatch]
        p = subprocess.run(["sbatch", "--parsable", *flags, str(SBATCH), *args], cwd=tmp, env=self.env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"sbatch failed ({p.returncode}): {p.stdout}{p.stderr}"
        self.id = p.stdout.strip().split(";")[0]
        self.log_path = tmp / "logs" / f"ftdist-{self.id}.out"
        self.t0 = time.monotonic()

    def field(self, name: str) -> str | None:
        return job_field(self.env, self.id, name)

    def state(self) -> str:
        return (self.field("JobState") or "?").split()[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no job log yet)"

    def info(self) -> str:
        return (f"job {self.id}: state={self.state()} reason={self.field('Reason')} restarts={self.field('Restarts')} "
                f"exit={self.field('ExitCode')} after {time.monotonic() - self.t0:.0f}s\n--- job log (tail) ---\n"
                + "\n".join(self.log().splitlines()[-60:]))

    def wait_until(self, predicate, timeout: float, what: str, interval: float = 0.2):
        try:
            return wait_for(predicate, timeout, interval, what=f"{what} (job {self.id})")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.info()}") from None

    def wait_end(self, timeout: float) -> str:
        return self.wait_until(lambda: self.state() in ENDED and self.state(), timeout, "the job to end", 0.5)

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=30)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a local ./launch and everything under it (accelerate runs in its own session)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    return fn(*args, **kwargs), time.monotonic() - t0


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return ["tiny", *extra, f"log.output_dir={run_dir}"]


# ------------------------------------------------------------------ the batch script's text

def test_batch_script_names_real_presets_and_ftdists_exit_status():
    """The presets its comments suggest exist; its requeue status is ftdist's; it computes no address itself."""
    from ftdist import presets
    from ftdist.errors import PREEMPTED_EXIT

    text = SBATCH.read_text()
    named = re.findall(r"FTDIST_PRESET=([\w.-]+)", text + (REPO / "slurm" / "README.md").read_text())
    assert named and set(named) <= set(presets.list_presets()), named
    assert re.findall(r"^PREEMPTED_EXIT=(\d+)", text, re.MULTILINE) == [str(PREEMPTED_EXIT)]
    assert "--print-main-address" in text and "NodeAddr=" not in text


# ------------------------------------------------------------------ SLURM: a 2-node job

@pytest.mark.timeout(400)
def test_two_node_job_matches_two_local_processes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, "train.max_steps=8")
    # a copy of ftdist in the submit directory comes first for the ranks (`python -m` puts the working
    # directory on sys.path): the log must name the copy they import and warn. Identical code, so the
    # job still matches the reference (which runs there too)
    shutil.copytree(REPO / "ftdist", tmp_path / "ftdist", ignore=shutil.ignore_patterns("__pycache__"))
    t0 = time.monotonic()
    job = Job(slurm_cluster, tmp_path, args)  # dry run on (the default): the plan is in the log first
    with ThreadPoolExecutor(1) as pool:  # the reference runs meanwhile: it uses the cores the job leaves idle
        ref_run = pool.submit(_timed, run_ftdist, tmp_path, args[1:-1], preset="cpu-2", nprocs=2, name="ref")
        try:
            state = job.wait_end(300)
        finally:
            job.cancel()
        t_job = time.monotonic() - t0
        ref, t_ref = ref_run.result()
    log = job.log()
    assert state == "COMPLETED", job.info()
    assert job.field("Restarts") == "0", job.info()
    assert "training finished (exit 0)" in log and "requeueing" not in log, log
    copy = re.escape(str(tmp_path.resolve()))
    assert re.search(rf"the ranks import ftdist {copy} \(version [\w.+-]+, not a git checkout\)", log), log
    assert f"warning: the ranks import ftdist from {tmp_path.resolve()}, not from {REPO.resolve()}" in log, log
    # the plan: the dry run on node 0, then the trainer's own, both with the 2-node world
    assert "plan (dry run: nothing is trained)" in log, log
    assert len(re.findall(r"world size +2 \(2 node\(s\) x 1 process\(es\)\)", log)) >= 2, log
    # each node took its own rank (the batch shell must not expand SLURM_NODEID for both)
    assert "node rank 0 of 2" in log and "node rank 1 of 2" in log, log
    assert "--machine_rank 0" in log and "--machine_rank 1" in log, log
    rows = {r: _trace(job.trace_dir, r) for r in (0, 1)}
    assert [x["step"] for x in rows[0]] == list(range(1, 9)), rows[0]
    assert [x["step"] for x in rows[1]] == list(range(1, 9)), rows[1]
    assert {x["world"] for r in rows for x in rows[r]} == {2}
    assert not set(rows[0][0]["ids"]) & set(rows[1][0]["ids"]), "both nodes trained on the same samples"

    assert ref.rc == 0, ref.log[-4000:]
    assert [x["loss"] for x in rows[0]] == pytest.approx(ref.losses(0), abs=TOL)
    _assert_same_weights(_weights(run_dir), ref.weights(), "2-node SLURM job vs 2 local processes")
    print(f"\n[slurm 2-node] job {t_job:.1f}s (submit to COMPLETED); local 2-process reference {t_ref:.1f}s "
          "(in parallel)")


# ------------------------------------------------------------------ SLURM: preemption, requeue, resume

@pytest.mark.timeout(400)
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    steps = 100
    # only the preemption checkpoint exists mid-run; the dry run is skipped to save time
    args = _overrides(run_dir, f"train.max_steps={steps}", "checkpoint.every_steps=1000", "log.progress=false")
    t0 = time.monotonic()
    job = Job(slurm_cluster, tmp_path, args, env={"FTDIST_DRY_RUN": "0"})
    timings = {}
    pool = ThreadPoolExecutor(1)  # the uninterrupted reference runs meanwhile (e.g. while the job waits to restart)
    ref_run = pool.submit(_timed, run_ftdist, tmp_path, args[1:-1], preset="cpu-2", nprocs=2, name="ref")
    try:
        # training has started on both nodes
        job.wait_until(lambda: len(_trace(job.trace_dir, 0)) >= 3 or job.state() in ENDED, 240, "3 trained steps",
                       0.1)
        assert job.state() == "RUNNING", job.info()
        timings["first steps"] = time.monotonic() - t0
        # what --signal=B:USR1@120 does ahead of the time limit: USR1 to the batch shell only
        p = subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], env=job.env, capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        signalled_at = len(_trace(job.trace_dir, 0))
        ckpts = job.wait_until(lambda: _complete_checkpoints(run_dir), 120, "the preemption checkpoint")
        timings["checkpoint"] = time.monotonic() - t0

        # the batch script requeues the job (after srun ended: the first run's rows are all written)
        job.wait_until(lambda: job.field("Restarts") == "1", 120, "the requeue")
        k = len(_trace(job.trace_dir, 0))
        timings["requeued"] = time.monotonic() - t0

        # it starts again at BeginTime = requeue + cred_expire (10 s on the test cluster). Not pulled forward
        # with `scontrol update StartTime=now`: issued within a second of the requeue, it failed the job
        # ("Killing non-startable batch JobId=N: Job credential revoked")
        job.wait_until(lambda: job.state() == "RUNNING" or job.state() in ENDED, 120, "the requeued job to start", 0.5)
        timings["restarted"] = time.monotonic() - t0
        state = job.wait_end(300)
        timings["completed"] = time.monotonic() - t0
    finally:
        job.cancel()
        pool.shutdown(wait=True)
    log = job.log()
    assert state == "COMPLETED", job.info()
    assert job.field("Restarts") == "1", job.info()

    # one checkpoint, at the step where the first run stopped, soon after the signal
    assert ckpts == [k], f"checkpoints {ckpts}, first run trained {k} steps\n{job.info()}"
    assert signalled_at <= k < steps, (signalled_at, k)
    assert "got SIGUSR1" in log and f"requeueing job {job.id}" in log, log
    assert "Traceback" not in log and "Exception raised from" not in log, log  # a clean stop looks clean
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log
    assert re.search(rf"resuming from +\S+step-{k:08d} \(step {k}\)", log), log
    # the restart continues at step k+1: every step trained exactly once, all in a world of 2
    for rank in (0, 1):
        got = [x["step"] for x in _trace(job.trace_dir, rank)]
        assert got[:k] == list(range(1, k + 1)) and got[k:k + 1] == [k + 1], (rank, got)
        assert got == list(range(1, steps + 1)), (rank, got)
        assert {x["world"] for x in _trace(job.trace_dir, rank)} == {2}

    ref, timings["reference (in parallel)"] = ref_run.result()
    assert ref.rc == 0, ref.log[-4000:]
    assert [x["loss"] for x in _trace(job.trace_dir, 0)] == pytest.approx(ref.losses(0), abs=TOL)
    _assert_same_weights(_weights(run_dir), ref.weights(), "preempted + requeued job vs uninterrupted run")
    print(f"\n[slurm preemption] signal at step {signalled_at}, checkpoint at step {k}; "
          + ", ".join(f"{n} {t:.1f}s" for n, t in timings.items()))


# ------------------------------------------------------------------ SLURM: every way SLURM stops a job

def _checkpoint_files(run_dir: Path, step: int) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints" / f"step-{step:08d}").rglob("*") if p.is_file()}


@pytest.mark.timeout(420)
def test_sigterm_stops_checkpoint_and_a_requeued_job_resumes_on_fewer_nodes(slurm_cluster, tmp_path):
    """One run, three starts, each stopped the way SLURM stops jobs (SIGTERM to every process of the job,
    srun and the batch shell included, then SIGKILL after KillWait):

    1. 2 nodes, `scontrol requeue` (a hard requeue: SLURM requeues the job itself): every rank saves a
       checkpoint, the first start ends with the script's closing line; while the job is pending again
       its node count is lowered (`scontrol update NumNodes=1 NumTasks=1`: one task per node), as a
       cluster that hands back a smaller allocation would;
    2. the same job on 1 node resumes ("written by 2 processes ..., now 1 process") and is stopped with a
       plain `scancel`: checkpoint saved, the job ends CANCELLED and is not requeued;
    3. the same command submitted again (what the docs say to do after a scancel) resumes and finishes.

    Submitted with the script's default --cpus-per-task, which must fit these 2-core nodes."""
    run_dir = tmp_path / "run"
    steps = 60
    args = _overrides(run_dir, f"train.max_steps={steps}", "checkpoint.every_steps=1000", "log.progress=false")
    env = {"FTDIST_DRY_RUN": "0"}
    t0, timings = time.monotonic(), {}
    job = Job(slurm_cluster, tmp_path, args, env=env, cpus=None)
    try:
        job.wait_until(lambda: len(_trace(job.trace_dir, 0)) >= 3 or job.state() in ENDED, 240, "3 trained steps",
                       0.1)
        assert job.state() == "RUNNING", job.info()
        timings["2 nodes training"] = time.monotonic() - t0
        p = subprocess.run(["scontrol", "requeue", job.id], env=job.env, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        job.wait_until(lambda: job.state() == "PENDING" and job.field("Restarts") == "1", 120, "the requeued job")
        k1 = len(_trace(job.trace_dir, 0))
        log1 = job.log()
        p = subprocess.run(["scontrol", "update", f"JobId={job.id}", "NumNodes=1", "NumTasks=1"], env=job.env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        timings["requeued"] = time.monotonic() - t0

        job.wait_until(lambda: len(_trace(job.trace_dir, 0)) >= k1 + 3 or job.state() in ENDED, 240,
                       "3 steps on one node", 0.1)
        assert job.state() == "RUNNING" and job.field("NumNodes") == "1", job.info()
        timings["1 node training"] = time.monotonic() - t0
        subprocess.run(["scancel", job.id], env=job.env, capture_output=True, timeout=30)
        state = job.wait_end(120)
        k2 = len(_trace(job.trace_dir, 0))
        timings["cancelled"] = time.monotonic() - t0
    finally:
        job.cancel()
    log2 = job.log()
    assert state == "CANCELLED" and job.field("Restarts") == "1", job.info()

    # 1: the hard requeue saved step k1 on every rank and the first start said how it ended
    assert _complete_checkpoints(run_dir)[:1] == [k1], (_complete_checkpoints(run_dir), k1, log1)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= _checkpoint_files(run_dir, k1), log1
    assert "got SIGTERM" in log1 and "sending USR1 through srun" not in log1, log1
    # which code ran: the checkout the script was submitted from, with its version and commit
    assert re.search(rf"the ranks import ftdist {re.escape(str(REPO.resolve()))} \(version [\w.+-]+, git commit "
                     r"[0-9a-f]{7,}", log1), log1
    assert "warning: the ranks import" not in log1, log1
    closing = re.findall(r"\[train\.sbatch [^]]*\] checkpoint saved on SIGTERM.*", log1)
    assert len(closing) == 1, log1
    # 2: resumed on one node from it, then a plain scancel saved again and ended the job
    assert re.search(rf"resuming from step {k1}, written by 2 processes \(ddp\), now 1 process \(single\)", log2), log2
    assert "SLURM_RESTART_COUNT=1" in log2 and "on 1 node(s)" in log2, log2
    assert _complete_checkpoints(run_dir) == [k1, k2] and k1 < k2 < steps, (_complete_checkpoints(run_dir), k1, k2)
    assert len(re.findall(r"checkpoint saved on SIGTERM", log2)) == 2, log2
    assert f"requeueing job {job.id}" not in log2, log2
    # clean stops are quiet: no Python or C++ traceback from torchrun, its store or the ranks
    assert "Traceback" not in log2 and "SignalException" not in log2 and "Exception raised from" not in log2, log2

    # 3: the same command again resumes from step k2 on one node and finishes
    again = Job(slurm_cluster, tmp_path, args, env=env, cpus=None, sbatch=["--nodes=1"])
    try:
        assert again.wait_end(300) == "COMPLETED", again.info()
    finally:
        again.cancel()
    timings["resubmitted and completed"] = time.monotonic() - t0
    log3 = again.log()
    assert re.search(rf"resuming from step {k2}, written by 1 process \(single\), now 1 process \(single\)", log3), log3
    assert "training finished (exit 0)" in log3, log3
    got = [x["step"] for x in _trace(job.trace_dir, 0)]
    assert got == list(range(1, steps + 1)), got  # every step trained once across the three starts
    assert {x["world"] for x in _trace(job.trace_dir, 0)[k1:]} == {1}
    assert (run_dir / "model" / "model.safetensors").is_file()
    print(f"\n[slurm SIGTERM stops] requeue at step {k1} (2 nodes), scancel at step {k2} (1 node); "
          + ", ".join(f"{n} {t:.1f}s" for n, t in timings.items()))


def test_a_repeated_stop_signal_keeps_saving_and_only_a_second_ctrl_c_exits_at_once(tmp_path):
    """SLURM signals every process of a step, torchrun passes SIGTERM on to its workers, the batch script
    relays: a rank sees the same stop request several times. Only a second Ctrl-C means "stop now"."""
    # one interpreter per case costs a torch import each: one for the cases that survive, one that exits
    code = ("import os, signal, sys\nfrom ftdist.preempt import Preemption\n"
            "for case in sys.argv[1:]:\n"
            "    p = Preemption()\n"
            "    for s in case.split(','): os.kill(os.getpid(), getattr(signal, s))\n"
            "    print('alive', p.signal, p.exit_code, flush=True)")
    cases = {"SIGTERM,SIGTERM,SIGUSR1": f"alive {int(signal.SIGTERM)} {PREEMPTED}",
             "SIGUSR1,SIGTERM": f"alive {int(signal.SIGUSR1)} {PREEMPTED}",
             "SIGINT,SIGTERM": f"alive {int(signal.SIGINT)} {INTERRUPTED}"}
    p = subprocess.run([sys.executable, "-c", code, *cases], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.splitlines() == list(cases.values()), (p.returncode, p.stdout, p.stderr)
    p = subprocess.run([sys.executable, "-c", code, "SIGINT,SIGINT"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 128 + signal.SIGINT and "alive" not in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_clean_stop_output_drops_torchruns_signal_tracebacks_and_keeps_real_errors():
    """What slurm/train.sbatch pipes each node's output through: torchrun's SignalException traceback and
    its exit-barrier store error (both only follow a clean stop) go; any other traceback stays whole."""
    from ftdist.quietstop import BARRIER_NOTE, quiet

    signal_tb = ["Traceback (most recent call last):\n", '  File "run.py", line 9, in main\n', "    agent.run()\n",
                 "torch.distributed.elastic.multiprocessing.api.SignalException: Process 7 got signal: 15\n"]
    barrier = ["E1206 02:29:21.143000 7362 api.py:1008] Error waiting on exit barrier. Elapsed: 0.1 seconds\n",
               "Traceback (most recent call last):\n", '  File "api.py", line 994, in _exit_barrier\n',
               "torch.distributed.DistNetworkError: failed to recv, got 0 bytes\n",
               "Exception raised from recvBytes at /torch/csrc/distributed/c10d/Utils.hpp:670 (most recent first):\n",
               "frame #0: c10::Error::Error() + 0x98\n", "frame #1: <unknown function> + 0x5f0e1b\n"]
    real_tb = ["Traceback (most recent call last):\n", '  File "train.py", line 3, in step\n',
               "RuntimeError: CUDA out of memory\n"]
    ok = ["0: plan:\n", "launch: checkpoint saved on a signal\n"]
    got = list(quiet([ok[0], *signal_tb, *real_tb, *barrier, ok[1], *real_tb[:2]]))
    assert got == [ok[0], *real_tb, BARRIER_NOTE, ok[1], *real_tb[:2]]  # an unfinished one is kept too


# ------------------------------------------------------------------ ./launch without SLURM: exit codes

@pytest.mark.timeout(300)
def test_launch_sigterm_checkpoints_and_exits_99_then_resumes_with_0(tmp_path):
    run_dir, trace_dir = tmp_path / "run", tmp_path / "trace"
    steps = 80
    env = slurm_env("/nonexistent", base=base_env({"FTDIST_TRACE_DIR": str(trace_dir)}))  # no SLURM_* at all
    env.pop("SLURM_CONF")
    cmd = [sys.executable, str(LAUNCH), *_overrides(run_dir, f"train.max_steps={steps}", "checkpoint.every_steps=1000",
                                                    "log.progress=false")]
    out = (tmp_path / "launch1.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(_trace(trace_dir)) >= 3 or proc.poll() is not None, 120, 0.05, what="3 trained steps")
        assert proc.poll() is None, (tmp_path / "launch1.log").read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
        out.close()
    log1 = (tmp_path / "launch1.log").read_text()
    k = len(_trace(trace_dir))
    assert rc == PREEMPTED, f"./launch exited {rc} on SIGTERM, want {PREEMPTED}\n{log1[-3000:]}"
    assert 3 <= k < steps
    assert _complete_checkpoints(run_dir) == [k], (_complete_checkpoints(run_dir), k, log1[-3000:])
    assert not (run_dir / "model").exists()

    # the same command again: resumes at step k+1, runs to the end, exits 0
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"./launch exited {p.returncode}\n{(p.stdout + p.stderr)[-3000:]}"
    got = [x["step"] for x in _trace(trace_dir)]
    assert got == list(range(1, steps + 1)) and got[k] == k + 1, got
    assert (run_dir / "model" / "model.safetensors").is_file()
    stop = Path(tempfile.gettempdir()) / f"ftdist-stop-{proc.pid}"
    assert not stop.exists() and not Path(f"{stop}.preempted").exists(), "./launch left its stop files behind"


def _start_launch(tmp_path: Path, name: str, *extra: str, fault: str = ""):
    run_dir, trace_dir = tmp_path / name, tmp_path / f"{name}-trace"
    env = base_env({"FTDIST_TRACE_DIR": str(trace_dir), "FTDIST_FAULT": fault})
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    cmd = [sys.executable, str(LAUNCH), *_overrides(run_dir, "log.progress=false", *extra)]
    log = tmp_path / f"{name}.log"
    out = log.open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc, run_dir, trace_dir, log


@pytest.mark.timeout(300)
def test_launch_ctrl_c_checkpoints_and_exits_130(tmp_path):
    """An interactive Ctrl-C is not a preemption: checkpoint at the next step boundary, exit 130, no requeue."""
    proc, run_dir, trace_dir, log = _start_launch(tmp_path, "run", "train.max_steps=80", "checkpoint.every_steps=1000")
    try:
        wait_for(lambda: len(_trace(trace_dir)) >= 3 or proc.poll() is not None, 120, 0.05, what="3 trained steps")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        _kill_tree(proc)
    text = log.read_text()
    k = len(_trace(trace_dir))
    assert rc == INTERRUPTED, f"./launch exited {rc} on Ctrl-C, want {INTERRUPTED}\n{text[-3000:]}"
    assert "Ctrl-C" in text and "requeue" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert 3 <= k < 80
    assert _complete_checkpoints(run_dir) == [k], (_complete_checkpoints(run_dir), k, text[-3000:])


@pytest.mark.timeout(300)
def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """Step 3 sleeps 60 s (injected), so the first Ctrl-C's checkpoint is a minute away; the second one
    must end every process within seconds, leaving step 2's checkpoint complete and nothing half-written."""
    proc, run_dir, trace_dir, log = _start_launch(tmp_path, "run", "train.max_steps=20", "checkpoint.every_steps=1",
                                                  fault="slow@3")
    try:
        wait_for(lambda: _complete_checkpoints(run_dir) == [1, 2] or proc.poll() is not None, 120, 0.05,
                 what="the step-2 checkpoint")
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert proc.poll() is None and workers, log.read_text()
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        gone, alive = psutil.wait_procs(workers, timeout=10)
    finally:
        _kill_tree(proc)
    text = log.read_text()
    assert rc == INTERRUPTED, f"./launch exited {rc}, want {INTERRUPTED}\n{text[-3000:]}"
    assert took < 20, f"the second Ctrl-C took {took:.0f}s to stop the run"
    assert not alive, f"processes left running after the second Ctrl-C: {alive}"
    assert "second Ctrl-C" in text and "Traceback" not in text, text[-3000:]
    assert _complete_checkpoints(run_dir) == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    # the same command resumes from it
    proc, *_ = _start_launch(tmp_path, "run", "train.max_steps=4", "checkpoint.every_steps=1",
                             "checkpoint.allow_changes=[train.max_steps]")
    try:
        assert proc.wait(timeout=200) == 0, log.read_text()[-3000:]
    finally:
        _kill_tree(proc)
    assert [r["step"] for r in _trace(trace_dir)] == [1, 2, 3, 4]
