"""The package's shape: a short loop without backend or task branches, small modules, no import cycles, no
private names across modules, and the accelerate / transformers internals the backends edit still there."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[1] / "ftdist"
MODULES = {p: ast.parse(p.read_text()) for p in PKG.rglob("*.py") if "metrics/" not in str(p.relative_to(PKG)) or
           p.name == "__init__.py"}


def modname(p: Path) -> str:
    parts = p.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_loop_is_short_and_has_no_backend_or_task_branches():
    src = (PKG / "train.py").read_text()
    assert len(src.splitlines()) <= 200
    for pattern in (r"is_deepspeed", r"num_processes\s*(==|>|<|!=)", r"DistributedType", r"\.task\s*==",
                    r"data\.task", r"token-classification", r"regression", r"zero_stage\s*=="):
        assert not re.search(pattern, src), f"train.py branches on {pattern}"


def test_no_module_over_about_400_lines():
    big = {str(p.relative_to(PKG)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 425}
    assert not big, big


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    names = {modname(p) for p in MODULES}
    for p, tree in MODULES.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftdist"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ftdist"))
        graph[modname(p)] = {d for d in deps if d in names and d != "ftdist" and d != modname(p)}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_private_names_across_modules():
    found = []
    for p, tree in MODULES.items():
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftdist"):
                found += [f"{p.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
                aliases.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                aliases.update((a.asname or a.name) for a in node.names if a.name.startswith("ftdist"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                found.append(f"{p.name}: {node.value.id}.{node.attr}")
    assert not found, found


def test_accelerate_internals_the_backends_edit_still_exist():
    """backend.py edits these (checked on accelerate 1.15.0): a new accelerate that renames them must fail here."""
    from accelerate import Accelerator
    from transformers.integrations import deepspeed as hf_ds

    acc = Accelerator(cpu=True)
    assert isinstance(acc._models, list) and isinstance(acc._optimizers, list)
    # set only under DeepSpeed: prepare() builds the wrapper when it is None, backward() goes through it
    src = inspect.getsource(Accelerator)
    assert "if self.deepspeed_engine_wrapped is None:" in src and "self.deepspeed_engine_wrapped.backward(" in src
    assert hasattr(hf_ds, "_hf_deepspeed_config_weak_ref") and callable(hf_ds.unset_hf_deepspeed_config)
    net = torch.nn.Linear(2, 2)
    model = acc.prepare_model(net)
    assert any(m is model for m in acc._models)


@pytest.mark.parametrize("name", ["classification", "regression", "token-classification"])
def test_task_count_is_the_loss_weight_sum(name):
    """The per-step normaliser and the loss come from one weight rule: count(batch) == the loss's weight sum."""
    from ftdist import tasks
    from ftdist.config import DataConfig

    g = torch.Generator().manual_seed(0)
    real = torch.tensor([True, True, False, True])
    if name == "token-classification":
        labels = torch.randint(0, 3, (4, 5), generator=g)
        labels[:, -2:] = -100
        logits = torch.randn(4, 5, 3, generator=g)
        task = tasks.make(DataConfig(task=name), ["a", "b", "c"], {"a": 1, "b": 1, "c": 1})
    elif name == "regression":
        labels, logits = torch.randn(4, generator=g), torch.randn(4, 1, generator=g)
        task = tasks.make(DataConfig(task=name), None, {})
    else:
        labels, logits = torch.tensor([0, 1, 1, 2]), torch.randn(4, 3, generator=g)
        task = tasks.make(DataConfig(task=name, class_weights="balanced"), ["a", "b", "c"], {"a": 5, "b": 2, "c": 1})
    batch = {"labels": labels, "real": real}
    _, weight_sum = task.loss_sum_and_count(logits, batch)
    assert task.count(batch) == float(weight_sum) > 0
