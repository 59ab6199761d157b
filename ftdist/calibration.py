"""Calibration: how far predicted probabilities are from observed frequencies, and temperature scaling.

The definitions, as every output states them:

* **ECE** (expected calibration error): 15 equal-width bins over the top-class confidence (the largest
  softmax probability); bin m holds the confidences in ((m-1)/15, m/15] (the first bin also 0).
  ECE = sum over bins of (n_m / n) * |accuracy_m - mean confidence_m|, where accuracy is argmax == label.
* **Brier score**: two classes: mean over examples of (p(class 1) - [label = 1])^2, which is
  sklearn.metrics.brier_score_loss (and half the sum over both classes); three or more classes: the sum over
  classes of (p_k - [label = k])^2, mean over examples (range 0..2).
* **NLL**: mean over examples of -ln p(label), natural log (sklearn.metrics.log_loss).

Temperature scaling (Guo et al. 2017) divides every logit by one T > 0 fitted on validation logits to minimise
the NLL. It never changes the argmax. The NLL of logits / T is convex in 1/T, hence unimodal in log T: a
golden-section search over log T in [0.05, 20] finds its minimum without step sizes or restarts.

For token classification every scored token (the positions the metrics score) is one example.
"""

from __future__ import annotations

import math

import torch

N_BINS = 15
T_MIN, T_MAX = 0.05, 20.0
BINNING = "15 equal-width bins over top-class confidence"
BRIER = ("2 classes: mean (p(class 1) - y)^2, as sklearn brier_score_loss; 3+ classes: sum over classes of "
         "(p_k - y_k)^2, mean over examples")
NLL = "mean -ln p(label), natural log"


def _checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels).long()
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits (n, classes) and labels (n,) expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits.double(), labels


def probabilities(logits, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float64."""
    return (torch.as_tensor(logits).double() / temperature).softmax(-1)


def reliability(probs, labels, n_bins: int = N_BINS) -> list[dict]:
    """Per bin of top-class confidence: its edges, count, accuracy and mean confidence (empty bins: count 0)."""
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels).long()
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    # bin m (0-based) holds (m/n_bins, (m+1)/n_bins]; confidence 0 falls in bin 0
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(idx, minlength=n_bins).double()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins)
    cs = torch.bincount(idx, weights=conf, minlength=n_bins)
    out = []
    for m in range(n_bins):
        n = int(count[m])
        out.append({"lo": m / n_bins, "hi": (m + 1) / n_bins, "count": n,
                    "accuracy": float(acc[m] / n) if n else None, "confidence": float(cs[m] / n) if n else None})
    return out


def ece(probs, labels, n_bins: int = N_BINS) -> float:
    bins = reliability(probs, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        return float("nan")
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def brier(probs, labels) -> float:
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels).long()
    if probs.shape[0] == 0:
        return float("nan")
    if probs.shape[1] == 2:
        return float(((probs[:, 1] - (labels == 1).double()) ** 2).mean())
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(-1).mean())


def nll(logits, labels, temperature: float = 1.0) -> float:
    logits, labels = _checked(logits, labels)
    if logits.shape[0] == 0:
        return float("nan")
    return float(-(logits / temperature).log_softmax(-1).gather(1, labels[:, None]).mean())


def scores(logits, labels, temperature: float = 1.0) -> dict:
    """{"ece", "brier", "nll"} of softmax(logits / T)."""
    logits, labels = _checked(logits, labels)
    p = probabilities(logits, temperature)
    return {"ece": ece(p, labels), "brier": brier(p, labels), "nll": nll(logits, labels, temperature)}


def fit_temperature(logits, labels, t_min: float = T_MIN, t_max: float = T_MAX, tol: float = 1e-7) -> float:
    """The T in [t_min, t_max] minimising nll(logits / T, labels): golden-section search over log T (the NLL
    is convex in 1/T, so unimodal in log T). Deterministic; float64."""
    logits, labels = _checked(logits, labels)
    if logits.shape[0] == 0:
        raise ValueError("no examples to fit a temperature on")
    if not torch.isfinite(logits).all():
        raise ValueError("the logits hold NaN or inf values")
    f = lambda u: nll(logits, labels, math.exp(u))  # noqa: E731
    a, b = math.log(t_min), math.log(t_max)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    u = (a + b) / 2
    # the ends themselves: a minimum at the bound is reported there, not a tolerance away from it
    best = min((nll(logits, labels, t), t) for t in (t_min, math.exp(u), t_max))
    return best[1]
