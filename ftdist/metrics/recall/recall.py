"""Macro recall over the labels present in references or predictions (zero_division=0), like sklearn."""

import datasets
import evaluate
import numpy as np

from ftdist.metrics.counting import counts

_KWARGS = "predictions (list of int), references (list of int) -> {'recall': float}"


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
