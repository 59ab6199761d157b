"""`ftdist sweep` (ftdist/sweep.py) on the tiny recipe: kill and resume, pruning, two local workers, the best
recipe, strict search-space errors, and a SLURM array (slurm/sweep.sbatch) sharing one study.

One sweep is shared by most tests (module fixture): started with 2 workers, SIGKILLed mid-trial, run again
with the same command plus --top-k 2 --seeds 1. The search space enqueues two good points and a hopeless
one (lr 1e-8), and the pruner judges only once both good ones are complete (they differ by a hair, so
neither is pruned against the other), so it has something certain to prune; runs are deterministic on CPU.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, base_env
from slurm_fixture import slurm_env, wait_for

from ftdist import cli, config

OVERRIDES = ["eval.every_steps=3", "train.max_steps=30"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SPACE = """\
metric: loss
direction: minimize
n_trials: 4
pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 5}
sampler: {type: random, seed: 0}
enqueue:
  - {train.lr: 1.0e-3, train.weight_decay: 0.0}
  - {train.lr: 1.0e-3, train.weight_decay: 0.05}
  - {train.lr: 1.0e-8}
params:
  train.lr: {type: float, low: 1.0e-8, high: 1.0e-2, log: true}
  train.weight_decay: {type: float, low: 0.0, high: 0.1}
"""


def _sweep_cmd(space: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ftdist", "sweep", "tiny", *OVERRIDES, "--space", str(space), "--out", str(out), *extra]


def _study(out: Path, name: str | None = None):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name or out.name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))


def _trial_logs(out: Path) -> str:
    return "".join(f"\n--- {f}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(out.glob("*/*.log")))


def _any_eval(out: Path) -> bool:
    return any("eval/loss" in f.read_text() for f in (out / "trials").glob("*/metrics.jsonl"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    space, out = d / "space.yaml", d / "out"
    space.write_text(SPACE)
    env = base_env()
    t0 = time.monotonic()
    with open(d / "first.log", "wb") as f:
        first = subprocess.Popen(_sweep_cmd(space, out, "--workers", "2"), cwd=REPO, env=env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not (out / "trials").is_dir() or not _any_eval(out):  # a trial is mid-training
            assert first.poll() is None, (d / "first.log").read_text()
            assert time.monotonic() - t0 < 120, "no evaluation within 120 s\n" + (d / "first.log").read_text()
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole sweep at once: no chance to clean up
        first.wait()
    killed_at = time.monotonic() - t0
    left_running = [t.number for t in _study(out).trials if t.state.name == "RUNNING"]
    second = subprocess.run(_sweep_cmd(space, out, "--workers", "2", "--top-k", "2", "--seeds", "1"), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=400)
    print(f"\n[sweep] killed after {killed_at:.1f}s with trials {left_running} running; resumed run took "
          f"{time.monotonic() - t0 - killed_at:.1f}s\n{second.stdout[-3000:]}")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:] + _trial_logs(out)
    return {"out": out, "space": space, "left_running": left_running, "log": second.stdout, "study": _study(out)}


def test_killed_sweep_resumes_without_duplicate_or_lost_trial(sweep):
    study = sweep["study"]
    assert sweep["left_running"], "the SIGKILL should have left running trials in the study"
    states = [t.state.name for t in study.trials]
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4, states
    assert not [s for s in states if s in ("RUNNING", "WAITING")], states
    # every trial the kill left running was failed once and re-run once, with the same parameters, in its run folder
    for n in sweep["left_running"]:
        t = study.trials[n]
        retries = [r for r in study.trials if r.system_attrs.get("failed_trial") == n]
        if t.state.name == "COMPLETE":  # its run finished after the kill: recorded as it was
            assert not retries
            continue
        assert t.state.name == "FAIL" and "interrupted" in t.user_attrs["note"]
        assert len(retries) == 1, [r.number for r in retries]
        assert retries[0].params == t.params and retries[0].user_attrs["run_dir"] == t.user_attrs["run_dir"]
        assert retries[0].state.name in ("COMPLETE", "PRUNED")
    # no duplicate: one finished trial per run folder and per enqueued point; none lost: all three points ran
    assert len({t.user_attrs["run_dir"] for t in finished}) == 4
    enq = sorted(t.user_attrs["enqueued"] for t in finished if "enqueued" in t.user_attrs)
    assert enq == [0, 1, 2], enq
    # a retried run resumed from the checkpoint its launcher wrote when the sweep died
    resumed = [json.loads((Path(t.user_attrs["run_dir"]) / "plan.json").read_text()).get("resumed_from")
               for t in finished if t.system_attrs.get("failed_trial") is not None]
    assert any(resumed), resumed


def test_pruning_stops_the_hopeless_trial(sweep):
    study = sweep["study"]
    bad = [t for t in study.trials if t.params.get("train.lr") == 1e-8 and t.state.name in ("COMPLETE", "PRUNED")]
    assert len(bad) == 1 and bad[0].state.name == "PRUNED", [(t.number, t.state.name) for t in bad]
    steps = sorted(bad[0].intermediate_values)
    assert steps[-1] < 30 and bad[0].user_attrs["note"] == f"pruned at step {steps[-1]}"
    good = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert good and max(good[0].intermediate_values) == 30  # the good ones trained to the end


def test_two_local_workers_run_trials_at_once_each_pinned(sweep):
    study = sweep["study"]
    runs = [t for t in study.trials if t.datetime_complete]
    overlap = any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
                  for i, a in enumerate(runs) for b in runs[i + 1:])
    assert overlap, "two workers: trials should have run at the same time"
    slots = {t.user_attrs.get("slot") for t in study.trials if t.user_attrs.get("slot")}
    assert {s.split(" (")[0] for s in slots} == {"worker 0", "worker 1"}, slots
    if len(os.sched_getaffinity(0)) >= 2:  # each worker on its own cores
        assert all("cores" in s for s in slots) and len(slots) == 2, slots


def test_table_plots_and_best_recipe_that_loads_and_trains(sweep):
    out, study = sweep["out"], sweep["study"]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    assert {"state", "value", "train.lr", "train.weight_decay", "duration_s"} <= set(rows[0])
    for png in ("history.png", "parallel_coordinate.png", "importances.png", "intermediate_values.png"):
        assert (out / png).stat().st_size > 1000, png
    best = study.best_trial
    recipe = config.load(str(out / "best_recipe.yaml"))  # what ./launch and ftdist train read
    assert recipe.train.lr == best.params["train.lr"] and recipe.train.weight_decay == best.params["train.weight_decay"]
    assert recipe.train.max_steps == 30 and recipe.eval.every_steps == 3  # the sweep's own overrides kept
    # --top-k 2 --seeds 1: the best trial re-trained from best_recipe.yaml itself, through the launcher
    rerun = out / "reruns" / f"trial-{best.number:04d}-seed-{recipe.train.seed + 1}"
    assert (rerun / "final_metrics.json").is_file()
    assert str(out / "best_recipe.yaml") in rerun.with_suffix(".log").read_text()
    reruns = list(csv.DictReader((out / "reruns.csv").open()))
    assert len(reruns) == 2 and int(reruns[0]["trial"]) == best.number and reruns[0]["mean"]
    assert "mean ± std" in sweep["log"]


BAD_SPACES = {
    "unknown top-level key": ("metrc: loss\nparams: {train.lr: [1.0e-3]}\n", "metrc: unknown key (did you mean 'metric'?)"),
    "not a recipe key": ("params: {train.lrr: {type: float, low: 1.0e-5, high: 1.0e-3}}\n",
                         "params.train.lrr: not a recipe key (did you mean 'train.lr'?)"),
    "bad distribution type": ("params: {train.lr: {type: uniform, low: 0.1, high: 0.2}}\n",
                              "params.train.lr.type: 'uniform' is not a distribution type"),
    "bound out of the key's range": ("params: {train.lr: {type: float, low: 1.0e-5, high: 2.0, log: true}}\n",
                                     "params.train.lr.high: 2.0 is out of range; expected a float in (0, 1)"),
    "float over an integer key": ("params: {train.epochs: {type: float, low: 1, high: 3}}\n",
                                  "params.train.epochs.low: expected an integer, got 1.0 (an integer key: use type: int)"),
    "bad choice": ("params: {unfreeze.schedule: [full, gradul]}\n",
                   "'gradul' is not one of full, gradual, lp-ft (did you mean 'gradual'?)"),
    "log scale from zero": ("params: {unfreeze.lr_decay: {type: float, low: 0, high: 1, log: true}}\n",
                            "params.unfreeze.lr_decay.low: 0.0 is out of range"),
    "unknown pruner": ("pruner: medain\nparams: {train.lr: [1.0e-3]}\n", "pruner: 'medain' is not one of none, median"),
    "unknown sampler argument": ("sampler: {type: tpe, sed: 1}\nparams: {train.lr: [1.0e-3]}\n",
                                 "sampler.sed: not an argument of optuna.samplers.TPESampler (did you mean 'seed'?)"),
    "metric the recipe does not report": ("metric: f2\nparams: {train.lr: [1.0e-3]}\n", "metric: 'f2' is not reported"),
    "enqueued value outside": ("enqueue: [{train.lr: 0.5}]\nparams: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3}}\n",
                               "enqueue[0].train.lr: 0.5 is outside the distribution"),
    "no params": ("n_trials: 3\n", "params: needs a mapping of recipe keys to distributions"),
    "not YAML": ("params: [unclosed\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_bad_space_is_one_error_naming_file_and_key(case, tmp_path, capsys):
    text, expected = BAD_SPACES[case]
    space = tmp_path / "space.sweep.yaml"
    space.write_text(text)
    rc = cli.main(["sweep", "tiny", "--space", str(space), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"ftdist: error: search space {str(space)!r} has ") or "not valid YAML" in err, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()  # nothing created before the space is right


def test_bad_space_from_the_shell_has_no_traceback(tmp_path):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text("data: {dataset: vader}\n")
    (tmp_path / "my_recipe.sweep.yaml").write_text("params: {train.lr: {type: float, low: 1.0e-5}, bogus.key: [1]}\n")
    p = subprocess.run([sys.executable, "-m", "ftdist", "sweep", str(recipe)], cwd=REPO, env=base_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith("ftdist: error: search space"), p.stderr
    assert "params.train.lr.high: missing" in p.stderr and "params.bogus.key: not a recipe key" in p.stderr, p.stderr


@pytest.mark.timeout(300)
def test_slurm_array_tasks_share_one_study(slurm_cluster, tmp_path):
    """sbatch --array=0-1 slurm/sweep.sbatch: two tasks, one study (a journal file on the shared folder), two trials."""
    space = tmp_path / "space.yaml"
    space.write_text("metric: loss\nn_trials: 2\npruner: none\nparams: {train.lr: {type: float, low: 1.0e-4, "
                     "high: 1.0e-2, log: true}}\n")
    env = slurm_env(slurm_cluster["slurm_conf"], base=base_env())
    env["FTDIST_PYTHON"] = sys.executable
    env.pop("FTDIST_HOME", None)  # the script finds the checkout itself
    (tmp_path / "logs").mkdir()
    t0 = time.monotonic()
    p = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1",
                        str(REPO / "slurm" / "sweep.sbatch"), "tiny", "train.max_steps=6", "--space", str(space),
                        "--out", "sweep"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    job = p.stdout.strip().split(";")[0]

    def states() -> list[str]:  # one line per array task (sbatch --wait polls every 10 s: slower)
        out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        return [tok.split("=", 1)[1] for line in out.splitlines() for tok in line.split() if tok.startswith("JobState=")]

    try:
        wait_for(lambda: len(states()) == 2 and all(s in ENDED for s in states()), 240, 0.5, what="both array tasks")
    finally:
        logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2500:]}" for f in sorted((tmp_path / "logs").glob("*.out")))
        print(f"\n[sweep array] {time.monotonic() - t0:.1f}s\n{logs}")
    assert states() == ["COMPLETED", "COMPLETED"], (states(), logs)
    study = _study(tmp_path / "sweep")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"], logs
    workers = sorted(t.user_attrs["worker"] for t in study.trials)
    assert workers == [f"slurm {job}_0", f"slurm {job}_1"], (workers, logs)  # each task ran one trial of the study
    assert (tmp_path / "sweep" / "best_recipe.yaml").is_file()
