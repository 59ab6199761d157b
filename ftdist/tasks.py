"""Tasks: what a label is, which items count, the loss, and how predictions are read.

Each task has one weight rule, `weights(labels, real)`: the loss is the weighted sum of per-item losses
and the step's normaliser is the sum of the same weights over the global batch. Both come from that one
function, so the count and the loss cannot drift apart (the parity guarantee rests on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftdist.config import DataConfig


class Task:
    name = ""
    sequence_labels = False  # labels are one per token (padded with -100), not one per row

    def weights(self, labels: torch.Tensor, real: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        """Per-item weight; 0 for items that do not count (placeholder rows, ignored tokens)."""
        return real.float()

    def per_item_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum_and_count(self, logits, batch, weighted: bool = True):
        """Summed loss over the counted items of one micro-batch, and their (weighted) count."""
        per = self.per_item_loss(logits, batch["labels"])
        w = self.weights(batch["labels"], batch["real"], weighted)
        # where() rather than a product: a placeholder row with an inf loss must not turn 0 * inf into NaN
        return torch.where(w > 0, per * w, torch.zeros_like(per)).sum(), w.sum()

    def count(self, batch) -> float:
        """The normaliser's share of one micro-batch (CPU tensors: no device sync)."""
        return float(self.weights(batch["labels"], batch["real"]).sum())

    def gather(self, acc, logits, labels):
        """Logits and labels of every rank for evaluation."""
        return acc.gather_for_metrics((logits, labels))

    def decode(self, logits, labels, label_names) -> tuple[list, list]:
        """Predictions and references in the form the metrics take."""
        return logits.argmax(-1).tolist(), labels.tolist()


class Classification(Task):
    name = "classification"

    def __init__(self, class_weights: torch.Tensor | None = None):
        self.class_weights = class_weights
        self._on_device: dict = {}

    def weights(self, labels, real, weighted=True):
        if not weighted or self.class_weights is None:
            return real.float()
        if labels.device not in self._on_device:
            self._on_device[labels.device] = self.class_weights.to(labels.device)
        return real.float() * self._on_device[labels.device][labels]

    def per_item_loss(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, reduction="none")


class Regression(Task):
    name = "regression"

    def per_item_loss(self, logits, labels):
        return (logits.squeeze(-1).float() - labels.float()) ** 2

    def decode(self, logits, labels, label_names):
        return logits.squeeze(-1).tolist(), labels.float().tolist()


class TokenClassification(Task):
    name = "token-classification"
    sequence_labels = True

    def weights(self, labels, real, weighted=True):
        return ((labels != -100) & real[:, None]).float()

    def per_item_loss(self, logits, labels):
        return F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")

    def gather(self, acc, logits, labels):
        # ranks' batches are padded to different lengths
        logits = acc.pad_across_processes(logits, dim=1, pad_index=0)
        labels = acc.pad_across_processes(labels, dim=1, pad_index=-100)
        return acc.gather_for_metrics((logits, labels))

    def decode(self, logits, labels, label_names):
        preds, refs = [], []
        for p_row, l_row in zip(logits.argmax(-1).tolist(), labels.tolist()):
            keep = [(label_names[p], label_names[t]) for p, t in zip(p_row, l_row) if t != -100]
            preds.append([p for p, _ in keep])
            refs.append([t for _, t in keep])
        return preds, refs


def class_weights(counts: list[int], kind: str, beta: float = 0.999) -> torch.Tensor | None:
    if kind == "none":
        return None
    c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    if kind == "balanced":  # sklearn's n / (k * count)
        w = c.sum() / (len(c) * c)
    else:  # effective number of samples (Cui et al. 2019)
        w = (1 - beta) / (1 - beta ** c)
        w = w * len(c) / w.sum()
    return w


def make(cfg: DataConfig, label_names: list[str] | None, label_counts: dict) -> Task:
    if cfg.task == "regression":
        return Regression()
    if cfg.task == "token-classification":
        return TokenClassification()
    return Classification(class_weights([label_counts[n] for n in label_names], cfg.class_weights))
