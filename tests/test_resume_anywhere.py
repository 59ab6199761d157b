"""A checkpoint written on N processes with one backend resumes on M processes with another.

One uninterrupted 1-process reference run, and a chain of runs that each resume the previous one's last
checkpoint on another backend or world size, train one step, checkpoint it and are killed: 1 process ->
DDP -> ZeRO-2 -> ZeRO-3 -> ZeRO-2 -> DDP -> 1 process, which covers 2 -> 1, 1 -> 2, DDP <-> ZeRO-2 and
ZeRO-2 <-> ZeRO-3. Every hop must continue the reference run: the same examples per step, the same
unfreeze stage, the loss within the cross-world parity tolerance (tests/test_parity.py), and the last
hop ends with the reference's weights within that tolerance.

The chain runs mid-epoch and through the unfreeze schedule (gradual, a transition every 2 steps), and the
global batch of 8 with per-device batches of 2 gives accumulation 4 on one process and 2 on two: re-derived
at every hop.

Dropout is 0 in the chain, because ranks draw different dropout masks, so runs on different world sizes can
only agree exactly without it. One more pair runs with the model's dropout: the same data order and steps,
final evaluation within seed noise.
"""

from __future__ import annotations

import json

import helpers
import pytest
import torch

pytestmark = pytest.mark.timeout(900)

LOSS_RTOL = 1e-5   # as tests/test_parity.py
WEIGHT_ATOL = 1e-5
STEPS = 8
AT = 4  # the dropout pair resumes here
COMMON = [f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.per_device_batch_size=2",
          "unfreeze.schedule=gradual", "unfreeze.every_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
          "log.trackers=[]", "log.every_steps=1"]
PARITY = [*COMMON, "model.dropout=0"]  # compared across world sizes: ranks draw different dropout masks
BACKENDS = {"single": (None, 1), "ddp": ("cpu-2", 2), "zero2": ("cpu-zero2", 2), "zero3": ("cpu-zero3", 2)}
CHAIN = ["single", "ddp", "zero2", "zero3", "zero2", "ddp", "single"]


def processes(n: int) -> str:
    return f"{n} process{'' if n == 1 else 'es'}"


def steps(res: helpers.Result) -> list[dict]:
    """Per step: the examples of the whole global batch (all ranks), the stage, the (global) loss."""
    world = res.trace(0)[0]["world"]
    rows = [res.trace(r) for r in range(world)]
    return [{"step": r0["step"], "ids": sorted(i for rs in rows for i in rs[k]["ids"]), "stage": r0["stage"],
             "loss": r0["loss"], "world": world} for k, r0 in enumerate(rows[0])]


def resume(tmp, ckpt, dst: str, overrides: list[str], name: str, kill_at: int | None) -> helpers.Result:
    preset, n = BACKENDS[dst]
    env = {"FTDIST_FAULT": f"kill@{kill_at}"} if kill_at else None
    res = helpers.run_ftdist(tmp, [*overrides, f"checkpoint.resume={ckpt}"], preset=preset, nprocs=n, name=name,
                             env=env, flags=())
    if kill_at is None:
        helpers.assert_ok(res, world=n)
    else:
        assert res.rc != 0 and res.trace(0), res.log[-3000:]
    return res


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(reference, [(source backend, destination backend, hop result)])"""
    tmp = tmp_path_factory.mktemp("anywhere")
    ref = helpers.run_ftdist(tmp, PARITY, name="ref")
    helpers.assert_ok(ref, world=1)
    hops, ckpt = [], ref.run_dir / "checkpoints" / "step-00000001"
    for h, (src, dst) in enumerate(zip(CHAIN, CHAIN[1:])):
        last = h == len(CHAIN) - 2
        at = h + 1  # resumes from step `at`, trains step at+1 (the last hop: to the end)
        res = resume(tmp, ckpt, dst, PARITY, f"hop{h}-{src}-to-{dst}", None if last else at + 2)
        hops.append((src, dst, at, res))
        ckpt = res.run_dir / "checkpoints" / f"step-{at + 1:08d}"
        assert (ckpt / "COMPLETE").is_file() or last, res.log[-3000:]
    return ref, hops


@pytest.mark.parametrize("hop", range(len(CHAIN) - 1), ids=[f"{a}-to-{b}" for a, b in zip(CHAIN, CHAIN[1:])])
def test_checkpoint_resumes_on_another_world_size_or_backend(chain, hop):
    ref, hops = chain
    src, dst, at, res = hops[hop]
    w_src, w_dst = BACKENDS[src][1], BACKENDS[dst][1]
    assert (f"resuming from step {at}, written by {processes(w_src)} ({src}), now {processes(w_dst)} ({dst})"
            in res.log), res.log[-3000:]
    got = steps(res)
    want = steps(ref)[at:at + len(got)]
    assert [r["step"] for r in got] == [r["step"] for r in want] and got[0]["step"] == at + 1
    assert {r["world"] for r in got} == {w_dst}
    assert [r["ids"] for r in got] == [r["ids"] for r in want], "another data order after the move"
    assert [r["stage"] for r in got] == [r["stage"] for r in want]
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["accumulation"] == 8 // (2 * w_dst)
    worst = max(abs(g["loss"] - w["loss"]) / abs(w["loss"]) for g, w in zip(got, want))
    assert worst <= LOSS_RTOL, f"{src} -> {dst}: per-step loss differs from the uninterrupted run by {worst:.3g}"
    print(f"\n[resume anywhere] {src} -> {dst} at step {at}: loss rel diff {worst:.2e}")


def test_the_moved_run_ends_with_the_uninterrupted_runs_weights(chain):
    ref, hops = chain
    assert [s for s, *_ in hops] + [hops[-1][1]] == CHAIN
    assert hops[-1][3].trace(0)[-1]["step"] == STEPS
    a, b = hops[-1][3].weights(), ref.weights()
    wdiff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
    print(f"\n[resume anywhere] after {len(hops)} moves: final weight abs diff {wdiff:.2e}")
    assert wdiff <= WEIGHT_ATOL, f"final weights differ from the uninterrupted run by {wdiff:.3g}"


def test_with_dropout_the_moved_run_keeps_data_order_and_lands_within_seed_noise(tmp_path_factory):
    """Dropout on (as shipped): masks differ on another world size, so only the data order and the step count
    are exact; the final evaluation must stay within seed noise of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("anywhere-dropout")
    ref = helpers.run_ftdist(tmp, COMMON, preset="cpu-zero2", nprocs=2, name="ref")
    helpers.assert_ok(ref, world=2)
    res = resume(tmp, ref.run_dir / "checkpoints" / f"step-{AT:08d}", "single", COMMON, "moved", None)
    want, got = steps(ref)[AT:], steps(res)
    assert [r["ids"] for r in got] == [r["ids"] for r in want]
    final, ref_final = (json.loads((r.run_dir / "final_metrics.json").read_text()) for r in (res, ref))
    assert final["steps"] == ref_final["steps"] == STEPS
    a, b = final["validation"]["loss"], ref_final["validation"]["loss"]
    assert abs(a - b) / b < 0.02, f"validation loss {a} after the move vs {b} uninterrupted"


def test_zero_checkpoint_carries_a_whole_tensor_copy(chain):
    """What the move needs from a ZeRO checkpoint: whole weights and Adam state, beside DeepSpeed's shards."""
    from ftdist import portable

    ref, hops = chain
    src, dst, at, res = hops[1]
    assert dst == "zero2"
    ckpt = res.run_dir / "checkpoints" / f"step-{at + 1:08d}"
    f = ckpt / portable.PORTABLE_FILE
    fs = portable._read_portable(f)
    assert set(fs.weights) == set(ref.weights())
    assert fs.moments and all(torch.isfinite(m["exp_avg_sq"]).all() for m in fs.moments.values())
    assert max(fs.steps.values()) == at + 1  # groups unfrozen later have stepped fewer times
    native = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and p != f)
    print(f"\n[resume anywhere] zero2 checkpoint: native {native / 1e6:.1f} MB, whole-tensor copy "
          f"{f.stat().st_size / 1e6:.1f} MB")
