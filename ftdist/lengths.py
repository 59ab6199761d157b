"""The truncation length a recipe leaves open (data.max_length: null), derived from the train data."""

from __future__ import annotations

import datasets

from ftdist.config import DataConfig

LENGTH_QUANTILE = 0.99
LENGTH_SAMPLE = 20_000


def derive_max_length(cfg: DataConfig, tokenizer, train: datasets.Dataset, limit: int | None) -> int:
    """The 99th percentile of the train rows' token lengths (special tokens included), rounded up to a
    multiple of 8, between 8 and the model's limit. Over at most LENGTH_SAMPLE evenly spaced rows: a
    pure function of the data, so every rank derives the same value."""
    import math

    import transformers

    step = max(1, math.ceil(len(train) / LENGTH_SAMPLE))
    rows = train.select(range(0, len(train), step))
    text = list(rows[cfg.text_column])
    pair = list(rows[cfg.text_pair_column]) if cfg.text_pair_column else None
    kwargs = {"is_split_into_words": True} if cfg.task == "token-classification" else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # no "longer than the model's maximum" warning: that is the point
    try:
        lengths = sorted(len(ids) for ids in tokenizer(text, pair, truncation=False, **kwargs)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)
    q = lengths[min(len(lengths) - 1, math.ceil(LENGTH_QUANTILE * len(lengths)) - 1)]
    value = max(8, 8 * math.ceil(q / 8))
    return min(value, limit) if limit else value
