"""Pearson correlation coefficient (scipy.stats.pearsonr), float64 inputs; NaN for constant input."""

import datasets
import evaluate
import numpy as np
from scipy import stats

_KWARGS = "predictions (list of float), references (list of float) -> {'pearson': float}"


class Pearson(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions, np.float64), np.asarray(references, np.float64)
        if p.size < 2 or np.ptp(p) == 0 or np.ptp(r) == 0:
            return {"pearson": float("nan")}
        return {"pearson": float(stats.pearsonr(r, p)[0])}
