"""End-of-run report: report.md plus PNG plots, rebuilt from the run folder alone (`ftdist report RUN_DIR`).

The plotted series are also written to report_data.json, so tests (and people) can check a
plot's content against metrics.jsonl without looking at pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftdist.errors import FtdistError


def _rows(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        raise FtdistError(f"report: {str(f)!r} not found; give a run folder written by `ftdist train` "
                          "(log.trackers must include jsonl)")
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
    return rows


def series(rows: list[dict]) -> dict:
    """Named (steps, values) series from the jsonl log."""
    out: dict[str, dict] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            s = out.setdefault(key, {"steps": [], "values": []})
            s["steps"].append(row["step"])
            s["values"].append(value)
    return out


SMOOTHING = 0.6  # TensorBoard's default weight
SMOOTHED_LOSS = "train/loss (smoothed)"
STYLE = {"train/loss": {"alpha": 0.45, "linewidth": 1}, SMOOTHED_LOSS: {"linewidth": 2}}


def smoothed(s: dict) -> dict:
    """A series' bias-corrected exponential moving average (TensorBoard's smoothing), at the same steps."""
    out, avg = [], 0.0
    for i, v in enumerate(s["values"]):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * v
        out.append(avg / (1 - SMOOTHING ** (i + 1)))
    return {"steps": list(s["steps"]), "values": out}


def transitions(data: dict) -> list[int]:
    stage = data.get("train/stage")
    if not stage:
        return []
    return [step for step, prev, cur in zip(stage["steps"][1:], stage["values"], stage["values"][1:]) if cur != prev]


def build(run_dir: str | Path) -> Path:
    from ftdist import runfolder

    if not runfolder.is_run_folder(Path(run_dir)):
        raise FtdistError(f"{str(run_dir)!r} is not an ftdist run folder (no {runfolder.MARKER}); the report is "
                          "written into the run folder, and ftdist writes only into folders it created")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    data = series(_rows(run_dir))
    if "train/loss" in data:
        data[SMOOTHED_LOSS] = smoothed(data["train/loss"])
    marks = transitions(data)
    plots = {
        "loss.png": ("loss: train (mean over each log window, and smoothed) and validation",
                     ["train/loss", SMOOTHED_LOSS, "eval/loss"]),
        "eval.png": ("eval metrics", sorted(k for k in data if k.startswith("eval/") and k not in ("eval/loss", "eval/n_examples"))),
        "lr.png": ("learning rate by parameter group (dashed: unfreeze transitions)", sorted(k for k in data if k.startswith("lr/"))),
        "throughput.png": ("throughput (window: its steps' own time; cumulative: wall time since the start)",
                           ["train/samples_per_s_window", "train/samples_per_s_cumulative"]),
    }
    written = {}
    for name, (title, keys) in plots.items():
        keys = [k for k in keys if k in data]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for k in keys:
            ax.plot(data[k]["steps"], data[k]["values"], label=k, marker="." if len(data[k]["steps"]) < 30 else None,
                    **STYLE.get(k, {}))
        for m in marks:
            ax.axvline(m, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=90)
        plt.close(fig)
        written[name] = {k: data[k] for k in keys}
    analysis, pngs = _analysis(run_dir)
    report_data = {"plots": written, "transitions": marks}
    if analysis:  # what the reliability diagrams and confusion matrices show, as numbers
        report_data["reliability"] = {s: r["calibration"]["reliability"] for s, r in analysis["splits"].items()}
        report_data["confusion"] = {s: r["confusion"] for s, r in analysis["splits"].items()}
    (run_dir / "report_data.json").write_text(json.dumps(report_data, indent=1))
    (run_dir / "report.md").write_text(_markdown(run_dir, data, written, marks, analysis, pngs))
    return run_dir / "report.md"


def _analysis(run_dir: Path) -> tuple[dict | None, list[str]]:
    """analysis.json (per-class, confusion, calibration, decision) and its plots; (None, []) without one."""
    from ftdist import analysis

    f = run_dir / analysis.FILE
    try:
        found = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or not found.get("splits"):
        return None, []
    return found, analysis.plots(found, run_dir)


def _markdown(run_dir: Path, data: dict, written: dict, marks: list[int], analysis: dict | None = None,
              pngs: list[str] = ()) -> str:
    def load(name):
        f = run_dir / name
        return json.loads(f.read_text()) if f.is_file() else {}

    plan, final = load("plan.json"), load("final_metrics.json")
    lines = [f"# Run report: {run_dir.name}", ""]
    if plan:
        lines += ["## Plan", "", "| key | value |", "|---|---|"]
        for k in ("world_size", "num_nodes", "per_device_batch", "accumulation", "global_batch", "precision", "backend",
                  "zero_stage", "steps_per_epoch", "total_steps", "train_examples"):
            if k in plan:
                lines.append(f"| {k} | {plan[k]} |")
        if plan.get("stages") and len(plan["stages"]) > 1:
            lines += ["", "Unfreeze stages: " + "; ".join(f"stage {s['stage']} from step {s['from_step']}: "
                                                         f"{', '.join(s['groups'])}" for s in plan["stages"])]
        lines.append("")
    if final:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        for k in ("train_time_s", "train_time_total_s", "samples_per_s", "steps", "trained_steps", "resumed_from_step", "skipped_steps",
                  "best_metric", "best", "best_step"):
            if k in final:
                v = final[k]
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        for prefix, results in (("", final), *((f"model-{m} ", final[m]) for m in ("ema", "avg") if m in final)):
            for split in ("validation", "test"):
                for k, v in (results.get(split) or {}).items():
                    lines.append(f"| {prefix}{split} {k} | {v:.4f} |" if isinstance(v, float)
                                 else f"| {prefix}{split} {k} | {v} |")
        lines.append("")
    if plan.get("lr"):
        lines += ["## LR range test (train.lr=auto)", "", f"Chosen head LR: {plan['lr']['value']:.3g}, a tenth of the LR at "
                  "the lowest smoothed training loss.", "", "![lr_find.png](lr_find.png)", ""]
    if marks:
        lines += [f"Unfreeze transitions at steps {', '.join(map(str, marks))}.", ""]
    if analysis:
        from ftdist.analysis import markdown

        lines += markdown(analysis, final, list(pngs))
    lines += ["## Plots", ""] + [f"![{n}]({n})" for n in written] + [""]
    return "\n".join(lines)
