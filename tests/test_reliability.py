"""Reliability: exact resume after SIGKILL, atomic checkpoints, no hangs, the non-finite policy, damaged checkpoints.

Faults are injected with FTDIST_FAULT (ftdist/faults.py). Every run is a real `ftdist train` subprocess
(1 process, or `accelerate launch` with the cpu-2 preset: DDP over gloo), bounded by a timeout; the
whole process group is killed afterwards, so a hung or orphaned rank never outlives its test. A few
checkpoint cases (every damaged file named, re-saving a step) run in-process on a tiny Accelerator.

Data: a 96-row CSV with two string classes; validation_split=0.25 leaves 72 train examples, so with a
global batch of 8 an epoch is 9 optimizer steps. On one process per_device_batch_size=4 means
gradient accumulation 2.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import assert_ok, run_ftdist
from safetensors.torch import load_file

from ftdist import checkpoint

CKPT = "checkpoints/step-{:08d}"
STEPS_PER_EPOCH = 9


# ------------------------------------------------------------------ plumbing

def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_in_own_group(cmd, *, cwd=None, env=None, capture_output=True, text=True, timeout=None, **_):
    """subprocess.run for helpers.run_ftdist, but in a new session whose whole process group is killed at
    the end: `accelerate launch` leaves torchrun workers behind when it is killed, and a hung rank
    must never survive its test (or keep our pipes open)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(p.pid)
        out, err = p.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    finally:
        _killpg(p.pid)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


# (helpers.run_ftdist itself now runs each command in its own process group and kills the group on timeout)


def write_csv(path: Path, n: int) -> Path:
    """n distinct rows, two string classes; the tiny recipe's tokenizer is uncased WordPiece."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            w.writerow([f"good day {i}" if i % 2 == 0 else f"bad night {i}", "pos" if i % 2 == 0 else "neg"])
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A module folder with the CSVs and a private `datasets` cache for the subprocesses."""
    root = tmp_path_factory.mktemp("reliability")
    write_csv(root / "d96.csv", 96)
    write_csv(root / "d49.csv", 49)
    return root


def base(work: Path, *extra: str, rows: int = 96, val: float = 0.25) -> list[str]:
    return ["data.dataset=null", f"data.train_file={work / f'd{rows}.csv'}", f"data.validation_split={val}",
            "train.global_batch_size=8", "train.per_device_batch_size=4",
            "train.max_steps=null", "train.epochs=2", "log.every_steps=1", "log.progress=false",
            "log.trackers=[]", *extra]  # no tracker: no report plots at the end (jsonl where a test reads metrics)


def env_for(work: Path, trace: Path, fault: str | None = None) -> dict:
    return {"FTDIST_TRACE_DIR": str(trace), "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"),
            "FTDIST_FAULT": fault or ""}


def run(work: Path, tmp: Path, overrides: list[str], trace: str, fault: str | None = None, name: str = "run",
        timeout: int = 180, **kw) -> helpers.Result:
    """run_ftdist with a fresh trace folder per invocation (tmp/<trace>): a killed run's rows stay apart from
    its resumed run's."""
    res = run_ftdist(tmp, overrides, name=name, env=env_for(work, tmp / trace, fault), timeout=timeout, **kw)
    res.trace_dir = tmp / trace
    return res


def trace_rows(trace_dir: Path, rank: int = 0) -> list[dict]:
    f = trace_dir / f"rank{rank}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def state_of(ckpt: Path) -> dict:
    return json.loads((ckpt / checkpoint.STATE_FILE).read_text())


def assert_same_steps(got: list[dict], want: list[dict], what: str, rel: float = 0.0) -> None:
    """Row-by-row: same step numbers, sample ids, unfreeze stage; losses bitwise equal (rel=0) or within rel."""
    assert [r["step"] for r in got] == [r["step"] for r in want], f"{what}: steps differ"
    for g, w in zip(got, want):
        assert g["ids"] == w["ids"], f"{what}: step {g['step']} saw examples {g['ids']}, expected {w['ids']}"
        assert g["stage"] == w["stage"], f"{what}: step {g['step']} in stage {g['stage']}, expected {w['stage']}"
        assert math.isclose(g["loss"], w["loss"], rel_tol=rel, abs_tol=0.0), \
            f"{what}: step {g['step']} loss {g['loss']!r} != {w['loss']!r}"


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff <= atol, f"{k}: max abs diff {diff}"


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def accelerator():
    """A one-process CPU Accelerator in this process; accelerate's global state is reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def no_traceback(log: str) -> None:
    assert "Traceback" not in log, f"a traceback reached the user:\n{log[-3000:]}"


# ------------------------------------------------------------------ 1. exact resume after SIGKILL

# Under the defaults users run: dropout on, gradual unfreezing (a transition every 5 steps, so the resume
# lands in stage 2, after two rebuilds), gradient accumulation 2. 2 epochs = 18 steps; a checkpoint every
# 3 (1 process) / 4 (2 processes) steps; killed at the start of step 14, i.e. in epoch 1 (steps 10..18),
# after the checkpoint of step 12 (epoch 1, step 3 of that epoch).
KILL_AT = 14
RESUME_AT = 12
GRADUAL = ("unfreeze.schedule=gradual", "unfreeze.every_steps=5")
# The averaged models resume exactly too: the EMA is saved in each checkpoint (whole tensors, gathered under
# ZeRO-3) and the checkpoint average reads the last two checkpoints at the end.
AVERAGES = ("train.ema_decay=0.9", "checkpoint.average_last=2")
# ZeRO: measured bitwise too (see test); a nonzero entry would be the run-to-run spread of that backend
ZERO_REL = {"cpu-zero2": 0.0, "cpu-zero3": 0.0}


def _reference(work: Path, name: str, overrides: list[str], preset: str | None = None, nprocs: int = 1):
    tmp = work / name
    tmp.mkdir()
    res = run(work, tmp, overrides, "t-ref", name="ref", preset=preset, nprocs=nprocs, timeout=240)
    assert_ok(res, world=nprocs)
    assert [r["step"] for r in res.trace(0)] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["accumulation"] == 2, "the guarantee is about accumulation > 1"
    assert [r["stage"] for r in res.trace(0)][RESUME_AT] == 2, "the resume should land after two transitions"
    return res


def _exact_resume(work: Path, ref, overrides: list[str], preset: str | None, nprocs: int, rel: float = 0.0) -> None:
    """Kill mid-epoch, resume, and compare with the uninterrupted run: bitwise when rel == 0."""
    tmp = ref.run_dir.parent
    kw = {"preset": preset, "nprocs": nprocs, "timeout": 240}
    killed = run(work, tmp, overrides, "t-killed", f"kill@{KILL_AT}", **kw)
    assert killed.rc != 0, "the run was not killed"
    assert "TIMEOUT" not in killed.log
    assert not (killed.run_dir / "model").exists(), "the killed run finished?"
    assert checkpoint.latest(str(killed.run_dir)) == killed.run_dir / CKPT.format(RESUME_AT)
    st = state_of(killed.run_dir / CKPT.format(RESUME_AT))
    assert (st["step"], st["epoch"], st["step_in_epoch"]) == (RESUME_AT, 1, RESUME_AT - STEPS_PER_EPOCH)

    resumed = run(work, tmp, overrides, "t-resumed", **kw)
    assert_ok(resumed, world=nprocs)
    plan = json.loads((resumed.run_dir / "plan.json").read_text())
    assert plan["resumed_from"] == str(resumed.run_dir / CKPT.format(RESUME_AT))
    final = json.loads((resumed.run_dir / "final_metrics.json").read_text())
    assert final["steps"] == 2 * STEPS_PER_EPOCH
    for rank in range(nprocs):
        want = ref.trace(rank)
        # the killed run kept its rows up to the kill, identical to the reference
        before = trace_rows(tmp / "t-killed", rank)
        assert [r["step"] for r in before] == list(range(1, KILL_AT))
        assert_same_steps(before, want[:KILL_AT - 1], f"rank {rank} before the kill", rel)
        # the resumed run replays every step after the checkpoint: same examples, stages and losses
        after = trace_rows(tmp / "t-resumed", rank)
        assert_same_steps(after, want[RESUME_AT:], f"rank {rank} after the resume", rel)
    if rel == 0.0:
        assert_same_weights(resumed.weights(), ref.weights())
    else:
        assert_same_weights(resumed.weights(), ref.weights(), atol=rel)
    for name in ("model-ema", "model-avg"):
        assert_same_weights(load_file(str(resumed.run_dir / name / "model.safetensors")),
                            load_file(str(ref.run_dir / name / "model.safetensors")), atol=rel)
    _check_average(ref.run_dir)


def _check_average(run_dir: Path) -> None:
    """model-avg is the mean of the last two checkpoints' whole weights, and differs from the final model."""
    from ftdist import portable

    last = checkpoint.complete_checkpoints(str(run_dir))[-2:]
    fs = [portable.read(c, state_of(c)).weights for c in last]
    avg = load_file(str(run_dir / "model-avg" / "model.safetensors"))
    final = load_file(str(run_dir / "model" / "model.safetensors"))
    ema = load_file(str(run_dir / "model-ema" / "model.safetensors"))
    for n, t in fs[0].items():
        torch.testing.assert_close(avg[n], (t + fs[1][n]) / 2, rtol=0, atol=1e-7)
    assert any(not torch.equal(avg[k], final[k]) for k in final), "model-avg is the final model"
    assert any(not torch.equal(ema[k], final[k]) for k in final), "model-ema is the final model"


@pytest.fixture(scope="module")
def one_proc(work) -> list[str]:
    # Two loader workers: the GPU path collates in workers, and a worker draws its own seeds; the count must
    # not change a resumed run (CPU defaults to 0 workers, so it is set here to exercise that path).
    return base(work, "checkpoint.every_steps=3", "checkpoint.keep_last=10", *GRADUAL, "data.loader_workers=2", *AVERAGES)


@pytest.fixture(scope="module")
def ref1(work, one_proc):
    """The uninterrupted 1-process run, every checkpoint kept (accumulation 2, a save every 3 steps)."""
    return _reference(work, "exact1", one_proc)


@pytest.mark.timeout(300)
def test_exact_resume_after_sigkill_one_process(work, one_proc, ref1):
    _exact_resume(work, ref1, one_proc, None, 1)


def _two_process(work: Path) -> list[str]:
    # per-device 2 on 2 processes keeps accumulation 2 for a global batch of 8
    return base(work, "checkpoint.every_steps=4", "train.per_device_batch_size=2", *GRADUAL, *AVERAGES)


@pytest.mark.timeout(400)
def test_exact_resume_after_sigkill_ddp(work):
    overrides = _two_process(work)
    ref = _reference(work, "exact2", overrides, "cpu-2", 2)
    _exact_resume(work, ref, overrides, "cpu-2", 2)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("preset", ["cpu-zero2", "cpu-zero3"])
def test_exact_resume_after_sigkill_zero(work, preset):
    overrides = _two_process(work)
    ref = _reference(work, f"exact-{preset}", overrides, preset, 2)
    _exact_resume(work, ref, overrides, preset, 2, rel=ZERO_REL[preset])


@pytest.mark.timeout(300)
def test_checkpoints_are_taken_between_optimizer_steps_only(work, one_proc, ref1):
    """Saves happen only after an optimizer step, never inside a gradient-accumulation window.

    One process with global batch 8 and per-device batch 4 accumulates 2 micro-batches per step; with
    checkpoint.every_steps=3 the first checkpoint is step-00000003 holding step 3 (3 optimizer steps =
    6 micro-batches, not 3 micro-batches = 1.5 steps), AdamW has stepped exactly 3 times, and resuming
    from it reproduces steps 4.. of the uninterrupted run exactly.
    """
    plan = json.loads((ref1.run_dir / "plan.json").read_text())
    assert plan["accumulation"] == 2
    saved = sorted(p.name for p in (ref1.run_dir / "checkpoints").iterdir())
    assert saved == [f"step-{s:08d}" for s in range(3, 19, 3)]
    ck = ref1.run_dir / CKPT.format(3)
    st = state_of(ck)
    assert (st["step"], st["epoch"], st["step_in_epoch"]) == (3, 0, 3)
    opt = torch.load(ck / "optimizer.bin", weights_only=True)
    steps = {float(s["step"]) for s in opt["state"].values()}
    assert steps == {3.0}, f"AdamW step counters in the checkpoint: {steps}"

    tmp = work / "accum"
    tmp.mkdir()
    res = run(work, tmp, [*one_proc, f"checkpoint.resume={ck}"], "t", timeout=240)
    assert_ok(res, world=1)
    assert_same_steps(trace_rows(tmp / "t"), ref1.trace(0)[3:], "resumed from step 3")
    assert_same_weights(res.weights(), ref1.weights())


# ------------------------------------------------------------------ 2. atomic checkpoints and rotation

@pytest.mark.timeout(300)
def test_killed_save_leaves_previous_checkpoint_and_is_cleaned_up(work):
    tmp = work / "atomic"
    tmp.mkdir()
    ov = base(work, "train.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep_last=2")
    killed = run(work, tmp, ov, "t1", "killsave@8", timeout=180)
    assert killed.rc == -signal.SIGKILL, f"expected a SIGKILL mid-save, got rc {killed.rc}:\n{killed.log[-2000:]}"
    root = killed.run_dir / "checkpoints"
    assert (root / "step-00000004" / checkpoint.COMPLETE).is_file()
    assert not (root / "step-00000008").exists(), "a half-written checkpoint was published"
    debris = root / ".tmp-step-00000008"
    assert debris.is_dir() and (debris / "model.safetensors").is_file() and not (debris / checkpoint.COMPLETE).exists()
    assert checkpoint.latest(str(killed.run_dir)) == root / "step-00000004"
    assert state_of(root / "step-00000004")["step"] == 4

    resumed = run(work, tmp, ov, "t2", timeout=180)
    assert_ok(resumed, world=1)
    assert [r["step"] for r in trace_rows(tmp / "t2")] == list(range(5, 13))
    assert json.loads((resumed.run_dir / "plan.json").read_text())["resumed_from"] == str(root / "step-00000004")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000012"]  # debris gone, keep_last=2
    assert all((root / n / checkpoint.COMPLETE).is_file() for n in ("step-00000008", "step-00000012"))


@pytest.mark.timeout(300)
def test_keep_last_one_rotates_and_survives_an_interrupted_save(work):
    tmp = work / "rotate"
    tmp.mkdir()
    ov = base(work, "train.max_steps=10", "checkpoint.every_steps=2", "checkpoint.keep_last=1")
    killed = run(work, tmp, ov, "t", "killsave@8", timeout=180)
    assert killed.rc == -signal.SIGKILL, killed.log[-2000:]
    root = killed.run_dir / "checkpoints"
    # saves at 2, 4, 6 rotated down to the newest; the save of 8 was killed and deleted nothing
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000008", "step-00000006"]
    assert (root / "step-00000006" / checkpoint.COMPLETE).is_file()
    assert checkpoint.latest(str(killed.run_dir)) == root / "step-00000006"


@pytest.mark.timeout(120)
def test_saving_the_same_step_again_never_unpublishes_it(tmp_path, accelerator, monkeypatch):
    """The end of training saves the last step again (its epoch/eval state changed after the periodic save).
    A crash while the old copy is being deleted must leave a complete checkpoint of that step: with
    keep_last=1 it is the only one. The crash is simulated by an rmtree that dies half-way (marker gone)."""
    net = torch.nn.Linear(4, 2)
    model, opt = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-3))
    state = {"step": 2, "epoch": 0, "step_in_epoch": 2, "stage": 0}
    checkpoint.save(accelerator, str(tmp_path), 2, state, "x: 1\n", keep_last=1)
    real = checkpoint.shutil.rmtree

    def dies_half_way(path, *a, **k):
        path = Path(path)
        if path.name.endswith("step-00000002") and (path / checkpoint.COMPLETE).exists():
            (path / checkpoint.COMPLETE).unlink()
            raise RuntimeError("killed while deleting")
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_half_way)
    with pytest.raises(RuntimeError, match="killed while deleting"):
        checkpoint.save(accelerator, str(tmp_path), 2, {**state, "epoch": 1, "step_in_epoch": 0}, "x: 1\n", keep_last=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    latest = checkpoint.latest(str(tmp_path))
    assert latest == tmp_path / CKPT.format(2), "no complete checkpoint left"
    assert checkpoint.read_state(latest)["epoch"] == 1, "the new copy was not published"
    checkpoint.load(accelerator, latest)
    # the next save clears the half-deleted old copy
    checkpoint.save(accelerator, str(tmp_path), 3, {**state, "step": 3}, "x: 1\n", keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]


# ------------------------------------------------------------------ 3. no hangs on 2 processes

def _fail_on_rank_1(work: Path, name: str, fault: str, *extra: str, limit: int = 150):
    """Run 2 processes with a fault on rank 1 at step 3; return (result, seconds from the fault to the end of
    the job). The fault's moment is the last trace write before it (step 2), so slow process start-up on a
    busy machine does not count."""
    tmp = work / name
    tmp.mkdir()
    res = run(work, tmp, base(work, "train.max_steps=6", *extra), "t", fault, preset="cpu-2", nprocs=2, timeout=limit)
    ended = time.time()
    assert "TIMEOUT" not in res.log, f"the job did not end by itself within {limit} s:\n{res.log[-3000:]}"
    assert res.rc != 0, "the job succeeded despite the fault"
    for rank in (0, 1):
        assert [r["step"] for r in trace_rows(tmp / "t", rank)] == [1, 2], f"rank {rank} did not stop at step 3"
    last_write = max((tmp / "t" / f"rank{r}.jsonl").stat().st_mtime for r in (0, 1))
    return res, ended - last_write


@pytest.mark.timeout(200)
def test_raise_on_one_rank_ends_the_job(work):
    res, took = _fail_on_rank_1(work, "raise", "raise@3:1")
    assert took < 60, f"the job took {took:.0f} s to end after rank 1 failed"
    assert "injected failure on rank 1" in res.log


@pytest.mark.timeout(200)
def test_killed_rank_ends_the_job(work):
    res, took = _fail_on_rank_1(work, "kill", "kill@3:1")
    assert took < 60, f"the job took {took:.0f} s to end after rank 1 was killed"


@pytest.mark.timeout(260)
def test_hung_rank_ends_the_job_at_the_collective_timeout(work):
    """Rank 1 sleeps forever at step 3; rank 0's next collective times out after train.timeout_s=20 and the
    launcher then stops rank 1 (SIGTERM, which ftdist's preemption handler only notes, then SIGKILL 30 s later)."""
    res, took = _fail_on_rank_1(work, "hang", "hang@3:1", "train.timeout_s=20", limit=200)
    assert 20 <= took < 100, f"the job ended {took:.0f} s after rank 1 hung (train.timeout_s=20)"
    assert re.search(r"[Tt]imed out|timeout", res.log), res.log[-3000:]
    # ... and says so in ftdist's words, naming the knob, rather than only gloo's traceback
    assert re.search(r"ftdist: error: a collective operation with the other ranks failed \(.*[Tt]imed out", res.log), \
        res.log[-3000:]
    assert "train.timeout_s=20 s" in res.log


@pytest.mark.timeout(260)
def test_uneven_last_batch_on_two_processes(work):
    """49 train examples, global batch 8 on 2 processes x accumulation 2: 7 steps, the last holding ONE
    example, so 3 of its 4 micro-batches (both of rank 1's) are placeholders. No hang, and the epoch
    covers every example exactly once."""
    tmp = work / "uneven"
    tmp.mkdir()
    ov = base(work, "train.epochs=1", "train.per_device_batch_size=2", rows=49, val=0.0)
    res = run(work, tmp, ov, "t", preset="cpu-2", nprocs=2, timeout=200)
    assert_ok(res, world=2)
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert (plan["train_examples"], plan["steps_per_epoch"], plan["accumulation"]) == (49, 7, 2)
    rows = [trace_rows(tmp / "t", r) for r in (0, 1)]
    assert [[r["step"] for r in rk] for rk in rows] == [list(range(1, 8))] * 2
    seen = [i for rk in rows for r in rk for i in r["ids"]]
    assert sorted(seen) == list(range(49)), "an example was skipped or seen twice"
    assert rows[1][-1]["ids"] == [] and len(rows[0][-1]["ids"]) == 1
    # the loss is a global mean: both ranks log the same value every step
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


# ------------------------------------------------------------------ 4. non-finite losses

def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _finite(weights: dict) -> bool:
    return all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.timeout(200)
def test_nan_step_is_skipped_one_process(work):
    tmp = work / "nan1"
    tmp.mkdir()
    ov = base(work, "train.max_steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=10", "log.trackers=[jsonl]")
    res = run(work, tmp, ov, "t", "nan@3", timeout=180)
    assert_ok(res, world=1)
    final = json.loads((res.run_dir / "final_metrics.json").read_text())
    assert final["steps"] == 5 and final["skipped_steps"] == 1
    by_step = {m["step"]: m for m in _metrics(res.run_dir) if "train/skipped_steps" in m}
    assert [by_step[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    losses = [r["loss"] for r in trace_rows(tmp / "t")]
    assert math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    assert _finite(res.weights())
    # the skipped step changed nothing: weights after step 3 == after step 2, and AdamW did not count it
    w2, w3 = (load_file(str(res.run_dir / CKPT.format(s) / "model.safetensors")) for s in (2, 3))
    assert_same_weights(w3, w2, atol=0.0)
    opt = torch.load(res.run_dir / CKPT.format(3) / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {2.0}
    assert "skipped" in res.log or "non-finite" in res.log


@pytest.mark.timeout(260)
def test_nan_on_one_rank_is_skipped_by_both(work):
    tmp = work / "nan2"
    tmp.mkdir()
    # check_sync=1: parameter checksums compared across ranks after every step (fails loudly on drift)
    ov = base(work, "train.max_steps=5", "train.check_sync=1")
    res = run(work, tmp, ov, "t", "nan@3:1", preset="cpu-2", nprocs=2, timeout=200)
    assert_ok(res, world=2)
    final = json.loads((res.run_dir / "final_metrics.json").read_text())
    assert final["skipped_steps"] == 1
    for rank in (0, 1):
        losses = [r["loss"] for r in trace_rows(tmp / "t", rank)]
        assert len(losses) == 5 and math.isnan(losses[2]), f"rank {rank} did not see step 3 as non-finite"
    assert _finite(res.weights())


@pytest.mark.timeout(200)
def test_too_many_nonfinite_steps_abort_with_exit_3(work):
    tmp = work / "nan-abort"
    tmp.mkdir()
    ov = base(work, "train.max_steps=8", "train.max_nonfinite=2", "checkpoint.every_steps=2")
    res = run(work, tmp, ov, "t", "nan@3,nan@4", timeout=180)
    assert res.rc == 3, f"rc {res.rc}:\n{res.log[-3000:]}"
    no_traceback(res.log)
    assert "non-finite" in res.log and "max_nonfinite=2" in res.log and "step 4" in res.log
    root = res.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    _assert_loadable(root / "step-00000002", step=2)


@pytest.mark.timeout(200)
def test_nonfinite_abort_policy(work):
    tmp = work / "nan-policy"
    tmp.mkdir()
    ov = base(work, "train.max_steps=8", "train.nonfinite=abort", "checkpoint.every_steps=4")
    res = run(work, tmp, ov, "t", "nan@5", timeout=180)
    assert res.rc == 3, f"rc {res.rc}:\n{res.log[-3000:]}"
    no_traceback(res.log)
    assert "train.nonfinite=abort" in res.log and "step 5" in res.log
    assert checkpoint.latest(str(res.run_dir)) == res.run_dir / CKPT.format(4)
    _assert_loadable(res.run_dir / CKPT.format(4), step=4)


def _assert_loadable(ck: Path, step: int) -> None:
    assert (ck / checkpoint.COMPLETE).is_file()
    assert checkpoint.read_state(ck)["step"] == step
    assert _finite(load_file(str(ck / "model.safetensors")))
    opt = torch.load(ck / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {float(step)}


# ------------------------------------------------------------------ 5. damaged checkpoints

@pytest.fixture(scope="module")
def saved(work):
    """A short run with complete checkpoints at steps 2 and 4."""
    tmp = work / "damaged"
    tmp.mkdir()
    ov = base(work, "train.max_steps=4", "checkpoint.every_steps=2", val=0.0)
    res = run(work, tmp, ov, "t", timeout=180)
    assert_ok(res, world=1)
    return tmp, ov, res.run_dir


def _resume_fails(saved, extra=(), name="run") -> tuple[str, dict, dict]:
    tmp, ov, run_dir = saved
    before = digest(run_dir / "checkpoints")
    res = run(tmp.parent, tmp, [*ov, "train.max_steps=6", "checkpoint.allow_changes=[train.max_steps]", *extra], "t-fail", name=name)
    assert res.rc == 2, f"expected exit 2, got {res.rc}:\n{res.log[-3000:]}"
    no_traceback(res.log)
    assert "ftdist: error:" in res.log
    return res.log, before, digest(run_dir / "checkpoints")


@pytest.mark.timeout(300)
def test_truncated_checkpoint_file_is_reported_not_overwritten(saved):
    _, _, run_dir = saved
    ck = run_dir / CKPT.format(4)
    f = ck / "model.safetensors"
    original = f.read_bytes()
    try:
        f.write_bytes(original[: len(original) // 2])
        log, before, after = _resume_fails(saved)
        assert str(ck) in log, "the message does not name the checkpoint folder"
        assert "model.safetensors is damaged" in log, "the message does not name the damaged file"
        assert f"checkpoint.resume={run_dir / CKPT.format(2)}" in log, "the message does not say how to recover"
        assert after == before, "a failed resume modified the checkpoints"
    finally:
        f.write_bytes(original)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_each_damaged_file_is_named(tmp_path, accelerator, victim):
    """In-process: every file of a checkpoint, truncated, gives a CheckpointError naming it. accelerate alone
    would skip a damaged random-state file silently (and the resume would not be exact)."""
    from ftdist.errors import CheckpointError

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    model, opt = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-3))
    for step in (1, 2):
        model(torch.ones(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        checkpoint.save(accelerator, str(tmp_path), step, {"step": step, "epoch": 0, "step_in_epoch": step, "stage": 0},
                        "x: 1\n", keep_last=2)
    ck = tmp_path / CKPT.format(2)
    checkpoint.load(accelerator, ck)  # intact: loads
    f = ck / victim
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    before = digest(tmp_path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(accelerator, ck)
    msg = str(e.value)
    assert f"{victim} is damaged" in msg and str(ck) in msg
    assert f"checkpoint.resume={tmp_path / CKPT.format(1)}" in msg
    assert digest(tmp_path) == before


@pytest.mark.timeout(300)
def test_corrupt_state_file_is_reported(saved):
    _, _, run_dir = saved
    f = run_dir / CKPT.format(4) / checkpoint.STATE_FILE
    original = f.read_bytes()
    try:
        f.write_text('{"step": 4, "epoch": ')
        log, before, after = _resume_fails(saved)
        assert checkpoint.STATE_FILE in log and "checkpoint.resume=" in log
        assert after == before
    finally:
        f.write_bytes(original)


@pytest.mark.timeout(300)
def test_resume_from_incomplete_folder_is_refused(saved):
    _, _, run_dir = saved
    ck = run_dir / CKPT.format(2)
    marker = ck / checkpoint.COMPLETE
    original = marker.read_bytes()
    marker.unlink()
    try:
        log, before, after = _resume_fails(saved, [f"checkpoint.resume={ck}"])
        assert str(ck) in log and checkpoint.COMPLETE in log
        assert after == before
    finally:
        marker.write_bytes(original)


def test_peer_failure_message_only_for_collective_errors(monkeypatch):
    from ftdist import collectives as runtime
    from ftdist.errors import PeerFailureError

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                        "20000ms for recv operation to complete\nmore lines")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = runtime.peer_failure(gloo, 20)
    assert isinstance(err, PeerFailureError) and err.exit_code == 1
    assert "Timed out waiting 20000ms" in str(err) and "train.timeout_s=20 s" in str(err)
    assert "more lines" not in str(err)
    assert runtime.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 20) is None
    assert runtime.peer_failure(ValueError("timed out"), 20) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runtime.peer_failure(gloo, 20) is None
