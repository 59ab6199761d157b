"""Per-key checks of a recipe: each value against its annotation (types, choices) and its range rule,
collecting every problem; the quoting of values in error messages (redacted, bounded)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from ftdist import decisions
from ftdist.errors import did_you_mean
from ftdist.redaction import redact, redact_text

# Range rules: key path -> (predicate, what it must be). Checked after types.
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
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
    "data.crop_scale": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
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


def text_of(value: Any, conv=str) -> str:
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


def short(value: Any) -> str:
    """The value as an error message quotes it: credentials redacted (before cutting, which could leave
    a token too short to be recognised), at most 80 characters."""
    text = text_of(value, lambda v: redact_text(repr(redact(v))))
    return text if len(text) <= 80 else text[:77] + "..."


MAX_DEPTH = 32
MAX_INT_BITS = 13_000  # ~3900 digits: Python refuses to print an integer of more than 4300 digits


def unsavable(value: Any) -> str | None:
    """Why a value could not be written back to recipe.yaml (None if it can): nested too deeply for the
    YAML writer and redaction (both recursive), or an integer too long to print. Iterative on purpose."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
            return "is an integer too long to write back"
        if isinstance(v, (list, tuple, dict, set)):
            if depth >= MAX_DEPTH:
                return f"is nested more than {MAX_DEPTH} levels deep"
            stack.extend((x, depth + 1) for x in ([*v.keys(), *v.values()] if isinstance(v, dict) else v))
    return None


def coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against annotation `tp`; return it (ints widened to floats). Append errors."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], path, errors)
        tried: list[str] = []
        for tp_ in inner:  # e.g. float | Literal["auto"]: the first reading that fits
            mine: list[str] = []
            out = coerce(value, tp_, path, mine)
            if not mine:
                return out
            tried += mine
        errors.append(f"{path}: expected " + " or ".join(
            "one of " + ", ".join(map(str, typing.get_args(t))) if typing.get_origin(t) is Literal
            else {float: "a number", int: "an integer", str: "a string"}.get(t, str(t)) for t in inner)
                      + f", got {short(value)}")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            value = "no" if value is False else "yes"  # YAML 1.1 reads `precision: no` as false
        if value not in choices:
            hint = did_you_mean(value, [str(c) for c in choices])
            errors.append(f"{path}: {short(value)} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {short(value)}")
            return value
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            errors.append(f"{path}: {short(value)} is too large for a number")
            return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {short(value)}")
        return value
    if tp is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {short(value)}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {short(value)}")
        return value
    raise AssertionError(f"unsupported annotation {tp!r} at {path}")


def build_section(cls, raw: Any, section: str, errors: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{section}: expected a mapping of keys, got {short(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{section}.{text_of(key)}"
        if key not in known:
            errors.append(f"{path}: unknown key{did_you_mean(key, known)}")
            continue
        why = unsavable(value)
        if why:
            errors.append(f"{path}: {short(value)} {why}")
            continue
        before = len(errors)
        coerced = coerce(value, hints[key], path, errors)
        if len(errors) == before:
            kwargs[key] = coerced
    obj = cls(**kwargs)
    for key in kwargs:
        rule = RANGES.get(f"{section}.{key}")
        if rule and not safe(rule[0], kwargs[key]):
            errors.append(f"{section}.{key}: {short(kwargs[key])} is out of range; expected {rule[1]}")
    return obj


def safe(pred, value) -> bool:
    try:
        return bool(pred(value))
    except (TypeError, ValueError, OverflowError):
        return False


def value_problem(key: str, value: Any, hint: Any) -> str | None:
    """Why `value` cannot be the recipe key's value (its type and range rule, as the recipe loader checks
    them), without the key prefix; None if it can. Cross-key rules are checked per trial by config.load."""
    errors: list[str] = []
    coerced = coerce(value, hint, key, errors)
    if not errors:
        rule = RANGES.get(key)
        if rule and not safe(rule[0], coerced):
            errors.append(f"{key}: {short(coerced)} is out of range; expected {rule[1]}")
    if not errors:
        return None
    msg = errors[0]
    return msg[len(key) + 2:] if msg.startswith(key + ": ") else msg
