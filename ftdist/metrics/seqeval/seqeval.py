"""Entity-level precision / recall / F1 for IOB / IOB2 (BIO) tags, as seqeval's default (conlleval-style) mode.

Chunks are extracted the conlleval way: an I- tag after O or after a chunk of another type starts a chunk,
B- of another type ends one. Sentences never share a chunk. Also reports token accuracy (all tokens).
"""

from collections import defaultdict

import datasets
import evaluate

_KWARGS = """predictions, references: list of lists of tag strings (e.g. [["B-PER", "I-PER", "O"]]).
Returns overall_precision, overall_recall, overall_f1, overall_accuracy (floats) and, per entity type,
{"precision", "recall", "f1", "number"}. Zero division gives 0."""


def get_entities(sentences):
    """(type, start, end) chunks; sentences are flattened with an 'O' between them."""
    seq = [tag for sent in sentences for tag in list(sent) + ["O"]]
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate(seq + ["O"]):
        tag, type_ = chunk[:1], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def end_of_chunk(prev_tag, tag, prev_type, type_):
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def start_of_chunk(prev_tag, tag, prev_type, type_):
    return (
        tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I")) or (tag not in ("O", ".") and prev_type != type_)
    )


def _prf(tp, n_pred, n_true):
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


class Seqeval(evaluate.Metric):
    def _info(self):
        tags = datasets.Sequence(datasets.Value("string", id="label"), id="sequence")
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": tags, "references": tags}),
        )

    def _compute(self, predictions, references):
        if [len(s) for s in predictions] != [len(s) for s in references]:
            raise ValueError("seqeval: each prediction must have as many tags as its reference")
        true, pred = defaultdict(set), defaultdict(set)
        for type_, start, end in get_entities(references):
            true[type_].add((start, end))
        for type_, start, end in get_entities(predictions):
            pred[type_].add((start, end))
        scores, tp_all, pred_all, true_all = {}, 0, 0, 0
        for type_ in sorted(set(true) | set(pred)):
            tp = len(true[type_] & pred[type_])
            p, r, f = _prf(tp, len(pred[type_]), len(true[type_]))
            scores[type_] = {"precision": p, "recall": r, "f1": f, "number": len(true[type_])}
            tp_all, pred_all, true_all = tp_all + tp, pred_all + len(pred[type_]), true_all + len(true[type_])
        p, r, f = _prf(tp_all, pred_all, true_all)
        flat_true = [t for s in references for t in s]
        flat_pred = [t for s in predictions for t in s]
        correct = sum(t == q for t, q in zip(flat_true, flat_pred, strict=True))
        acc = correct / len(flat_true) if flat_true else 0.0
        scores.update(overall_precision=p, overall_recall=r, overall_f1=f, overall_accuracy=acc)
        return scores
