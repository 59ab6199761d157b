"""Golden traces: the same backend at the same world size gives bitwise the same run as when they were recorded.

The cross-backend parity tests allow 1e-5; a refactor that reorders a reduction, draws one more random
number or moves a dropout mask passes them and still changes the model. These runs are compared exactly:
per-step loss (as JSON floats), sample ids, unfreeze stage and trainable count, the sha256 of the exported
weights, plan.json, the key set of metrics.jsonl and the final evaluation.

Everything runs under the `tiny` recipe's defaults (dropout on, as shipped): only the step budget is cut,
and checkpoints are turned on where a resume needs one.

Recorded goldens live in tests/golden/<name>.json with the machine they were recorded on (torch version,
CPU kernel family, CPU model, thread count). Floating-point results are only reproducible bitwise on the
same kernels and the same intra-op split, so on that machine everything is compared exactly. On another
machine (CI, a laptop) the integers and strings are still compared exactly and every float to a relative
1e-5: machine-to-machine noise measured 1e-8 on the final loss, while a moved dropout mask or an extra
random draw moves the loss by 1e-3. The weights hash is only compared on the recording machine; the final
evaluation loss stands for the weights elsewhere. Re-record (only when a change is meant to alter the
numbers, and say why in the commit) with:

    FTDIST_GOLDEN_WRITE=1 python3 -m pytest tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path

import helpers
import pytest
import torch
from test_tasks import token_sentences, write_conll

pytestmark = pytest.mark.timeout(900)

GOLDEN = Path(__file__).resolve().parent / "golden"
WRITE = os.environ.get("FTDIST_GOLDEN_WRITE") == "1"
STEPS = ["train.max_steps=8", "log.every_steps=2"]
GRADUAL = ["unfreeze.schedule=gradual", "unfreeze.every_steps=2"]

# name: (overrides, preset, processes)
CASES = {
    "single": (STEPS, None, 1),
    "cpu-2": (STEPS, "cpu-2", 2),
    "cpu-zero2": (STEPS, "cpu-zero2", 2),
    "cpu-zero3": (STEPS, "cpu-zero3", 2),
    "gradual-cpu-2": ([*STEPS, *GRADUAL], "cpu-2", 2),
    "gradual-cpu-zero3": ([*STEPS, *GRADUAL], "cpu-zero3", 2),
    "token": (None, None, 1),  # overrides filled in by the fixture (data files)
    "resume": ([*STEPS, "checkpoint.every_steps=3"], None, 1),
}


REL = 1e-5


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_model(), "threads": torch.get_num_threads()}


def close(got, want, exact: bool) -> bool:
    """Equal structure and integers/strings; floats equal (exact) or within REL (another machine)."""
    if isinstance(want, float) and isinstance(got, float) and not exact:
        return math.isclose(got, want, rel_tol=REL, abs_tol=REL)
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(close(got[k], want[k], exact) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(close(g, w, exact) for g, w in zip(got, want))
    return got == want


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(res: helpers.Result) -> dict:
    """What must not change: per-step trace, weights hash, plan, metric keys, final evaluation."""
    run = res.run_dir
    plan = json.loads((run / "plan.json").read_text())
    if plan.get("resumed_from"):
        plan["resumed_from"] = Path(plan["resumed_from"]).name
    keys = set()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        keys.update(json.loads(line))
    final = json.loads((run / "final_metrics.json").read_text())
    final = {k: v for k, v in final.items() if k not in ("train_time_s", "train_time_total_s", "samples_per_s")}
    trace = [{k: r[k] for k in ("step", "loss", "ids", "stage", "trainable", "world")} for r in res.trace(0)]
    return {"trace": trace, "weights_sha256": sha256(run / "model" / "model.safetensors"), "plan": plan,
            "metrics_keys": sorted(keys), "final": final}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("golden")
    write_conll(tmp / "train.conll", token_sentences(48, 0))
    write_conll(tmp / "val.conll", token_sentences(8, 1))
    return tmp


def overrides_for(name: str, work: Path) -> list[str]:
    if name != "token":
        return list(CASES[name][0])
    return ["data.dataset=null", f"data.train_file={work / 'train.conll'}", f"data.validation_file={work / 'val.conll'}",
            "data.task=token-classification", "data.text_column=tokens", "data.label_column=tags",
            "eval.metrics=[seqeval]", "eval.best_metric=seqeval", "data.max_length=32", *STEPS]


def run_case(name: str, work: Path) -> dict:
    _, preset, nprocs = CASES[name]
    ov = overrides_for(name, work)
    if name == "resume":
        # killed at the start of step 5, after the step-3 checkpoint; the rerun resumes from step 3
        first = helpers.run_ftdist(work, ov, name=name, env={"FTDIST_FAULT": "kill@5"})
        assert first.rc != 0, "the injected kill did not stop the run"
        (work / f"{name}-trace").rename(work / f"{name}-trace-killed")
    res = helpers.run_ftdist(work, ov, preset=preset, nprocs=nprocs, name=name)
    helpers.assert_ok(res, nprocs)
    return record(res)


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name, work):
    path = GOLDEN / f"{name}.json"
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps({"machine": machine(), **run_case(name, work)}, indent=1) + "\n")
        return
    want = json.loads(path.read_text())
    exact = want.pop("machine") == machine()
    how = "bitwise" if exact else f"within {REL} (recorded on another machine)"
    got = run_case(name, work)
    if name == "resume":
        assert [r["step"] for r in got["trace"]] == [4, 5, 6, 7, 8], "the resume did not start after the step-3 checkpoint"
    for key in ("plan", "metrics_keys", "final"):
        assert close(got[key], want[key], exact), f"{name}: {key} changed ({how}):\n got {got[key]}\nwant {want[key]}"
    assert len(got["trace"]) == len(want["trace"])
    for g, w in zip(got["trace"], want["trace"]):
        assert close(g, w, exact), f"{name}: step {w['step']} changed ({how}):\n got {g}\nwant {w}"
    if exact:
        assert got["weights_sha256"] == want["weights_sha256"], f"{name}: exported weights changed"
