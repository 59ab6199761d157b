"""Macro precision over the labels present in references or predictions (zero_division=0), like sklearn."""

import datasets
import evaluate
import numpy as np

from ftdist.metrics.counting import counts

_KWARGS = "predictions (list of int), references (list of int) -> {'precision': float}"


class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        tp, pred_n, _ = counts(predictions, references)
        prec = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
        return {"precision": float(prec.mean()) if prec.size else 0.0}
