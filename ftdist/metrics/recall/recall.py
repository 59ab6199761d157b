"""Macro recall over the labels present in references or predictions (zero_division=0), like sklearn."""

import datasets
import evaluate
import numpy as np

_KWARGS = "predictions (list of int), references (list of int) -> {'recall': float}"


def counts(predictions, references):
    """Per-label true positives, predicted counts and true counts over the union of labels."""
    p, r = np.asarray(predictions), np.asarray(references)
    _, inv = np.unique(np.concatenate([r, p]), return_inverse=True)
    ri, pi = inv[: len(r)], inv[len(r) :]
    k = int(inv.max()) + 1 if inv.size else 0
    tp = np.bincount(ri[ri == pi], minlength=k).astype(np.float64)
    return tp, np.bincount(pi, minlength=k).astype(np.float64), np.bincount(ri, minlength=k).astype(np.float64)


class Recall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        tp, _, true_n = counts(predictions, references)
        rec = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
        return {"recall": float(rec.mean()) if rec.size else 0.0}
