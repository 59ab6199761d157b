"""`ftdist eval` and `ftdist predict`: score or apply a trained model, batched, on the devices available."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ftdist.errors import FtdistError


def load_model(path: str):
    """An exported model folder (config.json + safetensors), or a training checkpoint (recipe.yaml + model.safetensors)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    p = Path(path)
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        arch = (cfg.get("architectures") or [""])[0]
        auto = AutoModelForTokenClassification if "TokenClassification" in arch else AutoModelForSequenceClassification
        return auto.from_pretrained(p), AutoTokenizer.from_pretrained(p)
    if (p / "recipe.yaml").is_file() and (p / "model.safetensors").is_file():
        from safetensors.torch import load_file

        from ftdist import config
        from ftdist import model as modellib

        recipe = config.load(str(p / "recipe.yaml"))
        state = load_file(str(p / "model.safetensors"))
        tok = modellib.load_tokenizer(recipe.model)
        n = next(v.shape[0] for k, v in state.items() if k.endswith("classifier.weight"))
        labels = recipe.data.labels or [str(i) for i in range(n)]
        net = modellib.build(recipe.model, recipe.data.task, None if recipe.data.task == "regression" else labels)
        net.load_state_dict(state, strict=False)
        return net, tok
    raise FtdistError(f"{path!r} is neither an exported model folder (config.json) nor a checkpoint folder "
                      "(recipe.yaml + model.safetensors); give <run>/model, <run>/best or <run>/checkpoints/step-N")


def _read(file: str, conll: tuple[str, str] | None = None, with_tags: bool = True):
    """A csv/tsv/json/jsonl/parquet file, or for a token model (conll = its token and tag columns) CoNLL too."""
    from ftdist import data

    p = Path(file)
    if not p.is_file():
        raise FtdistError(f"{file!r} does not exist")
    fmt = data.FORMATS.get(p.suffix.lower())
    if fmt == "conll" and conll:
        return data.read_conll(str(p), *conll, with_tags=with_tags)
    if fmt not in ("csv", "json", "parquet"):
        raise FtdistError(f"{file!r}: use a csv, tsv, json, jsonl or parquet file"
                          + (" (or CoNLL: .conll/.txt)" if conll else ""))
    import datasets

    kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
    return datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)


def _trained_with(model: str, key: str, given, fallback, section: str = "data"):
    """A setting the model was trained with (its recipe.yaml: max_length, text/pair/label columns, the
    metrics), unless one is given: scoring differently gives other numbers than the trainer reported."""
    if given is not None:
        return given
    f = Path(model) / "recipe.yaml"
    if f.is_file():
        import yaml

        try:
            value = ((yaml.safe_load(f.read_text()) or {}).get(section) or {}).get(key)
        except yaml.YAMLError:
            value = None
        if value not in (None, ""):
            return value
    return fallback


def _max_length(model: str, given: int | None) -> int:
    value = _trained_with(model, "max_length", given, 256)
    return value if isinstance(value, int) and value > 0 else 256


def _is_token_model(net) -> bool:
    return "TokenClassification" in type(net).__name__


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _token_probs(net, tok, sentences, batch_size, max_length):
    """(word id of each position, class probabilities of each position) per sentence of words."""
    device = _device()
    net.to(device).eval()
    for i in range(0, len(sentences), batch_size):
        chunk = [list(map(str, words)) for words in sentences[i:i + batch_size]]
        enc = tok(chunk, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt")
        word_ids = [enc.word_ids(j) for j in range(len(chunk))]
        with torch.no_grad():
            probs = net(**enc.to(device)).logits.float().softmax(-1).cpu()
        yield from zip(word_ids, probs)


def _token_columns(model: str, text_column: str | None, label_column: str | None = None):
    return (_trained_with(model, "text_column", text_column, "tokens"),
            _trained_with(model, "label_column", label_column, "tags"))


def _batches(net, tok, texts, pairs, batch_size, max_length):
    device = _device()
    net.to(device).eval()
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None, truncation=True,
                  max_length=max_length, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            yield net(**enc).logits.float().cpu()


def predict(model: str, file: str, out: str, text_column: str | None = None, text_pair_column: str | None = None,
            batch_size: int = 64, max_length: int | None = None) -> Path:
    net, tok = load_model(model)
    max_length = _max_length(model, max_length)
    if _is_token_model(net):
        return _predict_tokens(net, tok, model, file, out, text_column, batch_size, max_length)
    text_column = _trained_with(model, "text_column", text_column, "text")
    text_pair_column = _trained_with(model, "text_pair_column", text_pair_column, None)
    ds = _read(file)
    if text_column not in ds.column_names:
        raise FtdistError(f"--text-column: {text_column!r} is not a column of {file!r}; columns: {ds.column_names}")
    texts = [str(t) for t in ds[text_column][:]]  # [:] reads the column at once (iterating goes row by row)
    pairs = [str(t) for t in ds[text_pair_column][:]] if text_pair_column else None
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    rows = []
    regression = net.config.problem_type == "regression" or net.config.num_labels == 1
    for logits in _batches(net, tok, texts, pairs, batch_size, max_length):
        if regression:
            rows += [{"prediction": float(v)} for v in logits.squeeze(-1)]
            continue
        probs = logits.softmax(-1)
        for row in probs:
            top = int(row.argmax())
            rows.append({"label": id2label.get(top, str(top)), "score": float(row[top]),
                         **{f"p_{id2label.get(j, str(j))}": float(v) for j, v in enumerate(row)}})
    for text, row in zip(texts, rows):
        row["text"] = text
    return _write(out, rows, first="text")


def _predict_tokens(net, tok, model, file, out, text_column, batch_size, max_length) -> Path:
    """One row per sentence: its words, the tag of each word (from its first subword) and that tag's
    probability. Words past max_length get no tag (null) and are counted in a warning."""
    import logging

    from ftdist import data

    text_column, label_column = _token_columns(model, text_column)
    ds = _read(file, (text_column, label_column), with_tags=False)
    if text_column not in ds.column_names:
        raise FtdistError(f"--text-column: {text_column!r} is not a column of {file!r}; columns: {ds.column_names}")
    sentences = ds[text_column][:]
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    rows, untagged = [], 0
    for words, (word_ids, probs) in zip(sentences, _token_probs(net, tok, sentences, batch_size, max_length)):
        # each word's first subword: the trainer's own alignment (data.align_labels), labelled by word index
        first = {w: pos for pos, w in enumerate(data.align_labels(word_ids, range(len(words)), False)) if w != -100}
        tags, scores = [], []
        for w in range(len(words)):
            if w in first:
                row = probs[first[w]]
                top = int(row.argmax())
                tags.append(id2label.get(top, str(top)))
                scores.append(float(row[top]))
            else:
                tags.append(None)
                scores.append(None)
                untagged += 1
        rows.append({"tokens": [str(x) for x in words], "tags": tags, "scores": scores})
    if untagged:
        logging.getLogger("ftdist").warning("%d word(s) lie beyond max_length=%d subword tokens and have no tag "
                                            "(null); split long sentences to tag them", untagged, max_length)
    return _write(out, rows, first="tokens")


def _write(out: str, rows: list[dict], first: str) -> Path:
    """JSONL, or CSV (list values as JSON arrays in their cell)."""
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    if out_p.suffix.lower() == ".jsonl":
        out_p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with out_p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[first, *[k for k in rows[0] if k != first]] if rows else [first])
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    return out_p


def _metric_names(model: str, net, given) -> list[str]:
    """The metrics asked for, else those the model was trained with, else the task's usual ones."""
    if given:
        return list(given)
    if _is_token_model(net):
        default = ["seqeval"]
    elif net.config.problem_type == "regression" or net.config.num_labels == 1:
        default = ["pearson", "spearman"]
    else:
        default = ["accuracy", "f1"]
    names = _trained_with(model, "metrics", None, default, section="eval")
    return list(names) if isinstance(names, list) else default


def evaluate(model: str, file: str, label_column: str | None = None, text_column: str | None = None,
             text_pair_column: str | None = None, metrics_names=None, batch_size: int = 64,
             max_length: int | None = None) -> dict:
    from ftdist import metrics

    net, tok = load_model(model)
    max_length = _max_length(model, max_length)
    names = _metric_names(model, net, metrics_names)
    if _is_token_model(net):
        return _evaluate_tokens(net, tok, model, file, label_column, text_column, names, batch_size, max_length)
    label_column = _trained_with(model, "label_column", label_column, "label")
    text_column = _trained_with(model, "text_column", text_column, "text")
    text_pair_column = _trained_with(model, "text_pair_column", text_pair_column, None)
    ds = _read(file)
    for col in (text_column, label_column):
        if col not in ds.column_names:
            raise FtdistError(f"column {col!r} is not in {file!r}; columns: {ds.column_names}")
    texts = [str(t) for t in ds[text_column][:]]  # [:] reads the column at once (iterating goes row by row)
    pairs = [str(t) for t in ds[text_pair_column][:]] if text_pair_column else None
    logits = torch.cat(list(_batches(net, tok, texts, pairs, batch_size, max_length)))
    if net.config.problem_type == "regression" or net.config.num_labels == 1:
        out = metrics.compute(names, logits.squeeze(-1).tolist(), [float(v) for v in ds[label_column][:]])
        out["n_examples"] = len(texts)
        return out
    label2id = {str(k): int(v) for k, v in (net.config.label2id or {}).items()}
    refs = []
    for v in ds[label_column][:]:
        key = str(v)
        if key not in label2id:
            raise FtdistError(f"label {key!r} in {file!r} is not one the model knows ({sorted(label2id)})")
        refs.append(label2id[key])
    out = metrics.compute(names, logits.argmax(-1).tolist(), refs)
    out["n_examples"] = len(refs)
    return out


def _evaluate_tokens(net, tok, model, file, label_column, text_column, names, batch_size, max_length) -> dict:
    """Scores the positions the trainer scores (data.align_labels with the recipe's label_all_subwords: the first
    subword of each word within max_length, or every subword), so the numbers equal the trainer's."""
    from ftdist import data, metrics

    text_column, label_column = _token_columns(model, text_column, label_column)
    all_subwords = bool(_trained_with(model, "label_all_subwords", None, False))
    ds = _read(file, (text_column, label_column))
    for col in (text_column, label_column):
        if col not in ds.column_names:
            raise FtdistError(f"column {col!r} is not in {file!r}; columns: {ds.column_names}")
    sentences, gold = ds[text_column][:], ds[label_column][:]
    known = set((net.config.label2id or {}).keys())
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    preds, refs = [], []
    for tags, (word_ids, probs) in zip(gold, _token_probs(net, tok, sentences, batch_size, max_length)):
        bad = [t for t in tags if str(t) not in known]
        if bad:
            raise FtdistError(f"tag {str(bad[0])!r} in {file!r} is not one the model knows ({sorted(known)})")
        top = probs.argmax(-1).tolist()
        # word index at each scored position, -100 elsewhere (the trainer's own alignment)
        words_at = data.align_labels(word_ids, list(range(len(tags))), all_subwords)
        scored = [(pos, w) for pos, w in enumerate(words_at) if w != -100]
        preds.append([id2label.get(top[pos], str(top[pos])) for pos, _ in scored])
        refs.append([str(tags[w]) for _, w in scored])
    out = metrics.compute(names, preds, refs)
    out["n_examples"] = len(refs)
    return out
