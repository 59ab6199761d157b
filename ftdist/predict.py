"""`ftdist eval` and `ftdist predict`: score or apply a trained model, batched, on the devices available."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import torch

from ftdist import data, imagepredict
from ftdist import model as modellib
from ftdist.errors import FtdistError

REMOTE_CODE_FIX = ("ftdist runs a model's own code only when told: pass --trust-remote-code, and only for a model "
                   "whose code you have read and trust")


def load_model(path: str, trust_remote_code: bool = False):
    """An exported model folder (config.json + safetensors), or a training checkpoint (recipe.yaml + model.safetensors).
    trust_remote_code is passed to every loader, so transformers never asks on stdin."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    p = Path(path)
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        arch = (cfg.get("architectures") or [""])[0]
        if "ImageClassification" in arch:  # with the image processor the export saved beside it
            return (_from_pretrained(transformers.AutoModelForImageClassification, p, trust_remote_code),
                    _from_pretrained(transformers.AutoImageProcessor, p, trust_remote_code, modellib.pil_backend()))
        auto = AutoModelForTokenClassification if "TokenClassification" in arch else AutoModelForSequenceClassification
        return _from_pretrained(auto, p, trust_remote_code), _from_pretrained(AutoTokenizer, p, trust_remote_code)
    if (p / "recipe.yaml").is_file() and (p / "model.safetensors").is_file():
        import dataclasses

        from safetensors.torch import load_file

        from ftdist import config
        recipe = config.load(str(p / "recipe.yaml"))
        if recipe.model.trust_remote_code and not trust_remote_code:
            raise FtdistError(f"{path!r} was trained with model.trust_remote_code=true: its model runs its own code. "
                              + REMOTE_CODE_FIX)
        model_cfg = dataclasses.replace(recipe.model, trust_remote_code=trust_remote_code)
        state = load_file(str(p / "model.safetensors"))
        tok = modellib.load_processor(model_cfg, recipe.data.task)
        # the head's weight: classifier.weight, or ResNet's classifier.1.weight
        n = next(v.shape[0] for k, v in state.items() if re.search(r"classifier(\.\d+)?\.weight$", k))
        labels = None if recipe.data.task == "regression" else _checkpoint_labels(p, recipe.data.labels, n)
        net = modellib.build(model_cfg, recipe.data.task, labels)
        net.load_state_dict(state, strict=False)
        return net, tok
    raise FtdistError(f"{path!r} is neither an exported model folder (config.json) nor a checkpoint folder "
                      "(recipe.yaml + model.safetensors); give <run>/model, <run>/best or <run>/checkpoints/step-N")


def _from_pretrained(cls, path: Path, trust_remote_code: bool, extra: dict | None = None):
    try:
        return cls.from_pretrained(path, trust_remote_code=trust_remote_code, **(extra or {}))
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):  # transformers' words for a config.json whose auto_map names code
            raise FtdistError(f"{str(path)!r} holds its own model code (auto_map in its config.json). "
                              + REMOTE_CODE_FIX) from None
        raise FtdistError(f"{str(path)!r}: could not load the model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); give a folder written by ftdist "
                          "(<run>/model) or by save_pretrained") from None


def _checkpoint_labels(ckpt: Path, declared: list | None, n: int) -> list[str]:
    """The label names, in id order, the checkpoint's run trained with: data.labels, else what its run folder
    recorded (ftdist_state.json, then plan.json's label_counts, then the exported model's id2label)."""
    if declared:
        return [str(x) for x in declared]
    for names in _recorded_labels(ckpt):
        if isinstance(names, list) and len(names) == n:
            return [str(x) for x in names]
    import logging

    logging.getLogger("ftdist").warning("%s: the names of its %d classes were not found (no plan.json or exported "
                                        "model in its run folder); classes are named by id 0..%d", ckpt, n, n - 1)
    return [str(i) for i in range(n)]


def _recorded_labels(ckpt: Path):
    def read(f: Path) -> dict:
        try:
            value = json.loads(f.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    yield read(ckpt / "ftdist_state.json").get("label_names")
    if ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
        yield list(read(run / "plan.json").get("label_counts") or {})  # classification, in id order
        id2label = read(run / "model" / "config.json").get("id2label") or {}
        yield [id2label[k] for k in sorted(id2label, key=int)] if all(k.isdigit() for k in id2label) else None


def check_out(out: str, model: str, file: str, overwrite: bool) -> None:
    """ftdist never overwrites a file it did not write: --out may not be the input file, a file of the model
    folder or a folder, and an existing file is replaced only with --overwrite."""
    o = Path(out).resolve()
    if o.is_dir():
        raise FtdistError(f"--out: {out!r} is a folder; give a file name ending in .csv or .jsonl")
    if o == Path(file).resolve():
        raise FtdistError(f"--out: {out!r} is the input file; predictions go to a new file (e.g. --out predictions.csv)")
    if o.exists() and Path(model).resolve() in o.parents:
        raise FtdistError(f"--out: {out!r} is a file of the model folder {model!r}; write predictions elsewhere")
    if o.exists() and not overwrite:
        raise FtdistError(f"--out: {out!r} already exists and ftdist does not replace a file it may not have written; "
                          "give another --out, or --overwrite to replace it")


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


def _token_logits(net, tok, sentences, batch_size, max_length):
    """(word id of each position, class logits of each position) per sentence of words."""
    device = _device()
    net.to(device).eval()
    for i in range(0, len(sentences), batch_size):
        chunk = [list(map(str, words)) for words in sentences[i:i + batch_size]]
        enc = tok(chunk, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt")
        word_ids = [enc.word_ids(j) for j in range(len(chunk))]
        with torch.no_grad():
            logits = net(**enc.to(device)).logits.float().cpu()
        yield from zip(word_ids, logits)


def _label_names(net) -> list[str]:
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    return [str(id2label.get(i, i)) for i in range(net.config.num_labels)]


def _temperature(model: str, calibrated: bool) -> float:
    """The model's temperature when --calibrated asks for it (1.0 otherwise)."""
    if not calibrated:
        return 1.0
    from ftdist import analysis

    t = analysis.load_temperature(model)
    if t is None:
        raise FtdistError(f"--calibrated: {model!r} carries no temperature ({analysis.calibration_file()}); train "
                          "with eval.calibration=temperature to fit one on validation, or drop --calibrated")
    return t


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
            batch_size: int = 64, max_length: int | None = None, trust_remote_code: bool = False,
            overwrite: bool = False, calibrated: bool = False, argmax: bool = False,
            image_column: str | None = None) -> Path:
    """Labels and probabilities. The label follows the model's decision.json when it has one (unless `argmax`);
    `calibrated` divides the logits by the model's temperature (calibration.json) before the softmax."""
    import logging

    from ftdist import decisions

    check_out(out, model, file, overwrite)  # before the model loads: a refusal costs nothing
    net, tok = load_model(model, trust_remote_code)
    max_length = _max_length(model, max_length)
    regression = net.config.problem_type == "regression" or net.config.num_labels == 1
    if calibrated and regression:
        raise FtdistError("--calibrated: a regression model predicts a number, not probabilities; drop --calibrated")
    temperature = _temperature(model, calibrated)
    if _is_token_model(net):
        return _predict_tokens(net, tok, model, file, out, text_column, batch_size, max_length, temperature)
    decision = None if argmax or regression else decisions.load(model, _label_names(net))
    say = logging.getLogger("ftdist").info
    if decision is not None:
        say("labels by the model's decision (%s): %s; --argmax for the plain argmax", decisions.FILE,
            decisions.describe(decision, temperature if calibrated else None))
    if calibrated:
        say("probabilities calibrated: softmax(logits / %.4f), the temperature fitted on validation", temperature)
    if imagepredict.is_image_model(net):
        texts, _ = imagepredict.rows(file, "FILE", _trained_with(model, "image_column", image_column, "image"), None)
        batches, first = imagepredict.logits(net, tok, texts, batch_size), "path"
    else:
        text_column = _trained_with(model, "text_column", text_column, "text")
        text_pair_column = _trained_with(model, "text_pair_column", text_pair_column, None)
        ds = data.read_file(file, "FILE")
        data.require_columns(ds, {"--text-column": text_column, "--text-pair-column": text_pair_column}, repr(file))
        texts = [str(t) for t in ds[text_column][:]]  # [:] reads the column at once (iterating goes row by row)
        pairs = [str(t) for t in ds[text_pair_column][:]] if text_pair_column else None
        batches, first = _batches(net, tok, texts, pairs, batch_size, max_length), "text"
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    rows = []
    for logits in batches:
        if regression:
            rows += [{"prediction": float(v)} for v in logits.squeeze(-1)]
            continue
        probs = (logits / temperature).softmax(-1)
        chosen = decisions.apply(decision, logits).tolist()
        for row, top, plain in zip(probs, chosen, logits.argmax(-1).tolist()):
            rows.append({"label": id2label.get(top, str(top)), "score": float(row[top]),
                         **({"argmax_label": id2label.get(plain, str(plain))} if decision is not None else {}),
                         **{f"p_{id2label.get(j, str(j))}": float(v) for j, v in enumerate(row)}})
    for text, row in zip(texts, rows):
        row[first] = text
    return _write(out, rows, first=first)


def _predict_tokens(net, tok, model, file, out, text_column, batch_size, max_length, temperature=1.0) -> Path:
    """One row per sentence: its words, the tag of each word (from its first subword) and that tag's
    probability. Words past max_length get no tag (null) and are counted in a warning."""
    import logging

    text_column, label_column = _token_columns(model, text_column)
    ds = data.read_file(file, "FILE", (text_column, label_column), with_tags=False)
    data.require_columns(ds, {"--text-column": text_column}, repr(file))
    sentences = ds[text_column][:]
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    rows, untagged = [], 0
    for words, (word_ids, logits) in zip(sentences, _token_logits(net, tok, sentences, batch_size, max_length)):
        probs = (logits / temperature).softmax(-1)
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
             max_length: int | None = None, trust_remote_code: bool = False, image_column: str | None = None) -> dict:
    from ftdist import metrics

    net, tok = load_model(model, trust_remote_code)
    max_length = _max_length(model, max_length)
    names = _metric_names(model, net, metrics_names)
    if _is_token_model(net):
        return _evaluate_tokens(net, tok, model, file, label_column, text_column, names, batch_size, max_length)
    label_column = _trained_with(model, "label_column", label_column, "label")
    if imagepredict.is_image_model(net):
        texts, gold = imagepredict.rows(file, "--data", _trained_with(model, "image_column", image_column, "image"),
                                        label_column)
        logits = torch.cat(list(imagepredict.logits(net, tok, texts, batch_size)))
    else:
        text_column = _trained_with(model, "text_column", text_column, "text")
        text_pair_column = _trained_with(model, "text_pair_column", text_pair_column, None)
        ds = data.read_file(file, "--data")
        data.require_columns(ds, {"--text-column": text_column, "--label-column": label_column,
                                  "--text-pair-column": text_pair_column}, repr(file))
        texts = [str(t) for t in ds[text_column][:]]  # [:] reads the column at once (iterating goes row by row)
        pairs = [str(t) for t in ds[text_pair_column][:]] if text_pair_column else None
        logits = torch.cat(list(_batches(net, tok, texts, pairs, batch_size, max_length)))
        gold = ds[label_column][:]
    if net.config.problem_type == "regression" or net.config.num_labels == 1:
        out = metrics.compute(names, logits.squeeze(-1).tolist(), [float(v) for v in gold])
        out["n_examples"] = len(texts)
        return out
    label2id = {str(k): int(v) for k, v in (net.config.label2id or {}).items()}
    refs = []
    for v in gold:
        key = str(v)
        if key not in label2id:
            raise FtdistError(f"label {key!r} in {file!r} is not one the model knows ({sorted(label2id)})")
        refs.append(label2id[key])
    out = metrics.compute(names, logits.argmax(-1).tolist(), refs)
    out["n_examples"] = len(refs)
    return _with_analysis(out, model, net, analysis_outputs(logits, refs), names, token=False)


def analysis_outputs(logits, labels, tags_pred=None, tags_true=None):
    from ftdist.analysis import Outputs

    return Outputs(logits.float(), torch.as_tensor(labels, dtype=torch.long).reshape(-1), tags_pred, tags_true)


def _with_analysis(out: dict, model: str, net, outputs, names: list, token: bool) -> dict:
    """The argmax metrics `out` plus per-class scores, the confusion matrix, calibration metrics (before and
    after the model's temperature, if it has one) and, with a decision.json, the tuned metrics."""
    from ftdist import analysis, decisions

    label_names = _label_names(net)
    decision = None if token else decisions.load(model, label_names)
    temperature = analysis.load_temperature(model)
    rep = analysis.split_report(outputs, label_names, token, decision, temperature, names)
    if decision is not None:
        rep["tuned"] = {"decision": decisions.describe(decision, temperature), **rep["tuned"]}
    return {**out, **rep, "definitions": analysis.DEFINITIONS}


def _evaluate_tokens(net, tok, model, file, label_column, text_column, names, batch_size, max_length) -> dict:
    """Scores the positions the trainer scores (data.align_labels with the recipe's label_all_subwords: the first
    subword of each word within max_length, or every subword), so the numbers equal the trainer's."""
    from ftdist import metrics

    text_column, label_column = _token_columns(model, text_column, label_column)
    all_subwords = bool(_trained_with(model, "label_all_subwords", None, False))
    ds = data.read_file(file, "--data", (text_column, label_column))
    data.require_columns(ds, {"--text-column": text_column, "--label-column": label_column}, repr(file))
    sentences, gold = ds[text_column][:], ds[label_column][:]
    known = set((net.config.label2id or {}).keys())
    label2id = {str(k): int(v) for k, v in (net.config.label2id or {}).items()}
    id2label = {int(k): v for k, v in (net.config.id2label or {}).items()}
    preds, refs, scored_logits, scored_ids = [], [], [], []
    for tags, (word_ids, logits) in zip(gold, _token_logits(net, tok, sentences, batch_size, max_length)):
        bad = [t for t in tags if str(t) not in known]
        if bad:
            raise FtdistError(f"tag {str(bad[0])!r} in {file!r} is not one the model knows ({sorted(known)})")
        top = logits.argmax(-1).tolist()
        # word index at each scored position, -100 elsewhere (the trainer's own alignment)
        words_at = data.align_labels(word_ids, list(range(len(tags))), all_subwords)
        scored = [(pos, w) for pos, w in enumerate(words_at) if w != -100]
        preds.append([id2label.get(top[pos], str(top[pos])) for pos, _ in scored])
        refs.append([str(tags[w]) for _, w in scored])
        scored_logits.append(logits[[pos for pos, _ in scored]])
        scored_ids += [label2id[str(tags[w])] for _, w in scored]
    out = metrics.compute(names, preds, refs)
    out["n_examples"] = len(refs)
    k = net.config.num_labels
    outputs = analysis_outputs(torch.cat(scored_logits) if scored_logits else torch.zeros(0, k), scored_ids, preds, refs)
    return _with_analysis(out, model, net, outputs, names, token=True)
