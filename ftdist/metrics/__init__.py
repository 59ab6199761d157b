"""Evaluation metrics, computed through evaluate's public ``EvaluationModule.compute``.

A recipe's ``eval.metrics`` entry is one of:

* a shipped metric (:data:`NAMES`): an ``evaluate.Metric`` script in ``ftdist/metrics/<name>/<name>.py``,
  so ``evaluate.load(str(path(name)))`` also works offline. :func:`load` imports it in place as
  ``ftdist.metrics.<name>.<name>`` rather than through ``evaluate.load``, which copies the script into
  ``$HF_MODULES_CACHE`` under a file lock: every rank of every run would write to the user's home, and a
  read-only home would fail. The only thing it writes is the empty ``$HF_METRICS_CACHE/<name>/default``
  folder every ``EvaluationModule`` makes.
* a local evaluate module: a ``.py`` script or a folder holding ``<folder>.py``, loaded with ``evaluate.load``.
* a hub id such as ``bleu`` or ``org/name``, loaded with ``evaluate.load`` (needs network or a cached copy).

This module must stay cheap to import (config.py validates recipes with it before anything heavy is
imported), so evaluate is imported inside the functions that use it.
"""

from __future__ import annotations

import difflib
import numbers
import pickle
import re
from pathlib import Path
from typing import Any

from ftdist.errors import FtdistError, did_you_mean

NAMES: tuple[str, ...] = ("accuracy", "f1", "f1_micro", "precision", "recall", "mcc", "pearson", "spearman", "seqeval")
SEQEVAL_KEYS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy")
CHOICES = (
    f"available: {', '.join(NAMES)}, a path to an evaluate module script (a .py file or a folder holding "
    "<folder>.py), or an evaluate hub id such as bleu or org/name"
)

_DIR = Path(__file__).resolve().parent
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_LOADED: dict[str, Any] = {}  # entry -> EvaluationModule, reused by every compute call


def _script(entry: str) -> Path | None:
    """The local evaluate module script ``entry`` names, as ``evaluate.load`` finds it; None if there is none."""
    p = Path(entry).expanduser()
    script = p if p.suffix == ".py" else p / f"{p.name}.py"
    try:
        return script if script.is_file() else None
    except OSError:  # a name too long for the file system, a folder we may not read
        return None


def kind(entry: Any) -> str | None:
    """``"shipped"``, ``"local"``, ``"hub"``, or None when ``entry`` names no metric: not a string, a path
    that is not there, or a near miss of a shipped name (``acuracy`` is a typo, not a hub id)."""
    if not isinstance(entry, str):
        return None
    if entry in NAMES:
        return "shipped"
    if _script(entry):
        return "local"
    if (
        len(entry) <= 200  # also keeps difflib (quadratic) fast on a pasted blob
        and _HUB_ID.fullmatch(entry)
        and not entry.endswith(".py")
        and not ("/" not in entry and difflib.get_close_matches(entry, NAMES, n=1, cutoff=0.8))
    ):
        return "hub"
    return None


def result_name(entry: str) -> str:
    """The key a metric's results are reported under: the shipped name, the script's or folder's name, or
    the last part of a hub id (``org/my_metric`` -> ``my_metric``)."""
    p = Path(entry)
    return p.stem if p.suffix == ".py" else p.name


def reports(entries: list, key: str) -> bool:
    """Whether :func:`compute` on ``entries`` may return ``key``: a shipped entry itself, or a local or hub
    metric's ``<name>`` or ``<name>_<result key>`` (which keys it has is known only once it has run)."""
    for entry in entries:
        if kind(entry) in ("local", "hub"):
            if key == result_name(entry) or key.startswith(result_name(entry) + "_"):
                return True
        elif key == entry:
            return True
    return False


def _unknown(entry: Any) -> FtdistError:
    return FtdistError(f"unknown metric {entry!r:.80}{did_you_mean(entry, NAMES)}; {CHOICES}")


def path(name: str) -> Path:
    """Path of the shipped metric script, usable with ``evaluate.load(str(path(name)))``."""
    if name not in NAMES:
        raise _unknown(name)
    return _DIR / name / f"{name}.py"


def load(name: str, **kwargs: Any):
    """A fresh ``evaluate.EvaluationModule`` of the shipped metric ``name``; kwargs go to its constructor.

    Defaults to ``keep_in_memory=True`` (no arrow cache files, so concurrent processes never share any).
    Pass ``keep_in_memory=False, num_process=..., process_id=..., experiment_id=...`` for evaluate's
    distributed gathering instead.
    """
    from evaluate.loading import files_to_hash, import_main_class

    script = path(name)
    cls = import_main_class(f"{__name__}.{name}.{name}")
    if cls is None:  # pragma: no cover - a broken shipped script
        raise FtdistError(f"metric {name!r}: no evaluate.Metric class in {script}")
    if not kwargs.get("num_process", 1) > 1:
        kwargs.setdefault("keep_in_memory", True)
    module = cls(hash=files_to_hash([str(script)]), **kwargs)
    module.download_and_prepare()
    return module


def _module(entry: Any):
    """The cached module for ``entry``: shipped via :func:`load`, local and hub via ``evaluate.load``."""
    if isinstance(entry, str) and entry in _LOADED:
        return _LOADED[entry]
    k = kind(entry)
    if k is None:
        raise _unknown(entry)
    if k == "shipped":
        module = load(entry)
    else:
        import evaluate

        if k == "local":
            module = evaluate.load(str(_script(entry)), keep_in_memory=True)
        else:
            try:
                module = evaluate.load(entry, keep_in_memory=True)
            except Exception as e:  # offline, unknown on the hub, or the hub module's own requirements
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise FtdistError(
                    f"metric {entry!r} is not a shipped metric or a local path, so evaluate.load looked for it on the "
                    f"Hugging Face Hub and failed ({type(e).__name__}: {reason}). A hub metric needs network access "
                    "(HF_HUB_OFFLINE and HF_EVALUATE_OFFLINE unset) or a copy in the evaluate cache; offline, use a "
                    f"shipped metric ({', '.join(NAMES)}) or the path of a local evaluate module script or folder."
                ) from None
    _LOADED[entry] = module
    return module


def prepare(names: list) -> list:
    """The (cached) module of every entry; call it before training so that a bad or unreachable metric
    fails at start-up rather than at the first evaluation."""
    return [_module(entry) for entry in names]


def _flatten(entry: str, result: Any) -> dict[str, float]:
    """A local or hub metric's result as ``{name: value}`` (the key named like the metric) or ``{name_key: value}``."""
    if not isinstance(result, dict) or not result:
        raise FtdistError(f"metric {entry!r}: compute returned {type(result).__name__} {result!r:.80}, not a dict of numbers")
    base, out = result_name(entry), {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise FtdistError(
                f"metric {entry!r}: result {key!r} is {type(value).__name__} {value!r:.80}, not a number; "
                "ftdist logs and compares numbers only, so make the module return one number per key"
            )
        out[base if key == base else f"{base}_{key}"] = float(value)
    return out


def compute(names: list, predictions, references) -> dict[str, float]:
    """Compute several metrics on the same predictions / references; flat ``{key: float}``.

    Every metric runs through evaluate's public ``EvaluationModule.compute``. Shipped metrics report under
    their own name; seqeval (predictions / references: lists of tag-string lists) gives
    ``seqeval_precision``, ``seqeval_recall``, ``seqeval_f1``, ``seqeval_accuracy`` and ``seqeval`` (= the F1).
    The other shipped ones take flat lists of ints (classification) or floats (pearson, spearman). A local
    or hub metric's result ``{key: number}`` is reported as ``<name>`` for the key named like the metric and
    ``<name>_<key>`` for the others.
    """
    modules = prepare(names)  # every entry loads before any runs: a bad one fails first
    out: dict[str, float] = {}
    for entry, module in zip(names, modules):
        try:
            result = module.compute(predictions=predictions, references=references)
        except pickle.PicklingError as e:
            # compute buffers the inputs in an Arrow table and fingerprints it with the dill library, which pickles a module
            # by value unless it lies under the interpreter's prefix or in a site-packages folder, and pyarrow
            # cannot be pickled by value (its MonthDayNano class): with pyarrow in a PYTHONPATH folder this
            # fails, and so does datasets.Dataset.from_dict; with pyarrow in site-packages both work.
            raise FtdistError(
                f"metric {entry!r}: evaluate could not fingerprint its inputs ({type(e).__name__}: {str(e)[:200]}). "
                "This happens when pyarrow is installed outside the Python environment's prefix and outside a "
                "site-packages folder (PYTHONPATH or pip --target); install pyarrow into the environment instead."
            ) from None
        if entry == "seqeval":
            for key in SEQEVAL_KEYS:
                out[f"seqeval_{key}"] = float(result[f"overall_{key}"])
            out["seqeval"] = out["seqeval_f1"]
        elif entry in NAMES:
            out[entry] = float(result[entry])
        else:
            out.update(_flatten(entry, result))
    return out
