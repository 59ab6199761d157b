"""Macro F1 over the labels present in references or predictions (zero_division=0), like sklearn's f1_score(average="macro")."""

import datasets
import evaluate
import numpy as np

from ftdist.metrics.counting import counts

_KWARGS = "predictions (list of int), references (list of int) -> {'f1': float}"


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
