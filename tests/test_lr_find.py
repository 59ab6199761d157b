"""train.lr: auto. The range test leaves nothing behind: a run with lr=auto trains exactly (bitwise) like a run
given the LR it found, on one process and on ZeRO-3 (weights partitioned and engine rebuilt), with gradual
unfreezing and layer-wise decay (the LR found is the head's peak). The model's default dropout stays on: both
runs of a pair have the same world size."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math

import helpers
import pytest
import torch
import yaml

from ftdist import lr_find

SETUP = ["unfreeze.schedule=gradual", "unfreeze.every_steps=6", "unfreeze.lr_decay=0.8", "train.max_steps=16",
         "log.trackers=[jsonl]", "checkpoint.resume=null"]


def test_pick_is_a_tenth_of_the_lowest_smoothed_loss():
    lrs = [10 ** (-7 + 7 * i / 99) for i in range(100)]
    losses = [1.0 / (1 + math.exp(5 * (math.log10(lr) + 3))) + (0 if lr < 1e-2 else 100 * (lr - 1e-2)) for lr in lrs]
    lr, smoothed = lr_find.pick(lrs, losses)
    best = min(range(100), key=smoothed.__getitem__)
    assert lr == pytest.approx(lrs[best] / 10)
    assert 1e-4 < lr < 1e-2, lr  # the smoothed minimum sits between the descent and the blow-up


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lrfind")

    def pair(preset):
        nprocs = 2 if preset else 1
        auto = helpers.run_ftdist(tmp, [*SETUP, "train.lr=auto"], preset=preset, nprocs=nprocs, name=f"auto-{preset}",
                                  flags=(), timeout=400)
        helpers.assert_ok(auto, nprocs)
        lr = yaml.safe_load((auto.run_dir / "recipe.yaml").read_text())["train"]["lr"]
        given = helpers.run_ftdist(tmp, [*SETUP, f"train.lr={lr!r}"], preset=preset, nprocs=nprocs,
                                   name=f"given-{preset}", timeout=400)
        helpers.assert_ok(given, nprocs)
        return auto, given, lr

    with cf.ThreadPoolExecutor(2) as pool:
        futures = {p: pool.submit(pair, p) for p in (None, "cpu-zero3")}
        return {p: f.result() for p, f in futures.items()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("preset", [None, "cpu-zero3"])
def test_auto_lr_run_equals_a_run_given_that_lr(pairs, preset):
    auto, given, lr = pairs[preset]
    assert isinstance(lr, float) and 1e-6 < lr < 0.1
    world = 2 if preset else 1
    for rank in range(world):
        a, g = auto.trace(rank), given.trace(rank)
        assert [r["step"] for r in a] == list(range(1, 17))
        assert [(r["loss"], r["ids"], r["stage"]) for r in a] == [(r["loss"], r["ids"], r["stage"]) for r in g]
    wa, wg = auto.weights(), given.weights()
    assert all(torch.equal(wa[k], wg[k]) for k in wg)
    assert auto.log.count("(LR range test: ") == 1  # decided once, logged by the main process
    plan = json.loads((auto.run_dir / "plan.json").read_text())
    assert plan["lr"]["value"] == lr and plan["world_size"] == world
    found = json.loads((auto.run_dir / lr_find.FILE).read_text())
    assert found["lr"] == lr and len(found["lrs"]) == len(found["losses"]) > 10
    assert (auto.run_dir / "lr_find.png").stat().st_size > 0
    assert "lr_find.png" in (auto.run_dir / "report.md").read_text()
