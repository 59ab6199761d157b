"""Issue #15: `ftdist eval` / `predict` read their input through the training reader and its checks, never
overwrite a file they did not write, keep a checkpoint's label names, and never run a model's own code
unless told to (and never ask on stdin).

One tiny run (2 steps on a csv with classes neg/pos, no data.labels) is shared by the whole module.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import assert_ok, base_env, run_ftdist

from ftdist import predict
from ftdist.errors import FtdistError

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "window", "garden", "silver"]
CLI_TIMEOUT = 120


def write_csv(path: Path, n: int = 40) -> Path:
    pd.DataFrame([{"text": " ".join(WORDS[(i + k) % 10] for k in range(1 + i % 4)) + f" {i}",
                   "label": "pos" if i % 3 else "neg"} for i in range(n)]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict-input")
    f = write_csv(tmp / "train.csv")
    res = run_ftdist(tmp, ["data.dataset=null", f"data.train_file={f}", "train.max_steps=2",
                           "train.global_batch_size=8", "train.per_device_batch_size=8", "checkpoint.resume=null",
                           "log.trackers=[]"])
    assert_ok(res)
    return res


def ftdist_proc(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real `python -m ftdist` with stdin closed: anything that asks a question fails instead of waiting."""
    return subprocess.run([sys.executable, "-m", "ftdist", *map(str, args)], cwd=cwd, env=base_env(env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT)


def one_error(rc: int, err: str) -> str:
    """The error paragraph of a failed command: exit 2, one line, no traceback."""
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err[err.index("ftdist: error:"):]  # (in-process, library progress bars may come first)
    assert line.count("\n") == 1, line
    return line


# ------------------------------------------------------------------ one reader, one set of checks

BAD_FILES = {
    "latin1.csv": ("text,label\ncaf\u00e9 au lait,pos\n".encode("latin-1"), ["is not UTF-8", "line 2", "0xe9", "re-save"]),
    "tabs.csv": (b"text\tlabel\ngood day\tpos\n", ["tab", ".tsv"]),
    "empty.csv": (b"", ["has no data rows"]),
    "header.csv": (b"text,label\n", ["has no data rows"]),
    "missing.csv": (None, ["does not exist"]),
    "columns.csv": (b"sentence,gold\ngood day,pos\n", ["'text'", "'sentence'", "'gold'"]),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_eval_and_predict_check_files_like_train(trained, tmp_path, cli_main, name):
    content, words = BAD_FILES[name]
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    model = trained.run_dir / "model"
    for args in (["eval", model, "--data", f], ["predict", model, f, "--out", tmp_path / "p.csv"]):
        line = one_error(*cli_main(args)[::2])
        assert str(f) in line, line
        for w in words:
            assert w in line, (w, line)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.timeout(600)
def test_train_and_real_processes_give_the_same_clean_errors(trained, tmp_path):
    latin, tabs = tmp_path / "latin1.csv", tmp_path / "tabs.csv"
    latin.write_bytes(BAD_FILES["latin1.csv"][0])
    tabs.write_bytes(b"text\tlabel\n" + b"".join(b"row %d\t%s\n" % (i, b"pos" if i % 2 else b"neg") for i in range(20)))
    for f, words in ((latin, ["data.train_file: ", "is not UTF-8", "line 2"]), (tabs, ["data.train_file: ", ".tsv"])):
        res = run_ftdist(tmp_path, ["data.dataset=null", f"data.train_file={f}", "train.max_steps=2"],
                         name=f"run-{f.stem}", timeout=240)
        line = one_error(res.rc, res.log)
        for w in words:
            assert w in line, (w, line)
    p = ftdist_proc(["predict", trained.run_dir / "model", latin, "--out", tmp_path / "p.csv"], tmp_path)
    line = one_error(p.returncode, p.stderr)
    assert "is not UTF-8" in line and p.stderr.startswith("ftdist: error:"), p.stderr


# ------------------------------------------------------------------ predict --out

@pytest.mark.timeout(600)
def test_predict_out_never_overwrites_inputs_or_folders(trained, tmp_path, cli_main, monkeypatch):
    model = trained.run_dir / "model"
    data = write_csv(tmp_path / "in.csv", 10)
    before = data.read_bytes()
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--out", "./in.csv"], ["--out", "in.csv", "is the input file"]),
        (["--out", model / "config.json", "--overwrite"], ["--out", "config.json", "model folder"]),
        (["--out", model / "tokenizer.json"], ["--out", "model folder"]),
        (["--out", tmp_path], ["--out", "is a folder"]),
    ]
    model_files = {p.name: p.read_bytes() for p in model.iterdir()}
    for extra, words in cases:
        line = one_error(*cli_main(["predict", model, data, *extra])[::2])
        for w in words:
            assert w in line, (w, line)
    assert data.read_bytes() == before
    assert {p.name: p.read_bytes() for p in model.iterdir()} == model_files
    # an existing unrelated file: kept unless --overwrite says otherwise
    other = tmp_path / "notes.csv"
    other.write_text("mine\n")
    line = one_error(*cli_main(["predict", model, data, "--out", other])[::2])
    assert "already exists" in line and "--overwrite" in line, line
    assert other.read_text() == "mine\n"
    rc, out, err = cli_main(["predict", model, data, "--out", other, "--overwrite"])
    assert rc == 0, err
    with other.open() as fh:
        assert len(list(csv.DictReader(fh))) == 10


# ------------------------------------------------------------------ checkpoints keep their label names

@pytest.mark.timeout(600)
def test_checkpoint_folder_keeps_the_label_names(trained, tmp_path, cli_main):
    ckpt = sorted((trained.run_dir / "checkpoints").glob("step-*"))[-1]
    net, _ = predict.load_model(str(ckpt))
    assert net.config.id2label == {0: "neg", 1: "pos"}
    assert net.config.label2id == {"neg": 0, "pos": 1}
    data = write_csv(tmp_path / "in.csv", 10)
    outs = {}
    for name, folder in (("ckpt", ckpt), ("export", trained.run_dir / "model")):
        rc, _, err = cli_main(["predict", folder, data, "--out", tmp_path / f"{name}.jsonl"])
        assert rc == 0, err
        outs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert {r["label"] for r in outs["ckpt"]} <= {"neg", "pos"}
    for a, b in zip(outs["ckpt"], outs["export"], strict=True):  # the last checkpoint is the exported model
        assert a["label"] == b["label"] and a["p_pos"] == pytest.approx(b["p_pos"], abs=1e-6)
    rc, out, err = cli_main(["eval", ckpt, "--data", data])
    assert rc == 0, err
    assert json.loads(out[out.index("{"):])["n_examples"] == 10


def test_checkpoint_away_from_its_run_folder(trained, tmp_path, caplog):
    """Copied out of its run folder, a checkpoint still names its classes: the trainer saves them in its
    ftdist_state.json. Without them (an older checkpoint) it falls back to ids, with a warning."""
    ckpt = sorted((trained.run_dir / "checkpoints").glob("step-*"))[-1]
    copy = tmp_path / "elsewhere" / ckpt.name
    shutil.copytree(ckpt, copy)
    state = json.loads((copy / "ftdist_state.json").read_text())
    names = state["label_names"]
    assert len(names) == 2 and all(isinstance(n, str) for n in names)
    net, _ = predict.load_model(str(copy))
    assert net.config.id2label == dict(enumerate(names))
    (copy / "ftdist_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "label_names"}))
    net, _ = predict.load_model(str(copy))
    assert net.config.id2label == {0: "0", 1: "1"}
    assert "names of its 2 classes were not found" in caplog.text


# ------------------------------------------------------------------ trust_remote_code

CUSTOM_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import BertConfig, BertForSequenceClassification
class CustomConfig(BertConfig):
    model_type = "ftdist-custom-test"
class CustomForSequenceClassification(BertForSequenceClassification):
    config_class = CustomConfig
'''


def custom_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config.json sends transformers to Python code in the folder (auto_map)."""
    folder.mkdir()
    (folder / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "ftdist-custom-test", "architectures": ["CustomForSequenceClassification"],
        "auto_map": {"AutoConfig": "custom_code.CustomConfig",
                     "AutoModelForSequenceClassification": "custom_code.CustomForSequenceClassification"}}))
    return folder


@pytest.mark.timeout(600)
def test_custom_code_is_refused_without_asking(tmp_path):
    marker = tmp_path / "ran.txt"
    model = custom_model(tmp_path / "custom", marker)
    data = write_csv(tmp_path / "in.csv", 4)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers would copy the code to
    for args in (["predict", model, data, "--out", tmp_path / "p.csv"], ["eval", model, "--data", data]):
        p = ftdist_proc(args, tmp_path, env)
        line = one_error(p.returncode, p.stderr)
        assert "--trust-remote-code" in line and str(model) in line, line
        assert "[y/N]" not in p.stdout + p.stderr
    assert not marker.exists(), "the model's own code ran"
    assert not (tmp_path / "p.csv").exists()


def test_checkpoint_trained_with_remote_code_needs_the_flag(trained, tmp_path):
    ckpt = sorted((trained.run_dir / "checkpoints").glob("step-*"))[-1]
    copy = tmp_path / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, copy)
    recipe = (copy / "recipe.yaml").read_text()
    assert "trust_remote_code: false" in recipe
    (copy / "recipe.yaml").write_text(recipe.replace("trust_remote_code: false", "trust_remote_code: true"))
    with pytest.raises(FtdistError, match="--trust-remote-code"):
        predict.load_model(str(copy))


def test_every_loader_gets_trust_remote_code_explicitly(trained, monkeypatch):
    import transformers

    from ftdist import cli

    seen = []

    def spy(cls):
        real = cls.from_pretrained.__func__

        def from_pretrained(klass, *a, **kw):
            seen.append((cls.__name__, kw.get("trust_remote_code", "absent")))
            return real(klass, *a, **kw)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        spy(cls)
    for flag in (False, True):
        seen.clear()
        predict.load_model(str(trained.run_dir / "model"), trust_remote_code=flag)
        assert sorted(seen) == [("AutoModelForSequenceClassification", flag), ("AutoTokenizer", flag)]
    parser = cli.build_parser()
    for cmd in (["predict", "m", "f"], ["eval", "m", "--data", "f"]):
        assert parser.parse_args(cmd).trust_remote_code is False
        assert parser.parse_args([*cmd, "--trust-remote-code"]).trust_remote_code is True
