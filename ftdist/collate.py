"""Micro-batches from tokenized rows: dynamic padding, with each row's sample id and a real/placeholder flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ftdist.errors import FtdistError


class Collator:
    """Dynamic padding per micro-batch; keeps `real` (placeholder rows are False) and `idx` (sample ids).

    Pads with numpy into the tensors DataCollatorWithPadding / DataCollatorForTokenClassification make
    (same values and dtypes, tested against them): the tokenizer's pad() walks every row in Python, about
    2 ms per batch of 32 on one CPU core, 1% of a small model's step and more on a GPU without workers."""

    def __init__(self, tokenizer, pad_labels: bool):
        if tokenizer.pad_token_id is None:
            raise FtdistError(f"model.name_or_path: the tokenizer ({type(tokenizer).__name__}) has no pad token, and "
                              "dynamic padding needs one. Set tokenizer.pad_token in the model folder's "
                              "tokenizer_config.json (for GPT-style models, often the eos token)")
        self.pad_values = {"input_ids": tokenizer.pad_token_id, "labels": -100,
                           "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
        self.left = tokenizer.padding_side == "left"
        self.pad_labels = pad_labels  # token labels are sequences; one label per row otherwise

    def _pad(self, key: str, seqs) -> torch.Tensor:
        longest = max(len(s) for s in seqs)
        out = np.full((len(seqs), longest), self.pad_values.get(key, 0), dtype=np.int64)
        for i, s in enumerate(seqs):
            if len(s):
                if self.left:
                    out[i, longest - len(s):] = s
                else:
                    out[i, :len(s)] = s
        return torch.from_numpy(out)

    def __call__(self, items):
        rows = [row for row, _ in items]
        batch = {}
        for key in rows[0]:
            if key in ("idx", "length"):
                continue
            values = [row[key] for row in rows]
            if key == "labels" and not self.pad_labels:
                batch[key] = torch.tensor(values)  # int64 class ids, float32 regression targets
            else:
                batch[key] = self._pad(key, values)
        batch["real"] = torch.tensor([r for _, r in items], dtype=torch.bool)
        batch["idx"] = torch.tensor([row["idx"] for row in rows])
        return batch


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, real = key
        return self.ds[i], real

    def __getitems__(self, keys):
        # one Arrow slice per micro-batch instead of one row lookup per example
        cols = self.ds[[i for i, _ in keys]]
        rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
        return [(row, real) for row, (_, real) in zip(rows, keys)]


@dataclass
class TextFeed:
    """What the run's loaders need for tokenized rows (ftdist.imagefeed.ImageFeed is the images' counterpart)."""

    tokenizer: Any
    sequence_labels: bool

    def dataset(self, ds):
        return PairDataset(ds)

    def batch_sampler(self, sampler):
        return sampler

    def collator(self, train: bool) -> Collator:
        return Collator(self.tokenizer, self.sequence_labels)
