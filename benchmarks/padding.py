#!/usr/bin/env python3
"""Padding efficiency (real tokens / processed tokens) of ftdist's batching against the usual alternatives.

    python benchmarks/padding.py
    python benchmarks/padding.py --rows 100000 --batch 64

No training: each data set is loaded and tokenized by ftdist's own pipeline (ftdist.data.build), then
one epoch of batches is drawn per strategy and per seed, and padded the way it is trained:

  ftdist default         GlobalBatchSampler with group_by_length (ftdist's default), collated by ftdist's
                         Collator (dynamic padding per micro-batch): the batches ftdist trains on
  ftdist default, 4x8    the same global batch cut into 4 accumulation micro-batches (padding is per micro-batch)
  dynamic, no grouping   GlobalBatchSampler without grouping, same Collator (= a shuffled DataLoader + padding)
  pad to max_length      every row padded to data.max_length (padding="max_length")
  HF group_by_length     transformers' LengthGroupedSampler (Trainer's group_by_length=True), for reference

Data sets: `demo` (the shipped VADER lexicon of the default job, `ftdist train demo`: single words,
max_length 16) and `longtail` (generated sentences, log-normal word counts with median 20 words,
max_length 128). Target (printed, not asserted): ftdist default >= 0.90 on both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.90


def load(name: str, args, work: Path):
    """(lengths from the tokenized train split, the split, tokenizer, DataConfig, whether labels are padded
    like tokens) via ftdist's pipeline."""
    from ftdist import config, data, tasks
    from ftdist import model as modellib

    if name == "demo":
        recipe = config.load("demo")
    else:
        texts, labels = C.generate_texts(args.rows, seed=args.data_seed)
        csv = C.write_csv(work / "longtail.csv", texts, labels)
        recipe = config.load("demo", ["data.dataset=null", f"data.train_file={csv}", "data.max_length=128",
                                      "data.validation_split=0", "data.test_split=0"])
    tok = modellib.load_tokenizer(recipe.model)
    splits = data.build(recipe.data, tok)
    train = splits.train
    lengths = train["length"][:]  # [:] reads the column at once (iterating the lazy column goes row by row)
    pad_labels = tasks.make(recipe.data, splits.label_names, splits.label_counts).sequence_labels
    return lengths, train, tok, recipe.data, pad_labels


def iterate(train, tok, pad_labels: bool, lengths, batch: int, accum: int, seed: int, epoch: int, grouped: bool):
    """Real and processed tokens of one epoch, counted on the collated micro-batches ftdist would train on."""
    from torch.utils.data import DataLoader

    from ftdist.collate import Collator, PairDataset
    from ftdist.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(lengths, batch // accum, accum, 1, 0, seed, grouped)
    sampler.set_epoch(epoch)
    loader = DataLoader(PairDataset(train), batch_sampler=sampler, collate_fn=Collator(tok, pad_labels))
    real = processed = 0
    for b in loader:
        keep = b["real"]
        real += int(b["attention_mask"][keep].sum())
        processed += int(b["input_ids"][keep].numel())
    return real, processed


def hf_grouped(lengths, batch: int, seed: int, epoch: int):
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g))
    real = processed = 0
    for i in range(0, len(order), batch):
        chunk = [lengths[j] for j in order[i:i + batch]]
        real += sum(chunk)
        processed += len(chunk) * max(chunk)
    return real, processed


def efficiencies(train, tok, dcfg, pad_labels: bool, lengths, batch: int, accum: int,
                 seeds: list[int]) -> dict[str, list[float]]:
    """Strategy label -> efficiency for each seed (one epoch each)."""
    rows = {}
    epochs = list(range(len(seeds)))

    def add(label, fn):
        rows[label] = [r / max(q, 1) for r, q in (fn(s, e) for s, e in zip(seeds, epochs))]

    add("ftdist default (group_by_length)",
        lambda s, e: iterate(train, tok, pad_labels, lengths, batch, 1, s, e, True))
    if accum > 1:
        add(f"ftdist default, {accum} micro-batches of {batch // accum}",
            lambda s, e: iterate(train, tok, pad_labels, lengths, batch, accum, s, e, True))
    add("dynamic padding, no grouping",
        lambda s, e: iterate(train, tok, pad_labels, lengths, batch, 1, s, e, False))
    rows[f"pad to max_length ({dcfg.max_length})"] = [sum(lengths) / (len(lengths) * dcfg.max_length)] * len(seeds)
    add("HF Trainer group_by_length (reference)", lambda s, e: hf_grouped(lengths, batch, s, e))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo,longtail", help="comma list of: demo, longtail")
    p.add_argument("--rows", type=int, default=20000, help="rows of the generated long-tailed data set")
    p.add_argument("--batch", type=int, default=32, help="global batch (the demo recipe's is 32)")
    p.add_argument("--seeds", default="42,43,44", help="one epoch per seed; the table shows the mean")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ftdist-padding-"))
    os.environ.update(C.worker_env(work / "hf-cache"))
    from ftdist.console import setup_logging
    setup_logging(quiet=True, verbose=False)  # as `ftdist train --quiet`: no progress bars
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"padding: {time.strftime('%Y-%m-%d %H:%M')}  {C.machine_line()}")
    print(f"   global batch {args.batch}; one epoch for each seed in {seeds}; efficiency = real tokens / processed tokens")
    report = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "data": {}}
    ok = True
    for name in args.data.split(","):
        t0 = time.perf_counter()
        lengths, train, tok, dcfg, pad_labels = load(name, args, work)
        n = len(lengths)
        mean = sum(lengths) / n
        print(f"\n== {name}: {n} train rows, max_length {dcfg.max_length}, tokens per row mean {mean:.1f}, "
              f"max {max(lengths)}, at max_length {sum(x == dcfg.max_length for x in lengths) / n:.1%} "
              f"(loaded and tokenized by ftdist.data.build in {time.perf_counter() - t0:.1f} s)")
        accum = 4 if args.batch % 4 == 0 else 1
        rows = efficiencies(train, tok, dcfg, pad_labels, lengths, args.batch, accum, seeds)
        print(f"   {'batching':<42} {'efficiency':>10} {'min..max over seeds':>20}")
        for label, effs in rows.items():
            mark = ""
            if label.startswith("ftdist default"):
                verdict = C.verdict(min(effs), TARGET)
                ok &= verdict == "PASS"
                mark = f"  target >= {TARGET:.2f}: {verdict}"
            print(f"   {label:<42} {sum(effs) / len(effs):>10.3f} {min(effs):>9.3f}..{max(effs):.3f}{mark}")
        report["data"][name] = {"rows": n, "max_length": dcfg.max_length, "mean_tokens": mean,
                                "efficiency": {k: {"mean": sum(v) / len(v), "per_seed": v} for k, v in rows.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\nftdist default >= {TARGET:.2f} everywhere: {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
