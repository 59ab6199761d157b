"""Matthews correlation coefficient (multiclass, Gorodkin's R_K), like sklearn's matthews_corrcoef; 0 when undefined."""

import datasets
import evaluate
import numpy as np

from ftdist.metrics.counting import counts

_KWARGS = "predictions (list of int), references (list of int) -> {'mcc': float}"


class Mcc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        tp, p_sum, t_sum = counts(predictions, references)
        n_correct, n = float(tp.sum()), p_sum.sum()
        cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
        cov_ypyp_ytyt = (n**2 - np.dot(p_sum, p_sum)) * (n**2 - np.dot(t_sum, t_sum))
        return {"mcc": 0.0 if cov_ypyp_ytyt == 0 else float(cov_ytyp / np.sqrt(cov_ypyp_ytyt))}
