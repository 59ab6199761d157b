"""Accuracy: fraction of predictions equal to the reference (offline evaluate metric)."""

import datasets
import evaluate
import numpy as np

_KWARGS = "predictions (list of int), references (list of int) -> {'accuracy': float}"


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
