"""`ftdist verify RECIPE --preset P`: the user's own check of the promise, on their recipe and machine.

Two comparisons, each of real `./launch` runs of K optimizer steps:
    scale   1 process vs the preset's N processes, with dropout off for that comparison only (ranks draw
            different dropout masks, so with dropout on the two runs are different samples of the same
            model); per-step losses and final weights must agree to the backends' reduction-order noise
    resume  on the preset, a run killed (SIGKILL) after its mid-run checkpoint and resumed, against the
            uninterrupted run, with dropout as the recipe sets it; they must agree bitwise
Prints the largest differences with PASS/FAIL; exits 1 on any FAIL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftdist.errors import FtdistError

# per-step relative loss and absolute weight difference allowed between 1 and N processes (fp32):
# measured ~1e-8 on the CPU presets; bf16 autocast differs by up to ~3e-4 across backends
SCALE_TOL = {"no": 1e-5, "fp16": 3e-3, "bf16": 3e-3}


@dataclass
class Comparison:
    name: str
    loss_diff: float      # max relative per-step loss difference
    weight_diff: float    # max absolute difference of the exported weights
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.loss_diff <= self.tolerance and self.weight_diff <= self.tolerance

    def line(self) -> str:
        tol = "bitwise" if self.tolerance == 0 else f"tolerance {self.tolerance:g}"
        return (f"  {self.name:<58} loss {self.loss_diff:.3g}  weights {self.weight_diff:.3g}  "
                f"{'PASS' if self.passed else 'FAIL'} ({tol})")


@dataclass
class Launched:
    rc: int
    log: str
    run_dir: Path
    trace: list


def launch(preset: str, recipe: str, overrides: list[str], run_dir: Path, fault: str | None = None,
           timeout: int = 3600) -> Launched:
    trace_dir = run_dir.with_name(run_dir.name + "-trace")
    env = dict(os.environ, FTDIST_TRACE_DIR=str(trace_dir), FTDIST_FAULT=fault or "")
    cmd = [sys.executable, "-m", "ftdist.launcher", preset, recipe, *overrides, f"log.output_dir={run_dir}", "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    f = trace_dir / "rank0.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []
    return Launched(p.returncode, p.stdout + p.stderr, run_dir, rows)


def _ok(res: Launched, what: str) -> Launched:
    if res.rc != 0:
        raise FtdistError(f"verify: the {what} run failed (exit {res.rc}); its output ends with:\n{res.log[-3000:]}")
    return res


def compare(name: str, a: list, b: list, wa: dict, wb: dict, tolerance: float) -> Comparison:
    """a, b: per-step trace rows (step, loss); wa, wb: exported weights. Steps must match one for one."""
    steps_a, steps_b = [r["step"] for r in a], [r["step"] for r in b]
    if steps_a != steps_b or wa.keys() != wb.keys():
        return Comparison(name, float("inf"), float("inf"), tolerance)
    loss = max((abs(x["loss"] - y["loss"]) / max(abs(y["loss"]), 1e-12) for x, y in zip(a, b)), default=0.0)
    weights = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa), default=0.0)
    return Comparison(name, loss, weights, tolerance)


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def run(recipe: str, overrides: list[str], preset: str, steps: int, out: str | None) -> list[Comparison]:
    from ftdist import config

    if steps < 4:
        raise FtdistError(f"verify --steps: {steps} is too few; give at least 4 (a checkpoint mid-run, then a resume)")
    r = config.load(recipe, overrides)
    from ftdist import launcher

    topo = launcher.build(launcher.parse([preset, recipe, *overrides])).topology
    if topo.workdir:
        shutil.rmtree(topo.workdir, ignore_errors=True)
    info, nproc = topo.preset_info, topo.world_size
    single = "cpu" if info.use_cpu or info.distributed_type == "NO" and nproc == 1 else "gpu"
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="ftdist-verify-"))
    if root.exists() and any(root.iterdir()):
        raise FtdistError(f"verify --out: {str(root)!r} is not empty; give a new folder for the verification runs")
    every = steps // 2
    common = [*overrides, f"train.max_steps={steps}", "checkpoint.resume=latest", "log.progress=false"]
    results = []
    print(f"verify: {recipe} on {preset} ({nproc} process(es)), {steps} steps; runs in {root}", flush=True)
    if nproc > 1:
        no_dropout = [*common, "model.dropout=0"]  # ranks draw different masks: compare the model, not the noise
        one = _ok(launch(single, recipe, no_dropout, root / "scale-1"), "1-process")
        many = _ok(launch(preset, recipe, no_dropout, root / f"scale-{nproc}"), f"{nproc}-process")
        results.append(compare(f"1 process vs {nproc} ({preset}), dropout 0", one.trace, many.trace,
                               _weights(one.run_dir), _weights(many.run_dir), SCALE_TOL[r.train.precision]))
    resume = [*common, f"checkpoint.every_steps={every}"]
    ref = _ok(launch(preset, recipe, resume, root / "uninterrupted"), "uninterrupted")
    killed = launch(preset, recipe, resume, root / "resumed", fault=f"kill@{every + 2}")
    if killed.rc == 0:
        raise FtdistError("verify: the run that should have been killed finished; was FTDIST_FAULT handled?")
    (root / "resumed-trace").rename(root / "killed-trace")
    res = _ok(launch(preset, recipe, resume, root / "resumed"), "resumed")
    dropout = "dropout as configured" if r.model.dropout is None else f"dropout {r.model.dropout}"
    results.append(compare(f"kill at step {every + 2} + resume vs uninterrupted, {dropout}", res.trace,
                           [row for row in ref.trace if row["step"] > every], _weights(res.run_dir),
                           _weights(ref.run_dir), 0.0))
    for c in results:
        print(c.line(), flush=True)
    print("verify: " + ("PASS" if all(c.passed for c in results) else "FAIL"), flush=True)
    return results
