"""Matthews correlation coefficient (multiclass, Gorodkin's R_K), like sklearn's matthews_corrcoef; 0 when undefined."""

import datasets
import evaluate
import numpy as np

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
        p, r = np.asarray(predictions), np.asarray(references)
        _, inv = np.unique(np.concatenate([r, p]), return_inverse=True)
        ri, pi = inv[: len(r)], inv[len(r) :]
        k = int(inv.max()) + 1 if inv.size else 0
        t_sum = np.bincount(ri, minlength=k).astype(np.float64)
        p_sum = np.bincount(pi, minlength=k).astype(np.float64)
        n_correct, n = float(np.sum(ri == pi)), p_sum.sum()
        cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
        cov_ypyp_ytyt = (n**2 - np.dot(p_sum, p_sum)) * (n**2 - np.dot(t_sum, t_sum))
        return {"mcc": 0.0 if cov_ypyp_ytyt == 0 else float(cov_ytyp / np.sqrt(cov_ypyp_ytyt))}
