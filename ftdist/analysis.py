"""What a classifier's outputs say beyond its headline metrics: per-class scores, confusion matrices, calibration
(ECE, Brier, NLL; reliability diagrams), and the decisions and temperature fitted after training.

One code path for the trainer's end of run (`after_training`, written to <run>/analysis.json and the report)
and for `ftdist eval` (`split_report`). The fitting sees the validation split only: `fit` is handed the
validation outputs and nothing else, and the test split is scored with what was fitted.

Classification scores one example per row. Token classification scores every labelled token position the
metrics score (calibration, tag confusion matrix) and reports per entity type (seqeval's chunks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftdist import calibration, decisions
from ftdist.errors import FtdistError

log = logging.getLogger("ftdist")

FILE = "analysis.json"
DEFINITIONS = {"ece": f"expected calibration error, {calibration.BINNING}", "brier": calibration.BRIER,
               "nll": calibration.NLL, "confusion": "rows: true class, columns: predicted class"}


@dataclass
class Outputs:
    """One split's gathered outputs: logits (n, classes) and labels (n,) of every scored example or token, and
    for token classification the per-sentence tag lists the metrics take."""

    logits: torch.Tensor
    labels: torch.Tensor
    tags_pred: list | None = None
    tags_true: list | None = None


@dataclass
class Post:
    """The end of a run: what final_metrics.json gains, files exported beside the weights, and analysis.json."""

    final: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    analysis: dict | None = None


# ---------------------------------------------------------------- per class

def confusion(pred, true, n_classes: int) -> list[list[int]]:
    """Counts, rows: true class, columns: predicted class."""
    pred, true = torch.as_tensor(pred).long(), torch.as_tensor(true).long()
    flat = torch.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return flat.view(n_classes, n_classes).tolist()


def per_class(pred, true, label_names: list[str]) -> dict:
    """{class: {precision, recall, f1, support}} from predicted and true ids (zero division gives 0)."""
    m = torch.tensor(confusion(pred, true, len(label_names)), dtype=torch.float64)
    tp, predicted, support = m.diag(), m.sum(0), m.sum(1)
    out = {}
    for i, name in enumerate(label_names):
        p = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        r = float(tp[i] / support[i]) if support[i] else 0.0
        out[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(support[i])}
    return out


def per_entity(tags_pred: list, tags_true: list) -> dict:
    """{entity type: {precision, recall, f1, support}}: seqeval's chunks (the shipped seqeval metric's own
    per-type result; support = true entities of the type)."""
    from ftdist import metrics

    (module,) = metrics.prepare(["seqeval"])
    result = module.compute(predictions=tags_pred, references=tags_true)
    return {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1"]),
                "support": int(v["number"])} for k, v in result.items() if isinstance(v, dict)}


# ---------------------------------------------------------------- one split

def split_report(out: Outputs, label_names: list[str], token: bool = False, decision: dict | None = None,
                 temperature: float | None = None, metric_names: list | None = None) -> dict:
    """Per-class scores, confusion matrix, calibration (and, with a decision, the tuned metrics) of one split."""
    from ftdist import metrics

    logits, labels = out.logits.double(), out.labels.long()
    pred = logits.argmax(-1)
    res: dict = {"n_scored": int(labels.shape[0])} if token else {}
    if token:
        res["per_entity"] = per_entity(out.tags_pred, out.tags_true)
        res["per_tag"] = per_class(pred, labels, label_names)
    else:
        res["per_class"] = per_class(pred, labels, label_names)
    res["confusion"] = {"labels": list(label_names), "matrix": confusion(pred, labels, len(label_names))}
    probs = calibration.probabilities(logits)
    cal = {"uncalibrated": calibration.scores(logits, labels),
           "reliability": {"uncalibrated": calibration.reliability(probs, labels)}}
    if temperature is not None:
        cal["temperature"] = temperature
        cal["calibrated"] = calibration.scores(logits, labels, temperature)
        cal["reliability"]["calibrated"] = calibration.reliability(calibration.probabilities(logits, temperature), labels)
    res["calibration"] = cal
    if decision is not None and not token:
        tuned = decisions.apply(decision, logits)
        t = metrics.compute(metric_names, tuned.tolist(), labels.tolist()) if metric_names else {}
        res["tuned"] = {**t, "n_examples": int(labels.shape[0]), "per_class": per_class(tuned, labels, label_names),
                        "confusion": {"labels": list(label_names), "matrix": confusion(tuned, labels, len(label_names))}}
    return res


# ---------------------------------------------------------------- the end of a run

def fit(recipe, label_names: list[str], label_counts: dict, validation: Outputs | None) -> tuple[dict | None, float | None]:
    """The decision and temperature the recipe asks for, fitted on the validation outputs (the only split this
    function is given). A failure to fit is a warning: predictions stay argmax, probabilities uncalibrated."""
    e = recipe.eval
    decision = temperature = None
    if validation is None or (e.decision == "none" and e.calibration == "none"):
        return None, None
    if e.decision != "none":
        try:
            counts = [label_counts.get(n, 0) for n in label_names] if label_counts else None
            decision = decisions.fit(e.decision, e.decision_target, validation.logits, validation.labels, label_names,
                                     e.positive_label, counts)
            if decision.get("target_met") is False:
                log.warning("eval.decision_target=%s: no threshold reaches it on validation; using the most precise "
                            "one (precision %.4f)", e.decision_target, decision["validation"]["precision"])
        except decisions.Unfit as err:
            log.warning("eval.decision=%s not fitted: %s; predictions stay argmax", e.decision, err)
        except Exception as err:  # noqa: BLE001 - a failed fit must not cost the trained model its export
            log.warning("eval.decision=%s could not be fitted (%s: %s); predictions stay argmax", e.decision,
                        type(err).__name__, err)
    if e.calibration == "temperature":
        try:
            temperature = calibration.fit_temperature(validation.logits, validation.labels)
            if temperature in (calibration.T_MIN, calibration.T_MAX):
                log.warning("calibration: the fitted temperature is at the end of its range (%g); validation may be "
                            "too small or separable", temperature)
        except Exception as err:  # noqa: BLE001
            log.warning("eval.calibration=temperature could not be fitted (%s: %s)", type(err).__name__, err)
    return decision, temperature


def after_training(recipe, label_names: list[str], label_counts: dict, outputs: dict[str, Outputs], token: bool) -> Post:
    """Fit on validation, score every split, and say what the run folder and final metrics gain."""
    decision, temperature = fit(recipe, label_names, label_counts, outputs.get("validation"))
    splits = {split: split_report(out, label_names, token, decision, temperature, recipe.eval.metrics)
              for split, out in outputs.items()}
    post = Post(analysis={"task": "token-classification" if token else "classification", "labels": list(label_names),
                          "definitions": DEFINITIONS, "decision": decision, "temperature": temperature,
                          "splits": splits})
    if decision is not None:
        post.files[decisions.FILE] = decisions.save(decision)
        post.final["tuned"] = {"decision": decisions.describe(decision, temperature),
                               **{s: {k: v for k, v in r["tuned"].items() if k not in ("per_class", "confusion")}
                                  for s, r in splits.items()}}
    if temperature is not None:
        post.files[calibration_file()] = calibration_json(temperature, outputs["validation"])
    if recipe.eval.calibration != "none":
        post.final["calibration"] = {"binning": calibration.BINNING, "brier": calibration.BRIER, "temperature": temperature,
                                     **{s: {k: r["calibration"][k] for k in ("uncalibrated", "calibrated")
                                            if k in r["calibration"]} for s, r in splits.items()}}
    return post


# ---------------------------------------------------------------- the temperature stored with a model

def calibration_file() -> str:
    return "calibration.json"


def calibration_json(temperature: float, validation: Outputs) -> str:
    before = calibration.nll(validation.logits, validation.labels)
    after = calibration.nll(validation.logits, validation.labels, temperature)
    return json.dumps({"format": 1, "method": "temperature", "temperature": temperature, "fitted_on": "validation",
                       "n_scored": int(validation.labels.shape[0]),
                       "validation_nll": {"uncalibrated": before, "calibrated": after},
                       "applies": "probabilities = softmax(logits / temperature)"}, indent=1) + "\n"


def load_temperature(model_dir: str | Path) -> float | None:
    f = Path(model_dir) / calibration_file()
    if not f.is_file():
        return None
    try:
        t = json.loads(f.read_text())["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"temperature {t!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise FtdistError(f"{str(f)!r} is not a calibration ftdist wrote ({type(e).__name__}: {e}); delete it to "
                          "use uncalibrated probabilities, or retrain with eval.calibration=temperature") from None
    return float(t)


# ---------------------------------------------------------------- rendering: tables and plots

def _f(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def class_table(rows: dict, tuned: dict | None = None, what: str = "class") -> list[str]:
    head = f"| {what} | support | precision | recall | F1 |"
    sep = "|---|---|---|---|---|"
    if tuned:
        head += " precision (tuned) | recall (tuned) | F1 (tuned) |"
        sep += "---|---|---|"
    lines = [head, sep]
    for name, r in rows.items():
        line = f"| {name} | {r['support']} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['f1'])} |"
        if tuned:
            t = tuned[name]
            line += f" {_f(t['precision'])} | {_f(t['recall'])} | {_f(t['f1'])} |"
        lines.append(line)
    return lines


def confusion_table(conf: dict) -> list[str]:
    labels = conf["labels"]
    lines = ["| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(labels, conf["matrix"])]
    return lines


def calibration_table(splits: dict) -> list[str]:
    lines = ["| split | ECE | Brier | NLL | ECE (calibrated) | Brier (calibrated) | NLL (calibrated) |",
             "|---|---|---|---|---|---|---|"]
    for split, r in splits.items():
        c = r["calibration"]
        u, k = c["uncalibrated"], c.get("calibrated") or {}
        lines.append(f"| {split} | {_f(u['ece'])} | {_f(u['brier'])} | {_f(u['nll'])} | "
                     f"{_f(k.get('ece', '-'))} | {_f(k.get('brier', '-'))} | {_f(k.get('nll', '-'))} |")
    return lines


def calibration_note(temperature: float | None) -> str:
    t = (f"Temperature {temperature:.4f}, fitted on validation (minimum NLL)." if temperature is not None
         else "No temperature fitted (eval.calibration=temperature fits one).")
    return (f"ECE: {calibration.BINNING}. Brier: {calibration.BRIER}. NLL: {calibration.NLL}. {t}")


def markdown(analysis: dict, final: dict | None, pngs: list[str]) -> list[str]:
    """The report's sections on decisions, calibration and per-class results."""
    splits, token = analysis["splits"], analysis["task"] == "token-classification"
    lines = []
    if analysis.get("decision"):
        d = analysis["decision"]
        lines += ["## Decision (fitted on validation)", "", decisions.describe(d, analysis.get("temperature")) + ".", "",
                  "| split | metric | argmax | tuned |", "|---|---|---|---|"]
        for split, r in splits.items():
            argmax = (final or {}).get(split) or {}
            for k, v in r.get("tuned", {}).items():
                if isinstance(v, float):
                    lines.append(f"| {split} | {k} | {_f(argmax.get(k, '-'))} | {_f(v)} |")
        lines.append("")
    lines += ["## Calibration", "", calibration_note(analysis.get("temperature")), ""] + calibration_table(splits) + [""]
    lines += [f"![{p}]({p})" for p in pngs if p.startswith("reliability")] + [""]
    for split, r in splits.items():
        if token:
            lines += [f"## Per entity type ({split})", "", *class_table(r["per_entity"], what="entity type"), "",
                      f"## Per tag ({split}, scored tokens)", "", *class_table(r["per_tag"], what="tag"), ""]
        else:
            lines += [f"## Per class ({split})", "",
                      *class_table(r["per_class"], (r.get("tuned") or {}).get("per_class")), ""]
        lines += [f"Confusion matrix ({split}, argmax; rows: true, columns: predicted):", "",
                  *confusion_table(r["confusion"]), ""]
        if r.get("tuned"):
            lines += [f"Confusion matrix ({split}, tuned decision):", "", *confusion_table(r["tuned"]["confusion"]), ""]
        lines += [f"![{p}]({p})" for p in pngs if p.startswith(f"confusion-{split}")] + [""]
    return lines


def text(result: dict) -> str:
    """`ftdist eval`'s readable part: plain-text tables (no braces: the JSON that follows starts at the first one)."""
    def table(md: list[str]) -> list[str]:
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in md if not line.startswith("|---")]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    token = "per_entity" in result
    lines = []
    if "tuned" in result:
        lines += [f"decision: {result['tuned']['decision']}", ""]
        keys = [k for k, v in result["tuned"].items() if isinstance(v, float)]
        lines += table(["| metric | argmax | tuned |", "|---|"] +
                       [f"| {k} | {_f(result.get(k, '-'))} | {_f(result['tuned'][k])} |" for k in keys]) + [""]
    if token:
        lines += ["per entity type:"] + table(class_table(result["per_entity"], what="entity type")) + [""]
        lines += ["per tag (scored tokens):"] + table(class_table(result["per_tag"], what="tag")) + [""]
    else:
        lines += ["per class:"] + table(class_table(result["per_class"], (result.get("tuned") or {}).get("per_class"))) + [""]
    lines += ["confusion matrix (argmax; rows: true, columns: predicted):"]
    lines += table(confusion_table(result["confusion"])) + [""]
    if "tuned" in result:
        lines += ["confusion matrix (tuned decision):"] + table(confusion_table(result["tuned"]["confusion"])) + [""]
    c = result["calibration"]
    lines += ["calibration:"] + ["  " + part.strip().rstrip(".") + "." for part in calibration_note(c.get("temperature")).split(". ")
                                 if part.strip(". ")]
    lines += table(calibration_table({"this file": result})) + [""]
    return "\n".join(lines)


def plots(analysis: dict, folder: Path) -> list[str]:
    """reliability.png (one panel per split, before and after scaling) and confusion-<split>.png; their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits, written = analysis["splits"], []
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.0), squeeze=False)
    for ax, (split, r) in zip(axes[0], splits.items()):
        rel = r["calibration"]["reliability"]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect")
        for name, style in (("uncalibrated", "o-"), ("calibrated", "s-")):
            bins = [b for b in rel.get(name, []) if b["count"]]
            if bins:
                ece = r["calibration"][name]["ece"]
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, markersize=4,
                        label=f"{name} (ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{split}: {calibration.N_BINS} equal-width bins", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(folder / "reliability.png", dpi=90)
    plt.close(fig)
    written.append("reliability.png")
    for split, r in splits.items():
        for suffix, conf in (("", r["confusion"]), ("-tuned", (r.get("tuned") or {}).get("confusion"))):
            if conf is None:
                continue
            name = f"confusion-{split}{suffix}.png"
            _confusion_png(plt, conf, f"{split}{' (tuned decision)' if suffix else ' (argmax)'}", folder / name)
            written.append(name)
    return written


def _confusion_png(plt, conf: dict, title: str, path: Path) -> None:
    labels, m = conf["labels"], torch.tensor(conf["matrix"], dtype=torch.float64)
    k = len(labels)
    share = m / m.sum(1, keepdim=True).clamp(min=1)  # colour: the share of each true class (recall on the diagonal)
    size = min(3 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                v = int(m[i, j])
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7 if k > 12 else 9,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=90 if k > 6 else 0, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, {title}\n(counts; colour: share of the true class)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
