"""Proves the SLURM test cluster (tests/slurm_fixture.py) works: a 2-node job,
job requeue + restart, and signal delivery (scancel forms and --signal)."""

from __future__ import annotations

import pathlib
import subprocess
import textwrap
import time

import pytest
from slurm_fixture import job_field, wait_for

# the session fixture `slurm_cluster` comes from tests/conftest.py


def _run(cmd, env, timeout=60, check=True):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} -> rc {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def _sbatch(env, *args, timeout=60) -> str:
    return _run(["sbatch", "--parsable", *args], env, timeout=timeout).stdout.strip().split(";")[0]


def _script(path: pathlib.Path, body: str) -> pathlib.Path:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def _logs(cluster) -> str:
    out = []
    for f in sorted((cluster["state_dir"] / "log").glob("*.log")):
        out.append(f"--- {f.name} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


@pytest.mark.timeout(180)
def test_two_node_job(slurm_cluster, tmp_path):
    env = slurm_cluster["env"]
    out = tmp_path / "out.txt"
    script = _script(tmp_path / "job.sh", """
        #!/bin/bash
        srun bash -c 'echo node=$SLURMD_NODENAME rank=$SLURM_NODEID procid=$SLURM_PROCID'
    """)
    t0 = time.monotonic()
    p = _run(["sbatch", "--wait", "-N", "2", "--ntasks-per-node=1", "-o", str(out), str(script)],
             env, timeout=120, check=False)
    text = out.read_text() if out.exists() else ""
    print(f"\n[2-node job] {time.monotonic() - t0:.1f}s (setup took {slurm_cluster['setup_seconds']}s)\n{text}")
    assert p.returncode == 0, f"{p.stdout}{p.stderr}\n{text}\n{_logs(slurm_cluster)}"
    lines = set(text.split())
    assert {"node=node1", "node=node2"} <= lines, text
    assert {"rank=0", "rank=1"} <= lines, text
    assert {"procid=0", "procid=1"} <= lines, text


REQUEUE_JOB = """
    #!/bin/bash
    #SBATCH --requeue
    #SBATCH --open-mode=append
    D={d}
    echo "run restart=${{SLURM_RESTART_COUNT:-unset}} $(date +%s.%N)" >> $D/runs.log
    if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
        scontrol requeue "$SLURM_JOB_ID"
        echo "requeue rc=$?" >> $D/runs.log
        exit 99
    fi
    echo "resumed SLURM_RESTART_COUNT=$SLURM_RESTART_COUNT" > $D/resumed
"""


def _requeue_job(cluster, d: pathlib.Path, nudge: bool):
    env = cluster["env"]
    script = _script(d / "requeue.sh", REQUEUE_JOB.format(d=d))
    t0 = time.monotonic()
    job = _sbatch(env, "-N", "1", "-o", str(d / "slurm-%j.out"), str(script))
    resumed = d / "resumed"
    nudged = pending_since = None
    deadline = t0 + 90
    while not resumed.exists():
        assert time.monotonic() < deadline, (
            f"requeued job {job} did not restart within 90s; state="
            f"{job_field(env, job, 'JobState')} reason={job_field(env, job, 'Reason')}\n"
            f"{(d / 'runs.log').read_text() if (d / 'runs.log').exists() else ''}\n{_logs(cluster)}")
        if nudge and nudged is None and pending_since is None and (d / "runs.log").exists() \
                and job_field(env, job, "JobState") == "PENDING" \
                and job_field(env, job, "Reason") == "BeginTime":
            pending_since = time.monotonic()
        if nudge and nudged is None and pending_since is not None and time.monotonic() - pending_since >= 2:
            # the requeued job waits for BeginTime; pull it forward. Not at once: slurmd rejects a
            # credential created in the same second as the old one's revocation ("Killing non-startable
            # batch JobId=N: Job credential revoked", the job FAILS), so give it 2 s
            _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env)
            nudged = time.monotonic() - t0
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    wait_for(lambda: job_field(env, job, "JobState") == "COMPLETED", 30, what="COMPLETED")
    runs = (d / "runs.log").read_text()
    print(f"\n[requeue nudge={nudge}] resumed after {elapsed:.1f}s (nudged at {nudged}) "
          f"Restarts={job_field(env, job, 'Restarts')}\n{runs}{resumed.read_text()}")
    assert resumed.read_text().strip() == "resumed SLURM_RESTART_COUNT=1"
    assert job_field(env, job, "Restarts") == "1"
    assert "run restart=unset" in runs and "run restart=1" in runs
    return elapsed


@pytest.mark.timeout(180)
def test_requeue_restarts_job(slurm_cluster, tmp_path):
    """`scontrol requeue $SLURM_JOB_ID` from inside the job; the cluster's short
    AuthInfo cred_expire (10 s) makes the requeued job eligible ~11 s later."""
    elapsed = _requeue_job(slurm_cluster, tmp_path, nudge=False)
    assert elapsed < 60


@pytest.mark.timeout(180)
def test_requeue_restart_now(slurm_cluster, tmp_path):
    """Works on any cluster: once the requeued job is PENDING (Reason=BeginTime),
    `scontrol update JobId=N StartTime=now` lets it start at once."""
    elapsed = _requeue_job(slurm_cluster, tmp_path, nudge=True)
    assert elapsed < 30


# batch shell traps USR1; a plain child of the batch shell and the two srun
# tasks do the same; each writes who got it to $D/<who>.log
SIGNAL_JOB = """
    #!/bin/bash
    export D={d}
    trap 'echo "batch USR1 $(date +%s.%N)" >> $D/batch.log' USR1
    bash -c 'trap "echo child USR1 >> $D/child.log" USR1; touch $D/ready.child; for i in $(seq 1500); do sleep 0.1; done' &
    srun bash -c 'trap "echo task$SLURM_PROCID USR1 >> $D/task$SLURM_PROCID.log" USR1; touch $D/ready.task$SLURM_PROCID; for i in $(seq 1500); do sleep 0.1; done' &
    touch $D/ready.batch
    while kill -0 $! 2>/dev/null; do wait $!; done
"""
ALL = ("batch", "child", "task0", "task1")


def _signal_job(cluster, d: pathlib.Path, *sbatch_args) -> str:
    d.mkdir(parents=True, exist_ok=True)
    script = _script(d / "sig.sh", SIGNAL_JOB.format(d=d))
    job = _sbatch(cluster["env"], "-N", "2", "--ntasks-per-node=1", "-o", str(d / "slurm-%j.out"),
                  *sbatch_args, str(script))
    wait_for(lambda: all((d / f"ready.{w}").exists() for w in ALL), 60, 0.1,
             what=f"job {job} processes ready")
    time.sleep(0.3)  # traps installed
    return job


def _receivers(d: pathlib.Path) -> set:
    return {w for w in ALL if (d / f"{w}.log").exists()}


@pytest.mark.timeout(180)
def test_scancel_signal_forms(slurm_cluster, tmp_path):
    env = slurm_cluster["env"]
    forms = {
        "batch": (["scancel", "--batch", "--signal=USR1"], {"batch"}),
        "steps": (["scancel", "--signal=USR1"], {"task0", "task1"}),
        "full": (["scancel", "--full", "--signal=USR1"], set(ALL)),
    }
    seen = {}
    for name, (cmd, expected) in forms.items():
        d = tmp_path / name
        job = _signal_job(slurm_cluster, d)
        _run([*cmd, job], env)
        try:
            wait_for(lambda d=d, expected=expected: _receivers(d) >= expected, 15, 0.1,
                     what=f"{name}: {expected}")
        except TimeoutError:
            pass
        time.sleep(1.0)  # give unexpected receivers a chance to show up
        seen[name] = _receivers(d)
        _run(["scancel", job], env)
        wait_for(lambda job=job: job_field(env, job, "JobState") in ("CANCELLED", "COMPLETED", "FAILED"),
                 30, what=f"job {job} ended")
    print("\n[scancel signal forms] " + "; ".join(
        f"{' '.join(forms[n][0])} -> {sorted(s)}" for n, s in seen.items()))
    for name, (cmd, expected) in forms.items():
        assert seen[name] == expected, f"{' '.join(cmd)}: got {sorted(seen[name])}, want {sorted(expected)}"


@pytest.mark.timeout(180)
def test_sbatch_signal_option(slurm_cluster, tmp_path):
    """--signal=[B:]USR1@80 with --time=2 (120 s). slurmctld checks time limits only
    every 30 s and sends the signal up to 30 s early (when remaining <= N + 30 s),
    so here it arrives 10-40 s after start, well before the limit.
    Caveat: if N + 30 >= the time limit, the signal goes out at the first check,
    possibly before srun has started any step; --signal=USR1@N (steps only) is then
    lost, while B: still reaches the batch shell."""
    env = slurm_cluster["env"]
    jobs = {}
    t0 = time.monotonic()
    for name, sig in (("B", "--signal=B:USR1@80"), ("steps", "--signal=USR1@80")):
        jobs[name] = _signal_job(slurm_cluster, tmp_path / name, "--time=2", sig)
    try:
        wait_for(lambda: _receivers(tmp_path / "B") and _receivers(tmp_path / "steps"), 75, 0.2,
                 what="--signal delivery")
        elapsed = time.monotonic() - t0
    finally:
        time.sleep(1.0)
        got = {n: _receivers(tmp_path / n) for n in jobs}
        for job in jobs.values():
            _run(["scancel", job], env, check=False)
    print(f"\n[--signal] delivered {elapsed:.1f}s after submit: "
          f"B:USR1 -> {sorted(got['B'])}; USR1 -> {sorted(got['steps'])}")
    assert got["B"] == {"batch"}
    assert got["steps"] == {"task0", "task1"}
