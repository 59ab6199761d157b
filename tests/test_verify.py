"""`ftdist verify`: the user's check of the promise (issue #15 item 7), run for real on a CPU preset."""

from __future__ import annotations

import subprocess
import sys

import helpers
import pytest
import torch

from ftdist import cli, verify


@pytest.mark.timeout(600)
def test_verify_passes_on_cpu_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ftdist", "verify", "tiny", "--preset", "cpu-2", "--steps", "6",
                        "--out", str(tmp_path / "v")], cwd=tmp_path, env=helpers.base_env(), capture_output=True,
                       text=True, timeout=580)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "1 process vs 2 (cpu-2), dropout 0" in out and "kill at step 5 + resume vs uninterrupted" in out, out
    assert out.count("PASS (") == 2 and out.rstrip().endswith("verify: PASS"), out


def test_compare_fails_on_any_difference():
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    w = {"a": torch.zeros(2)}
    assert verify.compare("x", rows, rows, w, w, 0.0).passed
    other = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4000001}]
    assert not verify.compare("x", other, rows, w, w, 0.0).passed
    assert not verify.compare("x", rows, rows, {"a": torch.tensor([0.0, 1e-7])}, w, 0.0).passed
    assert not verify.compare("x", rows[:1], rows, w, w, 1.0).passed  # a missing step is a failure


def test_verify_exits_nonzero_on_fail(monkeypatch):
    monkeypatch.setattr(verify, "run", lambda *a: [verify.Comparison("x", 1.0, 0.0, 0.0)])
    assert cli.main(["verify", "tiny"]) == 1
    monkeypatch.setattr(verify, "run", lambda *a: [verify.Comparison("x", 0.0, 0.0, 0.0)])
    assert cli.main(["verify", "tiny"]) == 0
