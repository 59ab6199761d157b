"""End to end on CPU: one tiny run, its run folder and export, and an exact resume from a checkpoint.

The first run uses a constant LR after a 2-step warmup so that its LR schedule does not depend on
train.max_steps: the resumed run (max_steps=16) then takes exactly the same steps 9..12 as the
first one (max_steps=12). With a linear decay the two schedules differ by design.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from helpers import assert_ok, run_ftdist
from safetensors.torch import load_file

BASE = ["train.max_steps=12", "checkpoint.every_steps=4", "eval.every_steps=6", "data.test_split=0.1",
        "train.scheduler=constant_with_warmup", "train.warmup=2", "checkpoint.resume=null"]
CKPT = "checkpoints/step-{:08d}"
TEXTS = ["happy", "terrible", "wonderful day", "awful mess", "love", "hate", "calm", "disaster"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    res = run_ftdist(tmp, BASE, name="run")
    assert_ok(res, world=1)
    return res


@pytest.fixture(scope="module")
def resumed(first):
    """Resume from step 8 into (a copy of) the first run's folder, to step 16."""
    tmp = first.run_dir.parent
    folder = tmp / "resume-folder"
    if not folder.exists():
        shutil.copytree(first.run_dir, folder)
    overrides = [o for o in BASE if not o.startswith(("train.max_steps", "checkpoint.resume"))]
    res = run_ftdist(tmp, [*overrides, "train.max_steps=16", "checkpoint.allow_changes=[train.max_steps]", f"checkpoint.resume={folder / CKPT.format(8)}",
                           f"log.output_dir={folder}"], name="resume")
    res.run_dir = folder
    assert_ok(res, world=1)
    return res


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ the run folder

@pytest.mark.timeout(300)
def test_run_folder(first):
    run = first.run_dir
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["train"]["max_steps"] == 12 and recipe["checkpoint"]["every_steps"] == 4
    assert recipe["log"]["output_dir"] == str(run)

    plan = json.loads((run / "plan.json").read_text())
    assert (plan["world_size"], plan["accumulation"], plan["global_batch"], plan["per_device_batch"]) == (1, 2, 16, 8)
    assert plan["total_steps"] == 12 and plan["resumed_from"] is None
    assert plan["dropped_rows"] == {"train": 0, "validation": 0, "test": 0}

    trace = first.trace()
    assert [r["step"] for r in trace] == list(range(1, 13))
    assert all(len(r["ids"]) == 16 for r in trace)
    seen = [i for r in trace for i in r["ids"]]
    assert len(seen) == len(set(seen)) == 12 * 16  # no example twice within the epoch

    rows = jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 5, 10]  # log.every_steps=5 in the tiny recipe, and step 1
    by_step = {r["step"]: r for r in trace}
    for r, window in zip(train_rows, ([1], range(2, 6), range(6, 11))):
        # the logged loss is the mean over the steps since the last log, weighted by their items
        steps = [by_step[s] for s in window]
        assert r["train/loss"] == pytest.approx(sum(s["loss"] * s["items"] for s in steps) / sum(s["items"] for s in steps),
                                                rel=1e-12)
        assert r["lr/head/decay"] > 0
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert all(0 <= r["eval/accuracy"] <= 1 for r in eval_rows)

    # checkpoints: every 4 steps, keep_last=2 removed step 4
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000008", "step-00000012"]
    for step in (8, 12):
        c = run / CKPT.format(step)
        assert (c / "COMPLETE").read_text() == str(step)
        state = json.loads((c / "ftdist_state.json").read_text())
        assert (state["step"], state["epoch"], state["step_in_epoch"]) == (step, 0, step)
        assert (c / "model.safetensors").is_file() and (c / "optimizer.bin").is_file()
        assert yaml.safe_load((c / "recipe.yaml").read_text()) == recipe

    # the export: safetensors only, tokenizer, recipe, metrics
    model = run / "model"
    assert (model / "model.safetensors").is_file()
    assert not (model / "pytorch_model.bin").exists()
    assert (model / "tokenizer_config.json").is_file() and (model / "tokenizer.json").is_file()
    assert yaml.safe_load((model / "recipe.yaml").read_text()) == recipe
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 32
    assert not list(run.glob("*.tmp"))

    final = json.loads((run / "final_metrics.json").read_text())
    assert json.loads((model / "metrics.json").read_text()) == final
    assert final["steps"] == 12 and final["skipped_steps"] == 0
    assert final["best_step"] in (6, 12)
    assert final["best"] == max(r["eval/accuracy"] for r in eval_rows)
    assert set(final) >= {"validation", "test"}
    assert final["test"]["n_examples"] > 0 and final["validation"]["n_examples"] > 0
    assert final["validation"]["accuracy"] == eval_rows[-1]["eval/accuracy"]  # same model, same data

    best = run / "best"
    assert (best / "model.safetensors").is_file()
    assert json.loads((best / "metrics.json").read_text())["step"] == final["best_step"]


@pytest.mark.timeout(300)
def test_export_reloads_and_predicts_like_the_trainer(first):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    run = first.run_dir
    tok = AutoTokenizer.from_pretrained(run / "model")
    exported = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    # the trainer's own weights at the last step: the checkpoint's model.safetensors in the same architecture
    same = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(run / "model")).eval()
    same.load_state_dict(load_file(str(run / CKPT.format(12) / "model.safetensors")), strict=True)
    with torch.no_grad():
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        a, b = exported(**enc).logits, same(**enc).logits
    assert a.shape == (len(TEXTS), 2)
    assert torch.equal(a, b)
    # and the exported weights are the checkpoint's, tensor for tensor
    w_export, w_ckpt = first.weights("model"), load_file(str(run / CKPT.format(12) / "model.safetensors"))
    assert set(w_export) == set(w_ckpt)
    assert all(torch.equal(w_export[k], w_ckpt[k]) for k in w_export)


@pytest.mark.timeout(300)
def test_exported_model_reproduces_the_final_test_accuracy(first):
    """Rebuild the test split from the saved recipe and score the exported model: same accuracy as reported."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from ftdist import config, data

    run = first.run_dir
    recipe = config.from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    test = data.build(recipe.data, tok).test
    pad = DataCollatorWithPadding(tok)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            rows = [{k: test[i][k] for k in ("input_ids", "token_type_ids", "attention_mask")}
                    for i in range(start, min(start + 64, len(test)))]
            preds = model(**pad(rows)).logits.argmax(-1)
            correct += int((preds == torch.tensor(test["labels"][start:start + 64])).sum())
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test"]["n_examples"] == len(test)
    assert final["test"]["accuracy"] == pytest.approx(correct / len(test), abs=1e-12)


# ------------------------------------------------------------------ exact resume

@pytest.mark.timeout(300)
def test_resume_continues_exactly(first, resumed):
    before, after = first.trace(), resumed.trace()
    steps = [r["step"] for r in after]
    assert steps == list(range(9, 17)), f"resumed run took steps {steps}, not 9..16"
    for old, new in zip(before[8:12], after[:4], strict=True):
        assert new["step"] == old["step"]
        assert new["ids"] == old["ids"], f"step {new['step']}: other examples after resume"
        assert new["loss"] == old["loss"], f"step {new['step']}: loss {new['loss']} != {old['loss']}"
    # steps 13..16 continue the same epoch: examples not seen in steps 1..12
    seen = {i for r in before for i in r["ids"]}
    assert not seen & {i for r in after[4:] for i in r["ids"]}

    run = resumed.run_dir
    plan = json.loads((run / "plan.json").read_text())
    assert plan["resumed_from"] == str(run / CKPT.format(8)) and plan["total_steps"] == 16
    # the resumed run re-saved step 12 (same weights as the first run's) and step 16; step 8 rotated out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000012", "step-00000016"]
    w_first = load_file(str(first.run_dir / CKPT.format(12) / "model.safetensors"))
    w_again = load_file(str(run / CKPT.format(12) / "model.safetensors"))
    assert all(torch.equal(w_first[k], w_again[k]) for k in w_first)
    state = json.loads((run / CKPT.format(16) / "ftdist_state.json").read_text())
    assert (state["step"], state["step_in_epoch"]) == (16, 16)
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["steps"] == 16
    # on resume, rows logged after the checkpoint's step (8) are dropped, then logged again: no duplicates
    train_steps = [r["step"] for r in jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert train_steps == [1, 5, 10, 15]
