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
        "log": {"every_steps": 1, "tags": [TAG_SECRET, "plain-tag"], "run_name": NAME_SECRET,
                "trackers": ["jsonl", "tensorboard"]}}))
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
    named = [str(p.relative_to(run)) for p in run.rglob("*") if any(s in p.name for s in SECRETS)]
    assert not named, f"secrets in file or folder names: {named}"
    assert list(run.rglob("events.out.tfevents.*")), "TensorBoard wrote no events"
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


# ------------------------------------------------------------------ secrets inside names, errors, env reports

AWS_KEY = "AKIA" + "ABCDEFGHIJKLMNOP"          # an AWS access key id: AKIA + 16
GH_TOKEN = "ghp_" + "aB3" * 12                  # a GitHub personal access token
GH_PAT = "github_pat_" + "11AB_cd" * 6          # ... and a fine-grained one


def test_redact_text_masks_credentials_inside_text():
    from ftdist.redaction import redact_name, redact_override, redact_text

    for secret in (HF_TOKEN, TAG_SECRET, WANDB_KEY, AWS_KEY, GH_TOKEN, GH_PAT):
        for text in (secret, f"exp-{secret}", f"run {secret}, again", f"x_{secret}.log"):
            got = redact_text(text)
            assert secret not in got and REDACTED in got, (text, got)
            name = redact_name(text)
            assert secret not in name and "REDACTED" in name and "*" not in name, (text, name)
    assert redact_text("https://alice:s3cr3t@hub.example.com/x") == "https://alice:***@hub.example.com/x"
    assert redact_text("redis://:pw@cache:6379 and ok") == "redis://:***@cache:6379 and ok"
    # nothing that merely resembles a credential is touched
    for plain in ("task-classification-with-long-name-here", "https://hub.example.com/a@b", "pad_token_id",
                  "sha " + "a" * 41, "user@example.com", "runs/demo"):
        assert redact_text(plain) == plain and redact_name(plain) == plain, plain
    # a recipe value keeps a commit hash inside a path (a snapshot folder must still reload), not a token
    snapshot = "/cache/models--x/snapshots/" + WANDB_KEY
    assert redact({"name": snapshot, "run_name": f"exp-{HF_TOKEN}"}) == {"name": snapshot, "run_name": f"exp-{REDACTED}"}
    assert HF_TOKEN not in redact_override(f"log.run_name=exp-{HF_TOKEN}")


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """An Accelerator logging to jsonl, TensorBoard and wandb (disabled; wandb.init recorded), started the way
    ftdist.run starts its trackers, with credentials in the run name and the tags."""
    import wandb
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ftdist import tracking

    monkeypatch.setenv("WANDB_MODE", "disabled")
    inits = Spy(wandb.init)
    monkeypatch.setattr(wandb, "init", inits)
    r = config.from_dict({"data": {"dataset": "vader"}, "log": {
        "output_dir": str(tmp_path / "run"), "run_name": f"exp-{NAME_SECRET}", "tags": [TAG_SECRET, f"t-{AWS_KEY}", "ok"],
        "trackers": ["jsonl", "tensorboard", "wandb"]}})
    run_dir = Path(r.log.output_dir)
    acc = Accelerator(cpu=True, log_with=tracking.trackers(r.log.trackers, str(run_dir)), project_dir=str(run_dir))
    run = type("FakeRun", (), {"recipe": r, "run_dir": run_dir, "acc": acc})()
    try:
        tracking.start(run)  # as ftdist.run starts them
        acc.log({"train/loss": 1.0}, step=1)
        acc.end_training()
        yield run_dir, inits.calls
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.timeout(120)
def test_tracker_run_name_tags_and_folders_are_redacted(tracked):
    run_dir, inits = tracked
    secrets = (NAME_SECRET, TAG_SECRET, AWS_KEY)
    paths = list(run_dir.rglob("*"))
    assert any(p.name.startswith("events.out.tfevents") for p in paths), "TensorBoard wrote nothing"
    named = [str(p.relative_to(run_dir)) for p in paths if any(s in p.name for s in secrets)]
    assert not named, f"a credential became a file or folder name: {named}"
    written = [str(p.relative_to(run_dir)) for p in paths if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]
    assert not written, f"a credential was written to {written}"
    assert (run_dir / "exp-REDACTED").is_dir(), sorted(p.name for p in run_dir.iterdir())
    assert len(inits) == 1, inits
    shown = repr(inits[0])
    assert not [s[:6] for s in secrets if s in shown], f"wandb.init got a credential: {shown}"
    assert inits[0]["name"] == "exp-REDACTED" and inits[0]["project"] == "exp-REDACTED"
    assert inits[0]["tags"] == ["REDACTED", "t-REDACTED", "ok"]
    assert inits[0]["id"] == (run_dir / "wandb_run_id").read_text().strip()


@pytest.mark.parametrize("override, secret", [
    (f"train.lr={HF_TOKEN}", HF_TOKEN), (f"log.wandb_api_key={HF_TOKEN}", HF_TOKEN),
    (f"log.wandb.api_key={HF_TOKEN}", HF_TOKEN), (f"train.epochs=[1, {TAG_SECRET}]", TAG_SECRET),
    (f"trian.lr={WANDB_KEY}", WANDB_KEY), (f"log.{AWS_KEY}=1", AWS_KEY), (f"eval.best_metric=m-{GH_TOKEN}", GH_TOKEN),
    ("data.max_length=https://u:p4ssw0rd@host", "p4ssw0rd"), ("log.tags={api_key: hunter22}", "hunter22"),
    ("log.wandb.api_key=hunter22", "hunter22")])
def test_override_errors_do_not_echo_secrets(override, secret):
    with pytest.raises(config.RecipeError) as e:
        config.load("demo", [override])
    assert secret not in str(e.value), str(e.value)
    assert "\n  - " in str(e.value)  # the error itself is still reported


@pytest.mark.timeout(120)
def test_cli_override_error_does_not_print_secret(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ftdist", "train", "demo", f"train.lr={HF_TOKEN}",
                        f"log.wandb.api_key={WANDB_KEY}", "--quiet"],
                       cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=100)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "train.lr: expected a number" in out and "Traceback" not in out, out
    assert HF_TOKEN not in out and WANDB_KEY not in out, out


def test_env_report_masks_url_credentials_and_token_values(monkeypatch):
    env = {"HF_ENDPOINT": "https://alice:hunter2pass@hub.example.com", "WANDB_BASE_URL": f"https://u:{HF_TOKEN}@wb.example",
           "FTDIST_FOO": HF_TOKEN, "WANDB_X": WANDB_KEY, "NCCL_SOCKET_IFNAME": "eth0", "HF_HOME": f"/data/{GH_TOKEN}/hf",
           "SLURM_JOB_NAME": f"train-{TAG_SECRET}", "SLURM_NTASKS": "2", "SLURM_JOB_COMMENT": "https://bob:pw123456@git.example"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(envinfo, "_deepspeed_ops", lambda: {})
    info = envinfo.collect()
    text = envinfo.render(info) + "\n" + json.dumps(info)
    for secret in ("hunter2pass", HF_TOKEN, WANDB_KEY, GH_TOKEN, TAG_SECRET, "pw123456"):
        assert secret not in text, (secret, text)
    assert info["env"]["HF_ENDPOINT"] == "https://alice:***@hub.example.com"
    assert info["env"]["NCCL_SOCKET_IFNAME"] == "eth0" and info["slurm"]["SLURM_NTASKS"] == "2"
    assert info["env"]["FTDIST_FOO"] == REDACTED and info["slurm"]["SLURM_JOB_NAME"] == f"train-{REDACTED}"


@pytest.fixture
def saved_checkpoint(tmp_path, accelerator):
    net = torch.nn.Linear(4, 2)
    model, opt = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-3))
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return checkpoint.save(accelerator, str(tmp_path), 1, {"step": 1, "epoch": 0, "step_in_epoch": 1, "stage": 0},
                           "x: 1\n", keep_last=1)


class _Payload:
    """Unpickled, it would create a marker file (as a real attack would run a command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin"])
def test_unsafe_checkpoint_pickle_is_refused_with_a_clear_message(tmp_path, accelerator, saved_checkpoint, victim):
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker), "param_groups": []}, saved_checkpoint / victim)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(accelerator, saved_checkpoint)
    msg = str(e.value)
    assert not marker.exists(), "loading a checkpoint executed code from a pickle"
    assert victim in msg and str(saved_checkpoint) in msg, msg
    assert "refused as unsafe" in msg and "objects other than tensors and plain data" in msg, msg
    assert "re-create" in msg and "you made" in msg, msg
    assert "weights_only" not in msg and "Traceback" not in msg and "\n" not in msg, msg
