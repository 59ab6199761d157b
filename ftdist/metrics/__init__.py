"""Offline evaluation metrics shipped with ftdist.

Each metric is a real ``evaluate.Metric`` module script in ``ftdist/metrics/<name>/<name>.py``, so
``evaluate.load(str(path(name)))`` works without the Hub. :func:`load` does not go through
``evaluate.load`` though: that copies the script into ``$HF_MODULES_CACHE`` (a file lock plus writes in
the user's home, which is fragile when many ranks on a shared file system load at once and fails on a
read-only home). Instead we import the shipped script as ``ftdist.metrics.<name>.<name>`` and
instantiate its metric class with the same hash ``evaluate.load`` would give it. The only thing it
writes is the empty ``$HF_METRICS_CACHE/<name>/default`` folder every ``EvaluationModule`` makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate
from evaluate.loading import files_to_hash, import_main_class

from ftdist.errors import FtdistError

NAMES: tuple[str, ...] = ("accuracy", "f1", "f1_micro", "precision", "recall", "mcc", "pearson", "spearman", "seqeval")
SEQEVAL_KEYS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy")

_DIR = Path(__file__).resolve().parent
_LOADED: dict[str, evaluate.EvaluationModule] = {}


def _check(name: str) -> None:
    if name not in NAMES:
        raise FtdistError(f"unknown metric {name!r}; available metrics: {', '.join(NAMES)}")


def path(name: str) -> Path:
    """Path of the shipped metric script, usable with ``evaluate.load(str(path(name)))``."""
    _check(name)
    return _DIR / name / f"{name}.py"


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """A fresh instance of the shipped metric ``name``; kwargs go to the ``EvaluationModule`` constructor.

    Defaults to ``keep_in_memory=True`` (no arrow cache files, so concurrent processes never share any).
    Pass ``keep_in_memory=False, num_process=..., process_id=..., experiment_id=...`` for evaluate's
    distributed gathering instead.
    """
    script = path(name)
    cls = import_main_class(f"{__name__}.{name}.{name}")
    if cls is None:  # pragma: no cover - a broken shipped script
        raise FtdistError(f"metric {name!r}: no evaluate.Metric class in {script}")
    if not kwargs.get("num_process", 1) > 1:
        kwargs.setdefault("keep_in_memory", True)
    module = cls(hash=files_to_hash([str(script)]), **kwargs)
    module.download_and_prepare()
    return module


def compute(names: list[str], predictions, references) -> dict[str, float]:
    """Compute several metrics on the same predictions / references; flat ``{name: float}``.

    seqeval (predictions / references: lists of tag-string lists) gives ``seqeval_precision``,
    ``seqeval_recall``, ``seqeval_f1``, ``seqeval_accuracy`` and ``seqeval`` (= the F1).
    The others take flat lists of ints (classification) or floats (pearson, spearman).
    """
    for name in names:
        _check(name)
    out: dict[str, float] = {}
    for name in names:
        if name not in _LOADED:
            _LOADED[name] = load(name)
        # The module's own math (`_compute`), not evaluate's Arrow buffering around it: the trainer has
        # already gathered predictions from all ranks, and the buffering's dill fingerprinting broke on
        # one GPU machine's Python 3.12 + pyarrow (PicklingError on pyarrow's MonthDayNano).
        result = _LOADED[name]._compute(predictions=predictions, references=references)
        if name == "seqeval":
            for key in SEQEVAL_KEYS:
                out[f"seqeval_{key}"] = float(result[f"overall_{key}"])
            out["seqeval"] = out["seqeval_f1"]
        else:
            out[name] = float(result[name])
    return out
