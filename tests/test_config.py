"""Recipes: built-ins load, `a.b=c` overrides parse, and every class of mistake is reported clearly."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from helpers import base_env

from ftdist import config, yamlio
from ftdist.config import Recipe
from ftdist.errors import FtdistError, RecipeError, did_you_mean

# A recipe that passes validation on its own; tests add one mistake at a time.
GOOD = {"data": {"dataset": "vader"}}


def problems(excinfo) -> list[str]:
    """The bullet lines of a RecipeError message."""
    return [line.strip()[2:] for line in str(excinfo.value).splitlines() if line.strip().startswith("- ")]


def load_err(overrides, raw=None) -> pytest.ExceptionInfo:
    with pytest.raises(RecipeError) as e:
        config.from_dict(dict(raw or GOOD), overrides)
    return e


# ------------------------------------------------------------------ built-ins and overrides

def test_builtin_recipes_are_listed():
    names = config.builtin_recipes()
    assert {"demo", "tiny"} <= set(names)


@pytest.mark.parametrize("name", config.builtin_recipes())
def test_builtin_recipe_loads(name):
    r = config.load(name)
    assert isinstance(r, Recipe)
    raw = config.read_yaml(config.resolve_recipe_path(name))
    # every key written in the file ends up in the recipe, with its value
    for section, keys in raw.items():
        for key, value in (keys or {}).items():
            got = getattr(getattr(r, section), key)
            assert got == value, f"{name}: {section}.{key} = {got!r}, file says {value!r}"
    # a loaded recipe dumps to YAML that loads back to the same recipe
    again = config.from_dict(__import__("yaml").safe_load(config.dump(r)))
    assert again == r


def test_tiny_recipe_values():
    r = config.load("tiny")
    assert r.model.init == "random"
    assert r.model.config_overrides["num_hidden_layers"] == 2
    assert r.data.dataset == "vader"
    assert (r.train.global_batch_size, r.train.per_device_batch_size, r.train.max_steps) == (16, 8, 20)
    assert r.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("text, expected", [
    ("train.epochs=7", 7),
    ("train.lr=3e-5", 3e-5),          # exponent without a dot: a string in YAML 1.1
    ("train.lr=1.5E-4", 1.5e-4),
    ("train.lr=0.002", 0.002),
    ("train.max_steps=null", None),
    ("train.max_steps=", None),
    ("checkpoint.export=false", False),
    ("log.progress=true", True),
    ("train.adam_betas=[0.8, 0.95]", [0.8, 0.95]),
    ("eval.metrics=[accuracy,mcc]", ["accuracy", "mcc"]),
    ("log.run_name=my-run", "my-run"),
    ("model.config_overrides={num_hidden_layers: 1}", {"num_hidden_layers": 1}),
    ("data.labels=[b, a]", ["b", "a"]),
])
def test_parse_override_values(text, expected):
    (section, key), value = config.parse_override(text)
    assert f"{section}.{key}" == text.partition("=")[0]
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_with_types():
    r = config.load("tiny", ["train.lr=3e-5", "train.epochs=2", "train.max_steps=null", "checkpoint.export=false",
                             "train.warmup=10", "eval.metrics=[accuracy, mcc]", "eval.best_metric=mcc",
                             "model.dropout=0", "data.labels=[negative, positive]"])
    assert r.train.lr == 3e-5 and isinstance(r.train.lr, float)
    assert r.train.epochs == 2 and r.train.max_steps is None
    assert r.checkpoint.export is False
    assert r.train.warmup == 10.0 and isinstance(r.train.warmup, float)  # ints widen to float fields
    assert r.eval.metrics == ["accuracy", "mcc"] and r.eval.best_metric == "mcc"
    assert r.model.dropout == 0.0 and isinstance(r.model.dropout, float)
    assert r.data.labels == ["negative", "positive"]
    # untouched keys keep the recipe's values
    assert r.train.global_batch_size == 16


def test_override_last_one_wins_and_does_not_mutate_input():
    raw = {"data": {"dataset": "vader"}, "train": {"lr": 0.01}}
    r = config.from_dict(raw, ["train.lr=0.02", "train.lr=0.03"])
    assert r.train.lr == 0.03
    assert raw == {"data": {"dataset": "vader"}, "train": {"lr": 0.01}}


@pytest.mark.parametrize("text", ["train.lr", "lr=3", "train.x.y=3", ".lr=3"])
def test_malformed_override(text):
    with pytest.raises(RecipeError, match=re.escape(repr(text))):
        config.parse_override(text)


# ------------------------------------------------------------------ one test per error class

def test_unknown_key_with_did_you_mean():
    e = load_err(["train.lr_rate=1e-4"])
    assert problems(e) == ["train.lr_rate: unknown key (did you mean 'lr'?)"]
    e = load_err(["train.global_batch=8"])
    assert "train.global_batch: unknown key (did you mean 'global_batch_size'?)" in str(e.value)


def test_unknown_key_in_yaml_file():
    e = load_err([], {"data": {"dataset": "vader", "text_colum": "t"}})
    assert problems(e) == ["data.text_colum: unknown key (did you mean 'text_column'?)"]


def test_unknown_section():
    e = load_err([], {**GOOD, "trian": {"lr": 0.1}})
    (msg,) = problems(e)
    assert msg.startswith("trian: unknown section (did you mean 'train'?)")
    assert "sections are model, data, train, unfreeze, eval, checkpoint, log" in msg
    e = load_err(["optimizer.lr=0.1"])
    assert problems(e) == ["override 'optimizer.lr=0.1': unknown section 'optimizer'"]


def test_wrong_type():
    e = load_err(["train.epochs=three", "train.lr=fast", "checkpoint.export=maybe", "eval.metrics=accuracy",
                  "data.text_column=[a, b]", "model.config_overrides=5", "train.epochs=2.5"])
    assert problems(e) == [
        "model.config_overrides: expected a mapping, got 5",
        "data.text_column: expected a string, got ['a', 'b']",
        "train.epochs: expected an integer, got 2.5",
        "train.lr: expected a number or one of auto, got 'fast'",
        "eval.metrics: expected a list, got 'accuracy'",
        "checkpoint.export: expected true or false, got 'maybe'",
    ]


def test_bool_is_not_an_integer():
    e = load_err(["train.epochs=true"])
    assert problems(e) == ["train.epochs: expected an integer, got True"]


def test_out_of_range():
    e = load_err(["train.lr=2", "train.epochs=0", "data.validation_split=1.0", "checkpoint.keep_last=0",
                  "data.max_length=4", "model.dropout=-0.1"])
    assert problems(e) == [
        "model.dropout: -0.1 is out of range; expected a float in [0, 1) or null",
        "data.validation_split: 1.0 is out of range; expected a float in [0, 1)",
        "data.max_length: 4 is out of range; expected an integer in [8, 8192] or null (from the data)",
        "train.lr: 2.0 is out of range; expected a float in (0, 1) or auto",
        "train.epochs: 0 is out of range; expected an integer >= 1",
        "checkpoint.keep_last: 0 is out of range; expected an integer >= 1",
    ]


def test_bad_literal_choice_with_hint():
    e = load_err(["train.precision=bf61"])
    assert problems(e) == ["train.precision: 'bf61' is not one of no, bf16, fp16 (did you mean 'bf16'?)"]
    e = load_err(["train.scheduler=cosnie"])
    assert "'cosnie' is not one of linear, cosine, constant" in str(e.value)
    assert "(did you mean 'cosine'?)" in str(e.value)
    # no hint when nothing is close, but the choices are still listed
    e = load_err(["data.bad_rows=explode"])
    assert problems(e) == ["data.bad_rows: 'explode' is not one of drop, fail"]


def test_several_errors_reported_at_once():
    e = load_err(["train.lr_rate=1", "train.epochs=zero", "train.max_steps=-3", "train.precision=fp32",
                  "eval.every_step=5"], {**GOOD, "logs": {}})
    msg = str(e.value)
    assert msg.startswith("recipe has 6 problems:\n")
    assert len(problems(e)) == 6
    for key in ("logs:", "train.lr_rate:", "train.epochs:", "train.max_steps:", "train.precision:", "eval.every_step:"):
        assert any(p.startswith(key) for p in problems(e)), key
    one = load_err(["train.epochs=0"])
    assert str(one.value).startswith("recipe has 1 problem:\n")


@pytest.mark.parametrize("overrides, expected", [
    (["train.per_device_batch_size=64", "train.global_batch_size=32"],
     "train.per_device_batch_size: 64 is larger than train.global_batch_size 32; lower it or raise the global batch"),
    (["unfreeze.schedule=gradual"],
     "unfreeze: schedule 'gradual' needs exactly one trigger: unfreeze.every_steps=N, unfreeze.every_epoch=true or unfreeze.on_plateau=true"),
    (["unfreeze.schedule=gradual", "unfreeze.every_steps=5", "unfreeze.every_epoch=true"],
     "unfreeze: schedule 'gradual' needs exactly one trigger"),
    (["unfreeze.schedule=gradual", "unfreeze.every_steps=5", "unfreeze.on_plateau=true", "eval.every_steps=5"],
     "unfreeze: schedule 'gradual' needs exactly one trigger"),
    (["eval.metrics=[acuracy, f1]", "eval.best_metric=f1"],
     "eval.metrics: unknown metric 'acuracy' (did you mean 'accuracy'?); available: accuracy, f1, f1_micro"),
    (["eval.metrics=[accuracy]", "eval.best_metric=f1"],
     "eval.best_metric: 'f1' is not in eval.metrics ['accuracy']; add it there or pick one of them (or 'loss')"),
    (["unfreeze.schedule=lp-ft"], "unfreeze.lp_steps: schedule 'lp-ft' needs lp_steps >= 1"),
    (["log.trackers=[jsonl, tensorbaord]"], "log.trackers: unknown tracker 'tensorbaord' (did you mean 'tensorboard'?)"),
    (["train.adam_betas=[0.9]"], "train.adam_betas: [0.9] must be two numbers in [0, 1)"),
    (["data.dataset=null"], "data: give data.train_file (a local file) or data.dataset"),
    (["data.train_file=x.csv"], "data: data.dataset and data.train_file are both set; keep one"),
])
def test_cross_key_errors(overrides, expected):
    e = load_err(overrides)
    (msg,) = problems(e)
    assert msg.startswith(expected), msg


def test_cross_key_rules_accept_valid_combinations():
    r = config.from_dict(GOOD, ["unfreeze.schedule=gradual", "unfreeze.every_steps=5", "eval.best_metric=loss",
                                "train.per_device_batch_size=32", "train.global_batch_size=32"])
    assert r.unfreeze.every_steps == 5 and r.eval.best_metric == "loss"
    for trigger in (["unfreeze.every_epoch=true"], ["unfreeze.on_plateau=true", "eval.every_steps=10"]):
        r = config.from_dict(GOOD, ["unfreeze.schedule=gradual", *trigger])
        assert r.unfreeze.schedule == "gradual"


# ------------------------------------------------------------------ recipe files

def test_empty_file(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# just a comment\n")
    with pytest.raises(RecipeError, match=r"empty\.yaml' is empty; start from a built-in one"):
        config.load(str(f))


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml(tmp_path, text, kind):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=rf"must be a mapping of sections \(model, data, .*\), got {kind}$"):
        config.load(str(f))


def test_invalid_yaml(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train: {lr: [1, 2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml' is not valid YAML"):
        config.load(str(f))


def test_yaml_alias_bomb_rejected(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10^9 strings if aliases were expanded
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]")
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError) as e:
        config.load(str(f))
    assert "not valid YAML" in str(e.value)
    assert "bomb.yaml' is not valid YAML: YAML aliases (*a) are not allowed (line 2)" in str(e.value)


def test_did_you_mean_is_one_helper_for_every_hint():
    assert did_you_mean("lr_rate", ["lr", "seed"]) == " (did you mean 'lr'?)"  # a word of the name
    assert did_you_mean("zero", ["zero2", "zero3", "ddp"], n=2) == " (did you mean 'zero3' or 'zero2'?)"
    assert did_you_mean("explode", ["drop", "fail"]) == ""
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert did_you_mean(nested, ["train"]) == ""  # str() of it overflows the stack: no hint, no error
    assert did_you_mean("x" * 10**6, ["train"]) == ""  # a pasted blob stays fast


def test_one_no_alias_yaml_reader():
    with pytest.raises(yaml.YAMLError, match=r"YAML aliases \(\*x\) are not allowed \(line 2\)"):
        yamlio.load_no_alias("a: &x 1\nb: *x\n")
    assert yamlio.load_no_alias("lr: 3e-5") == {"lr": "3e-5"}  # what yaml.safe_load (and accelerate) reads
    assert yamlio.load_no_alias("lr: 3e-5", yaml12_floats=True) == {"lr": 3e-5}  # recipes


def test_yaml_alias_in_override_is_not_expanded():
    (_, _), value = config.parse_override("log.tags=[&x a, *x]")
    assert value == "[&x a, *x]"  # kept as the raw string, never expanded


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file '.*nope\.yaml' does not exist; give a YAML path or a built-in recipe: demo"):
        config.load(str(tmp_path / "nope.yaml"))


def test_a_folder_named_like_a_builtin_recipe_does_not_hide_it(tmp_path, monkeypatch):
    """`./launch` run from a folder that holds a `demo/` directory (a run folder, say) still means the demo recipe."""
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert config.resolve_recipe_path("demo").name == "demo.yaml"
    assert config.load("demo").data.dataset == "vader"


def test_unknown_builtin_recipe_name_hints():
    with pytest.raises(RecipeError, match=r"recipe 'tinny' is neither a file nor a built-in recipe \(did you mean 'tiny'\?\)"):
        config.load("tinny")


def test_recipe_error_is_ftdist_error_with_exit_2():
    assert issubclass(RecipeError, FtdistError) and RecipeError.exit_code == 2


def test_yaml_file_with_exponent_float(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("data: {dataset: vader}\ntrain: {lr: 2e-5, adam_eps: 1e-8}\n")
    r = config.load(str(f))
    assert r.train.lr == 2e-5 and r.train.adam_eps == 1e-8


# ------------------------------------------------------------------ the CLI

def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "ftdist", "train", *args], cwd=tmp_path, env=base_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "BAD.yaml"
    bad.write_text("data: {dataset: vader}\ntrain:\n  lr_rate: 0.1\n  epochs: zero\n")
    p = _cli(tmp_path, str(bad), "train.seed=abc", f"log.output_dir={tmp_path / 'run'}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert "ftdist: error: recipe has 3 problems:" in p.stderr
    assert "train.seed: expected an integer, got 'abc'" in p.stderr
    assert "train.lr_rate: unknown key (did you mean 'lr'?)" in p.stderr
    assert "train.epochs: expected an integer, got 'zero'" in p.stderr
    assert not (tmp_path / "run").exists()


def test_cli_missing_recipe_exits_2(tmp_path):
    p = _cli(tmp_path, str(tmp_path / "missing.yaml"))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "missing.yaml' does not exist" in p.stderr


@pytest.mark.parametrize("world,used,accum", [(1, 32, 1), (2, 16, 1), (4, 8, 1), (8, 4, 1), (16, 2, 1)])
def test_the_demo_recipe_plans_on_every_world_size(world, used, accum):
    """per_device_batch_size is a memory bound: one recipe (global 32, per-device 32) runs on any world
    size that divides the global batch, with the same global batch, and the plan says what it lowered."""
    from ftdist import plan

    p = plan.resolve(config.load("demo", []).train, world)
    assert (p.per_device_batch, p.accumulation, p.global_batch) == (used, accum, 32)
    assert ("lowered" in p.lines()[1]) == (world > 1)
    p = plan.resolve(config.load("demo", ["train.per_device_batch_size=5"]).train, 2)
    assert (p.per_device_batch, p.accumulation) == (4, 4)


def test_a_global_batch_that_cannot_be_split_is_an_error():
    from ftdist import plan

    with pytest.raises(RecipeError, match=r"train.global_batch_size: 32 cannot be split over world size 3.*\[27, 30, 33, 36\]"):
        plan.resolve(config.load("demo", []).train, 3)
