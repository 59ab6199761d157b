"""Tasks: what a label is, which items count, the loss, and how predictions are read.

Each task has one weight rule, `weights(labels, real)`: the loss is the weighted sum of per-item losses
and the step's normaliser is the sum of the same weights over the global batch. Both come from that one
function, so the count and the loss cannot drift apart (the parity guarantee rests on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftdist.config import DataConfig, TrainConfig


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


class Loss:
    """Per-item classification loss over the last dimension: cross-entropy, optionally label-smoothed and
    focal. Class weights are not applied here: they are the task's weight rule (the focal loss's alpha),
    so the loss and the normaliser are weighted alike."""

    def __init__(self, focal_gamma: float = 0.0, label_smoothing: float = 0.0):
        self.gamma, self.smoothing = focal_gamma, label_smoothing

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not self.gamma and not self.smoothing:  # plain cross-entropy: torch's fused kernel
            return F.cross_entropy(logits.movedim(-1, 1), labels, reduction="none")
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = nll if not self.smoothing else (1 - self.smoothing) * nll - self.smoothing * logp.mean(-1)
        if self.gamma:
            loss = (1 - torch.exp(-nll)).clamp(min=0) ** self.gamma * loss  # (1 - p_true)^gamma
        return loss


class ClassWeighted:
    """The weight rule with optional per-class weights, indexed by label (ignored labels read class 0)."""

    def __init__(self, class_weights: torch.Tensor | None):
        self.class_weights = class_weights
        self._on_device: dict = {}

    def class_weight(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.device not in self._on_device:
            self._on_device[labels.device] = self.class_weights.to(labels.device)
        return self._on_device[labels.device][labels.clamp(min=0)]


class Classification(Task, ClassWeighted):
    name = "classification"

    def __init__(self, class_weights: torch.Tensor | None = None, loss: Loss | None = None):
        ClassWeighted.__init__(self, class_weights)
        self.loss = loss or Loss()

    def weights(self, labels, real, weighted=True):
        if not weighted or self.class_weights is None:
            return real.float()
        return real.float() * self.class_weight(labels)

    def per_item_loss(self, logits, labels):
        return self.loss(logits, labels)


class Regression(Task):
    name = "regression"

    def per_item_loss(self, logits, labels):
        return (logits.squeeze(-1).float() - labels.float()) ** 2

    def decode(self, logits, labels, label_names):
        return logits.squeeze(-1).tolist(), labels.float().tolist()


class TokenClassification(Task, ClassWeighted):
    name = "token-classification"
    sequence_labels = True

    def __init__(self, class_weights: torch.Tensor | None = None, loss: Loss | None = None):
        ClassWeighted.__init__(self, class_weights)
        self.loss = loss or Loss()

    def weights(self, labels, real, weighted=True):
        w = ((labels != -100) & real[:, None]).float()
        return w if not weighted or self.class_weights is None else w * self.class_weight(labels)

    def per_item_loss(self, logits, labels):
        return self.loss(logits, labels.clamp(min=0))

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


def make(cfg: DataConfig, label_names: list[str] | None, label_counts: dict, train: TrainConfig | None = None) -> Task:
    """The task of a recipe. `label_counts`: train items per label (rows, or labelled tokens for token
    classification), in any order."""
    if cfg.task == "regression":
        return Regression()
    train = train or TrainConfig()
    loss = Loss(train.focal_gamma if train.loss == "focal" else 0.0, train.label_smoothing)
    weights = class_weights([label_counts.get(n, 0) for n in label_names], cfg.class_weights)
    cls = TokenClassification if cfg.task == "token-classification" else Classification
    return cls(weights, loss)


def token_label_counts(labels: list[list[int]], label_names: list[str]) -> dict[str, int]:
    """Labelled tokens per tag (-100: not labelled) of a token-classification split."""
    import collections

    c = collections.Counter(t for row in labels for t in row if t != -100)
    return {name: c.get(i, 0) for i, name in enumerate(label_names)}
