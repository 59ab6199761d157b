"""Macro F1 over the labels present in references or predictions (zero_division=0), like sklearn's f1_score(average="macro")."""

import datasets
import evaluate
import numpy as np

_KWARGS = "predictions (list of int), references (list of int) -> {'f1': float}"


def counts(predictions, references):
    """Per-label true positives, predicted counts and true counts over the union of labels."""
    p, r = np.asarray(predictions), np.asarray(references)
    _, inv = np.unique(np.concatenate([r, p]), return_inverse=True)
    ri, pi = inv[: len(r)], inv[len(r) :]
    k = int(inv.max()) + 1 if inv.size else 0
    tp = np.bincount(ri[ri == pi], minlength=k).astype(np.float64)
    return tp, np.bincount(pi, minlength=k).astype(np.float64), np.bincount(ri, minlength=k).astype(np.float64)


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        tp, pred_n, true_n = counts(predictions, references)
        denom = true_n + pred_n
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        return {"f1": float(f1.mean()) if f1.size else 0.0}
