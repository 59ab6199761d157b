"""Issue #8: what a run tells you while and after it runs: trackers (JSONL, TensorBoard, W&B offline),
the logged values, the end-of-run report, `ftdist env`, and a console that is quiet where it should be.

Three tiny training runs, shared by the tests (started in the background on first use, each bounded):
    main     1 process, log.trackers=[jsonl, tensorboard, wandb] (WANDB_MODE=offline), gradual unfreezing
             every 2 steps, eval every 4 steps, checkpoints every 3 steps, 6 steps = one epoch, --verbose.
             Secrets in the environment (WANDB_API_KEY, HF_TOKEN) and one in the recipe file.
    resumed  a copy of main's folder resumed from its step-3 checkpoint to step 8, --quiet
    ddp      2 processes (cpu-2), log.trackers=[jsonl, wandb], log every step, plan and summary printed
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import importlib.metadata
import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import yaml

from ftdist import config as configlib
from ftdist import envinfo

RUN_TIMEOUT = 420
CLI_TIMEOUT = 240
WANDB_KEY = "0123456789abcdef0123456789abcdef0123wkey"
HF_TOKEN = "hf_SeCrEtEnVtOkEn0123456789abcd"
RECIPE_SECRET = "hf_ReCiPeSeCrEt0123456789abcdef"
SECRETS = (WANDB_KEY, HF_TOKEN, RECIPE_SECRET)
RUN_NAME, TAGS = "obs-run", ["obs-tag-one", "obs-tag-two"]
GROUPS = ["embeddings", "block0", "block1", "pooler", "head"]


def write_csv(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    pos, neg = ["good", "great", "happy", "love"], ["bad", "awful", "sad", "hate"]
    filler = ["the", "a", "movie", "day", "food", "it", "was", "very", "and", "book"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = "positive" if i % 2 else "negative"
            words = [rng.choice(filler) for _ in range(rng.randint(0, 9))]
            words.insert(rng.randint(0, len(words)), rng.choice(pos if i % 2 else neg))
            w.writerow([" ".join(words), label])
    return path


def run(tmp: Path, overrides: list[str], name: str, preset: str | None = None, nprocs: int = 1,
        recipe: str = "tiny", flags: tuple = ("--quiet",), env: dict | None = None) -> helpers.Result:
    """helpers.run_ftdist with a choice of console flags (--quiet, --verbose or none)."""
    return helpers.run_ftdist(tmp, overrides, preset=preset, nprocs=nprocs, recipe=recipe, env=env,
                              timeout=RUN_TIMEOUT, name=name, flags=flags)


class Runs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        train, val = write_csv(tmp / "train.csv", 96, 0), write_csv(tmp / "val.csv", 16, 1)
        # the tiny recipe plus a secret-looking value (never used: data.dataset is null)
        raw = configlib.read_yaml(configlib.resolve_recipe_path("tiny"))
        raw["data"]["dataset_config"] = RECIPE_SECRET
        self.recipe = tmp / "obs.yaml"
        self.recipe.write_text(yaml.safe_dump(raw))
        self.env = {"WANDB_MODE": "offline", "WANDB_API_KEY": WANDB_KEY, "HF_TOKEN": HF_TOKEN, "WANDB_SILENT": "true"}
        base = ["data.dataset=null", f"data.train_file={train}", f"data.validation_file={val}", "log.progress=false",
                "train.global_batch_size=16", "train.per_device_batch_size=8",
                "eval.per_device_batch_size=8", f"log.run_name={RUN_NAME}", f"log.tags=[{','.join(TAGS)}]"]
        self.main_overrides = [*base, "train.max_steps=6", "log.every_steps=2", "eval.every_steps=4",
                               "checkpoint.every_steps=3", "unfreeze.schedule=gradual", "unfreeze.every_steps=2",
                               "log.trackers=[jsonl,tensorboard,wandb]", "train.scheduler=constant_with_warmup",
                               "train.warmup=2"]
        ddp = [*base, "train.max_steps=4", "log.every_steps=1", "log.trackers=[jsonl,wandb]"]
        self.pool = cf.ThreadPoolExecutor(max_workers=2)
        self.futures = {
            "ddp": self.pool.submit(run, tmp, ddp, "ddp", "cpu-2", 2, str(self.recipe), (), self.env),
            "main": self.pool.submit(run, tmp, self.main_overrides, "main", None, 1, str(self.recipe), ("--verbose",),
                                     self.env),
        }
        self.futures["resumed"] = self.pool.submit(self._resume)

    def _resume(self) -> helpers.Result:
        main = self.futures["main"].result()
        folder = self.tmp / "resumed"
        if main.rc == 0:
            shutil.copytree(main.run_dir, folder)
        overrides = [o for o in self.main_overrides if not o.startswith("train.max_steps")]
        # from step 3, not the last checkpoint (6): main's rows for steps 4..6 must be replaced, not repeated
        ckpt = folder / "checkpoints" / "step-00000003"
        res = run(self.tmp, [*overrides, "train.max_steps=8", "checkpoint.allow_changes=[train.max_steps]", f"checkpoint.resume={ckpt}"], "resumed",
                  recipe=str(self.recipe), env=self.env)
        return res

    def get(self, name: str) -> helpers.Result:
        res = self.futures[name].result()
        helpers.assert_ok(res, 2 if name == "ddp" else 1)
        return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("obs"))
    yield r
    r.pool.shutdown(wait=True, cancel_futures=True)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def ftdist_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "ftdist", *args], cwd=cwd, env=helpers.base_env(env),
                              capture_output=True, text=True, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired as t:
        pytest.fail(f"ftdist {' '.join(args)}: no answer in {CLI_TIMEOUT}s\n{t.stdout}{t.stderr}")


# ------------------------------------------------------------------ trackers

@pytest.mark.timeout(900)
def test_jsonl_and_tensorboard_files(runs):
    res = runs.get("main")
    rows = jsonl(res.run_dir / "metrics.jsonl")
    assert rows and all(isinstance(r["step"], int) for r in rows)
    events = sorted(res.run_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event files under {res.run_dir}"
    assert all(res.run_dir in e.parents for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(s.step, s.value) for s in acc.Scalars(tag)]
    loss = [(r["step"], r["train/loss"]) for r in train_rows(res.run_dir)]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in loss]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in loss], rel=1e-6)
    assert "lr/head/decay" in scalars and "eval/accuracy" in scalars


@pytest.mark.timeout(900)
def test_wandb_offline_run_name_tags_and_id_reused_on_resume(runs):
    main, resumed = runs.get("main"), runs.get("resumed")
    run_id = (main.run_dir / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{12}", run_id)
    assert (resumed.run_dir / "wandb_run_id").read_text().strip() == run_id
    for res in (main, resumed):
        offline = sorted((res.run_dir / "wandb").glob("offline-run-*"))
        assert offline, f"no wandb offline run under {res.run_dir}/wandb"
        assert all(p.name.endswith(f"-{run_id}") for p in offline), [p.name for p in offline]
        blob = b"".join(f.read_bytes() for f in offline[-1].glob("run-*.wandb"))
        assert RUN_NAME.encode() in blob and all(t.encode() in blob for t in TAGS)
    # the resumed run is the same W&B run continued: two offline segments with the same id
    assert len(list((resumed.run_dir / "wandb").glob("offline-run-*"))) == 2
    assert not (runs.tmp / "wandb").exists(), "wandb wrote into the working directory instead of the run folder"


@pytest.mark.timeout(900)
def test_two_processes_log_once(runs):
    res = runs.get("ddp")
    found = sorted(p.relative_to(runs.tmp) for p in runs.tmp.rglob("metrics.jsonl") if "ddp" in str(p))
    assert found == [Path("ddp/metrics.jsonl")]
    rows = train_rows(res.run_dir)
    steps = [r["step"] for r in rows]
    assert steps == [1, 2, 3, 4], f"train rows per step: {collections.Counter(steps)}"
    # logged every step: each window is one step, whose loss every rank reports
    assert [r["train/loss"] for r in rows] == pytest.approx(res.losses(0), rel=1e-12)
    assert res.losses(1) == res.losses(0)
    all_rows = jsonl(res.run_dir / "metrics.jsonl")
    keys = collections.Counter((r["step"], k) for r in all_rows for k in r if k not in ("step", "time"))
    assert max(keys.values()) == 1, [k for k, c in keys.items() if c > 1]
    assert len(list((res.run_dir / "wandb").glob("offline-run-*"))) == 1
    # a worker's tracker would write its own config
    assert json.loads((res.run_dir / "tracker_config.json").read_text())["log.run_name"] == RUN_NAME


@pytest.mark.timeout(900)
def test_secrets_are_redacted_everywhere(runs):
    main, resumed, ddp = runs.get("main"), runs.get("resumed"), runs.get("ddp")
    cfg = json.loads((main.run_dir / "tracker_config.json").read_text())
    assert cfg["data.dataset_config"] == "***REDACTED***"
    assert cfg["log.run_name"] == RUN_NAME and cfg["train.max_steps"] == 6  # the rest is logged as is
    assert yaml.safe_load((main.run_dir / "recipe.yaml").read_text())["data"]["dataset_config"] == "***REDACTED***"
    checked = 0
    for res in (main, resumed, ddp):
        for f in res.run_dir.rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                checked += 1
                for s in SECRETS:
                    assert s.encode() not in blob, f"secret found in {f}"
        for s in SECRETS:
            assert s not in res.log
    assert checked > 20


# ------------------------------------------------------------------ what is logged

@pytest.mark.timeout(900)
def test_logged_values_every_n_steps(runs):
    res = runs.get("main")
    rows = train_rows(res.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 4, 6]  # log.every_steps=2, and step 1
    trace = {r["step"]: r for r in res.trace()}
    # the loss is the mean over the steps since the last log (1; 2; 3-4; 5-6), weighted by their items
    windows = {1: [1], 2: [2], 4: [3, 4], 6: [5, 6]}
    for r in rows:
        t = trace[r["step"]]
        steps = [trace[s] for s in windows[r["step"]]]
        assert r["train/loss"] == pytest.approx(sum(s["loss"] * s["items"] for s in steps) / sum(s["items"] for s in steps),
                                                rel=1e-12)
        assert r["train/stage"] == t["stage"] and r["train/trainable_params"] == t["trainable"]
        assert math.isfinite(r["train/grad_norm"]) and 0 < r["train/grad_norm"] <= r["train/grad_norm_max"]
        # every rate says in its name over what it is taken: the window, or since the loop started
        assert r["train/step_time_s_window"] > 0
        for k in ("samples_per_s", "tokens_per_s"):
            assert r[f"train/{k}_window"] > 0 and r[f"train/{k}_cumulative"] > 0 and f"train/{k}" not in r
        assert "train/step_time_s" not in r
        assert 0 < r["train/real_token_fraction"] <= 1
        assert 0 < r["train/peak_rss_gb"] < 64
        for g in GROUPS:
            for kind in ("decay", "no_decay"):
                assert r[f"lr/{g}/{kind}"] >= 0, (g, kind)
        assert not [k for k in r if k.startswith("lr/") and k.split("/")[1] not in GROUPS]
    # constant_with_warmup (2 steps) and lr 1e-3: warming up at step 1, then the peak
    assert rows[0]["lr/head/decay"] == pytest.approx(5e-4)
    assert all(r["lr/head/decay"] == pytest.approx(1e-3) for r in rows[1:])
    # gradual: the trainable count grows at the transitions (steps 2, 4 and 6)
    trainable = [t["trainable"] for t in res.trace()]
    assert trainable == sorted(trainable) and len(set(trainable)) == 3
    stage_rows = [r for r in jsonl(res.run_dir / "metrics.jsonl") if "train/stage" in r and "train/loss" not in r]
    assert [(r["step"], r["train/stage"]) for r in stage_rows] == [(2, 1), (4, 2), (6, 3)]


# ------------------------------------------------------------------ report

REPORT_FILES = ("report.md", "report_data.json", "loss.png", "lr.png", "eval.png", "throughput.png")


def series(rows: list[dict], key: str) -> dict:
    picked = [r for r in rows if key in r]
    return {"steps": [r["step"] for r in picked], "values": [r[key] for r in picked]}


@pytest.mark.timeout(900)
def test_report_matches_metrics(runs):
    res = runs.get("main")
    run_dir = res.run_dir
    for name in REPORT_FILES:
        assert (run_dir / name).is_file(), name
        if name.endswith(".png"):
            assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = jsonl(run_dir / "metrics.jsonl")
    rep = json.loads((run_dir / "report_data.json").read_text())
    plots = rep["plots"]
    assert plots["loss.png"]["train/loss"] == series(rows, "train/loss")
    assert plots["loss.png"]["eval/loss"] == series(rows, "eval/loss")  # validation on the same axis
    # beside the windowed means, a smoothed curve: their bias-corrected EMA, at the same steps
    loss = series(rows, "train/loss")
    smoothed, avg = [], 0.0
    for i, v in enumerate(loss["values"]):
        avg = 0.6 * avg + 0.4 * v
        smoothed.append(avg / (1 - 0.6 ** (i + 1)))
    assert plots["loss.png"]["train/loss (smoothed)"]["steps"] == loss["steps"]
    assert plots["loss.png"]["train/loss (smoothed)"]["values"] == pytest.approx(smoothed, rel=1e-12)
    lr_keys = {f"lr/{g}/{k}" for g in GROUPS for k in ("decay", "no_decay")}
    assert set(plots["lr.png"]) == lr_keys
    for k in lr_keys:
        assert plots["lr.png"][k] == series(rows, k), k
    for k in ("train/samples_per_s_window", "train/samples_per_s_cumulative"):
        assert plots["throughput.png"][k] == series(rows, k)
    assert plots["eval.png"]["eval/accuracy"] == series(rows, "eval/accuracy")
    assert rep["transitions"] == [2, 4, 6]
    md = (run_dir / "report.md").read_text()
    assert "Unfreeze transitions at steps 2, 4, 6." in md
    assert all(f"![{n}]({n})" in md for n in ("loss.png", "lr.png", "eval.png", "throughput.png"))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert f"| validation accuracy | {final['validation']['accuracy']:.4f} |" in md


@pytest.mark.timeout(900)
def test_report_command_rebuilds_the_report(runs, tmp_path):
    src = runs.get("main").run_dir
    folder = tmp_path / "copy"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("checkpoints", "wandb", "model", "best"))
    before = {n: (folder / n).read_bytes() for n in ("report.md", "report_data.json")}
    for n in REPORT_FILES:
        (folder / n).unlink()
    p = ftdist_cli(["report", str(folder)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert str(folder / "report.md") in p.stdout
    for n in REPORT_FILES:
        assert (folder / n).is_file(), n
    assert json.loads((folder / "report_data.json").read_bytes()) == json.loads(before["report_data.json"])
    assert (folder / "report.md").read_text() == before["report.md"].decode().replace(src.name, folder.name, 1)
    # a folder ftdist did not create is refused (the report would write into it), and a run folder
    # without metrics.jsonl is a clear error
    p = ftdist_cli(["report", str(tmp_path / "nothing")], tmp_path)
    assert p.returncode == 2 and "not an ftdist run folder" in p.stderr and "Traceback" not in p.stderr, p.stderr
    (folder / "metrics.jsonl").unlink()
    p = ftdist_cli(["report", str(folder)], tmp_path)
    assert p.returncode == 2 and "metrics.jsonl" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.timeout(900)
def test_report_after_resume_covers_both_segments(runs):
    res = runs.get("resumed")
    rows = jsonl(res.run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 4, 6, 8], steps  # rows after the checkpoint (4, 6) were replaced, not repeated
    # up to step 6, the same values logged as by the uninterrupted run (less its end-of-run final/ values)
    main_rows = jsonl(runs.get("main").run_dir / "metrics.jsonl")

    def logged(rs):
        return collections.Counter((r["step"], k) for r in rs if r["step"] <= 6 for k in r
                                   if k not in ("step", "time") and not k.startswith("final/"))

    assert logged(rows) == logged(main_rows)
    # the resumed steps 4..6 are the first run's steps 4..6 (exact resume), and so are their logged losses
    main = {r["step"]: r["train/loss"] for r in train_rows(runs.get("main").run_dir)}
    assert [r["train/loss"] for r in rows if "train/loss" in r and r["step"] in (4, 6)] == [main[4], main[6]]
    rep = json.loads((res.run_dir / "report_data.json").read_text())
    assert rep["plots"]["loss.png"]["train/loss"]["steps"] == steps
    assert rep["transitions"] == [2, 4, 6, 8]


# ------------------------------------------------------------------ ftdist env

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
         "SLURM_JOB_TOKEN": "slurm-secret-value"}


@pytest.fixture(scope="module")
def env_outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("env")
    extra = {**SLURM, "HF_TOKEN": HF_TOKEN}
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        text, as_json = pool.map(lambda a: ftdist_cli(a, tmp, extra), [["env"], ["env", "--json"]])
    return text, as_json


@pytest.mark.timeout(600)
def test_env_text(env_outputs):
    p = env_outputs[0]
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for pkg in ("torch", "accelerate", "transformers", "datasets", "deepspeed", "wandb"):
        m = re.search(rf"^\s+{pkg}\s+(\S+)$", out, re.M)
        assert m, f"no version line for {pkg}:\n{out}"
        assert m.group(1) == importlib.metadata.version(pkg)
    assert re.search(r"^devices: cuda=(True|False) .* bf16=(True|False)$", out, re.M), out
    assert re.search(r"^distributed backends: gloo=True", out, re.M), out
    assert re.search(r"^deepspeed ops (compatible: |unavailable)", out, re.M), out
    slurm = re.search(r"^slurm: (.*)$", out, re.M).group(1)
    for k in ("SLURM_JOB_ID=4242", "SLURM_JOB_NODELIST=node[01-02]", "SLURM_PROCID=0", "SLURM_NTASKS=2"):
        assert k in slurm, slurm
    assert "slurm-secret-value" not in out and HF_TOKEN not in out
    assert "HF_TOKEN=***REDACTED***" in out


@pytest.mark.timeout(600)
def test_env_json(env_outputs):
    p = env_outputs[1]
    assert p.returncode == 0, p.stdout + p.stderr
    info = json.loads(p.stdout)
    for pkg in ("torch", "accelerate", "transformers", "datasets", "deepspeed", "wandb"):
        assert info["versions"][pkg] == importlib.metadata.version(pkg)
    d = info["devices"]
    assert isinstance(d["cuda_available"], bool) and isinstance(d["bf16_supported"], bool) and d["cpu_count"] >= 1
    assert info["distributed_backends"]["gloo"] is True
    assert isinstance(info["deepspeed_ops"], dict) and info["deepspeed_ops"]
    assert {k: v for k, v in info["slurm"].items()} == {k: v for k, v in SLURM.items() if k != "SLURM_JOB_TOKEN"}
    assert info["env"]["HF_TOKEN"] == "***REDACTED***"
    # without SLURM variables the text says so
    assert "slurm: not detected" in envinfo.render({**info, "slurm": {}})


# ------------------------------------------------------------------ console

PLAN_HEADER = re.compile(r"^plan:$", re.M)


@pytest.mark.timeout(900)
def test_only_rank0_prints_plan_and_summary(runs):
    log = runs.get("ddp").log
    assert len(PLAN_HEADER.findall(log)) == 1, log[-4000:]
    assert log.count("global batch      16 = 8 x 1 x 2") == 1
    assert len(re.findall(r"^train time\s+\S+ s$", log, re.M)) == 1, log[-4000:]
    assert len(re.findall(r"^final validation\s+accuracy=", log, re.M)) == 1
    assert log.count("labels            negative: 48, positive: 48") == 1


@pytest.mark.timeout(900)
def test_quiet_prints_no_plan_verbose_runs(runs):
    quiet, verbose = runs.get("resumed"), runs.get("main")
    assert not PLAN_HEADER.search(quiet.log) and "stage 0 from step" not in quiet.log, quiet.log[-3000:]
    assert len(PLAN_HEADER.findall(verbose.log)) == 1
    assert "step 2: unfreeze stage 1" in verbose.log  # info lines shown
    # python warnings: each distinct one at most once (warnings.simplefilter("once"))
    warned = collections.Counter(line for line in verbose.log.splitlines() if re.search(r"\w+Warning: ", line))
    assert all(c == 1 for c in warned.values()), [w for w, c in warned.items() if c > 1]
    # DeepSpeed, imported by accelerate's unwrap_model when the best model is exported, guesses the
    # accelerator and warns "unable to detect it" on every CPU machine unless told: ftdist tells it
    for res in (quiet, verbose):
        assert (res.run_dir / "best" / "model.safetensors").exists() or (res.run_dir / "model").exists()
        assert "unable to detect it" not in res.log, res.log[-3000:]


@pytest.mark.timeout(900)
def test_summary_says_what_the_run_did(runs):
    """Trained steps (this run's), the step it resumed from and the skipped steps, in the summary and the results."""
    main, resumed = runs.get("main"), runs.get("resumed")
    for res, trained, first, start in ((main, 6, 1, "- (fresh start)"), (resumed, 5, 4, "step 3 (step-00000003)")):
        last = first + trained - 1
        assert re.search(rf"^trained steps\s+{trained} \(steps {first}-{last} of {last}\)$", res.log, re.M), res.log[-3000:]
        assert re.search(rf"^resumed from\s+{re.escape(start)}$", res.log, re.M), res.log[-3000:]
        assert re.search(r"^skipped steps\s+0 \(non-finite loss or gradient\)$", res.log, re.M), res.log[-3000:]
        final = json.loads((res.run_dir / "final_metrics.json").read_text())
        assert (final["steps"], final["trained_steps"], final["skipped_steps"]) == (last, trained, 0)
        assert final["resumed_from_step"] == (None if res is main else 3)
        # time: this start's and the total over the starts that made the model (up to the checkpoint resumed from)
        before = json.loads((main.run_dir / "checkpoints" / "step-00000003" / "ftdist_state.json").read_text())
        want = final["train_time_s"] + (before["train_time_s"] if res is resumed else 0.0)
        assert before["train_time_s"] > 0 and final["train_time_total_s"] == pytest.approx(want, rel=1e-9), final
        this, total = (f"{final[k]:.1f} s" for k in ("train_time_s", "train_time_total_s"))
        line = f"{this} this start, {total} in total" if res is resumed else this
        assert re.search(rf"^train time\s+{re.escape(line)}$", res.log, re.M), res.log[-3000:]
        assert "| train_time_total_s |" in (res.run_dir / "report.md").read_text()


def test_progress_bar_shows_eta():
    """The ETA counts this run's pace only: a resumed run's bar starts at its step, not at a rate of 0."""
    from tqdm import tqdm

    from ftdist.console import BAR_FORMAT

    line = tqdm.format_meter(n=6, total=10, elapsed=4.0, initial=4, unit="step", bar_format=BAR_FORMAT, prefix="train")
    assert "step 6/10" in line and "ETA 00:08" in line, line


def test_log_window_means():
    """The logged loss is the item-weighted mean over the window: sum of loss sums / sum of items, so the same
    at every world size; a skipped step (non-finite) counts in neither the loss nor the grad norm."""
    from ftdist.tracking import Window

    w = Window()
    w.add(loss=0.5, items=10, grad_norm=1.0, dt=0.2, samples=4, tokens=40, real_tokens=30)
    w.add(loss=float("nan"), items=7, grad_norm=float("nan"), dt=0.3, samples=4, tokens=40, real_tokens=30)
    w.add(loss=2.0, items=30, grad_norm=3.0, dt=0.1, samples=4, tokens=40, real_tokens=20)
    assert w.loss() == pytest.approx((0.5 * 10 + 2.0 * 30) / 40)
    assert (w.grad_norm(), w.grad_norm_max) == (pytest.approx(2.0), 3.0)
    assert (w.steps, w.time_s, w.samples, w.real_tokens) == (3, pytest.approx(0.6), 12, 80)
    assert Window(**json.loads(json.dumps(vars(w)))) == w  # kept in the checkpoint's state as JSON
    empty = Window()
    empty.add(loss=float("inf"), items=3, grad_norm=float("nan"), dt=0.1, samples=1, tokens=1, real_tokens=1)
    assert math.isnan(empty.loss()) and math.isnan(empty.grad_norm())


@pytest.mark.timeout(300)
def test_logger_has_one_handler_and_repeated_warnings_show_once(tmp_path):
    code = (
        "import logging, warnings\n"
        "from ftdist.console import setup_logging\n"
        "setup_logging(False, False)\n"
        "setup_logging(False, False)\n"
        "log = logging.getLogger('ftdist')\n"
        "assert len(log.handlers) == 1 and log.propagate is False, (log.handlers, log.propagate)\n"
        "logging.getLogger().addHandler(logging.StreamHandler())  # a library adding a root handler (DeepSpeed does)\n"
        "log.info('hello-once')\n"
        "for i in range(5):  # from different places: the default filter would show each one\n"
        "    warnings.warn_explicit('repeated-in-loop', UserWarning, f'lib{i}.py', 10 + i)\n"
    )
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=helpers.base_env(), capture_output=True,
                           text=True, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired as t:
        pytest.fail(f"no answer in {CLI_TIMEOUT}s: {t.stdout}{t.stderr}")
    assert p.returncode == 0, p.stdout + p.stderr
    both = p.stdout + p.stderr
    assert both.count("hello-once") == 1, both
    assert both.count("repeated-in-loop") == 1, both


def test_mfu_estimate_uses_the_device_peak():
    from ftdist import mfu as track

    # BERT-base-sized: 110M params, 12 x 768, seq 128, 50k real tokens/s on one H200
    fpt = track.flops_per_token(110_000_000, 12, 768, 128)
    assert fpt == 6 * 110_000_000 + 12 * 12 * 768 * 128
    m = track.mfu(110_000_000, 12, 768, 128, 50_000, 1, "NVIDIA H200")
    assert m == pytest.approx(fpt * 50_000 / 989e12)
    assert track.mfu(110_000_000, 12, 768, 128, 50_000, 2, "NVIDIA A100-SXM4-80GB") == pytest.approx(fpt * 50_000 / (2 * 312e12))
    assert track.mfu(1, 1, 1, 1, 1, 1, "Tesla T4") is None


def test_mfu_counts_parameters_outside_embedding_tables():
    """The N of 6N leaves out embedding tables (lookups, no matmul): BERT-base is 85.6M of its 109.5M."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftdist import mfu as track
    from ftdist.model import default_model_path

    cfg = AutoConfig.from_pretrained(default_model_path(), num_labels=2, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)
    with torch.device("meta"):
        m = AutoModelForSequenceClassification.from_config(cfg)
    tables = sum(p.numel() for mod in m.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters())
    assert tables == (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * 768
    assert track.matmul_params(m) == sum(p.numel() for p in m.parameters()) - tables
    assert 85e6 < track.matmul_params(m) < 86e6
