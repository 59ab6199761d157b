"""Typed recipes: YAML -> dataclasses, `a.b=c` overrides, strict validation.

Every error in a recipe is collected and reported at once (unknown keys with a
did-you-mean hint, wrong types, out-of-range values), so a user fixes a recipe
in one pass instead of one key per run. An unknown key is an error, never dropped:
a misspelt key that were ignored would train with the default and look like it worked.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ftdist import decisions, metrics, yamlio
from ftdist.errors import DataError, RecipeError, did_you_mean
from ftdist.recipe import (  # noqa: F401  (the schema, re-exported: config.Recipe is the public name)
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
    UnfreezeConfig,
    keys_markdown,
)
from ftdist.redaction import redact, redact_override, redact_text

# Range rules: key path -> (predicate, what it must be). Checked after types.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "train.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.max_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "train.global_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.per_device_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lr": (lambda v: v == "auto" or 0 < v < 1, "a float in (0, 1) or auto"),
    "train.weight_decay": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "train.adam_eps": (lambda v: 0 < v < 1, "a float in (0, 1)"),
    "train.warmup": (lambda v: 0 <= v and (v < 1 or float(v).is_integer()), "a ratio in [0, 1) or a whole number of steps"),
    "train.focal_gamma": (lambda v: 0 <= v <= 10, "a float in [0, 10]"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "train.ema_decay": (lambda v: v is None or 0 < v < 1, "a float in (0, 1) or null"),
    "checkpoint.average_last": (lambda v: v == 0 or 2 <= v <= 100, "0 (off) or an integer in [2, 100]"),
    "train.max_grad_norm": (lambda v: v is None or v > 0, "a float > 0 or null"),
    "train.max_nonfinite": (lambda v: v >= 1, "an integer >= 1"),
    "train.check_sync": (lambda v: v >= 0, "an integer >= 0"),
    "train.timeout_s": (lambda v: 1 <= v <= 86400, "an integer in [1, 86400]"),
    "data.validation_split": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "data.test_split": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "data.max_length": (lambda v: v is None or 8 <= v <= 8192, "an integer in [8, 8192] or null (from the data)"),
    "data.num_proc": (lambda v: v is None or 1 <= v <= 256, "an integer in [1, 256] or null"),
    "data.loader_workers": (lambda v: v is None or 0 <= v <= 64, "an integer in [0, 64] or null (null: 2 on GPU, 0 on CPU)"),
    "model.dropout": (lambda v: v is None or 0 <= v < 1, "a float in [0, 1) or null"),
    "unfreeze.every_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "unfreeze.groups_per_stage": (lambda v: v >= 1, "an integer >= 1"),
    "unfreeze.lp_steps": (lambda v: v >= 0, "an integer >= 0"),
    "unfreeze.lr_decay": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
    "unfreeze.rewarmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "eval.every_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "eval.per_device_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.decision_target": (decisions.valid_target, decisions.TARGETS),
    "checkpoint.every_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "checkpoint.keep_last": (lambda v: v >= 1, "an integer >= 1"),
    "log.every_steps": (lambda v: v >= 1, "an integer >= 1"),
}

KNOWN_TRACKERS = ("jsonl", "tensorboard", "wandb")

def _text(value: Any, conv=str) -> str:
    """str()/repr() that never raises: deeply nested lists hit the recursion limit and integers of more
    than 4300 digits refuse conversion (Python's int_max_str_digits); neither may escape as a traceback."""
    try:
        return conv(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to show>"
    except ValueError:
        if isinstance(value, int):
            return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
        return f"<a {type(value).__name__} too large to show>"


def _short(value: Any) -> str:
    """The value as an error message quotes it: credentials redacted (before cutting, which could leave
    a token too short to be recognised), at most 80 characters."""
    text = _text(value, lambda v: redact_text(repr(redact(v))))
    return text if len(text) <= 80 else text[:77] + "..."


_MAX_DEPTH = 32
_MAX_INT_BITS = 13_000  # ~3900 digits: Python refuses to print an integer of more than 4300 digits


def _unsavable(value: Any) -> str | None:
    """Why a value could not be written back to recipe.yaml (None if it can): nested too deeply for the
    YAML writer and redaction (both recursive), or an integer too long to print. Iterative on purpose."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > _MAX_INT_BITS:
            return "is an integer too long to write back"
        if isinstance(v, (list, tuple, dict, set)):
            if depth >= _MAX_DEPTH:
                return f"is nested more than {_MAX_DEPTH} levels deep"
            stack.extend((x, depth + 1) for x in ([*v.keys(), *v.values()] if isinstance(v, dict) else v))
    return None


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against annotation `tp`; return it (ints widened to floats). Append errors."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], path, errors)
        tried: list[str] = []
        for tp_ in inner:  # e.g. float | Literal["auto"]: the first reading that fits
            mine: list[str] = []
            out = _coerce(value, tp_, path, mine)
            if not mine:
                return out
            tried += mine
        errors.append(f"{path}: expected " + " or ".join(
            "one of " + ", ".join(map(str, typing.get_args(t))) if typing.get_origin(t) is Literal
            else {float: "a number", int: "an integer", str: "a string"}.get(t, str(t)) for t in inner)
                      + f", got {_short(value)}")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            value = "no" if value is False else "yes"  # YAML 1.1 reads `precision: no` as false
        if value not in choices:
            hint = did_you_mean(value, [str(c) for c in choices])
            errors.append(f"{path}: {_short(value)} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {_short(value)}")
            return value
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            errors.append(f"{path}: {_short(value)} is too large for a number")
            return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {_short(value)}")
        return value
    if tp is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {_short(value)}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {_short(value)}")
        return value
    raise AssertionError(f"unsupported annotation {tp!r} at {path}")


def _build_section(cls, raw: Any, section: str, errors: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{section}: expected a mapping of keys, got {_short(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{section}.{_text(key)}"
        if key not in known:
            errors.append(f"{path}: unknown key{did_you_mean(key, known)}")
            continue
        why = _unsavable(value)
        if why:
            errors.append(f"{path}: {_short(value)} {why}")
            continue
        before = len(errors)
        coerced = _coerce(value, hints[key], path, errors)
        if len(errors) == before:
            kwargs[key] = coerced
    obj = cls(**kwargs)
    for key in kwargs:
        rule = _RANGES.get(f"{section}.{key}")
        if rule and not _safe(rule[0], kwargs[key]):
            errors.append(f"{section}.{key}: {_short(kwargs[key])} is out of range; expected {rule[1]}")
    return obj


def _safe(pred, value) -> bool:
    try:
        return bool(pred(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _cross_checks(r: Recipe, errors: list[str]) -> None:
    """Rules that involve more than one key, run with the per-key checks so that one pass reports every
    problem. A key that failed its own check holds its default here: a rule naming such a key (or its
    section) is not reported, since it would judge a value the user never gave."""
    failed = {k for k in (e.split(":", 1)[0] for e in errors) if k.split(".")[0] in SECTIONS}
    before = len(errors)
    for m in r.eval.metrics:
        if metrics.kind(m) is None:
            errors.append(f"eval.metrics: unknown metric {_short(m)}{did_you_mean(m, metrics.NAMES)}; {metrics.CHOICES}")
    if r.eval.best_metric != "loss" and not metrics.reports(r.eval.metrics, r.eval.best_metric):
        errors.append(f"eval.best_metric: {_short(r.eval.best_metric)} is not in eval.metrics {_short(r.eval.metrics)}; add it there or pick one of them (or 'loss')")
    for t in r.log.trackers:
        if t not in KNOWN_TRACKERS:
            errors.append(f"log.trackers: unknown tracker {_short(t)}{did_you_mean(t, KNOWN_TRACKERS)}; available: {', '.join(KNOWN_TRACKERS)}")
    betas = r.train.adam_betas
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        errors.append(f"train.adam_betas: {_short(betas)} must be two numbers in [0, 1)")
    if r.train.per_device_batch_size > r.train.global_batch_size:
        errors.append(
            f"train.per_device_batch_size: {r.train.per_device_batch_size} is larger than train.global_batch_size "
            f"{r.train.global_batch_size}; lower it or raise the global batch")
    u = r.unfreeze
    triggers = (u.every_steps is not None) + bool(u.every_epoch) + bool(u.on_plateau)
    if u.schedule == "gradual" and triggers != 1:  # two triggers: one would be silently ignored
        errors.append("unfreeze: schedule 'gradual' needs exactly one trigger: unfreeze.every_steps=N, unfreeze.every_epoch=true or unfreeze.on_plateau=true")
    if u.schedule == "lp-ft" and u.lp_steps < 1:
        errors.append("unfreeze.lp_steps: schedule 'lp-ft' needs lp_steps >= 1 (head-only steps before full fine-tuning)")
    if u.on_plateau and u.schedule != "gradual":
        errors.append("unfreeze.on_plateau: only applies to unfreeze.schedule 'gradual'")
    if u.on_plateau and r.eval.every_steps is None:
        errors.append("unfreeze.on_plateau: needs eval.every_steps so that there is a metric to watch")
    if u.group_patterns is not None and not all(isinstance(p, str) for p in u.group_patterns):
        errors.append(f"unfreeze.group_patterns: {_short(u.group_patterns)} must be a list of regex strings")
    elif u.group_patterns is not None:
        for p in u.group_patterns:
            try:
                re.compile(p)
            except (re.error, RecursionError, OverflowError) as e:
                errors.append(f"unfreeze.group_patterns: {_short(p)} is not a valid regular expression ({e})")
    labels = r.data.labels
    if labels is not None:
        ok = all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in labels)
        if not labels or not ok or len({_text(x) for x in labels}) != len(labels):
            errors.append(f"data.labels: {_short(labels)} must be a non-empty list of distinct label names "
                          "(strings or numbers), in id order")
    d = r.data
    if d.dataset is None and d.train_file is None:
        errors.append("data: give data.train_file (a local file) or data.dataset (a hub name, or 'vader' for the demo data)")
    if d.dataset is not None and d.train_file is not None:
        errors.append("data: data.dataset and data.train_file are both set; keep one")
    if r.data.oversample and r.data.task != "classification":
        errors.append("data.oversample: only applies to data.task 'classification'")
    if r.data.class_weights != "none" and r.data.task == "regression":
        errors.append("data.class_weights: has no classes to weigh under data.task 'regression'")
    for key, off in (("loss", "cross_entropy"), ("label_smoothing", 0.0)):
        if getattr(r.train, key) != off and r.data.task == "regression":
            errors.append(f"train.{key}: applies to classification and token classification; data.task "
                          "'regression' trains on squared error")
    c = r.checkpoint
    if c.average_last and not c.every_steps:
        errors.append(f"checkpoint.average_last: averages saved checkpoints, and only the final one is saved; set "
                      f"checkpoint.every_steps (e.g. a tenth of the run) to have {c.average_last} to average")
    if c.average_last > c.keep_last:
        errors.append(f"checkpoint.average_last: {c.average_last} checkpoints are averaged but checkpoint.keep_last="
                      f"{c.keep_last} keeps fewer; set checkpoint.keep_last to at least {c.average_last}")
    _decision_checks(r, errors)
    if not isinstance(r.model.config_overrides, dict) or not all(isinstance(k, str) for k in r.model.config_overrides):
        errors.append("model.config_overrides: must be a mapping of config keys to values")
    errors[before:] = [e for e in errors[before:]
                       if not any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", e) for k in failed)]


def _decision_checks(r: Recipe, errors: list[str]) -> None:
    """eval.decision / calibration: what they apply to, and that there is a validation split to fit them on."""
    e, d = r.eval, r.data
    asked = [f"eval.{k}={getattr(e, k)}" for k in ("decision", "calibration") if getattr(e, k) != "none"]
    if asked and d.task == "regression":
        errors.append(f"{asked[0].split('=')[0]}: decisions and calibration need classes; data.task 'regression' "
                      f"predicts a number (remove {' and '.join(asked)})")
        return
    if e.decision != "none" and d.task != "classification":
        errors.append(f"eval.decision: applies to data.task 'classification'; token classification is scored per "
                      f"entity, where a per-token decision is not what is measured (remove eval.decision={e.decision})")
    if asked and d.validation_file is None and d.validation_split == 0 and d.dataset in (None, "vader"):
        errors.append(f"{asked[0].split('=')[0]}: is fitted on the validation split, and there is none; give "
                      "data.validation_file or data.validation_split > 0 (never the test split)")
    if e.decision == "bias" and e.decision_target not in ("f1", "macro_f1") and decisions.valid_target(e.decision_target):
        errors.append(f"eval.decision_target: {_short(e.decision_target)} applies to eval.decision=threshold; "
                      "eval.decision=bias maximises macro-F1 (decision_target: f1 or macro_f1)")
    if e.decision == "threshold" and d.labels is not None and len(d.labels) != 2:
        errors.append(f"eval.decision: threshold needs two classes and data.labels has {len(d.labels)}; use "
                      "eval.decision=bias for several classes")
    if e.positive_label is not None:
        if e.decision != "threshold":
            errors.append("eval.positive_label: only applies to eval.decision=threshold")
        elif d.labels is not None and e.positive_label not in [_text(x) for x in d.labels]:
            errors.append(f"eval.positive_label: {_short(e.positive_label)} is not in data.labels {_short(d.labels)}"
                          f"{did_you_mean(e.positive_label, [_text(x) for x in d.labels])}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-5` -> (['train', 'lr'], 3e-5). The value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {redact_override(text)!r}: expected key.sub=value, e.g. train.lr=3e-5")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"override {redact_override(text)!r}: the key must be section.key (e.g. train.lr), "
                          f"got {redact_text(key)!r}")
    try:
        value = yamlio.load_no_alias(raw, yaml12_floats=True) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        # not YAML (or YAML that cannot be built: a date like 2024-13-45, an integer of 5000 digits,
        # brackets nested thousands deep): the text itself is the value, and the type check judges it
        value = raw
    return parts, value


def builtin_recipes() -> list[str]:
    folder = importlib.resources.files("ftdist") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # (a folder named like a built-in recipe is not one)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; give a YAML path or a built-in recipe: {', '.join(builtin_recipes())}")
        return path
    builtin = importlib.resources.files("ftdist") / "recipes" / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise RecipeError(
            f"recipe {name_or_path!r} is neither a file nor a built-in recipe{did_you_mean(name_or_path, builtin_recipes())}; "
            f"built-in: {', '.join(builtin_recipes())}")
    return Path(str(builtin))


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {str(path)!r} could not be read: {e}") from None
    if len(text) > 1_000_000:
        raise RecipeError(f"recipe {str(path)!r} is {len(text)} bytes; a recipe is a short YAML file (limit 1 MB)")
    try:
        raw = yamlio.load_no_alias(text, yaml12_floats=True)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if raw is None:
        raise RecipeError(f"recipe {str(path)!r} is empty; start from a built-in one, e.g. `ftdist train demo`, or copy ftdist/recipes/demo.yaml")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    return raw


def from_dict(raw: dict, overrides: list[str] = ()) -> Recipe:
    """Build and validate a Recipe; raise RecipeError listing every problem found."""
    errors: list[str] = []
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        try:
            (section, key), value = parse_override(text)
        except RecipeError as e:
            errors.append(str(e))
            continue
        if section not in SECTIONS:
            errors.append(f"override {redact_override(text)!r}: unknown section {redact_text(section)!r}"
                          f"{did_you_mean(section, SECTIONS)}")
            continue
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][key] = value
    sections = {}
    for name in raw:
        if name not in SECTIONS:
            errors.append(f"{_text(name)}: unknown section{did_you_mean(name, SECTIONS)}; sections are {', '.join(SECTIONS)}")
    for f in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[f.name]
        sections[f.name] = _build_section(cls, raw.get(f.name), f.name, errors)
    recipe = Recipe(**sections)
    _cross_checks(recipe, errors)
    if errors:
        listed = "\n  - ".join(errors)
        # redact_text: also a credential pasted as a key name, which `unknown key` messages quote
        raise RecipeError(redact_text(f"recipe has {len(errors)} problem{'' if len(errors) == 1 else 's'}:\n  - {listed}"))
    return recipe


def load(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    return from_dict(read_yaml(path), overrides)


def check_data_file(key: str, path: str) -> None:
    if not Path(path).is_file():
        raise DataError(f"data.{key}: file {path!r} does not exist; check the path (relative paths are from the "
                        "folder you run in)")


def check_data_files(recipe: Recipe) -> None:
    """The recipe's data files exist here (`launch` checks before starting any process; not part of `load`,
    which also reads recipes saved next to models whose training files may be long gone)."""
    for key in ("train_file", "validation_file", "test_file"):
        if getattr(recipe.data, key):
            check_data_file(key, getattr(recipe.data, key))


def dump(recipe: Recipe | dict) -> str:
    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    return yaml.safe_dump(redact(data), sort_keys=False)
