"""The search space: the YAML file next to the recipe (recipe key -> Optuna distribution), checked strictly
against the recipe's own types and ranges, every problem reported at once with the file and key named."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftdist import checks, yamlio
from ftdist.errors import FtdistError, did_you_mean
from ftdist.recipe import Recipe

SPACE_KEYS = ("params", "metric", "direction", "value", "n_trials", "pruner", "sampler", "storage", "study_name",
              "output_dir", "enqueue")
DIST_KEYS = {"float": ("type", "low", "high", "log", "step"), "int": ("type", "low", "high", "log", "step"),
             "categorical": ("type", "choices")}
NOT_SEARCHABLE = {"log.output_dir": "the sweep gives every trial its own run folder",
                  "checkpoint.resume": "the sweep resumes interrupted trials itself"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "percentile": "PercentilePruner",
           "hyperband": "HyperbandPruner", "asha": "SuccessiveHalvingPruner"}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler"}


class SweepError(FtdistError):
    """A bad search-space file, sweep flag or sweep folder: one paragraph, exit 2."""


class TrialFailuresError(FtdistError):
    """Trials kept failing: exit 1, not bad input to the sweep itself."""

    exit_code = 1


@dataclass(frozen=True)
class Param:
    key: str
    kind: str                      # float | int | categorical
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices)}"
        extra = (" log" if self.log else "") + (f" step {self.step}" if self.step else "")
        return f"{self.kind} in [{self.low}, {self.high}]{extra}"

    def as_dict(self) -> dict:
        d = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return d


@dataclass
class Space:
    path: Path
    params: dict[str, Param]
    metric: str
    direction: str                 # maximize | minimize
    value: str = "final"           # final | best
    n_trials: int | None = None
    pruner: tuple[str, dict] = ("median", {})
    sampler: tuple[str, dict] = ("tpe", {})
    storage: str | None = None
    study_name: str | None = None
    output_dir: str | None = None
    enqueue: list[dict] = field(default_factory=list)

    def identity(self) -> dict:
        """What a resumed study must agree on (the budget, pruner and sampler may change)."""
        return {"params": {k: p.as_dict() for k, p in self.params.items()}, "metric": self.metric,
                "direction": self.direction, "value": self.value}


def recipe_key_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Recipe)
    return {f"{s.name}.{f.name}": typing.get_type_hints(hints[s.name])[f.name]
            for s in dataclasses.fields(Recipe) for f in dataclasses.fields(hints[s.name])}


def default_space_path(recipe_arg: str) -> Path | None:
    p = Path(recipe_arg)
    if p.suffix in (".yaml", ".yml"):
        return p.with_name(p.stem + ".sweep.yaml")
    return None


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _component(spec: Any, what: str, table: dict[str, str], default: str, errors: list[str]) -> tuple[str, dict]:
    """`pruner` / `sampler`: a name, or a mapping with `type` and the Optuna class's own arguments."""
    import optuna

    if spec is None:
        return default, {}
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict):
        kwargs = {str(k): v for k, v in spec.items()}
        name = kwargs.pop("type", None)
        if name is None:
            errors.append(f"{what}: a mapping needs `type` ({', '.join(table)}), e.g. {{type: {default}}}")
            return default, {}
    else:
        errors.append(f"{what}: {checks.short(spec)} must be one of {', '.join(table)}, or a mapping "
                      f"{{type: NAME, ...Optuna arguments}}")
        return default, {}
    if name not in table:
        errors.append(f"{what}: {checks.short(name)} is not one of {', '.join(table)}{did_you_mean(name, table)}")
        return default, {}
    cls = getattr(optuna.pruners if what == "pruner" else optuna.samplers, table[name])
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    bad = [k for k in kwargs if k not in accepted]
    for k in bad:
        errors.append(f"{what}.{k}: not an argument of optuna.{'pruners' if what == 'pruner' else 'samplers'}."
                      f"{table[name]}{did_you_mean(k, accepted)}; it takes {', '.join(accepted) or 'none'}")
    if not bad:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**kwargs)
        except Exception as e:  # Optuna's own argument checks: ValueError, TypeError, ...
            errors.append(f"{what}: optuna.{table[name]}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                          f"refused it: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return name, kwargs


def _param(key: str, spec: Any, hint: Any, errors: list[str]) -> Param | None:
    where = f"params.{key}"
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        errors.append(f"{where}: {checks.short(spec)} is not a distribution; write {{type: float, low: L, high: H, "
                      "log: true}}, {type: int, low: L, high: H}, {type: categorical, choices: [...]} or a list of choices")
        return None
    kind = spec.get("type")
    if kind not in DIST_KEYS:
        errors.append(f"{where}.type: {checks.short(kind)} is not a distribution type{did_you_mean(kind, DIST_KEYS)}; "
                      f"use float, int or categorical" if kind is not None else
                      f"{where}: needs `type` (float, int or categorical)")
        return None
    before = len(errors)
    for k in spec:
        if k not in DIST_KEYS[kind]:
            errors.append(f"{where}.{k}: unknown key for a {kind} distribution{did_you_mean(k, DIST_KEYS[kind])}; "
                          f"keys are {', '.join(DIST_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            errors.append(f"{where}.choices: needs a non-empty list of values, got {checks.short(choices)}")
            return None
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                errors.append(f"{where}.choices: {checks.short(c)} is not a scalar; choices are null, true/false, "
                              "numbers or strings (Optuna stores categorical values as they are)")
            elif (problem := checks.value_problem(key, c, hint)) is not None:
                errors.append(f"{where}.choices: {problem}")
        if len({(type(c).__name__, repr(c)) for c in choices}) != len(choices):
            errors.append(f"{where}.choices: {checks.short(choices)} repeats a value")
        return Param(key, kind, choices=tuple(choices)) if len(errors) == before else None
    low, high, logscale, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    want = "an integer" if kind == "int" else "a number"
    for name, v in (("low", low), ("high", high)):
        if v is None:
            errors.append(f"{where}.{name}: missing; a {kind} distribution needs low and high")
        elif not is_number(v) or (kind == "int" and not isinstance(v, int)):
            errors.append(f"{where}.{name}: expected {want}, got {checks.short(v)}")
        elif (problem := checks.value_problem(key, float(v) if kind == "float" else v, hint)) is not None:
            errors.append(f"{where}.{name}: {problem}"
                          + (" (an integer key: use type: int)" if kind == "float" and "integer" in problem else ""))
    if not isinstance(logscale, bool):
        errors.append(f"{where}.log: expected true or false, got {checks.short(logscale)}")
    if step is not None and (not is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int))):
        errors.append(f"{where}.step: expected {'an integer >= 1' if kind == 'int' else 'a number > 0'} or null, "
                      f"got {checks.short(step)}")
    if len(errors) != before:
        return None
    if not low < high:
        errors.append(f"{where}: low {low} must be below high {high}")
    elif logscale and low <= 0:
        errors.append(f"{where}: a log scale needs low > 0, got {low}")
    elif logscale and step not in (None, 1):
        errors.append(f"{where}: step and log: true cannot be combined (Optuna samples a log scale without steps)")
    if len(errors) != before:
        return None
    if kind == "float":
        low, high = float(low), float(high)
    return Param(key, kind, low, high, bool(logscale), step if kind == "float" or step not in (None, 1) else None)


def load_space(path: Path, recipe: Recipe) -> Space:
    """Read and check a search-space file; every problem is reported at once, naming the file and key."""
    import optuna  # noqa: F401  (a missing install is reported before anything else)

    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"search space {where!r} does not exist; write one (see README, Sweeps) or give --space FILE") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"search space {where!r} could not be read: {e}") from None
    if len(text) > 1_000_000:
        raise SweepError(f"search space {where!r} is {len(text)} bytes; a search space is a short YAML file (limit 1 MB)")
    try:
        raw = yamlio.load_no_alias(text, yaml12_floats=True)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise SweepError(f"search space {where!r} is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"search space {where!r} must be a mapping with `params:` (recipe key -> distribution), "
                         f"got {type(raw).__name__ if raw is not None else 'an empty file'}")
    errors: list[str] = []
    for k in raw:
        if k not in SPACE_KEYS:
            errors.append(f"{checks.text_of(k)}: unknown key{did_you_mean(k, SPACE_KEYS)}; keys are {', '.join(SPACE_KEYS)}")
    types = recipe_key_types()
    params: dict[str, Param] = {}
    raw_params = raw.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        errors.append("params: needs a mapping of recipe keys to distributions, e.g. "
                      "params: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}}")
        raw_params = {}
    for key, spec in raw_params.items():
        key_text = checks.text_of(key)
        if key_text not in types:
            errors.append(f"params.{key_text}: not a recipe key{did_you_mean(key_text, types)}; "
                          "search over keys like train.lr, train.epochs, unfreeze.lr_decay")
            continue
        if key_text in NOT_SEARCHABLE:
            errors.append(f"params.{key_text}: cannot be searched: {NOT_SEARCHABLE[key_text]}")
            continue
        p = _param(key_text, spec, types[key_text], errors)
        if p is not None:
            params[key_text] = p

    metric = raw.get("metric", recipe.eval.best_metric)
    from ftdist import metrics

    if not isinstance(metric, str) or not (metric == "loss" or metrics.reports(recipe.eval.metrics, metric)):
        errors.append(f"metric: {checks.short(metric)} is not reported by the recipe's eval.metrics "
                      f"{checks.short(recipe.eval.metrics)}{did_you_mean(metric, [*recipe.eval.metrics, 'loss'])}; "
                      "pick one of them or 'loss'")
    if "direction" in raw:
        direction = raw["direction"]
        if direction not in ("maximize", "minimize"):
            errors.append(f"direction: {checks.short(direction)} must be maximize or minimize"
                          f"{did_you_mean(direction, ('maximize', 'minimize'))}")
    elif metric == recipe.eval.best_metric:
        direction = "maximize" if recipe.eval.greater_is_better else "minimize"
    else:
        direction = "minimize" if metric == "loss" else "maximize"
    value = raw.get("value", "final")
    if value not in ("final", "best"):
        errors.append(f"value: {checks.short(value)} must be final (the metric at the end of training) or best "
                      f"(its best evaluation){did_you_mean(value, ('final', 'best'))}")
    n_trials = raw.get("n_trials")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        errors.append(f"n_trials: expected an integer >= 1, got {checks.short(n_trials)}")
    for k in ("storage", "study_name", "output_dir"):
        if raw.get(k) is not None and not (isinstance(raw[k], str) and raw[k].strip()):
            errors.append(f"{k}: expected a non-empty string, got {checks.short(raw[k])}")
    pruner = _component(raw.get("pruner"), "pruner", PRUNERS, "median", errors)
    sampler = _component(raw.get("sampler"), "sampler", SAMPLERS, "tpe", errors)
    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) and e for e in enqueue):
        errors.append(f"enqueue: expected a list of mappings (recipe key -> value), got {checks.short(enqueue)}")
        enqueue = []
    for i, point in enumerate(enqueue):
        for k, v in point.items():
            if k not in raw_params:
                errors.append(f"enqueue[{i}].{checks.text_of(k)}: not a key of params{did_you_mean(k, raw_params)}")
            elif k in params and not params[k].contains(v):
                errors.append(f"enqueue[{i}].{k}: {checks.short(v)} is outside the distribution ({params[k].describe()})")
    d = recipe.data
    if d.validation_file is None and not d.validation_split:
        errors.append("the recipe has no validation set (data.validation_file, or data.validation_split > 0): a sweep "
                      "scores its trials on it")
    if errors:
        listed = "\n  - ".join(errors)
        raise SweepError(f"search space {where!r} has {len(errors)} problem{'' if len(errors) == 1 else 's'}:\n  - {listed}")
    return Space(path, params, metric, direction, value, n_trials, pruner, sampler, raw.get("storage"),
                 raw.get("study_name"), raw.get("output_dir"), [dict(e) for e in enqueue])


def override(key: str, value: Any) -> str:
    """A concrete `key=value` override that config.parse_override reads back as exactly `value`."""
    return f"{key}={json.dumps(value)}"


def fmt_value(v: Any) -> str:
    """A parameter value as the logs and the table show it."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
