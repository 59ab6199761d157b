"""Run folders never lose data, and a resume honours the recipe (issue #15, items 2 and 3).

One short `tiny` run (3 steps, constant LR so the logged LR is the recipe's) is trained once and then
re-run into the same folder the ways a user would: unchanged, with a changed recipe, with the change
allowed, and as a fresh start. Every refusal must leave the folder byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import helpers
import pytest

pytestmark = pytest.mark.timeout(600)

BASE = ["train.max_steps=3", "train.scheduler=constant", "train.warmup=0", "log.every_steps=1", "log.progress=false"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(tmp: Path, name: str, *extra: str) -> helpers.Result:
    return helpers.run_ftdist(tmp, [*BASE, *extra], name=name, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runfolder")
    res = train(tmp, "run")
    helpers.assert_ok(res, 1)
    return tmp, res


def test_null_every_steps_saves_at_the_end(finished):
    _, res = finished
    assert (res.run_dir / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
    assert (res.run_dir / "ftdist-run.json").is_file()


def entries(folder: Path) -> dict:
    """Every file and folder with its modification time: a rewrite with the same bytes still shows."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_finished_run_is_not_retrained_or_mixed(finished):
    tmp, res = finished
    before, stamps = snapshot(res.run_dir), entries(res.run_dir)
    again = train(tmp, "run")
    assert again.rc == 2 and "Traceback" not in again.log, again.log[-2000:]
    # a no-op rerun says so plainly, not that it resumes
    assert "nothing to do" in again.log and "finished run" in again.log and "trained 3 of 3 steps" in again.log, again.log[-2000:]
    assert "nothing was trained and no file was changed" in again.log, again.log[-2000:]
    assert "resuming" not in again.log, again.log[-2000:]
    assert "checkpoint.allow_changes=[train.max_steps]" in again.log
    assert entries(res.run_dir) == stamps and snapshot(res.run_dir) == before
    fresh = train(tmp, "run", "checkpoint.resume=null")
    assert fresh.rc == 2 and "holds another run (finished)" in fresh.log, fresh.log[-2000:]
    assert snapshot(res.run_dir) == before


def test_changed_recipe_is_refused_with_the_differences(finished):
    tmp, res = finished
    before = snapshot(res.run_dir)
    changed = train(tmp, "run", "train.max_steps=5", "train.lr=5e-4")
    assert changed.rc == 2 and "Traceback" not in changed.log, changed.log[-2000:]
    assert "train.lr: 0.001 -> 0.0005" in changed.log and "train.max_steps: 3 -> 5" in changed.log, changed.log[-2000:]
    bad = train(tmp, "run", "train.max_steps=5", "checkpoint.allow_changes=[train.max_step]")
    assert bad.rc == 2 and "did you mean 'train.max_steps'" in bad.log, bad.log[-2000:]
    assert snapshot(res.run_dir) == before


@pytest.mark.parametrize("key, value", [("train.global_batch_size", 8),
                                        ("model.config_overrides", "{num_hidden_layers: 1}")])
def test_a_change_no_checkpoint_can_continue_is_refused_even_when_allowed(finished, key, value):
    """Another global batch (the data position counts old batches) or another model (other weights)."""
    tmp, res = finished
    before = snapshot(res.run_dir)
    got = train(tmp, "run", "train.max_steps=5", f"{key}={value}", f"checkpoint.allow_changes=[train.max_steps,{key}]")
    assert got.rc == 2 and "Traceback" not in got.log, got.log[-2000:]
    assert f"was trained with {key}=" in got.log and "cannot continue across that change" in got.log, got.log[-2000:]
    assert snapshot(res.run_dir) == before


def test_per_device_batch_may_change_on_resume(finished):
    """A memory bound, not a result: the global batch and so the run are the same."""
    from ftdist import runfolder

    old = "train:\n  per_device_batch_size: 16\n  global_batch_size: 16\n"
    new = "train:\n  per_device_batch_size: 4\n  global_batch_size: 16\n"
    assert runfolder.recipe_changes(old, new, []) == []


def test_allowed_change_continues_with_the_new_values(finished):
    tmp, res = finished
    cont = train(tmp, "run", "train.max_steps=5", "train.lr=5e-4", "checkpoint.allow_changes=[train.max_steps,train.lr]")
    helpers.assert_ok(cont, 1)
    assert [r["step"] for r in cont.trace(0)][-2:] == [4, 5]
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if "train/loss" in r]
    assert loss_steps == [1, 2, 3, 4, 5], loss_steps  # continued, no step logged twice
    lrs = {r["step"]: r["lr/head/decay"] for r in rows if "lr/head/decay" in r}
    assert [lrs[s] for s in (1, 2, 3)] == [1e-3] * 3 and [lrs[s] for s in (4, 5)] == [5e-4] * 2, lrs
    assert "lr: 0.0005" in (res.run_dir / "recipe.yaml").read_text()


def test_foreign_folder_and_file_are_refused(tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "model").mkdir()
    (own / "model" / "weights.bin").write_bytes(b"precious")
    (own / "report.md").write_text("my notes")
    before = snapshot(own)
    res = helpers.run_ftdist(tmp_path, [*BASE, f"log.output_dir={own}"], name="ignored")
    assert res.rc == 2 and "is not an ftdist run folder" in res.log and "Traceback" not in res.log, res.log[-2000:]
    assert snapshot(own) == before and sorted(p.name for p in own.iterdir()) == ["model", "report.md"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = helpers.run_ftdist(tmp_path, [*BASE, f"log.output_dir={afile}"], name="ignored2")
    assert res.rc == 2 and "is a file" in res.log, res.log[-2000:]
    from ftdist import report
    from ftdist.errors import FtdistError
    with pytest.raises(FtdistError, match="not an ftdist run folder"):
        report.build(own)
    assert snapshot(own) == before


def test_launch_checks_the_output_folder_before_starting(tmp_path):
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("x")
    p = subprocess.run([sys.executable, str(helpers.REPO / "launch"), "cpu-2", "tiny", f"log.output_dir={afile}"],
                       cwd=tmp_path, env=helpers.base_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "log.output_dir" in p.stderr and "is a file" in p.stderr, p.stderr[-2000:]
    assert "accelerate.commands.launch" not in p.stdout  # nothing was started
    assert afile.read_text() == "x"


def test_fixed_keys_are_recipe_keys_and_refused_even_when_allowed():
    """Each key no checkpoint can continue under is a real recipe key (a misspelt one would let its change through
    checkpoint.allow_changes), and allowing it still refuses the resume."""
    from ftdist import runfolder
    from ftdist.errors import FtdistError

    for key in runfolder.FIXED:
        runfolder.check_allowed([key])  # raises on a key that is not in the recipe
        section, name = key.split(".")
        old, new = f"{section}:\n  {name}: 1\n", f"{section}:\n  {name}: 2\n"
        changes = runfolder.recipe_changes(old, new, [key])
        assert changes == [(key, 1, 2)], key
        with pytest.raises(FtdistError, match="cannot continue across that change"):
            runfolder.refuse_changes(Path("ckpt"), changes)


@pytest.mark.parametrize("key", ["log.every_steps", "eval.every_steps", "checkpoint.every_steps",
                                 "checkpoint.keep_last", "train.timeout_s"])
def test_cadence_changes_are_always_allowed(key):
    from ftdist import runfolder

    section, name = key.split(".")
    assert runfolder.recipe_changes(f"{section}:\n  {name}: 5\n", f"{section}:\n  {name}: 7\n", []) == []
    assert runfolder.recipe_changes("train:\n  lr: 1.0\n", "train:\n  lr: 2.0\n", []) == [("train.lr", 1.0, 2.0)]


def test_unwritable_output_folder_is_refused_by_launch_and_its_dry_run(tmp_path, monkeypatch, capsys):
    """A folder the user cannot write (a read-only mount; root passes chmod, so os.access is what answers) fails
    before any process starts, the dry run included, naming the key and the folder."""
    import os

    from ftdist import launcher, runfolder

    target = tmp_path / "ro" / "run"
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(runfolder.os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and os.path.exists(p))
    for extra in (["--dry-run"], []):
        rc = launcher.main(["cpu", "tiny", f"log.output_dir={target}", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "log.output_dir" in err and "not writable" in err and str(target) in err, (extra, err)
        assert "Traceback" not in err
    assert not target.exists()
