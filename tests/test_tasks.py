"""Issue #7: beyond single-sentence classification: token classification, sentence pairs, regression,
class imbalance (weights and oversampling), `ftdist eval` / `ftdist predict`, parallel tokenization.

Real training runs are few, tiny and shared: every run this module needs is started once, in the
background, when the first test asks for one (3 at a time; each subprocess bounded by RUN_TIMEOUT),
and each test waits only for the runs it reads.

    tok-a      token task (CoNLL file), 1 process, per-device 4 x accumulation 2 (global 8), 8 steps, seqeval,
               unfreeze.schedule=gradual every 2 steps (head, block1, block0, embeddings: every group trains
               for a while, and every backend must rebuild at each transition)
    tok-ddp    the same on 2 processes (cpu-2): per-device 4 x accumulation 1
    tok-acc1   the same on 1 process, per-device 8 x accumulation 1
    tok-zero2  the same on ZeRO-2 (cpu-zero2), per-device 4 x accumulation 1
    pairreg    sentence pairs (two text columns), float labels: task=regression, pearson/spearman
    over1      90/10 classification, data.oversample=true, 1 process (printing its plan), export; then
               `ftdist eval` and `ftdist predict --out x.jsonl` on it (subprocesses, also in the background)
    over1-bal  over1 with data.class_weights=balanced (same draws; a different step-1 loss; a double-count warning)
    over2-eff  over1 on 2 processes (cpu-2) with data.class_weights=effective_number
    foc1       90/10 classification with focal loss, label smoothing and balanced class weights, 1 process,
               per-device 4 x accumulation 4; foc-acc1 16 x 1; foc-ddp on cpu-2 and foc-zero2 on cpu-zero2
The tok-* runs train with the same three imbalance options, per tag.

The token data mixes sentences of 1 to ~20 words (some words split into 4-5 word pieces), so a loss
averaged per micro-batch instead of over the global batch's labelled tokens would differ between
4 x 2, 4 x 1 x 2 processes and 8 x 1 by far more than the 1e-5 tolerance.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import datasets
import helpers
import pytest
import torch

from ftdist import data, decisions, metrics
from ftdist.config import DataConfig, ModelConfig
from ftdist.model import load_tokenizer
from ftdist.sampler import GlobalBatchSampler, balanced_weights
from ftdist.tasks import class_weights

RUN_TIMEOUT = 420
CLI_TIMEOUT = 240
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5

TAGS = ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"]  # sorted: the label ids
PER = ["alice", "okonkwo", "bob", "zhang", "maria"]
LOC = ["paris", "ouagadougou", "berlin", "kathmandu"]
ORG = ["acme", "unicef", "volkswagen"]
FILL = ["the", "visited", "met", "in", "with", "and", "a", "unbelievably", "quickly", "yesterday", "went", "to"]
MULTI_PIECE = ("okonkwo", "ouagadougou", "unbelievably")  # 4-5 word pieces each with the MiniLM tokenizer


# ------------------------------------------------------------------ data

def token_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.choice([1, 1, 2, 3, 5, 9, 14, 20])):
            r = rng.random()
            if r < 0.25:
                names = [rng.choice(PER)] + ([rng.choice(PER)] if rng.random() < 0.5 else [])
                tokens += names
                tags += ["B-PER"] + ["I-PER"] * (len(names) - 1)
            elif r < 0.4:
                tokens.append(rng.choice(LOC))
                tags.append("B-LOC")
            elif r < 0.5:
                tokens.append(rng.choice(ORG))
                tags.append("B-ORG")
            else:
                tokens.append(rng.choice(FILL))
                tags.append("O")
        out.append((tokens, tags))
    out[0] = (["okonkwo", "maria", "visited", "ouagadougou", "unbelievably", "quickly"],
              ["B-PER", "I-PER", "O", "B-LOC", "O", "O"])  # every tag and every multi-piece word, in every file
    out[1] = (["acme"], ["B-ORG"])
    return out


def write_conll(path: Path, sents) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for tokens, tags in sents:
        lines += [f"{w} NN O {t}" for w, t in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_token_jsonl(path: Path, sents) -> Path:
    path.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in sents))
    return path


POS = ["good", "great", "happy", "love", "excellent", "nice"]
NEG = ["bad", "awful", "sad", "hate", "terrible", "poor"]
FILLER = ["the", "a", "movie", "day", "food", "it", "was", "very", "and", "book", "really", "quite"]


def write_imbalanced(path: Path, n: int, seed: int, long_every: int = 0) -> Path:
    """Rows with i % 10 == 0 are 'rare' (10%), the rest 'common'. Every `long_every`-th row is longer
    than the tiny recipe's max_length (16 tokens), so truncation matters for it."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = "rare" if i % 10 == 0 else "common"
            k = 30 if long_every and i % long_every == 3 else rng.randint(1, 6)
            words = [rng.choice(FILLER) for _ in range(k)]
            words.insert(rng.randint(0, 3), rng.choice(NEG if label == "rare" else POS))
            w.writerow([" ".join(words), label])
    return path


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["first", "second", "score"])
        for _ in range(n):
            a = [rng.choice(POS + NEG + FILLER) for _ in range(rng.randint(1, 6))]
            b = [rng.choice(a) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(rng.randint(1, 6))]
            w.writerow([" ".join(a), " ".join(b), round(sum(x in a for x in b) / len(b) * 5, 2)])
    return path


# ------------------------------------------------------------------ runs

def run_cli(tmp: Path, overrides: list[str], preset: str | None = None, nprocs: int = 1, name: str = "run",
            quiet: bool = True) -> helpers.Result:
    """helpers.run_ftdist, optionally without --quiet (to see the plan)."""
    return helpers.run_ftdist(tmp, overrides, preset=preset, nprocs=nprocs, name=name, timeout=RUN_TIMEOUT,
                              flags=("--quiet",) if quiet else ())


class Runs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        f = {
            "conll": write_conll(tmp / "train.conll", token_sentences(64, 0)),
            "conll_val": write_conll(tmp / "val.conll", token_sentences(8, 1)),
            "imb": write_imbalanced(tmp / "imb.csv", 100, 0),
            "imb_val": write_imbalanced(tmp / "imb_val.csv", 20, 1, long_every=4),
            "pairs": write_pairs(tmp / "pairs.csv", 64, 0),
            "pairs_val": write_pairs(tmp / "pairs_val.csv", 16, 1),
        }
        self.files = f
        common = ["data.dataset=null", "log.progress=false", "checkpoint.resume=null", "log.trackers=[]"]
        tok = [*common, f"data.train_file={f['conll']}", f"data.validation_file={f['conll_val']}",
               "data.task=token-classification", "data.text_column=tokens", "data.label_column=tags",
               "eval.metrics=[seqeval]", "eval.best_metric=seqeval", "data.max_length=32",
               # tok-a / tok-ddp / tok-acc1 are compared across world sizes: ranks draw different dropout masks
               "model.dropout=0",
               "train.max_steps=8", "train.global_batch_size=8", "train.per_device_batch_size=4",
               "train.scheduler=constant", "train.warmup=0", "eval.per_device_batch_size=4",
               "unfreeze.schedule=gradual", "unfreeze.every_steps=2",
               # the imbalance losses, per tag: weights, smoothing and focusing must all normalise globally
               "train.loss=focal", "train.label_smoothing=0.1", "data.class_weights=balanced",
               # logged windows of 1, 2 and 3 steps whose labelled-token counts differ: the logged loss is compared
               # with the item-weighted mean of the per-step losses, and across world sizes
               "log.trackers=[jsonl]", "log.every_steps=3"]
        over = [*common, f"data.train_file={f['imb']}", f"data.validation_file={f['imb_val']}", "data.oversample=true",
                "train.max_steps=7", "train.global_batch_size=16", "train.per_device_batch_size=8"]
        pairreg = [*common, f"data.train_file={f['pairs']}", f"data.validation_file={f['pairs_val']}",
                   "data.text_column=first", "data.text_pair_column=second", "data.label_column=score",
                   "data.task=regression", "eval.metrics=[pearson,spearman]", "eval.best_metric=pearson",
                   "train.max_steps=4", "train.global_batch_size=16", "train.per_device_batch_size=16", "eval.every_steps=3",
                   "log.trackers=[jsonl]"]
        # classification with every imbalance loss at once, compared across world sizes (hence dropout 0)
        focal = [*common, f"data.train_file={f['imb']}", f"data.validation_file={f['imb_val']}", "model.dropout=0",
                 "train.max_steps=7", "train.global_batch_size=16", "train.per_device_batch_size=4",
                 "train.loss=focal", "train.focal_gamma=2", "train.label_smoothing=0.1", "data.class_weights=balanced"]
        self.specs = {
            "foc1": (focal, None, 1, True),  # 4 x accumulation 4
            "foc-acc1": ([*focal, "train.per_device_batch_size=16"], None, 1, True),  # 16 x 1
            "foc-ddp": (focal, "cpu-2", 2, True),  # 4 x 2 x 2 processes
            "foc-zero2": (focal, "cpu-zero2", 2, True),
            # name: (overrides, preset, nprocs, quiet)
            "tok-a": (tok, None, 1, True),
            "tok-ddp": (tok, "cpu-2", 2, True),
            "tok-acc1": ([*tok, "train.per_device_batch_size=8"], None, 1, True),
            "tok-zero2": (tok, "cpu-zero2", 2, True),
            "pairreg": (pairreg, None, 1, True),
            "over1": (over, None, 1, False),
            "over1-bal": ([*over, "data.class_weights=balanced"], None, 1, True),
            "over2-eff": ([*over, "data.class_weights=effective_number"], "cpu-2", 2, True),
        }
        self.pool = cf.ThreadPoolExecutor(max_workers=3)
        # 2-process runs first: they are the slowest
        order = sorted(self.specs, key=lambda n: -self.specs[n][2])
        self.futures = {n: self.pool.submit(self._run, n) for n in order}
        self.cli = self.pool.submit(self._eval_and_predict)

    def _run(self, name: str) -> helpers.Result:
        overrides, preset, nprocs, quiet = self.specs[name]
        return run_cli(self.tmp, overrides, preset=preset, nprocs=nprocs, name=name, quiet=quiet)

    def _eval_and_predict(self):
        """`ftdist eval` and `ftdist predict` (and one error) on over1's model, as a user runs them, once it is trained."""
        res = self.futures["over1"].result()
        if res.rc != 0:
            return None
        model, val = str(res.run_dir / "model"), str(self.files["imb_val"])
        return (ftdist_cli(["eval", model, "--data", val], self.tmp),
                ftdist_cli(["predict", model, val, "--out", str(self.tmp / "preds.jsonl")], self.tmp),
                ftdist_cli(["predict", model, str(self.tmp / "missing.csv")], self.tmp))

    def get(self, name: str) -> helpers.Result:
        res = self.futures[name].result()
        helpers.assert_ok(res, self.specs[name][2])
        return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("tasks"))
    yield r
    r.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """In-process `datasets` caches of throw-away files stay out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def token_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(train_file=str(path), task="token-classification", text_column="tokens", label_column="tags",
                      validation_split=0.0, max_length=32, **kw)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), f"{len(a)} vs {len(b)} steps"
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ------------------------------------------------------------------ token classification: data

@pytest.mark.timeout(120)
def test_conll_jsonl_and_parquet_token_files_load_the_same(tmp_path, tok):
    sents = token_sentences(24, 5)
    a = data.build(token_cfg(write_conll(tmp_path / "t.conll", sents)), tok)
    b = data.build(token_cfg(write_token_jsonl(tmp_path / "t.jsonl", sents)), tok)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"tokens": [t for t, _ in sents], "tags": [g for _, g in sents]}), tmp_path / "t.parquet")
    c = data.build(token_cfg(tmp_path / "t.parquet"), tok)
    assert a.label_names == b.label_names == c.label_names == TAGS
    assert len(a.train) == len(b.train) == len(c.train) == 24
    for col in ("input_ids", "labels", "attention_mask"):
        assert a.train[col] == b.train[col] == c.train[col], col
    # the words survive tokenization: decoding gives the sentence back (its start, if truncated at 32)
    for (tokens, _), ids in zip(sents, a.train["input_ids"]):
        text = tok.decode(ids, skip_special_tokens=True)
        assert text == " ".join(tokens) if len(ids) < 32 else " ".join(tokens).startswith(text)


def test_align_first_subword_and_all_subwords():
    word_ids = [None, 0, 0, 0, 1, 2, 2, None]
    assert data.align_labels(word_ids, [3, 1, 4], False) == [-100, 3, -100, -100, 1, 4, -100, -100]
    assert data.align_labels(word_ids, [3, 1, 4], True) == [-100, 3, 3, 3, 1, 4, 4, -100]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("all_subwords", [False, True])
def test_tokenized_token_labels_follow_word_ids(tmp_path, tok, all_subwords):
    sents = token_sentences(24, 6)
    s = data.build(token_cfg(write_conll(tmp_path / "t.conll", sents), label_all_subwords=all_subwords), tok)
    tag_id = {t: i for i, t in enumerate(TAGS)}
    multi = 0
    for (tokens, tags), ids, labels in zip(sents, s.train["input_ids"], s.train["labels"], strict=True):
        enc = tok(tokens, is_split_into_words=True, truncation=True, max_length=32)
        assert enc["input_ids"] == ids
        word_ids = enc.word_ids()
        expected, prev = [], None
        for w in word_ids:
            if w is None:
                expected.append(-100)
            elif w != prev or all_subwords:
                expected.append(tag_id[tags[w]])
            else:
                expected.append(-100)
            prev = w
        assert labels == expected
        counts = collections.Counter(w for w in word_ids if w is not None)
        multi += sum(c > 1 for c in counts.values())
        labelled = sum(lab != -100 for lab in labels)
        assert labelled == (sum(counts.values()) if all_subwords else len(counts))
    assert multi >= 5, "the data must contain words split into several pieces"


# ------------------------------------------------------------------ token classification: training

@pytest.mark.timeout(900)
def test_token_run_exports_tag_names_and_seqeval(runs):
    res = runs.get("tok-a")
    cfg = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForTokenClassification"]
    assert cfg["id2label"] == {str(i): t for i, t in enumerate(TAGS)}
    assert cfg["label2id"] == {t: i for i, t in enumerate(TAGS)}
    final = json.loads((res.run_dir / "final_metrics.json").read_text())
    assert final["best_metric"] == "seqeval"
    v = final["validation"]
    for k in ("seqeval", "seqeval_precision", "seqeval_recall", "seqeval_f1", "seqeval_accuracy", "loss"):
        assert k in v and math.isfinite(v[k]), (k, v)
    assert v["seqeval"] == v["seqeval_f1"]
    assert v["n_examples"] == 8
    assert all(math.isfinite(x) for x in res.losses())


def test_seqeval_is_entity_level():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    preds = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG", "B-LOC"]]
    # entities: refs PER(0-1), LOC(3), ORG(1); preds PER(0) (wrong span), LOC(3), ORG(1), LOC(2) (spurious)
    out = metrics.compute(["seqeval"], preds, refs)
    assert out["seqeval_precision"] == pytest.approx(2 / 4)
    assert out["seqeval_recall"] == pytest.approx(2 / 3)
    assert out["seqeval_f1"] == out["seqeval"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert out["seqeval_accuracy"] == pytest.approx(5 / 7)  # token-level: differs from the entity scores


@pytest.mark.timeout(900)
@pytest.mark.parametrize("other", ["tok-ddp", "tok-acc1"])
def test_token_loss_normalisation_parity(runs, other):
    """4 x accum 2 (1 process) == 4 x accum 1 x 2 processes == 8 x accum 1: per step and in the final weights
    (a loss averaged per micro-batch, or per rank, would differ: see test_token_batches_mix_lengths)."""
    ref, res = runs.get("tok-a"), runs.get(other)
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["global_batch"] == 8
    assert [r["step"] for r in res.trace(0)] == list(range(1, 9))
    # the same sequences in each step (union over ranks)
    world = runs.specs[other][2]
    for step in range(8):
        ids = sorted(i for rank in range(world) for i in res.trace(rank)[step]["ids"])
        assert ids == sorted(ref.trace(0)[step]["ids"]), f"step {step + 1}: different examples"
    diff = max_rel_diff(res.losses(0), ref.losses(0))
    assert diff <= LOSS_RTOL, f"{other}: per-step loss differs from 4 x accum 2 by {diff:.3g} (relative)"
    if world > 1:
        assert res.losses(1) == res.losses(0)  # every rank reports the global loss
    wdiff = max_abs_diff(res.weights(), ref.weights())
    assert wdiff <= WEIGHT_ATOL, f"{other}: final weights differ by {wdiff:.3g}"


@pytest.mark.timeout(900)
def test_logged_loss_is_the_item_weighted_window_mean_at_every_world_size(runs):
    """train/loss at a log step = sum(loss sums) / sum(weighted labelled tokens) over the steps since the last
    log, as the loss itself is normalised: the same on 1 process (accumulation 2 or 1) and 2-process DDP."""
    windows = {1: [1], 3: [2, 3], 6: [4, 5, 6]}
    logged = {}
    for name in ("tok-a", "tok-ddp", "tok-acc1"):
        res = runs.get(name)
        trace = {r["step"]: r for r in res.trace(0)}
        rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        got = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
        assert sorted(got) == sorted(windows), got
        assert len({trace[s]["items"] for s in range(1, 7)}) > 1  # the weights matter: the counts differ
        for step, steps in windows.items():
            want = sum(trace[s]["loss"] * trace[s]["items"] for s in steps) / sum(trace[s]["items"] for s in steps)
            assert got[step] == pytest.approx(want, rel=1e-12), (name, step)
        logged[name] = [got[s] for s in sorted(got)]
    for name in ("tok-ddp", "tok-acc1"):
        diff = max_rel_diff(logged[name], logged["tok-a"])
        assert diff <= LOSS_RTOL, f"{name}: logged windowed loss differs from 1 process by {diff:.3g} (relative)"


@pytest.mark.timeout(120)
def test_token_batches_mix_lengths(runs, tok):
    """The parity above is only meaningful if micro-batches differ in labelled-token counts."""
    s = data.build(token_cfg(runs.files["conll"]), tok)
    n_labelled = [sum(lab != -100 for lab in row) for row in s.train["labels"]]
    assert max(n_labelled) >= 8 * min(n_labelled)


@pytest.mark.timeout(900)
def test_token_zero2_gradual_matches_one_process(runs):
    ref, res = runs.get("tok-a"), runs.get("tok-zero2")
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["zero_stage"] == 2 and plan["backend"] == "DEEPSPEED"
    # head, then block1, block0, embeddings: one more group every 2 steps, the same on both
    stages = [r["stage"] for r in res.trace(0)]
    assert stages == [r["stage"] for r in ref.trace(0)]
    assert stages[0] == 0 and stages[-1] == 3, stages
    trainable = [r["trainable"] for r in res.trace(0)]
    assert trainable == sorted(trainable) and trainable[0] < trainable[-1]
    diff = max_rel_diff(res.losses(0), ref.losses(0))
    assert diff <= LOSS_RTOL, f"ZeRO-2 gradual: per-step loss differs from 1 process by {diff:.3g} (relative)"
    wdiff = max_abs_diff(res.weights(), ref.weights())
    assert wdiff <= WEIGHT_ATOL, f"ZeRO-2 gradual: final weights differ by {wdiff:.3g}"


# ------------------------------------------------------------------ sentence pairs and regression

@pytest.mark.timeout(120)
def test_pair_columns_give_token_type_ids(runs, tok):
    f = runs.files["pairs"]
    s = data.build(DataConfig(train_file=str(f), text_column="first", text_pair_column="second", label_column="score",
                              task="regression", validation_split=0.0), tok)
    with f.open() as fh:
        rows = list(csv.DictReader(fh))
    assert s.label_names is None
    for row, ids, types_, label in zip(rows, s.train["input_ids"], s.train["token_type_ids"], s.train["labels"],
                                       strict=True):
        n_first = ids.index(tok.sep_token_id) + 1
        assert types_ == [0] * n_first + [1] * (len(ids) - n_first)
        assert 1 in types_
        assert tok.decode(ids[n_first:], skip_special_tokens=True) == row["second"]
        assert label == pytest.approx(float(row["score"]))


@pytest.mark.timeout(900)
def test_pair_regression_run(runs, cli_main, tmp_path):
    res = runs.get("pairreg")
    final = json.loads((res.run_dir / "final_metrics.json").read_text())
    v = final["validation"]
    assert {"pearson", "spearman", "loss"} <= set(v), v
    assert all(math.isfinite(v[k]) and -1 <= v[k] <= 1 for k in ("pearson", "spearman")), v
    assert final["best_metric"] == "pearson" and final["best_step"] in (3, 4)
    cfg = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert len(cfg["id2label"]) == 1 and cfg["problem_type"] == "regression"
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/pearson" in r] == [3, 4]  # every 3 steps, and the epoch's end
    assert all(math.isfinite(x) for x in res.losses())
    # `ftdist eval` / `predict` on the pair model: the trainer's numbers, one prediction per row
    model, val = str(res.run_dir / "model"), str(runs.files["pairs_val"])
    cols = ["--text-column", "first", "--text-pair-column", "second"]
    rc, out, err = cli_main(["eval", model, "--data", val, *cols, "--label-column", "score", "--metrics", "pearson,spearman"])
    assert rc == 0, err
    got = json.loads(out)
    assert got == pytest.approx({k: v[k] for k in ("pearson", "spearman", "n_examples")}, abs=1e-6)
    rc, _, err = cli_main(["predict", model, val, *cols, "--out", str(tmp_path / "p.jsonl")])
    assert rc == 0, err
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and all(set(p) == {"prediction", "text"} and math.isfinite(p["prediction"]) for p in preds)


# ------------------------------------------------------------------ class imbalance

def test_class_weight_vectors():
    counts = [90, 10]
    assert class_weights(counts, "none") is None
    bal = class_weights(counts, "balanced")
    assert bal.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    beta = 0.999
    raw = [(1 - beta) / (1 - beta ** c) for c in counts]
    eff = class_weights(counts, "effective_number", beta)
    assert eff.tolist() == pytest.approx([w * 2 / sum(raw) for w in raw], rel=1e-5)
    assert float(eff.sum()) == pytest.approx(2.0)
    assert eff[1] > eff[0] and bal[1] / bal[0] == pytest.approx(9.0)
    # the minority weight of effective_number is milder than balanced's
    assert float(eff[1] / eff[0]) < 9.0


def _labels_of_train(runs, tok):
    s = data.build(DataConfig(train_file=str(runs.files["imb"]), validation_file=str(runs.files["imb_val"]),
                              max_length=16), tok)
    assert s.label_names == ["common", "rare"] and s.label_counts == {"common": 90, "rare": 10}
    return s


@pytest.mark.timeout(900)
def test_label_distribution_in_plan(runs):
    res = runs.get("over1")
    assert "labels            common: 90, rare: 10" in res.log, res.log[-3000:]
    assert res.log.count("plan:") == 1
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["label_counts"] == {"common": 90, "rare": 10}


@pytest.mark.timeout(900)
def test_balanced_weights_change_the_step_one_loss(runs):
    plain, bal = runs.get("over1"), runs.get("over1-bal")
    # same seed, same draws: only the loss weighting differs
    assert [r["ids"] for r in plain.trace()] == [r["ids"] for r in bal.trace()]
    a, b = plain.losses()[0], bal.losses()[0]
    assert math.isfinite(a) and math.isfinite(b)
    assert abs(a - b) > 1e-4, f"balanced class weights left the step-1 loss unchanged ({a} vs {b})"
    assert all(math.isfinite(x) for x in runs.get("over2-eff").losses())  # effective_number runs too
    assert "counts them twice" in bal.log and "counts them twice" not in plain.log


@pytest.mark.timeout(900)
@pytest.mark.parametrize("other", ["foc-acc1", "foc-ddp", "foc-zero2"])
def test_imbalance_losses_parity(runs, other):
    """Focal loss + label smoothing + class weights: 4 x accum 4 on 1 process == 16 x 1 == 2 processes (DDP,
    ZeRO-2), per step and in the final weights."""
    ref, res = runs.get("foc1"), runs.get(other)
    world = runs.specs[other][2]
    for step in range(7):
        ids = sorted(i for rank in range(world) for i in res.trace(rank)[step]["ids"])
        assert ids == sorted(ref.trace(0)[step]["ids"]), f"step {step + 1}: different examples"
    diff = max_rel_diff(res.losses(0), ref.losses(0))
    assert diff <= LOSS_RTOL, f"{other}: per-step loss differs from 4 x accum 4 by {diff:.3g} (relative)"
    wdiff = max_abs_diff(res.weights(), ref.weights())
    assert wdiff <= WEIGHT_ATOL, f"{other}: final weights differ by {wdiff:.3g}"
    # the runs train on the focal objective: not the plain cross-entropy of over1 (same data, other batches)
    assert res.losses(0)[0] < runs.get("over1").losses(0)[0]


@pytest.mark.timeout(900)
def test_oversampling_two_processes(runs, tok):
    one, two = runs.get("over1"), runs.get("over2-eff")
    s = _labels_of_train(runs, tok)
    labels = s.train["labels"]
    rare = s.label_names.index("rare")
    r0, r1 = two.trace(0), two.trace(1)
    assert len(r0) == len(r1) == len(one.trace()) == 7  # 100 draws / global 16 = 7 steps: one epoch
    # the seeded epoch, recomputed here: every rank took exactly its micro-batches of it
    w = balanced_weights(labels)
    for rank, rows in ((0, r0), (1, r1)):
        sampler = GlobalBatchSampler(s.train["length"], 8, 1, 2, rank, 42, True, w)
        assert [r["ids"] for r in rows] == [[i for i, _ in mb] for mb in sampler], f"rank {rank}: not the seeded draws"
    expected = GlobalBatchSampler(s.train["length"], 16, 1, 1, 0, 42, True, w).batches()
    draws = []
    for step, (a, b, ref) in enumerate(zip(r0, r1, one.trace())):
        batch = collections.Counter(expected[step])
        # disjoint parts of the step's draws (an example drawn twice may land on both ranks)
        assert collections.Counter(a["ids"]) + collections.Counter(b["ids"]) == batch, f"step {step + 1}"
        for i in set(a["ids"]) & set(b["ids"]):
            assert batch[i] >= 2, f"step {step + 1}: example {i} on both ranks but drawn once"
        # world size 1 and 2 draw the same examples in each step
        assert collections.Counter(ref["ids"]) == batch, f"step {step + 1}: 1 vs 2 processes differ"
        draws += a["ids"] + b["ids"]
    assert len(draws) == len(labels) == 100  # an epoch is len(train) draws
    share = sum(labels[i] == rare for i in draws) / len(draws)
    assert 0.35 <= share <= 0.65, f"minority share {share:.2f} with oversampling (10% in the data)"
    assert len(set(draws)) < len(draws)  # with replacement


# ------------------------------------------------------------------ ftdist eval / predict

def ftdist_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "ftdist", *args], cwd=cwd, env=helpers.base_env(),
                              capture_output=True, text=True, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired as t:
        return subprocess.CompletedProcess(args, -9, t.stdout or "", f"TIMEOUT after {CLI_TIMEOUT}s\n{t.stderr or ''}")


def manual_probs(model_dir: Path, texts: list[str], max_length: int) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tk = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return torch.cat([net(**tk(texts[i:i + 1], truncation=True, max_length=max_length, return_tensors="pt"))
                          .logits.softmax(-1) for i in range(len(texts))])


@pytest.mark.timeout(900)
def test_eval_and_predict_cli(runs, tmp_path, cli_main):
    res = runs.get("over1")
    ev, pj, _ = runs.cli.result()  # subprocesses: `ftdist eval`, `ftdist predict --out preds.jsonl`
    model = res.run_dir / "model"
    val = runs.files["imb_val"]
    with val.open() as fh:
        rows = list(csv.DictReader(fh))
    texts = [r["text"] for r in rows]
    assert any(len(t.split()) > 16 for t in texts)  # some rows are truncated by the recipe's max_length
    for p in (ev, pj):
        assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads(ev.stdout[ev.stdout.index("{"):])
    trainer = json.loads((res.run_dir / "final_metrics.json").read_text())["validation"]
    assert got["n_examples"] == trainer["n_examples"] == 20
    for k in ("accuracy", "f1"):
        assert got[k] == pytest.approx(trainer[k], abs=1e-9), f"{k}: ftdist eval {got[k]} vs trainer {trainer[k]}"

    # the same by hand, with the exported model and the recipe's max_length (16)
    probs = manual_probs(model, texts, 16)
    cfg = json.loads((model / "config.json").read_text())
    names = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    preds, refs = probs.argmax(-1).tolist(), [cfg["label2id"][r["label"]] for r in rows]
    want = {**metrics.compute(["accuracy", "f1"], preds, refs), "n_examples": 20}
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)  # (eval also reports per class, calibration)

    rc, out, err = cli_main(["predict", str(model), str(val), "--out", str(tmp_path / "preds.csv"), "--batch-size", "7"])
    assert rc == 0, err
    assert str(tmp_path / "preds.csv") in out
    with (tmp_path / "preds.csv").open() as fh:
        out_csv = list(csv.DictReader(fh))
    out_jsonl = [json.loads(line) for line in (runs.tmp / "preds.jsonl").read_text().splitlines()]
    decision = decisions.load(model, names)
    assert decision is not None and decision["kind"] == "bias"
    for out in (out_csv, out_jsonl):
        assert len(out) == len(rows)
        for row, text, p in zip(out, texts, probs, strict=True):
            assert row["text"] == text
            class_p = [float(row[f"p_{n}"]) for n in names]
            assert sum(class_p) == pytest.approx(1.0, abs=1e-6)
            assert class_p == pytest.approx(p.tolist(), abs=1e-6)  # a max_length other than 16 moves them by ~2e-5
            # the labels 90:10 make the default eval.decision=auto fit logit biases: predict labels by them
            # (log p is the logits up to a per-row constant, which no argmax sees), argmax beside them
            assert row["label"] == names[int(decisions.apply(decision, p.log()[None])[0])]
            assert row["argmax_label"] == names[int(p.argmax())]
            assert float(row["score"]) == pytest.approx(class_p[names.index(row["label"])], abs=1e-9)  # p(label)


def manual_word_tags(model_dir: Path, sentences, max_length: int):
    """Per sentence, the tag of each word's first subword (None past max_length), by hand."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    net = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    tk = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for words in sentences:
        enc = tk(words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            top = net(**enc).logits[0].argmax(-1).tolist()
        first = {}
        for pos, w in enumerate(enc.word_ids(0)):
            if w is not None:
                first.setdefault(w, pos)
        out.append([net.config.id2label[top[first[w]]] if w in first else None for w in range(len(words))])
    return out


@pytest.mark.timeout(900)
def test_token_eval_and_predict_cli(runs, tmp_path, cli_main, caplog):
    """`ftdist eval` on a token model gives the trainer's own validation numbers (CoNLL and jsonl files alike);
    `ftdist predict` tags every word by its first subword, and leaves words past max_length untagged."""
    res = runs.get("tok-a")
    model = res.run_dir / "model"
    trainer = json.loads((res.run_dir / "final_metrics.json").read_text())["validation"]
    sents = token_sentences(8, 1)  # the validation file's sentences
    for f in (runs.files["conll_val"], write_token_jsonl(tmp_path / "val.jsonl", sents)):
        rc, out, err = cli_main(["eval", str(model), "--data", str(f)])
        assert rc == 0, err
        got = json.loads(out[out.index("{"):])
        assert got["n_examples"] == trainer["n_examples"] == 8
        for k in ("seqeval", "seqeval_precision", "seqeval_recall", "seqeval_f1", "seqeval_accuracy"):
            assert got[k] == pytest.approx(trainer[k], abs=1e-9), f"{f.name} {k}: ftdist eval {got[k]} vs trainer {trainer[k]}"

    # predict on tokens only (a CoNLL file without tags), one sentence longer than max_length (32 subwords)
    long = (["unbelievably", "okonkwo"] * 12, ["O", "B-PER"] * 12)
    words = [t for t, _ in sents] + [long[0]]
    (tmp_path / "raw.conll").write_text("\n\n".join("\n".join(ws) for ws in words) + "\n")
    want = manual_word_tags(model, words, 32)
    assert None in want[-1] and None not in want[0]
    for name in ("p.jsonl", "p.csv"):
        rc, out, err = cli_main(["predict", str(model), str(tmp_path / "raw.conll"), "--out", str(tmp_path / name)])
        assert rc == 0, err
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        else:
            with (tmp_path / name).open() as fh:
                rows = [{k: json.loads(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        assert [r["tokens"] for r in rows] == words
        assert [r["tags"] for r in rows] == want
        for r in rows:
            assert all((s is None) == (t is None) for s, t in zip(r["scores"], r["tags"]))
            assert all(0 < s <= 1 for s in r["scores"] if s is not None)
    untagged = sum(t is None for ts in want for t in ts)
    assert f"{untagged} word(s) lie beyond max_length=32" in caplog.text  # counted in a warning
    # predict's tags of the words it tagged, scored against their gold tags, are eval's (and the trainer's) numbers
    pred = [[t for t in ts if t is not None] for ts in want[:-1]]
    gold = [[g for t, g in zip(ts, gs) if t is not None] for ts, (_, gs) in zip(want, sents)]
    assert metrics.compute(["seqeval"], pred, gold)["seqeval"] == pytest.approx(trainer["seqeval"], abs=1e-9)


@pytest.mark.timeout(900)
def test_eval_predict_errors_exit_2(runs, tmp_path, cli_main):
    model = runs.get("over1").run_dir / "model"
    val = runs.files["imb_val"]
    tok_model = runs.get("tok-a").run_dir / "model"
    cases = [
        (["predict", str(model), str(tmp_path / "nope.csv"), "--out", str(tmp_path / "p.csv")], ["nope.csv", "does not exist"]),
        (["eval", str(model), "--data", str(tmp_path / "nope.csv")], ["nope.csv", "does not exist"]),
        (["predict", str(model), str(val), "--text-column", "sentence", "--out", str(tmp_path / "p.csv")],
         ["'sentence'", "'text'", "'label'"]),
        (["eval", str(model), "--data", str(val), "--label-column", "gold"], ["'gold'", "'text'", "'label'"]),
        (["predict", str(tmp_path), str(val)], ["neither an exported model folder"]),
        (["predict", str(tok_model), str(val), "--out", str(tmp_path / "t.csv")], ["'tokens'", "'text'", "'label'"]),
        (["eval", str(tok_model), "--data", str(runs.files["conll_val"]), "--metrics", "seqeval,bleu"], ["bleu"]),
    ]
    for args, words in cases:
        rc, out, err = cli_main(args)
        assert rc == 2, f"ftdist {' '.join(args)}: exit {rc}\n{out}{err}"
        assert "ftdist: error:" in err, err
        err = err[err.index("ftdist: error:"):]  # (in this process, transformers' progress bars come first)
        assert err.count("\n") == 1, err
        for w in words:
            assert w in err, (w, err)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "t.csv").exists()
    # the same through a real process: exit status 2, one line, no traceback
    p = runs.cli.result()[2]
    assert p.returncode == 2 and p.stderr.startswith("ftdist: error:") and "Traceback" not in p.stderr, p.stderr
    assert "missing.csv' does not exist" in p.stderr


# ------------------------------------------------------------------ parallel tokenization

@pytest.mark.timeout(300)
def test_num_proc_tokenization_is_identical(tmp_path, tok):
    f = write_imbalanced(tmp_path / "big.csv", 300, 3, long_every=7)
    conll = write_conll(tmp_path / "t.conll", token_sentences(40, 9))
    for cfg in (DataConfig(train_file=str(f), validation_split=0.1, max_length=16),
                token_cfg(conll)):
        a = data.build(cfg, tok)
        cfg.num_proc = 2
        b = data.build(cfg, tok)
        for split in ("train", "validation"):
            x, y = getattr(a, split), getattr(b, split)
            if x is None:
                assert y is None
                continue
            assert x.column_names == y.column_names
            assert x.to_dict() == y.to_dict(), split
        assert a.label_names == b.label_names and a.label_counts == b.label_counts


@pytest.mark.timeout(400)
def test_tokenization_happens_once_main_process_first(tmp_path):
    """2 processes on a CSV: rank 0 tokenizes and fills the datasets cache; rank 1 reads the cache
    (accelerate's main_process_first + datasets fingerprints), so only rank 0 ever runs the tokenizer."""
    from helpers import assert_ok, run_ftdist

    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"\"sample number {i} is {'good' if i % 2 else 'bad'}\",{i % 2}\n"
                                            for i in range(200)))
    res = run_ftdist(tmp_path, ["data.dataset=null", f"data.train_file={csv}", "data.validation_split=0.2",
                                "train.max_steps=2", "checkpoint.export=false", "log.trackers=[]"],
                     preset="cpu-2", nprocs=2, env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert_ok(res, world=2)
    lines = (res.trace_dir / "tokenized.log").read_text().split()
    ranks, rows = lines[0::2], [int(n) for n in lines[1::2]]
    assert set(ranks) == {"0"}, f"ranks that tokenized: {sorted(set(ranks))}"
    assert sum(rows) == 200  # train + validation, each row once
