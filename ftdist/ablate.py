"""`ftdist ablate RECIPE`: full vs gradual vs LP-FT vs layer-wise LR decay on the same data, seeds and budget.

Each run is a separate `ftdist train` process (a clean Accelerator per run), into
<out>/<variant>-seed<k>. The table reports the chosen metric's mean and spread over seeds
and the mean train time; ablation.png plots the same numbers.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from ftdist.errors import FtdistError


def variants(budget: int, n_groups: int) -> dict[str, list[str]]:
    every = max(1, budget // (n_groups + 1))
    return {
        "full": ["unfreeze.schedule=full"],
        "gradual": ["unfreeze.schedule=gradual", f"unfreeze.every_steps={every}"],
        "lp-ft": ["unfreeze.schedule=lp-ft", f"unfreeze.lp_steps={max(1, budget // 4)}"],
        "lr-decay": ["unfreeze.schedule=full", "unfreeze.lr_decay=0.8"],
    }


def run(recipe: str, overrides: list[str], out: str, seeds: list[int], budget: int, names: list[str] | None,
        metric: str | None, split: str = "test") -> dict:
    from ftdist import config
    from ftdist import model as modellib

    r = config.load(recipe, overrides)
    metric = metric or r.eval.best_metric
    tok = modellib.load_processor(r.model, r.data.task)  # noqa: F841 - fails early on a bad model path
    net = modellib.build(r.model, r.data.task, ["a", "b"] if r.data.task != "regression" else None)
    n_groups = len(modellib.layer_groups(net, r.unfreeze.group_patterns))
    table = variants(budget, n_groups)
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise FtdistError(f"ablate --variants: unknown {unknown}; choose from {', '.join(table)}")
        table = {n: table[n] for n in names}
    results: dict[str, list[dict]] = {}
    out_dir = Path(out)
    for seed in seeds:  # seeds outermost, variants alternate: drift in machine load hits every variant alike
        for name, extra in table.items():
            run_dir = out_dir / f"{name}-seed{seed}"
            cmd = [sys.executable, "-m", "ftdist", "train", recipe, *overrides, *extra, f"train.seed={seed}",
                   f"train.max_steps={budget}", f"log.output_dir={run_dir}", "checkpoint.resume=null", "--quiet"]
            print(f"ablate: {name} seed {seed}", flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise FtdistError(f"ablate: run {name} seed {seed} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
            final = json.loads((run_dir / "final_metrics.json").read_text())
            scores = final.get(split) or final.get("validation") or {}
            if metric not in scores:
                raise FtdistError(f"ablate: metric {metric!r} not in the {split} results {sorted(scores)}")
            results.setdefault(name, []).append({"seed": seed, "score": scores[metric], "time": final["train_time_s"]})
    summary = {name: {"mean": statistics.mean(x["score"] for x in rows),
                      "std": statistics.stdev([x["score"] for x in rows]) if len(rows) > 1 else 0.0,
                      "time_s": statistics.mean(x["time"] for x in rows), "runs": rows}
               for name, rows in results.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"recipe": recipe, "overrides": overrides, "metric": metric, "split": split, "budget_steps": budget,
              "seeds": seeds, "variants": {k: table[k] for k in summary}, "summary": summary}
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (out_dir / "ablation.md").write_text(text + "\n")
    _plot(report, out_dir / "ablation.png")
    print(text)
    return report


def render(report: dict) -> str:
    lines = [f"ablation: {report['recipe']} {' '.join(report['overrides'])}, {report['budget_steps']} steps, "
             f"seeds {report['seeds']}, {report['split']} {report['metric']}", "",
             f"| variant | {report['metric']} mean | spread (std) | train time (s) |", "|---|---|---|---|"]
    for name, s in report["summary"].items():
        lines.append(f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {s['time_s']:.1f} |")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(names, [report["summary"][n]["mean"] for n in names], yerr=[report["summary"][n]["std"] for n in names],
           capsize=4, color="#4a7ab5")
    lo = min(report["summary"][n]["mean"] - report["summary"][n]["std"] for n in names)
    ax.set_ylim(max(0.0, lo - 0.05), None)
    ax.set_ylabel(f"{report['split']} {report['metric']}")
    ax.set_title(f"{report['budget_steps']} steps, {len(report['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
