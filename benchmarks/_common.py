"""Shared pieces of the benchmark scripts: generated data, model folders, timing helpers.

Only the standard library and numpy at import time, so that gpu_bench.py runs on a machine that has
torch/accelerate/transformers but not datasets/evaluate.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a checkout works without `pip install -e .`
    sys.path.insert(0, str(REPO))

# ---------------------------------------------------------------- generated text

# Common English words (one word-piece each in a BERT vocabulary, mostly) plus sentiment words.
NEUTRAL = """the a an and or but of to in on at for with from by about as into like through after over
between out against during without before under around among this that these those it its they them
their we our you your he she his her i me my is are was were be been being have has had do does did
will would can could should may might must shall not no yes very more most less some any each every
all both few many much other another such same so than too also just only even still already again
then now here there when where why how what which who whom whose time year day week month people way
thing man woman child world life hand part place case point group company number system program
question work government night home water room mother area money story fact lot right study book eye
job word business issue side kind head house service friend father power hour game line end member law
car city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy moment
air teacher force education food film movie show music phone store hotel table price order delivery
staff screen battery camera size color quality version update trip flight seat window street""".split()
POSITIVE = """good great excellent wonderful amazing love loved happy pleasant nice fantastic perfect best
enjoy enjoyed brilliant superb delightful friendly helpful comfortable clean fast beautiful fun
impressive reliable recommend awesome glad satisfied smooth""".split()
NEGATIVE = """bad terrible awful horrible hate hated sad poor worst boring broken dirty slow rude annoying
disappointing disappointed useless ugly painful angry noisy expensive unreliable wrong cheap
waste problem failed fail""".split()


def lengths_longtail(n: int, seed: int, median_words: float = 20.0, sigma: float = 0.9, max_words: int = 400):
    """Word counts with a long right tail (log-normal): most texts short, a few long (reviews, support tickets)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.lognormal(mean=math.log(median_words), sigma=sigma, size=n)
    return np.clip(np.rint(w), 1, max_words).astype(int).tolist()


def generate_texts(n: int, seed: int = 0, median_words: float = 20.0, sigma: float = 0.9):
    """n (text, label) pairs: log-normal lengths, label 1 if positive words outnumber negative ones (learnable)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    texts, labels = [], []
    for k in lengths_longtail(n, seed, median_words, sigma):
        y = int(rng.integers(2))
        words = []
        for _ in range(k):
            u = rng.random()
            if u < 0.08:  # a sentiment word, mostly agreeing with the label
                agree = rng.random() < 0.8
                pool = POSITIVE if (y == 1) == agree else NEGATIVE
            else:
                pool = NEUTRAL
            words.append(pool[int(rng.integers(len(pool)))])
        text = " ".join(words)
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        label = 1 if pos > neg else 0 if neg > pos else y
        texts.append(text[0].upper() + text[1:] + ".")
        labels.append(label)
    return texts, labels


def write_csv(path: Path, texts, labels) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for t, y in zip(texts, labels):
            w.writerow([t, y])
    return path


def read_csv(path: Path):
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


# ---------------------------------------------------------------- models

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Small random BERT (MiniLM's vocabulary and tokenizer): compute per step small enough for a shared 2-core CPU.
SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
# A model with next to no compute (a few ms per step): what is left of a step is each tool's own work
# per step (batch fetch, collate, bookkeeping, optimizer calls), the regime of a small model on a GPU.
MICRO = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 16}


def default_model_dir() -> Path:
    from ftdist.model import default_model_path

    return default_model_path()


def make_model_dir(dest: Path, arch: dict, tokenizer_from: Path | None = None) -> Path:
    """A model folder: MiniLM's config.json with `arch` applied (no weights: use model.init=random) + its tokenizer."""
    src = Path(tokenizer_from) if tokenizer_from else default_model_dir()
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(arch)
    cfg["architectures"] = ["BertForSequenceClassification"]
    cfg.pop("_name_or_path", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    return dest


# ---------------------------------------------------------------- numbers

def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}..{max(xs):.3g})"


def verdict(value: float, target: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "PASS" if value >= target else "FAIL"


def machine_line() -> str:
    import platform

    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, load average {load}"


def worker_env(cache: Path | None = None, threads: int | None = None) -> dict:
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if cache is not None:
        env["HF_DATASETS_CACHE"] = str(cache)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("FTDIST_TRACE_DIR", None)
    env.pop("FTDIST_FAULT", None)
    return env
