"""Security: no remote code unless asked, no unsafe unpickling, safetensors-only exports, no leaked secrets."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, assert_ok, base_env, run_ftdist

from ftdist import checkpoint, config, envinfo
from ftdist import model as modellib
from ftdist.config import ModelConfig
from ftdist.redaction import REDACTED, is_secret_key, redact

PKG = REPO / "ftdist"
TINY = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}

# Fake credentials, shaped like the real ones (so value-based redaction has to catch them too).
HF_TOKEN = "hf_" + "Qx7" * 11                   # hf_ + 33 alphanumerics
WANDB_KEY = "0123456789abcdef" * 2 + "fedcba98"  # 40 hex digits
TAG_SECRET = "sk-" + "AbCd3fGh" * 4              # an API key pasted as a tracker tag
NAME_SECRET = "hf_" + "Zz9" * 10                  # ... and as the run name
SECRETS = [HF_TOKEN, WANDB_KEY, TAG_SECRET, NAME_SECRET]


# ------------------------------------------------------------------ trust_remote_code

class Spy:
    """Records the kwargs of every call, then calls through (or returns `result`)."""

    def __init__(self, real=None, result=None):
        self.real, self.result, self.calls = real, result, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.real(*args, **kwargs) if self.real is not None else self.result


@pytest.fixture
def spies(monkeypatch):
    import transformers

    out = {}
    for cls, meth, through in [("AutoConfig", "from_pretrained", True), ("AutoTokenizer", "from_pretrained", True),
                               ("AutoModelForSequenceClassification", "from_config", True),
                               ("AutoModelForSequenceClassification", "from_pretrained", False),
                               ("AutoModelForTokenClassification", "from_config", True)]:
        target = getattr(transformers, cls)
        spy = Spy(getattr(target, meth) if through else None, result="sentinel-model")
        monkeypatch.setattr(target, meth, spy)
        out[f"{cls}.{meth}"] = spy
    return out


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert config.from_dict({"data": {"dataset": "vader"}}).model.trust_remote_code is False
    for name in config.builtin_recipes():
        assert config.load(name).model.trust_remote_code is False, name
    with pytest.raises(config.RecipeError, match="trust_remote_code"):
        config.from_dict({"data": {"dataset": "vader"}}, ["model.trust_remote_code=yes please"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trust", [None, False, True])
def test_trust_remote_code_reaches_every_loader_only_when_set(spies, trust):
    overrides = [] if trust is None else [f"model.trust_remote_code={str(trust).lower()}"]
    want = bool(trust)
    rnd = config.from_dict({"data": {"dataset": "vader"}, "model": {"init": "random", "config_overrides": TINY}},
                           overrides).model
    modellib.load_tokenizer(rnd)
    net = modellib.build(rnd, "classification", ["neg", "pos"])
    assert isinstance(net, torch.nn.Module)
    modellib.build(rnd, "token-classification", ["O", "B", "I"])
    pre = config.from_dict({"data": {"dataset": "vader"}}, overrides).model
    assert modellib.build(pre, "classification", ["neg", "pos"]) == "sentinel-model"
    used = {name: [c.get("trust_remote_code", "absent") for c in spy.calls] for name, spy in spies.items()}
    assert all(used.values()), f"a loader was never called: {used}"
    for name, flags in used.items():
        assert flags == [want] * len(flags), f"{name} got trust_remote_code={flags}, recipe says {want}"


def test_every_transformers_loader_call_passes_trust_remote_code_explicitly():
    """Source check: in the training path (ftdist/model.py) every from_pretrained/from_config names the flag;
    elsewhere (predict.py loads exported folders) it must never be switched on."""
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text()
        for m in re.finditer(r"\.(from_pretrained|from_config)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", src):
            args = m.group(2)
            if f.name == "model.py":
                assert "trust_remote_code=cfg.trust_remote_code" in args, f"{f.name}: {m.group(0)}"
            else:
                assert "trust_remote_code=True" not in args.replace(" ", ""), f"{f.name}: {m.group(0)}"


# ------------------------------------------------------------------ unpickling

def test_no_unsafe_torch_load_in_the_package():
    """Every torch.load in ftdist passes weights_only=True; nothing unpickles by hand; nothing registers
    custom checkpoint objects (accelerate reloads those with weights_only=False)."""
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in m.group(1), f"{f.relative_to(REPO)}: {m.group(0)}"
        assert not re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", src), f"{f.relative_to(REPO)} unpickles"
        assert "register_for_checkpointing" not in src and "load_custom_state" not in src, f.relative_to(REPO)
        assert "weights_only=False" not in src, f.relative_to(REPO)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.timeout(120)
def test_resume_loads_checkpoints_with_weights_only(tmp_path, accelerator, monkeypatch):
    """ftdist resumes through accelerate's load_state: every torch.load it makes (optimizer, RNG states, and
    ftdist's own check of the RNG file) must be weights_only=True, and a malicious pickle must not run."""
    net = torch.nn.Linear(4, 2)
    model, opt = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-3))
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    ck = checkpoint.save(accelerator, str(tmp_path), 1, {"step": 1, "epoch": 0, "step_in_epoch": 1, "stage": 0},
                         "x: 1\n", keep_last=1)
    calls = []
    real = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    checkpoint.load(accelerator, ck)
    assert len(calls) >= 2 and all(c is True for c in calls), f"torch.load weights_only flags: {calls}"

    # a checkpoint whose optimizer file is a pickle that runs code when unpickled
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Evil(), "param_groups": []}, ck / "optimizer.bin")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.bin"):
        checkpoint.load(accelerator, ck)
    assert not marker.exists(), "loading a checkpoint executed code from a pickle"


# ------------------------------------------------------------------ secrets and exports

def test_redaction_rules():
    for key in ("api_key", "hf_token", "HF_TOKEN", "WANDB_API_KEY", "password", "client_secret", "auth_token",
                "aws_secret_access_key", "token", "credentials"):
        assert is_secret_key(key), key
    # model config keys that happen to contain the words: numbers a saved recipe must keep
    for key in ("pad_token_id", "eos_token_id", "bos_token_id", "num_key_value_heads", "max_length",
                "tokens_per_s", "real_token_fraction", "trust_remote_code"):
        assert not is_secret_key(key), key
    got = redact({"a": {"hf_token": "x", "tags": [TAG_SECRET, "ok"], "n": NAME_SECRET, "w": WANDB_KEY, "empty": None}})
    assert got == {"a": {"hf_token": REDACTED, "tags": [REDACTED, "ok"], "n": REDACTED, "w": REDACTED, "empty": None}}


def test_saved_recipe_keeps_token_ids():
    """recipe.yaml is written redacted; a model config key like pad_token_id is no secret and must survive,
    or the saved recipe no longer reloads (predict on a checkpoint folder reloads it)."""
    r = config.from_dict({"data": {"dataset": "vader"},
                          "model": {"init": "random", "config_overrides": {**TINY, "pad_token_id": 0, "eos_token_id": 2}}})
    again = config.from_dict(yaml.safe_load(config.dump(r)))
    assert again == r


def test_env_report_redacts(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setattr(envinfo, "_deepspeed_ops", lambda: {})
    info = envinfo.collect()
    text = envinfo.render(info) + json.dumps(info)
    assert "HF_TOKEN" in text and "WANDB_API_KEY" in text
    for s in (HF_TOKEN, WANDB_KEY):
        assert s not in text


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """One short training run with secrets in the environment and in the recipe (tags, run name)."""
    tmp = tmp_path_factory.mktemp("security")
    data = tmp / "d.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(48):
            w.writerow([f"good day {i}" if i % 2 == 0 else f"bad night {i}", "pos" if i % 2 == 0 else "neg"])
    recipe = tmp / "secret.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"init": "random", "config_overrides": {**TINY, "pad_token_id": 0}},
        "data": {"train_file": str(data), "validation_split": 0.25, "max_length": 16},
        "train": {"max_steps": 3, "global_batch_size": 8, "per_device_batch_size": 8, "lr": 1e-3},
        "eval": {"every_steps": 2}, "checkpoint": {"every_steps": 2},
        "log": {"every_steps": 1, "tags": [TAG_SECRET, "plain-tag"], "run_name": NAME_SECRET, "trackers": ["jsonl"]}}))
    env = {"HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY, "HF_DATASETS_CACHE": str(tmp / "hf-cache")}
    res = run_ftdist(tmp, [], recipe=str(recipe), env=env, timeout=240)
    assert_ok(res, world=1)
    return tmp, recipe, env, res


@pytest.mark.timeout(300)
def test_no_secret_reaches_the_run_folder_or_the_console(secret_run):
    _, _, _, res = secret_run
    run = res.run_dir
    for name in ("recipe.yaml", "plan.json", "tracker_config.json", "metrics.jsonl", "final_metrics.json",
                 "checkpoints/step-00000002/recipe.yaml", "model/recipe.yaml", "best/recipe.yaml"):
        assert (run / name).is_file(), f"{name} was not written"
    leaks = [(str(p.relative_to(run)), s[:6]) for p in run.rglob("*") if p.is_file()
             for s in SECRETS if s.encode() in p.read_bytes()]
    assert not leaks, f"secrets written to the run folder: {leaks}"
    assert not [s for s in SECRETS if s in res.log], "a secret was printed"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["log"]["tags"] == [REDACTED, "plain-tag"] and saved["log"]["run_name"] == REDACTED
    assert saved["model"]["config_overrides"]["pad_token_id"] == 0
    tracker = json.loads((run / "tracker_config.json").read_text())
    assert tracker["log.run_name"] == REDACTED


@pytest.mark.timeout(300)
def test_exports_are_safetensors_only(secret_run):
    run = secret_run[3].run_dir
    for sub in ("model", "best"):
        files = {p.name for p in (run / sub).iterdir()}
        assert "model.safetensors" in files, f"{sub}: {sorted(files)}"
        unsafe = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
        assert not unsafe, f"{sub} holds pickle-based weights: {unsafe}"
    # checkpoints: the weights are safetensors too (optimizer/RNG pickles are loaded weights_only, see above)
    ck = run / "checkpoints" / "step-00000003"
    assert (ck / "model.safetensors").is_file() and not (ck / "pytorch_model.bin").exists()


def _launch(cwd: Path, env: dict, *args: str) -> tuple[int, str]:
    env = {**env, "FTDIST_LAUNCH_DIR": str(cwd / "launch-configs")}  # not a fresh folder under /tmp per call
    p = subprocess.run([sys.executable, str(REPO / "launch"), *args], cwd=cwd, env=base_env(env),
                       capture_output=True, text=True, timeout=200)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def dry_run(secret_run):
    """`./launch cpu RECIPE --dry-run` with the secrets in the environment and the recipe file, and one more
    given on the command line as an override."""
    tmp, recipe, env, _ = secret_run
    rc, out = _launch(tmp, env, "cpu", str(recipe), f"log.output_dir={tmp / 'dry'}", f"log.tags=[{TAG_SECRET}]",
                      "--dry-run")
    assert rc == 0, out
    assert "command on each node" in out
    return out


@pytest.mark.timeout(300)
def test_dry_run_does_not_print_secrets_from_env_or_recipe(dry_run):
    assert not [s[:6] for s in (HF_TOKEN, WANDB_KEY, NAME_SECRET) if s in dry_run], f"the dry run printed a secret:\n{dry_run}"


def test_override_redaction_for_printed_command_lines():
    from ftdist.redaction import redact_override

    assert redact_override("train.lr=3e-5") == "train.lr=3e-5"
    assert redact_override("model.config_overrides={pad_token_id: 0}") == "model.config_overrides={pad_token_id: 0}"
    assert redact_override(f"log.run_name={TAG_SECRET}") == f"log.run_name={REDACTED}"
    assert redact_override("model.config_overrides={hf_token: abc}") == f"model.config_overrides={REDACTED}"
    assert redact_override(f"log.tags=[a, {HF_TOKEN}]") == f"log.tags={REDACTED}"


@pytest.mark.timeout(300)
def test_dry_run_does_not_print_a_secret_given_as_override(dry_run):
    assert TAG_SECRET not in dry_run, "the dry run printed a secret given on the command line"
