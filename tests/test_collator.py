"""ftdist's numpy collator makes exactly the tensors of transformers' padding collators."""

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding

from ftdist.collate import Collator
from ftdist.errors import FtdistError
from ftdist.model import default_model_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_model_path())


def _rows(tok, texts, labels, pairs=None):
    enc = tok(texts, pairs, truncation=True, max_length=32) if pairs else tok(texts, truncation=True, max_length=32)
    return [{**{k: enc[k][i] for k in enc}, "labels": labels[i], "idx": 10 + i, "length": len(enc["input_ids"][i])}
            for i in range(len(texts))]


def _reference(pad, rows):
    return pad([{k: v for k, v in r.items() if k not in ("idx", "length")} for r in rows])


def _same(ours, ref):
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype, k
        assert torch.equal(ours[k], v), k


TEXTS = ["a fine film", "bad", "the longest sentence of them all, with words", "ok then"]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("labels", [[0, 1, 1, 0], [0.5, -1.25, 3.0, 0.0]], ids=["class", "regression"])
def test_sequence_and_pair_batches_match_datacollatorwithpadding(tok, side, labels):
    tok.padding_side = side
    try:
        for pairs in (None, ["x", "y z", "w", "a longer second text here"]):
            rows = _rows(tok, TEXTS, labels, pairs)
            items = [(r, i != 2) for i, r in enumerate(rows)]
            ours = Collator(tok, pad_labels=False)(items)
            _same(ours, _reference(DataCollatorWithPadding(tok), rows))
            assert ours["real"].tolist() == [True, True, False, True]
            assert ours["idx"].tolist() == [10, 11, 12, 13]
            assert "length" not in ours
    finally:
        tok.padding_side = "right"


def test_token_batches_match_datacollatorfortokenclassification(tok):
    rows = _rows(tok, TEXTS, [None] * 4)
    for r in rows:
        r["labels"] = [-100] + [i % 3 for i in range(len(r["input_ids"]) - 2)] + [-100]
    ours = Collator(tok, pad_labels=True)([(r, True) for r in rows])
    _same(ours, _reference(DataCollatorForTokenClassification(tok), rows))


def test_tokenizer_without_pad_token_is_a_clear_error(tok):
    class NoPad:
        pad_token_id = None
    with pytest.raises(FtdistError, match="no pad token"):
        Collator(NoPad(), pad_labels=False)
