"""The imbalance losses against their definitions (the parity runs across world sizes are in test_tasks.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftdist import config, tasks
from ftdist.config import DataConfig, TrainConfig
from ftdist.errors import RecipeError


def _data(seed: int = 0, shape=(6,), classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, classes, generator=g) * 3, torch.randint(0, classes, shape, generator=g)


def test_label_smoothing_is_torchs():
    logits, labels = _data()
    got = tasks.Loss(label_smoothing=0.2)(logits, labels)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.2))


def test_focal_is_its_definition():
    logits, labels = _data(1)
    p_true = logits.softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    want = -((1 - p_true) ** 2) * p_true.log()
    torch.testing.assert_close(tasks.Loss(focal_gamma=2.0)(logits, labels), want)
    # focal down-weights what is already right: never above cross-entropy, equal at gamma 0
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert (tasks.Loss(focal_gamma=2.0)(logits, labels) <= ce + 1e-7).all()
    torch.testing.assert_close(tasks.Loss(focal_gamma=0.0)(logits, labels), ce)


def test_focal_with_smoothing_scales_the_smoothed_loss():
    logits, labels = _data(2)
    p_true = logits.softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    smoothed = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(tasks.Loss(1.5, 0.1)(logits, labels), (1 - p_true) ** 1.5 * smoothed)


def test_token_loss_is_the_flat_loss_per_token():
    logits, labels = _data(3, shape=(3, 5))
    loss = tasks.Loss(2.0, 0.1)
    torch.testing.assert_close(loss(logits, labels), loss(logits.reshape(15, 4), labels.reshape(15)).reshape(3, 5))


def test_focal_alpha_is_the_class_weight_in_loss_and_count():
    """Class weights weigh each item's loss and its share of the normaliser alike, for rows and for tags."""
    counts = {"a": 8, "b": 2, "c": 1}
    train = TrainConfig(loss="focal", focal_gamma=2.0)
    cls = tasks.make(DataConfig(class_weights="balanced"), ["a", "b", "c"], counts, train)
    logits, labels = _data(4, classes=3)
    real = torch.tensor([True] * 5 + [False])
    w = tasks.class_weights([8, 2, 1], "balanced")[labels] * real
    loss, count = cls.loss_sum_and_count(logits, {"labels": labels, "real": real})
    torch.testing.assert_close(loss, (tasks.Loss(2.0)(logits, labels) * w).sum())
    assert float(count) == pytest.approx(float(w.sum()))

    tok = tasks.make(DataConfig(task="token-classification", class_weights="balanced"), ["a", "b", "c"], counts, train)
    logits, labels = _data(5, shape=(2, 4), classes=3)
    labels[0, 2:] = -100
    real = torch.tensor([True, True])
    w = tasks.class_weights([8, 2, 1], "balanced")[labels.clamp(min=0)] * (labels != -100)
    loss, count = tok.loss_sum_and_count(logits, {"labels": labels, "real": real})
    torch.testing.assert_close(loss, (tasks.Loss(2.0)(logits, labels.clamp(min=0)) * w).sum())
    assert tok.count({"labels": labels, "real": real}) == pytest.approx(float(w.sum()))


def test_token_label_counts():
    assert tasks.token_label_counts([[0, 1, -100], [1, 1]], ["O", "B-X", "I-X"]) == {"O": 1, "B-X": 3, "I-X": 0}


@pytest.mark.parametrize("override", ["train.loss=focal", "train.label_smoothing=0.1", "data.class_weights=balanced"])
def test_classification_losses_refused_for_regression(override):
    with pytest.raises(RecipeError, match=override.split("=")[0].replace(".", r"\.")):
        config.load("tiny", ["data.task=regression", override])


@pytest.mark.parametrize("override", ["train.focal_gamma=-1", "train.label_smoothing=1.0", "train.loss=focus"])
def test_loss_keys_out_of_range(override):
    with pytest.raises(RecipeError, match=override.split("=")[0].replace(".", r"\.")):
        config.load("tiny", [override])
