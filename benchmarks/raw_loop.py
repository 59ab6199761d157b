"""The hand-written Accelerate training loop that the benchmarks compare ftdist with (one copy, shared).

    from raw_loop import RawSpec, train
    result = train(RawSpec(model_dir=..., csv=..., max_length=128, batch=32, total=13), on_step)

What it runs: a tokenizer from `model_dir`, every row of `csv` tokenized up front into a plain list of
dicts (truncation at `max_length`, no padding), `DataCollatorWithPadding` per batch, a sequence
classifier with 2 labels (random init from `model_dir`'s config with `arch` applied, or the pretrained
weights), AdamW (lr 5e-5, weight decay 0.01; torch's default implementation unless `optimizer` says
otherwise), a linear schedule with 6% warm-up, gradient clipping at 1.0, `total` optimizer steps, one
micro-batch per step. Batches: `identical` hands the loader ftdist's own seeded random batches (what
ftdist trains on with `data.group_by_length=false`, epoch 0), `shuffled` is `DataLoader(shuffle=True)`.

`on_step(step, loss, batch)` is called after every optimizer step (step counts from 1; loss is the
step's loss tensor, not read back to the host: the loop itself never waits for a device). The caller
takes its timestamps there; returning True ends the loop.

Imports only torch, accelerate, transformers and numpy (through ftdist.sampler), so that gpu_bench.py
can run it on a machine without datasets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _common as C

LR, WEIGHT_DECAY, SEED = 5e-5, 0.01, 42
MAX_GRAD_NORM = 1.0
OPTIMIZERS = {"default": {}, "fused": {"fused": True}, "foreach-false": {"foreach": False}}


def warmup_steps(total: int) -> int:
    """ftdist's default train.warmup ratio (0.06) as a step count, for the loops that take a count."""
    return int(round(0.06 * total))


def ftdist_batches(lengths, batch: int):
    """ftdist's own seeded random batches (group_by_length off), epoch 0."""
    from ftdist.sampler import global_batches  # numpy only

    return global_batches(lengths, batch, SEED, 0, False)


@dataclass
class RawSpec:
    model_dir: str
    csv: str
    max_length: int
    batch: int
    total: int                       # optimizer steps
    precision: str = "no"            # accelerate mixed_precision: no, bf16, fp16
    arch: dict = field(default_factory=dict)  # config overrides of a randomly initialised model
    pretrained: bool = False         # load model_dir's weights instead (arch ignored)
    batching: str = "identical"      # identical (ftdist's batches) or shuffled
    only_run_batches: bool = False   # identical: hand the loader only the `total` batches the run uses
    optimizer: str = "default"       # a key of OPTIMIZERS


@dataclass
class RawResult:
    setup_s: float                   # Accelerator, tokenization, model, optimizer, prepare
    steps: int                       # optimizer steps run
    lengths: list                    # tokens of every row
    batches: list | None             # the row indices of every batch (identical batching), else None


def model_config(model_dir: str, arch: dict):
    """model_dir's config with 2 labels and `arch` applied (the randomly initialised models)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, num_labels=2)
    for k, v in arch.items():
        setattr(cfg, k, v)
    return cfg


def tokenized_rows(csv: str, tok, max_length: int) -> list[dict]:
    texts, labels = C.read_csv(csv)
    enc = tok(texts, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(texts))]


def train(spec: RawSpec, on_step: Callable[[int, object, dict], bool | None]) -> RawResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    if spec.batching not in ("identical", "shuffled"):
        raise ValueError(f"batching: {spec.batching!r}")
    t0 = time.perf_counter()
    acc = Accelerator(mixed_precision=spec.precision, cpu=not torch.cuda.is_available())
    set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    rows = tokenized_rows(spec.csv, tok, spec.max_length)
    lengths = [len(r["input_ids"]) for r in rows]
    if spec.pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(spec.model_dir, num_labels=2)
    else:
        model = AutoModelForSequenceClassification.from_config(model_config(spec.model_dir, spec.arch))
    collate = DataCollatorWithPadding(tok)
    batches = None
    if spec.batching == "identical":
        batches = ftdist_batches(lengths, spec.batch)
        if spec.only_run_batches:
            batches = batches[:spec.total]
        loader = DataLoader(rows, batch_sampler=batches, collate_fn=collate)
    else:
        loader = DataLoader(rows, batch_size=spec.batch, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **OPTIMIZERS[spec.optimizer])
    sched = get_linear_schedule_with_warmup(opt, warmup_steps(spec.total), spec.total)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    setup_s = time.perf_counter() - t0
    model.train()
    step = 0
    while step < spec.total:  # more than one pass over the data only if it holds fewer than `total` batches
        for batch in loader:
            loss = model(**batch).loss
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if on_step(step, loss, batch) or step >= spec.total:
                return RawResult(setup_s, step, lengths, batches)
    return RawResult(setup_s, step, lengths, batches)
