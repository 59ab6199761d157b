"""Decisions after training: how logits become a label, fitted on the validation split only.

* ``threshold`` (two classes): predict the positive class when p(positive) >= t. The threshold is fitted on the
  logit margin z_pos - z_neg (exact in float64, where probabilities near 1 would tie) and stored both as that
  margin and as t = sigmoid(margin). Targets: ``f1`` (the F1 of the positive class is largest), ``macro_f1``
  (the mean F1 of both classes is largest), ``precision>=X``
  (the most recall whose precision is at least X; when no threshold reaches X, the most precise one, flagged
  ``target_met: false``) and ``recall>=X`` (the most precision whose recall is at least X). Cuts lie halfway
  between neighbouring validation scores, never on one.
* ``bias`` (any number of classes): predict argmax(logits + b). b starts as a log-prior correction
  -alpha * ln(train prior), alpha in {0, 0.25, ..., 1} chosen for validation macro-F1, then coordinate ascent
  sets one class's bias at a time to the value maximising validation macro-F1 (an exact line search over the
  points where that class's predictions change), until a full round improves nothing. Robust on tiny classes:
  a class absent from validation keeps its start value (nothing there to fit it on) and the macro-F1 is taken
  over the classes validation has; a bias moves only on a strict gain, and among equally good values the one
  nearest the start wins; |b| <= 10.

A decision is a small JSON file beside the exported weights (``decision.json``), applied by ``ftdist eval`` and
``ftdist predict``. Importing this module is cheap (config.py checks targets with it); numpy and torch are
imported where used.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ftdist.errors import FtdistError

FILE = "decision.json"
FORMAT = 1
KINDS = ("none", "threshold", "bias")
# eval.decision=auto fits logit biases when the largest train class has at least this many times the examples of
# the smallest: on the benchmark's 26-class task (ratio 435) they raise test macro-F1 from 0.559 to 0.615 at equal
# accuracy; on balanced data there is little to correct and a fitted decision only adds variance.
IMBALANCE = 3.0
BIAS_BOUND = 10.0
PRIOR_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_TARGET = re.compile(r"^(f1|macro_f1|precision|recall)(?:\s*>=\s*([0-9]*\.?[0-9]+))?$")
TARGETS = "f1, macro_f1, precision>=X or recall>=X with X in (0, 1]"


class Unfit(Exception):
    """The validation data cannot support the decision (a warning, not an error: argmax stays in force)."""


def resolve_auto(task: str, label_counts: dict[str, int], has_validation: bool) -> str:
    """What eval.decision=auto means for this data: ``bias`` for classification with a validation split and
    imbalanced train labels (largest/smallest class count >= IMBALANCE), otherwise ``none`` (argmax)."""
    counts = list((label_counts or {}).values())
    if task not in ("classification", "image-classification") or not has_validation or len(counts) < 2:
        return "none"
    return "bias" if max(counts) >= IMBALANCE * max(min(counts), 1) else "none"


def parse_target(text: str) -> tuple[str, float | None]:
    """``f1`` -> ("f1", None); ``precision>=0.9`` -> ("precision", 0.9). ValueError when malformed."""
    m = _TARGET.match(str(text).strip())
    if not m or (m.group(1) in ("f1", "macro_f1")) != (m.group(2) is None):
        raise ValueError(f"expected {TARGETS}")
    floor = float(m.group(2)) if m.group(2) is not None else None
    if floor is not None and not 0 < floor <= 1:
        raise ValueError(f"expected {TARGETS}")
    return m.group(1), floor


def valid_target(text) -> bool:
    try:
        parse_target(text)
    except ValueError:
        return False
    return isinstance(text, str)


# ---------------------------------------------------------------- fitting

def fit_threshold(logits, labels, positive: int, target: str = "f1") -> dict:
    """The binary threshold for `target` on validation logits (n, 2) and labels (n,)."""
    import numpy as np
    import torch

    z = torch.as_tensor(logits).double()
    if z.ndim != 2 or z.shape[1] != 2:
        raise Unfit(f"a threshold needs two classes; the model has {z.shape[-1]}")
    kind, floor = parse_target(target)
    score = (z[:, positive] - z[:, 1 - positive]).numpy()
    y = (torch.as_tensor(labels).numpy() == positive)
    n, n_pos = len(y), int(y.sum())
    if n_pos == 0 or n_pos == n:
        raise Unfit(f"validation holds {'no' if n_pos == 0 else 'only'} examples of the positive class")
    order = np.argsort(-score, kind="stable")
    s, ys = score[order], y[order]
    tp = np.concatenate([[0], np.cumsum(ys)])  # tp[k]: true positives among the k highest scores
    k = np.arange(n + 1)
    cut = np.concatenate([[True], s[:-1] > s[1:], [True]])  # a threshold can split after k only between distinct scores
    prec = np.divide(tp, k, out=np.zeros(n + 1), where=k > 0)
    rec = tp / n_pos
    f1 = 2 * tp / (k + n_pos)
    tn = (n - k) - (n_pos - tp)
    macro = (f1 + 2 * tn / ((n - k) + (n - n_pos))) / 2
    ok = cut & (k > 0)
    met = True
    if kind == "f1":
        best = _first_max(f1, ok)
    elif kind == "macro_f1":
        best = _first_max(macro, cut)
    elif kind == "precision":
        feasible = ok & (prec >= floor - 1e-12)
        met = bool(feasible.any())
        best = _lexmax((rec, prec), feasible) if met else _lexmax((prec, rec), ok)
    else:
        feasible = ok & (rec >= floor - 1e-12)
        best = _lexmax((prec, rec), feasible)
    # halfway between the last score predicted positive and the first one not; one logit beyond the ends
    margin = float(s[0] + 1.0) if best == 0 else float(s[n - 1] - 1.0) if best == n else float((s[best - 1] + s[best]) / 2)
    return {"kind": "threshold", "target": target, "positive_id": int(positive), "margin": margin,
            "threshold": _sigmoid(margin), "target_met": met,
            "validation": {"precision": float(prec[best]), "recall": float(rec[best]), "f1": float(f1[best]),
                           "macro_f1": float(macro[best]), "predicted_positive": int(best), "n_examples": int(n)}}


def _first_max(values, mask) -> int:
    import numpy as np

    v = np.where(mask, values, -np.inf)
    return int(np.argmax(v))


def _lexmax(keys, mask) -> int:
    """The index maximising keys[0], then keys[1], then the smallest index, among `mask`."""
    import numpy as np

    idx = np.flatnonzero(mask)
    order = np.lexsort((idx, *(-k[idx] for k in reversed(keys))))
    return int(idx[order[0]])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _macro_f1(tp, pred_n, true_n, present):
    """Macro F1 over the `present` classes, for one (k,) or many (m, k) rows of counts."""
    import numpy as np

    denom = pred_n + true_n
    f1 = np.divide(2 * tp, denom, out=np.zeros(np.broadcast(tp, denom).shape), where=denom > 0)
    return f1[..., present].mean(-1)


def _counts(pred, y, k):
    import numpy as np

    return (np.bincount(pred[pred == y], minlength=k).astype(float), np.bincount(pred, minlength=k).astype(float))


def fit_bias(logits, labels, train_counts: list[int] | None = None, max_rounds: int = 20) -> dict:
    """Per-class additive logit biases maximising validation macro-F1 (see the module docstring)."""
    import numpy as np
    import torch

    z = torch.as_tensor(logits).double().numpy()
    y = torch.as_tensor(labels).long().numpy()
    n, k = z.shape
    true_n = np.bincount(y, minlength=k).astype(float)
    present = true_n > 0
    if present.sum() < 2:
        raise Unfit("validation holds fewer than two classes")

    def score(b):
        pred = np.argmax(z + b, axis=1)
        tp, pn = _counts(pred, y, k)
        return float(_macro_f1(tp, pn, true_n, present))

    argmax_f1 = score(np.zeros(k))
    if train_counts is not None:
        prior = np.maximum(np.asarray(train_counts, dtype=float), 1.0)
        log_prior = np.log(prior / prior.sum())
        log_prior -= log_prior.mean()
    else:
        log_prior = np.zeros(k)
    starts = [(score(-a * log_prior), -a, a) for a in PRIOR_STRENGTHS]
    best_start = max(starts, key=lambda t: (t[0], t[1]))  # ties: the weakest correction
    alpha = best_start[2]
    start = np.clip(-alpha * log_prior, -BIAS_BOUND, BIAS_BOUND)
    b = start.copy()
    current = score(b)
    rows = np.arange(n)
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (reported)
        improved = False
        for c in np.flatnonzero(present):
            zb = z + b
            other = zb.copy()
            other[:, c] = -np.inf
            comp = other.argmax(1)
            t = other[rows, comp] - z[:, c]  # example i goes to class c iff b_c > t_i
            order = np.argsort(t, kind="stable")
            ts, comp_s, y_s = t[order], comp[order], y[order]
            # counts with class c never predicted, then as the m lowest-t examples move to c
            tp0, pn0 = _counts(comp, y, k)
            moved = np.zeros((n + 1, k))
            moved[1:] = np.cumsum(np.eye(k)[comp_s], axis=0)
            moved_tp = np.zeros((n + 1, k))
            moved_tp[1:] = np.cumsum(np.eye(k)[comp_s] * (y_s == comp_s)[:, None], axis=0)
            pn = pn0 - moved
            tp = tp0 - moved_tp
            pn[:, c] = np.arange(n + 1)
            tp[:, c] = np.concatenate([[0], np.cumsum(y_s == c)])
            f1 = _macro_f1(tp, pn, true_n, present)
            # the bias interval of each m: (ts[m-1], ts[m]); a value inside it, within the bound
            lo = np.concatenate([[-np.inf], ts])
            hi = np.concatenate([ts, [np.inf]])
            value = np.where(np.isinf(lo), hi - 1.0, np.where(np.isinf(hi), lo + 1.0, (lo + hi) / 2))
            ok = (lo < hi) & (hi > -BIAS_BOUND) & (lo < BIAS_BOUND)
            value = np.clip(value, np.maximum(lo, -BIAS_BOUND), np.minimum(hi, BIAS_BOUND))
            value = np.where(np.isfinite(value), value, 0.0)
            gain = np.where(ok, f1, -np.inf)
            top = gain.max()
            if top <= current + 1e-12:
                continue
            candidates = np.flatnonzero(gain >= top - 1e-12)
            pick = candidates[np.argmin(np.abs(value[candidates] - start[c]))]
            b[c] = float(value[pick])
            new = score(b)
            if new > current + 1e-12:  # the line search's own count; recomputed to guard against ties
                current, improved = new, True
        if not improved:
            break
    return {"kind": "bias", "target": "f1", "bias": [float(v) for v in b], "prior_strength": float(alpha),
            "rounds": int(rounds),
            "validation": {"macro_f1_argmax": argmax_f1, "macro_f1_tuned": current, "n_examples": int(n),
                           "classes_fitted": int(present.sum())}}


def fit(kind: str, target: str, logits, labels, label_names: list[str], positive_label: str | None = None,
        train_counts: list[int] | None = None) -> dict:
    """The decision `kind` fitted on (validation) logits and labels, as stored in decision.json."""
    if kind == "threshold":
        positive = positive_id(label_names, positive_label)
        out = fit_threshold(logits, labels, positive, target)
        out["positive_label"] = label_names[positive]
    elif kind == "bias":
        out = fit_bias(logits, labels, train_counts)
    else:
        raise ValueError(f"unknown decision {kind!r}")
    return {"format": FORMAT, "fitted_on": "validation", **out, "labels": list(label_names)}


def positive_id(label_names: list[str], positive_label: str | None) -> int:
    if positive_label is None:
        return 1
    if positive_label not in label_names:
        raise FtdistError(f"eval.positive_label: {positive_label!r} is not one of the labels {label_names}")
    return label_names.index(positive_label)


# ---------------------------------------------------------------- applying

def apply(decision: dict | None, logits):
    """Predicted class ids (LongTensor) under `decision` (None: argmax). Temperature never changes them."""
    import torch

    z = torch.as_tensor(logits).double()
    if decision is None:
        return z.argmax(-1)
    if decision["kind"] == "threshold":
        pos = decision["positive_id"]
        margin = z[:, pos] - z[:, 1 - pos]
        return torch.where(margin >= decision["margin"], pos, 1 - pos).long()
    return (z + torch.tensor(decision["bias"], dtype=torch.float64)).argmax(-1)


def describe(decision: dict, temperature: float | None = None) -> str:
    """One line: what the decision does."""
    if decision["kind"] == "threshold":
        t = f"p({decision['positive_label']}) >= {decision['threshold']:.4f}"
        if temperature is not None:
            t += f" (calibrated: >= {_sigmoid(decision['margin'] / temperature):.4f})"
        met = "" if decision.get("target_met", True) else ", target not reachable on validation: the most precise cut"
        what = {"f1": f"F1 of {decision['positive_label']}", "macro_f1": "macro-F1"}.get(decision["target"], decision["target"])
        return f"threshold {t}, target {what}{met}, fitted on validation"
    bias = ", ".join(f"{n} {v:+.3f}" for n, v in zip(decision["labels"], decision["bias"]))
    return f"logit biases ({bias}; prior strength {decision['prior_strength']}), target macro-F1, fitted on validation"


def save(decision: dict) -> str:
    return json.dumps(decision, indent=1) + "\n"


def load(model_dir: str | Path, label_names: list[str]) -> dict | None:
    """The decision stored with a model (None if it has none), checked against the model's labels."""
    f = Path(model_dir) / FILE
    if not f.is_file():
        return None
    where = f"{str(f)!r}"
    try:
        d = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FtdistError(f"{where} is unreadable ({type(e).__name__}: {e}); delete it to predict by argmax, or "
                          "retrain with eval.decision set") from None
    try:
        assert isinstance(d, dict) and d.get("format") == FORMAT and d.get("kind") in ("threshold", "bias")
        assert list(d["labels"]) == list(label_names)
        if d["kind"] == "threshold":
            assert len(label_names) == 2 and d["positive_id"] in (0, 1) and math.isfinite(float(d["margin"]))
        else:
            assert len(d["bias"]) == len(label_names) and all(math.isfinite(float(v)) for v in d["bias"])
    except (AssertionError, KeyError, TypeError, ValueError):
        raise FtdistError(f"{where} is not a decision ftdist wrote for this model (format {FORMAT}, labels "
                          f"{label_names}); delete it to predict by argmax, or retrain with eval.decision set") from None
    return d
