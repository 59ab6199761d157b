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
import typing
from pathlib import Path
from typing import Any

import yaml

from ftdist import checks, decisions, metrics, yamlio
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

KNOWN_TRACKERS = ("jsonl", "tensorboard", "wandb")


def _cross_checks(r: Recipe, errors: list[str]) -> None:
    """Rules that involve more than one key, run with the per-key checks so that one pass reports every
    problem. A key that failed its own check holds its default here: a rule naming such a key (or its
    section) is not reported, since it would judge a value the user never gave."""
    failed = {k for k in (e.split(":", 1)[0] for e in errors) if k.split(".")[0] in SECTIONS}
    before = len(errors)
    for m in r.eval.metrics:
        if metrics.kind(m) is None:
            errors.append(f"eval.metrics: unknown metric {checks.short(m)}{did_you_mean(m, metrics.NAMES)}; {metrics.CHOICES}")
    if r.eval.best_metric != "loss" and not metrics.reports(r.eval.metrics, r.eval.best_metric):
        errors.append(f"eval.best_metric: {checks.short(r.eval.best_metric)} is not in eval.metrics {checks.short(r.eval.metrics)}; add it there or pick one of them (or 'loss')")
    for t in r.log.trackers:
        if t not in KNOWN_TRACKERS:
            errors.append(f"log.trackers: unknown tracker {checks.short(t)}{did_you_mean(t, KNOWN_TRACKERS)}; available: {', '.join(KNOWN_TRACKERS)}")
    betas = r.train.adam_betas
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        errors.append(f"train.adam_betas: {checks.short(betas)} must be two numbers in [0, 1)")
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
        errors.append(f"unfreeze.group_patterns: {checks.short(u.group_patterns)} must be a list of regex strings")
    elif u.group_patterns is not None:
        for p in u.group_patterns:
            try:
                re.compile(p)
            except (re.error, RecursionError, OverflowError) as e:
                errors.append(f"unfreeze.group_patterns: {checks.short(p)} is not a valid regular expression ({e})")
    labels = r.data.labels
    if labels is not None:
        ok = all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in labels)
        if not labels or not ok or len({checks.text_of(x) for x in labels}) != len(labels):
            errors.append(f"data.labels: {checks.short(labels)} must be a non-empty list of distinct label names "
                          "(strings or numbers), in id order")
    d = r.data
    if d.dataset is None and d.train_file is None:
        errors.append("data: give data.train_file (a local file) or data.dataset (a hub name, or 'vader' for the demo data)")
    if d.dataset is not None and d.train_file is not None:
        errors.append("data: data.dataset and data.train_file are both set; keep one")
    augment = d.augment if isinstance(d.augment, list) else []
    unknown = [a for a in augment if a not in ("random_resized_crop", "horizontal_flip")]
    if unknown:
        errors.append(f"data.augment: {checks.short(unknown[0])} is not an augmentation ftdist knows; use "
                      f"random_resized_crop and/or horizontal_flip{did_you_mean(checks.text_of(unknown[0]), ['random_resized_crop', 'horizontal_flip'])}")
    elif augment and d.task != "image-classification":
        errors.append("data.augment: only applies to data.task 'image-classification'")
    if r.data.oversample and r.data.task not in ("classification", "image-classification"):
        errors.append("data.oversample: only applies to data.task 'classification' or 'image-classification'")
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
    # auto asks for nothing: it resolves to none where a decision cannot apply
    asked = [f"eval.{k}={getattr(e, k)}" for k in ("decision", "calibration") if getattr(e, k) not in ("none", "auto")]
    if asked and d.task == "regression":
        errors.append(f"{asked[0].split('=')[0]}: decisions and calibration need classes; data.task 'regression' "
                      f"predicts a number (remove {' and '.join(asked)})")
        return
    if e.decision not in ("none", "auto") and d.task not in ("classification", "image-classification"):
        errors.append(f"eval.decision: applies to data.task 'classification'; token classification is scored per "
                      f"entity, where a per-token decision is not what is measured (remove eval.decision={e.decision})")
    if asked and d.validation_file is None and d.validation_split == 0 and d.dataset in (None, "vader"):
        errors.append(f"{asked[0].split('=')[0]}: is fitted on the validation split, and there is none; give "
                      "data.validation_file or data.validation_split > 0 (never the test split)")
    if e.decision in ("bias", "auto") and e.decision_target not in ("f1", "macro_f1") and decisions.valid_target(e.decision_target):
        errors.append(f"eval.decision_target: {checks.short(e.decision_target)} applies to eval.decision=threshold; "
                      f"eval.decision={e.decision} maximises macro-F1 (decision_target: f1 or macro_f1, or set "
                      "eval.decision=threshold)")
    if e.decision == "threshold" and d.labels is not None and len(d.labels) != 2:
        errors.append(f"eval.decision: threshold needs two classes and data.labels has {len(d.labels)}; use "
                      "eval.decision=bias for several classes")
    if e.positive_label is not None:
        if e.decision != "threshold":
            errors.append("eval.positive_label: only applies to eval.decision=threshold")
        elif d.labels is not None and e.positive_label not in [checks.text_of(x) for x in d.labels]:
            errors.append(f"eval.positive_label: {checks.short(e.positive_label)} is not in data.labels {checks.short(d.labels)}"
                          f"{did_you_mean(e.positive_label, [checks.text_of(x) for x in d.labels])}")


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
            errors.append(f"{checks.text_of(name)}: unknown section{did_you_mean(name, SECTIONS)}; sections are {', '.join(SECTIONS)}")
    for f in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[f.name]
        sections[f.name] = checks.build_section(cls, raw.get(f.name), f.name, errors)
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


def check_data_file(key: str, path: str, folder_ok: bool = False) -> None:
    """`folder_ok`: image classification, whose data may be a folder of images."""
    if folder_ok and Path(path).is_dir():
        return
    if not Path(path).is_file():
        what = "file or folder" if folder_ok else "file"
        raise DataError(f"data.{key}: {what} {path!r} does not exist; check the path (relative paths are from the "
                        "folder you run in)")


def check_data_files(recipe: Recipe) -> None:
    """The recipe's data files exist here (`launch` checks before starting any process; not part of `load`,
    which also reads recipes saved next to models whose training files may be long gone)."""
    for key in ("train_file", "validation_file", "test_file"):
        if getattr(recipe.data, key):
            check_data_file(key, getattr(recipe.data, key), recipe.data.task == "image-classification")


def dump(recipe: Recipe | dict) -> str:
    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    return yaml.safe_dump(redact(data), sort_keys=False)
