"""Micro F1 (global TP / FP / FN counts), like sklearn's f1_score(average="micro")."""

import datasets
import evaluate
import numpy as np

_KWARGS = "predictions (list of int), references (list of int) -> {'f1_micro': float}"


class F1Micro(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions), np.asarray(references)
        tp, denom = float(np.sum(p == r)), float(p.size + r.size)  # sum of predicted + true counts
        return {"f1_micro": 2 * tp / denom if denom > 0 else 0.0}
