"""EMA and checkpoint averaging, in process (the runs that resume them exactly on every backend, and check
the checkpoint average against the checkpoints' weights, are in test_reliability.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ftdist import averaging, config
from ftdist.backend import Backend
from ftdist.errors import RecipeError


def _run():
    torch.manual_seed(0)
    return SimpleNamespace(net=torch.nn.Linear(3, 2), backend=Backend(None, None))


def test_ema_is_the_warmed_up_moving_average():
    run = _run()
    ema = averaging.EMA(0.9)
    ema.start(run)
    want = {n: p.detach().clone() for n, p in run.net.named_parameters()}
    for step in range(1, 30):
        with torch.no_grad():
            for p in run.net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(run, step)
        d = min(0.9, (1 + step) / (10 + step))
        for n, p in run.net.named_parameters():
            want[n] = d * want[n] + (1 - d) * p.detach()
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.9
    for n, t in want.items():
        torch.testing.assert_close(ema.shadow[n], t)


def test_swapped_puts_weights_in_and_back():
    run = _run()
    before = {n: p.detach().clone() for n, p in run.net.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in run.net.named_parameters()}
    with averaging.swapped(run, zeros):
        assert all(float(p.detach().abs().sum()) == 0 for p in run.net.parameters())
        assert averaging.full_weights(run, zeros)["weight"].abs().sum() == 0
    for n, p in run.net.named_parameters():
        assert torch.equal(p, before[n])


def test_ema_survives_a_save_and_load(tmp_path):
    run = _run()
    run.acc = SimpleNamespace(is_main_process=True)
    ema = averaging.EMA(0.5)
    ema.start(run)
    with torch.no_grad():
        run.net.weight.mul_(3)
    ema.update(run, 100)
    ema.save(run, tmp_path)
    again = averaging.EMA(0.5)
    assert again.load(run, tmp_path)
    for n, t in ema.shadow.items():
        assert torch.equal(again.shadow[n], t)
    assert not averaging.EMA(0.5).load(run, tmp_path / "elsewhere")


@pytest.mark.parametrize("overrides, key", [
    (["checkpoint.average_last=2"], "checkpoint.average_last: averages saved checkpoints"),
    (["checkpoint.average_last=3", "checkpoint.every_steps=5"], "checkpoint.keep_last to at least 3"),
    (["checkpoint.average_last=1", "checkpoint.every_steps=5"], "out of range"),
    (["train.ema_decay=1.0"], "train.ema_decay"),
])
def test_averaging_recipe_errors(overrides, key):
    with pytest.raises(RecipeError, match=key):
        config.load("tiny", overrides)
