"""Per-label counts shared by the shipped classification metric scripts (f1, precision, recall, mcc).

The scripts import this as ``ftdist.metrics.counting``, an absolute import, so it resolves the same way
whether ftdist imports a script in place or ``evaluate.load`` imports its copy from the modules cache.
"""

import numpy as np


def counts(predictions, references):
    """Per-label true positives, predicted counts and true counts (float64) over the union of labels."""
    p, r = np.asarray(predictions), np.asarray(references)
    _, inv = np.unique(np.concatenate([r, p]), return_inverse=True)
    ri, pi = inv[: len(r)], inv[len(r) :]
    k = int(inv.max()) + 1 if inv.size else 0
    tp = np.bincount(ri[ri == pi], minlength=k).astype(np.float64)
    return tp, np.bincount(pi, minlength=k).astype(np.float64), np.bincount(ri, minlength=k).astype(np.float64)
