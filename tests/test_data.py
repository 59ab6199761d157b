"""Data: every file format, label mapping, deterministic splits, pairs, regression, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pandas as pd
import pytest
from helpers import assert_ok, base_env, run_ftdist

from ftdist import data
from ftdist.config import DataConfig, ModelConfig
from ftdist.errors import DataError, FtdistError
from ftdist.model import load_tokenizer

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "window", "garden", "silver"]


def rows(n: int = 40) -> list[dict]:
    """n distinct lowercase texts (the MiniLM tokenizer is uncased), two string classes, uneven lengths."""
    return [{"text": " ".join(WORDS[(i + k) % 10] for k in range(1 + i % 5)) + f" {i}",
             "label": "pos" if i % 3 else "neg"} for i in range(n)]


def write(path, records: list[dict]):
    df = pd.DataFrame(records)
    ext = path.suffix
    if ext == ".csv":
        df.to_csv(path, index=False)
    elif ext == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif ext == ".json":
        df.to_json(path, orient="records")
    elif ext == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif ext == ".parquet":
        df.to_parquet(path)
    else:
        raise ValueError(ext)
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache of these throw-away files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def texts_of(ds, tok) -> list[str]:
    return [tok.decode(ids, skip_special_tokens=True) for ids in ds["input_ids"]]


# ------------------------------------------------------------------ formats

@pytest.mark.parametrize("ext", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_each_format_loads(tmp_path, tok, ext):
    recs = rows(40)
    f = write(tmp_path / f"train.{ext}", recs)
    s = data.build(DataConfig(train_file=str(f)), tok)
    assert (len(s.train), len(s.validation)) == (36, 4)
    assert s.test is None
    assert s.label_names == ["neg", "pos"]
    n_neg = sum(r["label"] == "neg" for r in recs)
    assert sum(s.label_counts.values()) == 36 and s.label_counts["neg"] <= n_neg
    assert s.dropped == {"train": 0, "validation": 0}
    assert {"idx", "input_ids", "attention_mask", "labels", "length"} <= set(s.train.column_names)
    assert s.train["idx"] == list(range(36))
    assert s.train["length"] == [len(x) for x in s.train["input_ids"]]
    # every row went somewhere exactly once, with its own label id
    by_text = {r["text"]: r["label"] for r in recs}
    got = {}
    for split in (s.train, s.validation):
        for text, label in zip(texts_of(split, tok), split["labels"], strict=True):
            assert text not in got
            got[text] = s.label_names[label]
    assert got == by_text


def test_test_split_carved(tmp_path, tok):
    f = write(tmp_path / "train.csv", rows(40))
    s = data.build(DataConfig(train_file=str(f), test_split=0.25, validation_split=0.1), tok)
    assert (len(s.train), len(s.validation), len(s.test)) == (27, 3, 10)
    all_texts = texts_of(s.train, tok) + texts_of(s.validation, tok) + texts_of(s.test, tok)
    assert sorted(all_texts) == sorted(r["text"] for r in rows(40))


def test_validation_file_used_instead_of_carving(tmp_path, tok):
    recs = rows(40)
    tr = write(tmp_path / "train.jsonl", recs[:30])
    va = write(tmp_path / "dev.csv", recs[30:])
    s = data.build(DataConfig(train_file=str(tr), validation_file=str(va)), tok)
    assert (len(s.train), len(s.validation)) == (30, 10)
    assert texts_of(s.validation, tok) == [r["text"] for r in recs[30:]]  # file order kept


# ------------------------------------------------------------------ labels

def test_string_labels_sorted_to_ids(tmp_path, tok):
    recs = [{"text": r["text"], "label": ["zebra", "apple", "mango"][i % 3]} for i, r in enumerate(rows(42))]
    f = write(tmp_path / "t.csv", recs)
    s = data.build(DataConfig(train_file=str(f), validation_split=0.0), tok)
    assert s.label_names == ["apple", "mango", "zebra"]
    want = {r["text"]: ["apple", "mango", "zebra"].index(r["label"]) for r in recs}
    assert dict(zip(texts_of(s.train, tok), s.train["labels"], strict=True)) == want
    assert s.label_counts == {"apple": 14, "mango": 14, "zebra": 14}


def test_integer_labels_sorted_numerically(tmp_path, tok):
    recs = [{"text": r["text"], "label": [10, 2, -1][i % 3]} for i, r in enumerate(rows(30))]
    f = write(tmp_path / "t.jsonl", recs)
    s = data.build(DataConfig(train_file=str(f), validation_split=0.0), tok)
    assert s.label_names == ["-1", "2", "10"]  # numeric order, not "10" < "2"
    want = {r["text"]: ["-1", "2", "10"].index(str(r["label"])) for r in recs}
    assert dict(zip(texts_of(s.train, tok), s.train["labels"], strict=True)) == want


def test_explicit_labels_fix_the_order(tmp_path, tok):
    recs = rows(40)
    f = write(tmp_path / "t.csv", recs)
    s = data.build(DataConfig(train_file=str(f), validation_split=0.0, labels=["pos", "neg"]), tok)
    assert s.label_names == ["pos", "neg"]
    want = {r["text"]: 0 if r["label"] == "pos" else 1 for r in recs}
    assert dict(zip(texts_of(s.train, tok), s.train["labels"], strict=True)) == want


def test_a_declared_class_with_no_train_example_is_an_error(tmp_path, tok):
    f = write(tmp_path / "t.csv", rows(40))
    with pytest.raises(DataError, match=r"data.labels: 'neutral' has no example in the train split, so the model could "
                                        r"never learn to predict it.*\['neg', 'pos'\]"):
        data.build(DataConfig(train_file=str(f), validation_split=0.0, labels=["neg", "neutral", "pos"]), tok)
    with pytest.raises(DataError, match=r"'poss' \(did you mean 'pos'\?\)"):
        data.build(DataConfig(train_file=str(f), validation_split=0.0, labels=["neg", "poss"]), tok)


@pytest.mark.timeout(300)
def test_label_names_reach_the_exported_model_config(tmp_path):
    recs = rows(40)
    f = write(tmp_path / "t.csv", recs)
    res = run_ftdist(tmp_path, ["data.dataset=null", f"data.train_file={f}", "data.labels=[pos, neg]",
                                "train.max_steps=2", "train.global_batch_size=8", "train.per_device_batch_size=8",
                                "log.every_steps=1", "checkpoint.resume=null"])
    assert_ok(res)
    cfg = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "pos", "1": "neg"}
    assert cfg["label2id"] == {"pos": 0, "neg": 1}
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["train_examples"] == 36
    assert list(plan["label_counts"]) == ["pos", "neg"]


# ------------------------------------------------------------------ splits

def _split_rows(s, tok):
    return {split: sorted(texts_of(getattr(s, split), tok)) for split in ("train", "validation", "test")
            if getattr(s, split) is not None}


def test_split_is_deterministic(tmp_path, tok):
    f = write(tmp_path / "t.csv", rows(40))
    cfg = DataConfig(train_file=str(f), validation_split=0.2, test_split=0.1, split_seed=7)
    a, b = data.build(cfg, tok), data.build(cfg, tok)
    for split in ("train", "validation", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert x["idx"] == y["idx"]
        assert x["input_ids"] == y["input_ids"]  # same rows in the same order
        assert x["labels"] == y["labels"]
    c = data.build(DataConfig(train_file=str(f), validation_split=0.2, test_split=0.1, split_seed=8), tok)
    assert _split_rows(c, tok)["validation"] != _split_rows(a, tok)["validation"]
    assert _split_rows(c, tok)["test"] != _split_rows(a, tok)["test"]
    assert sorted(sum(_split_rows(c, tok).values(), [])) == sorted(sum(_split_rows(a, tok).values(), []))


def test_split_does_not_depend_on_file_format(tmp_path, tok):
    """Carving is a function of the rows and the seed only: the same rows as csv or parquet split alike."""
    recs = rows(40)
    f1, f2 = write(tmp_path / "a.csv", recs), write(tmp_path / "b.parquet", recs)
    a = data.build(DataConfig(train_file=str(f1), validation_split=0.25), tok)
    b = data.build(DataConfig(train_file=str(f2), validation_split=0.25), tok)
    assert _split_rows(a, tok) == _split_rows(b, tok)


# ------------------------------------------------------------------ pairs and regression

def test_sentence_pair_column(tmp_path, tok):
    recs = [{"premise": r["text"], "hypothesis": f"claim {i}", "label": r["label"]} for i, r in enumerate(rows(40))]
    f = write(tmp_path / "pairs.jsonl", recs)
    s = data.build(DataConfig(train_file=str(f), text_column="premise", text_pair_column="hypothesis",
                              validation_split=0.0), tok)
    assert len(s.train) == 40
    by_premise = {r["premise"]: r for r in recs}
    for ids, types_ in zip(s.train["input_ids"], s.train["token_type_ids"], strict=True):
        text = tok.decode(ids)
        assert text.startswith("[CLS] ") and text.count("[SEP]") == 2
        first, second = [t.strip() for t in text[len("[CLS] "):].split("[SEP]")[:2]]
        assert by_premise[first]["hypothesis"] == second
        # segment ids: 0 for [CLS] first [SEP], 1 for second [SEP]
        n_first = ids.index(tok.sep_token_id) + 1
        assert types_ == [0] * n_first + [1] * (len(ids) - n_first)


def test_missing_pair_column_is_named(tmp_path, tok):
    f = write(tmp_path / "t.csv", rows(40))
    with pytest.raises(DataError, match=r"data.text_pair_column: column 'hypothesis' is not in the train split"):
        data.build(DataConfig(train_file=str(f), text_pair_column="hypothesis"), tok)


def test_regression_floats(tmp_path, tok):
    recs = [{"text": r["text"], "score": round(i * 0.25 - 3.0, 2)} for i, r in enumerate(rows(40))]
    f = write(tmp_path / "reg.csv", recs)
    s = data.build(DataConfig(train_file=str(f), task="regression", label_column="score", validation_split=0.0), tok)
    assert s.label_names is None and s.label_counts == {}
    want = {r["text"]: r["score"] for r in recs}
    got = dict(zip(texts_of(s.train, tok), s.train["labels"], strict=True))
    assert got == pytest.approx(want)
    assert all(isinstance(v, float) for v in s.train["labels"])


def test_regression_non_numeric_label_fails(tmp_path, tok):
    recs = [{"text": r["text"], "score": "high" if i == 5 else str(i)} for i, r in enumerate(rows(40))]
    f = write(tmp_path / "reg.csv", recs)
    with pytest.raises(DataError, match=r"train split: 1 bad row\(s\) \(non-numeric label\), first at row 5"):
        data.build(DataConfig(train_file=str(f), task="regression", label_column="score", validation_split=0.0,
                              bad_rows="fail"), tok)


# ------------------------------------------------------------------ bad input

def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match=r"data.train_file: file '.*nope\.csv' does not exist"):
        data.build(DataConfig(train_file=str(tmp_path / "nope.csv")), tok)
    f = write(tmp_path / "t.csv", rows(40))
    with pytest.raises(DataError, match=r"data.validation_file: file '.*dev\.csv' does not exist"):
        data.build(DataConfig(train_file=str(f), validation_file=str(tmp_path / "dev.csv")), tok)


def test_unsupported_extension(tmp_path, tok):
    f = tmp_path / "t.xlsx"
    f.write_text("x")
    with pytest.raises(DataError, match=r"unsupported extension '\.xlsx'; use one of .*\.csv"):
        data.build(DataConfig(train_file=str(f)), tok)


def test_unknown_column_with_did_you_mean(tmp_path, tok):
    f = write(tmp_path / "t.csv", rows(40))
    with pytest.raises(DataError) as e:
        data.build(DataConfig(train_file=str(f), text_column="txt"), tok)
    msg = str(e.value)
    assert "data.text_column: column 'txt' is not in the train split (did you mean 'text'?)" in msg
    assert "['text', 'label']" in msg and "Set data.text_column=<name>" in msg
    with pytest.raises(DataError, match=r"data.label_column: column 'labels' is not in the train split \(did you mean 'label'\?\)"):
        data.build(DataConfig(train_file=str(f), label_column="labels"), tok)


def test_single_class_label_column(tmp_path, tok):
    recs = [{"text": r["text"], "label": "pos"} for r in rows(40)]
    f = write(tmp_path / "t.csv", recs)
    with pytest.raises(DataError) as e:
        data.build(DataConfig(train_file=str(f)), tok)
    assert "column 'label' of the train split has 1 class(es) ['pos']; classification needs at least two" in str(e.value)


def test_header_only_file(tmp_path, tok):
    f = tmp_path / "t.csv"
    f.write_text("text,label\n")
    with pytest.raises(DataError, match=r"data.train_file: '.*t\.csv' has no data rows"):
        data.build(DataConfig(train_file=str(f)), tok)
    good = write(tmp_path / "good.csv", rows(40))
    with pytest.raises(DataError, match=r"data.validation_file: '.*t\.csv' has no data rows"):
        data.build(DataConfig(train_file=str(good), validation_file=str(f)), tok)


def test_split_fraction_leaving_nothing(tmp_path, tok):
    f = write(tmp_path / "t.csv", rows(5))
    with pytest.raises(DataError, match=r"data.validation_split: 0.05 of 5 training rows leaves an empty split"):
        data.build(DataConfig(train_file=str(f), validation_split=0.05), tok)


def _dirty(n=40):
    recs = rows(n)
    recs[3]["text"] = ""
    recs[11]["text"] = "   "
    recs[20]["label"] = "maybe"
    return recs


def test_bad_rows_fail(tmp_path, tok):
    f = write(tmp_path / "t.csv", _dirty())
    with pytest.raises(DataError) as e:
        data.build(DataConfig(train_file=str(f), labels=["neg", "pos"], bad_rows="fail", validation_split=0.0), tok)
    msg = str(e.value)
    assert "train split: 3 bad row(s) (empty text, unknown label), first at row 3" in msg
    assert "data.bad_rows=drop" in msg


def test_bad_rows_drop_counts(tmp_path, tok):
    recs = _dirty()
    f = write(tmp_path / "t.csv", recs)
    s = data.build(DataConfig(train_file=str(f), labels=["neg", "pos"], bad_rows="drop", validation_split=0.0), tok)
    assert s.dropped == {"train": 3}
    assert len(s.train) == 37
    assert s.train["idx"] == list(range(37))
    kept = set(texts_of(s.train, tok))
    assert kept == {r["text"] for i, r in enumerate(recs) if i not in (3, 11, 20)}


def test_bad_rows_drop_counts_per_split(tmp_path, tok):
    f = write(tmp_path / "t.csv", _dirty())
    s = data.build(DataConfig(train_file=str(f), labels=["neg", "pos"], validation_split=0.5), tok)
    assert sum(s.dropped.values()) == 3 and set(s.dropped) == {"train", "validation"}
    assert len(s.train) + len(s.validation) == 37
    assert len(s.train) == 20 - s.dropped["train"]


def test_unknown_validation_label_without_explicit_labels(tmp_path, tok):
    """Labels come from train; a validation label never seen in train is a bad row."""
    recs = rows(40)
    tr = write(tmp_path / "train.csv", recs[:30])
    dev = recs[30:]
    dev[0] = {"text": "brand new", "label": "other"}
    va = write(tmp_path / "dev.csv", dev)
    with pytest.raises(DataError, match=r"validation split: 1 bad row\(s\) \(unknown label\), first at row 0"):
        data.build(DataConfig(train_file=str(tr), validation_file=str(va), bad_rows="fail"), tok)
    s = data.build(DataConfig(train_file=str(tr), validation_file=str(va), bad_rows="drop"), tok)
    assert s.dropped == {"train": 0, "validation": 1} and len(s.validation) == 9


def test_data_errors_are_ftdist_errors():
    assert issubclass(DataError, FtdistError) and DataError.exit_code == 2


# ------------------------------------------------------------------ model source errors through the CLI

@pytest.mark.parametrize("name, expected", [
    ("./no-such-model", "model.name_or_path: './no-such-model' is not a model folder (no config.json there)"),
    ("some-org/some-model", "model.name_or_path: could not load 'some-org/some-model'"),
], ids=["missing-folder", "hub-id-offline"])
def test_missing_model_exits_2(tmp_path, name, expected):
    res = run_ftdist(tmp_path, [f"model.name_or_path={name}", "model.init=pretrained", "model.config_overrides={}"],
                     timeout=120)
    assert res.rc == 2, res.log[-3000:]
    assert "Traceback" not in res.log
    assert f"ftdist: error: {expected}" in res.log
    if "/" in name and not name.startswith("."):
        assert "needs network access" in res.log
    assert not (res.run_dir / "final_metrics.json").exists()
    assert not (res.run_dir / "model").exists()


# ------------------------------------------------------------------ issue #15: labels, encodings, delimiters, max_length

def test_label_typo_in_data_labels_is_named_with_a_hint(tmp_path, tok):
    """A class in data.labels with no train example while the data has a label data.labels lacks: a typo that
    would drop every row of the real class as 'unknown label'. An error, before anything is dropped."""
    recs = [{"text": r["text"], "label": "positive" if r["label"] == "pos" else "negative"} for r in rows(40)]
    f = write(tmp_path / "t.csv", recs)
    for bad_rows in ("drop", "fail"):
        with pytest.raises(DataError) as e:
            data.build(DataConfig(train_file=str(f), labels=["positive", "negatve"], bad_rows=bad_rows), tok)
        msg = str(e.value)
        assert msg.startswith("data.labels: ") and "'negatve'" in msg, msg
        assert "(did you mean 'negative'?)" in msg, msg
        assert "no example in the train split" in msg, msg


@pytest.mark.parametrize("labels", [[0.25, 3.7], ["0.5", "1.5"]], ids=["floats", "float-strings"])
def test_fractional_labels_under_classification_hint_regression(tmp_path, tok, labels):
    recs = [{"text": r["text"], "label": labels[i % 2]} for i, r in enumerate(rows(40))]
    f = write(tmp_path / "t.jsonl", recs)
    with pytest.raises(DataError) as e:
        data.build(DataConfig(train_file=str(f)), tok)
    msg = str(e.value)
    assert msg.startswith("data.label_column: ") and "data.task=regression" in msg, msg
    assert str(labels[0]) in msg, msg
    # whole numbers are class ids, and regression takes the same file
    s = data.build(DataConfig(train_file=str(f), task="regression", validation_split=0.0), tok)
    assert len(s.train) == 40


def test_non_utf8_file_is_named_with_the_fix(tmp_path, tok):
    f = tmp_path / "latin1.csv"
    f.write_bytes("text,label\ngood day,pos\ncaf\u00e9 au lait,neg\n".encode("latin-1"))
    for key, cfg in (("data.train_file", DataConfig(train_file=str(f))),
                     ("data.validation_file", DataConfig(train_file=str(write(tmp_path / "ok.csv", rows(40))),
                                                         validation_file=str(f)))):
        with pytest.raises(DataError) as e:
            data.build(cfg, tok)
        msg = str(e.value)
        assert msg.startswith(f"{key}: '{f}' is not UTF-8"), msg
        assert "line 3" in msg and "0xe9" in msg and "re-save" in msg.lower(), msg
    conll = tmp_path / "t.conll"
    conll.write_bytes("Caf\u00e9 B-LOC\nau O\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"data.train_file: '.*t\.conll' is not UTF-8 .*line 1"):
        data.build(DataConfig(train_file=str(conll), task="token-classification", text_column="tokens",
                              label_column="tags"), tok)
    utf16 = tmp_path / "excel.csv"
    utf16.write_bytes("text,label\ngood day,pos\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"data.train_file: '.*excel\.csv' is not UTF-8 .*UTF-16"):
        data.build(DataConfig(train_file=str(utf16)), tok)


def test_tsv_saved_as_csv_gets_a_delimiter_hint(tmp_path, tok):
    f = tmp_path / "t.csv"
    pd.DataFrame(rows(40)).to_csv(f, sep="\t", index=False)
    with pytest.raises(DataError) as e:
        data.build(DataConfig(train_file=str(f)), tok)
    msg = str(e.value)
    assert msg.startswith(f"data.train_file: '{f}' ") and "tab" in msg and ".tsv" in msg, msg
    assert "\n" not in msg


def test_one_reader_for_train_eval_and_predict():
    """`ftdist eval`/`predict` read files through data.read_file, the training reader with its checks."""
    import inspect

    from ftdist import predict

    src = inspect.getsource(predict)
    assert "load_dataset" not in src and "read_conll" not in src and "def _read(" not in src
    assert "data.read_file(" in src


def test_cross_key_and_per_key_errors_are_reported_together():
    from ftdist import config
    from ftdist.errors import RecipeError


    with pytest.raises(RecipeError) as e:
        config.from_dict({"data": {"dataset": "vader", "train_file": "x.csv", "max_length": "long"}})
    msg = str(e.value)
    assert msg.startswith("recipe has 2 problems:"), msg
    assert "data.max_length: expected an integer, got 'long'" in msg
    assert "data.dataset and data.train_file are both set" in msg
    # a rule reading a key that failed its own check is not reported: the key's default stands in for it
    with pytest.raises(RecipeError) as e:
        config.from_dict({"data": {"dataset": "vader"}}, ["train.global_batch_size=big", "train.per_device_batch_size=64",
                                                          "unfreeze.schedule=gradul", "unfreeze.on_plateau=true",
                                                          "eval.every_steps=5"])
    msg = str(e.value)
    assert msg.startswith("recipe has 2 problems:"), msg
    assert "train.global_batch_size: expected an integer" in msg and "unfreeze.schedule: 'gradul'" in msg


@pytest.mark.timeout(300)
def test_max_length_beyond_the_model_positions_fails_before_training(tmp_path):
    res = run_ftdist(tmp_path, ["data.max_length=1024", "train.max_steps=2"], timeout=240)
    assert res.rc == 2, res.log[-3000:]
    assert "Traceback" not in res.log
    line = res.log[res.log.index("ftdist: error:"):].strip()
    assert line.count("\n") == 0, line
    for words in ("data.max_length: 1024", "512", "max_position_embeddings", "data.max_length=512"):
        assert words in line, (words, line)
    assert not res.trace(0) and not (res.run_dir / "checkpoints").exists()
    # the dry run (`ftdist plan`, as `./launch --dry-run`) says the same
    p = subprocess.run([sys.executable, "-m", "ftdist", "plan", "tiny", "data.max_length=1024", "--config", "cpu",
                        f"log.output_dir={tmp_path / 'plan'}"], cwd=tmp_path, env=base_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "data.max_length: 1024" in p.stderr and "data.max_length=512" in p.stderr, p.stderr


def test_max_length_from_the_data_is_the_99th_percentile(tmp_path, tok):
    """data.max_length: null truncates at the 99th percentile of the train rows' token lengths, rounded up to 8
    (here 200 rows: 198 short ones and 2 very long, which the percentile ignores), at most the model's limit."""
    records = [{"text": "good " * (1 + i % 20), "label": "a" if i % 2 else "b"} for i in range(198)]
    records += [{"text": "word " * 600, "label": "a"}] * 2
    cfg = DataConfig(train_file=str(write(tmp_path / "t.csv", records)), max_length=None, validation_split=0.0)
    s = data.build(cfg, tok, limit=512)
    assert s.max_length == 24  # 20 words + [CLS] + [SEP] = 22 tokens, rounded up to 24
    assert max(s.train["length"]) == 24
    assert data.build(cfg, tok, limit=16).max_length == 16
