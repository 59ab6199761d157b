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


def _read(file: str) -> list[dict]:
    from ftdist.data import FORMATS

    p = Path(file)
    if not p.is_file():
        raise FtdistError(f"{file!r} does not exist")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt not in ("csv", "json", "parquet"):
        raise FtdistError(f"{file!r}: use a csv, tsv, json, jsonl or parquet file")
    import datasets

    kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
    return datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)


def _trained_with(model: str, key: str, given, fallback):
    """A data setting the model was trained with (its recipe.yaml: max_length, text/pair/label columns),
    unless one is given: scoring differently gives other numbers than the trainer reported."""
    if given is not None:
        return given
    f = Path(model) / "recipe.yaml"
    if f.is_file():
        import yaml

        try:
            value = ((yaml.safe_load(f.read_text()) or {}).get("data") or {}).get(key)
        except yaml.YAMLError:
            value = None
        if value not in (None, ""):
            return value
    return fallback


def _max_length(model: str, given: int | None) -> int:
    value = _trained_with(model, "max_length", given, 256)
    return value if isinstance(value, int) and value > 0 else 256


def _sequence_level(net, model: str) -> None:
    if "TokenClassification" in type(net).__name__:
        raise FtdistError(f"{model!r} is a token-classification model; `ftdist eval` and `ftdist predict` score "
                          "sequence-level models (classification, regression) only")


def _batches(net, tok, texts, pairs, batch_size, max_length, device):
    net.to(device).eval()
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None, truncation=True,
                  max_length=max_length, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            yield net(**enc).logits.float().cpu()


def predict(model: str, file: str, out: str, text_column: str | None = None, text_pair_column: str | None = None,
            batch_size: int = 64, max_length: int | None = None) -> Path:
    text_column = _trained_with(model, "text_column", text_column, "text")
    text_pair_column = _trained_with(model, "text_pair_column", text_pair_column, None)
    net, tok = load_model(model)
    _sequence_level(net, model)
    max_length = _max_length(model, max_length)
    ds = _read(file)
    if text_column not in ds.column_names:
        raise FtdistError(f"--text-column: {text_column!r} is not a column of {file!r}; columns: {ds.column_names}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = [str(t) for t in ds[text_column]]
    pairs = [str(t) for t in ds[text_pair_column]] if text_pair_column else None
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    rows = []
    regression = net.config.problem_type == "regression" or net.config.num_labels == 1
    for logits in _batches(net, tok, texts, pairs, batch_size, max_length, device):
        if regression:
            rows += [{"prediction": float(v)} for v in logits.squeeze(-1)]
            continue
        probs = logits.softmax(-1)
        for row in probs:
            top = int(row.argmax())
            rows.append({"label": id2label.get(top, str(top)), "score": float(row[top]),
                         **{f"p_{id2label.get(j, str(j))}": float(v) for j, v in enumerate(row)}})
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    for text, row in zip(texts, rows):
        row["text"] = text
    if out_p.suffix.lower() == ".jsonl":
        out_p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with out_p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", *[k for k in rows[0] if k != "text"]] if rows else ["text"])
            w.writeheader()
            w.writerows(rows)
    return out_p


def evaluate(model: str, file: str, label_column: str | None = None, text_column: str | None = None,
             text_pair_column: str | None = None, metrics_names=("accuracy", "f1"), batch_size: int = 64,
             max_length: int | None = None) -> dict:
    from ftdist import metrics

    label_column = _trained_with(model, "label_column", label_column, "label")
    text_column = _trained_with(model, "text_column", text_column, "text")
    text_pair_column = _trained_with(model, "text_pair_column", text_pair_column, None)

    net, tok = load_model(model)
    _sequence_level(net, model)
    max_length = _max_length(model, max_length)
    ds = _read(file)
    for col in (text_column, label_column):
        if col not in ds.column_names:
            raise FtdistError(f"column {col!r} is not in {file!r}; columns: {ds.column_names}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = [str(t) for t in ds[text_column]]
    pairs = [str(t) for t in ds[text_pair_column]] if text_pair_column else None
    logits = torch.cat(list(_batches(net, tok, texts, pairs, batch_size, max_length, device)))
    if net.config.problem_type == "regression" or net.config.num_labels == 1:
        out = metrics.compute(list(metrics_names), logits.squeeze(-1).tolist(), [float(v) for v in ds[label_column]])
        out["n_examples"] = len(texts)
        return out
    label2id = {str(k): int(v) for k, v in (net.config.label2id or {}).items()}
    refs = []
    for v in ds[label_column]:
        key = str(v)
        if key not in label2id:
            raise FtdistError(f"label {key!r} in {file!r} is not one the model knows ({sorted(label2id)})")
        refs.append(label2id[key])
    out = metrics.compute(list(metrics_names), logits.argmax(-1).tolist(), refs)
    out["n_examples"] = len(refs)
    return out
