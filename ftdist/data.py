"""Data: load splits (hub, local files or the shipped demo), check columns and labels, tokenize once.

Everything goes through `datasets`, so tokenization is batched and cached on disk
(`datasets.map` fingerprints), and large files are memory-mapped Arrow tables.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from ftdist import lengths
from ftdist.config import DataConfig
from ftdist.errors import DataError, did_you_mean

log = logging.getLogger("ftdist")

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
           ".conll": "conll", ".txt": "conll"}


@dataclass
class Splits:
    """Tokenized splits plus what the model needs to know about the labels."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    label_names: list[str] | None  # None for regression
    dropped: dict[str, int]        # split -> rows dropped by the bad_rows policy
    label_counts: dict[str, int]   # train label distribution (classification)
    max_length: int | None = 0     # the truncation length used (data.max_length, or derived from the data); None: images


# ---------------------------------------------------------------- loading

def _vader() -> datasets.Dataset:
    """The demo data: VADER's lexicon of ~7,500 English tokens rated by 10 humans each (-4..+4).

    Binary task: positive if the mean rating > +0.5, negative if < -0.5; the ambiguous middle is left out.
    """
    import vaderSentiment

    path = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        mean = float(parts[1])
        if abs(mean) > 0.5:
            texts.append(parts[0])
            labels.append("positive" if mean > 0 else "negative")
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def read_conll(path: str, text_column: str, label_column: str, with_tags: bool = True) -> datasets.Dataset:
    """CoNLL-style columns: one token per line, token first and tag last, blank line between sentences.
    With with_tags=False (text to predict on) a line may hold the token alone, and no tag column is returned."""
    tokens, tags, all_tokens, all_tags = [], [], [], []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("-DOCSTART-"):
            if tokens:
                all_tokens.append(tokens)
                all_tags.append(tags)
                tokens, tags = [], []
            continue
        parts = line.split()
        if with_tags and len(parts) < 2:
            raise DataError(f"{path}: line {raw!r} has no tag column; CoNLL files need 'TOKEN ... TAG' per line")
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        all_tokens.append(tokens)
        all_tags.append(tags)
    if not with_tags:
        return datasets.Dataset.from_dict({text_column: all_tokens})
    return datasets.Dataset.from_dict({text_column: all_tokens, label_column: all_tags})


def read_file(path: str, where: str, conll: tuple[str, str] | None = None, with_tags: bool = True) -> datasets.Dataset:
    """A local data file, with the checks every reader of one needs: training (where='data.train_file'...),
    `ftdist eval` (where='--data') and `ftdist predict` (where='FILE') alike. A missing, empty, header-only,
    non-UTF-8 or wrongly delimited file is a DataError naming `where` and the file.
    `conll`: the (token, tag) columns a CoNLL file is read into; None refuses CoNLL files (no use for them)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{where}: {path!r} is a folder; give a data file in it")
    if not p.is_file():
        raise DataError(f"{where}: file {path!r} does not exist; check the path (relative paths are from the "
                        "folder you run in)")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None or (fmt == "conll" and conll is None):
        usable = sorted(ext for ext, f in FORMATS.items() if conll or f != "conll")
        raise DataError(f"{where}: {path!r} has an unsupported extension {p.suffix!r}; use one of {', '.join(usable)}")
    # datasets logs a reader's failure at ERROR before raising: the user is told once, by the DataError below
    readers = logging.getLogger("datasets.packaged_modules")
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    try:
        if p.stat().st_size == 0:
            ds = None
        elif fmt == "conll":
            ds = read_conll(path, *conll, with_tags=with_tags)
        else:
            kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(fmt, data_files={"train": str(p)}, split="train", **kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for malformed files
        if fmt != "parquet":
            _check_utf8(p, where, path)  # the likeliest cause, and the library's words for it name no line
        chain = [e]
        while chain[-1].__cause__ is not None:  # datasets wraps the reader's error: "An error occurred while..."
            chain.append(chain[-1].__cause__)
        if not any("corresponds to no data" in str(x) for x in chain):  # datasets' words for zero rows
            why = f"{type(chain[-1]).__name__}: {str(chain[-1]).splitlines()[0] if str(chain[-1]) else ''}"
            raise DataError(f"{where}: could not read {path!r} as {fmt} ({why})") from None
        ds = None
    finally:
        readers.setLevel(level)
    if ds is None or len(ds) == 0:
        raise DataError(f"{where}: {path!r} has no data rows (an empty file, or a header only); "
                        "give a file with examples in it")
    if fmt == "csv":
        _check_delimiter(ds, where, path)
    return ds


_SEPARATORS = {"\t": ("tab", ".tsv", "rename it to .tsv"), ",": ("comma", ".csv", "rename it to .csv"),
               ";": ("semicolon", None, "re-save it comma-separated (.csv) or tab-separated (.tsv)")}


def _check_delimiter(ds: datasets.Dataset, where: str, path: str) -> None:
    """A file read as one column whose header holds another separator was saved with that separator: without
    this, the user hears only that the text column is missing."""
    if len(ds.column_names) != 1:
        return
    header, suffix = ds.column_names[0], Path(path).suffix.lower()
    for sep, (name, ext, fix) in _SEPARATORS.items():
        if sep in header and ext != suffix:
            raise DataError(f"{where}: {path!r} was read as one column named {header!r}: its header holds {name}s, "
                            f"so the file is {name}-separated, not what its {suffix} name says; {fix}")


def _check_utf8(p: Path, where: str, path: str) -> None:
    """Raise naming the first line that is not UTF-8, if any. Line by line is exact: a newline byte never
    occurs inside a multi-byte UTF-8 character."""
    with p.open("rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{where}: {path!r} is not UTF-8 but UTF-16 text (it starts with a UTF-16 byte-order "
                            "mark, as Excel's 'Unicode text' writes); re-save it as UTF-8 (e.g. 'CSV UTF-8')")
        f.seek(0)
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: {path!r} is not UTF-8 text: line {n} has byte 0x{line[e.start]:02x} at column "
                    f"{e.start + 1}, which is not UTF-8 (Latin-1 or Windows-1252 text?); re-save the file as UTF-8 "
                    "(spreadsheets: 'CSV UTF-8'; or iconv -f cp1252 -t utf-8 IN > OUT)") from None


def _read_split(cfg: DataConfig, key: str) -> datasets.Dataset:
    return read_file(getattr(cfg, key), f"data.{key}", (cfg.text_column, cfg.label_column))


def _load_raw(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    if cfg.dataset == "vader":
        raw = {"train": _vader()}
    elif cfg.dataset is not None:
        try:
            loaded = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
        except Exception as e:
            raise DataError(
                f"data.dataset: could not load {cfg.dataset!r} from the hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). With no network, download it once elsewhere "
                "or point data.train_file at a local csv/jsonl/parquet file") from None
        raw = {k: v for k, v in loaded.items()}
        if "validation" not in raw and "dev" in raw:
            raw["validation"] = raw.pop("dev")
    else:
        raw = {"train": _read_split(cfg, "train_file")}
    if cfg.validation_file:
        raw["validation"] = _read_split(cfg, "validation_file")
    if cfg.test_file:
        raw["test"] = _read_split(cfg, "test_file")
    return carve_splits(raw, cfg)


def carve_splits(raw: dict[str, datasets.Dataset], cfg: DataConfig) -> dict[str, datasets.Dataset]:
    """The splits with those the files did not give carved from train (text and image rows alike)."""
    # Carve missing splits from train, deterministically (test first so validation does not change with test_split).
    if "test" not in raw and cfg.test_split > 0:
        parts = _carve(raw["train"], cfg.test_split, cfg.split_seed, "test_split")
        raw["train"], raw["test"] = parts["train"], parts["test"]
    if "validation" not in raw and cfg.validation_split > 0:
        parts = _carve(raw["train"], cfg.validation_split, cfg.split_seed + 1, "validation_split")
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    return raw


def _carve(ds: datasets.Dataset, fraction: float, seed: int, key: str):
    n_out = int(round(len(ds) * fraction))
    if n_out < 1 or n_out >= len(ds):
        raise DataError(f"data.{key}: {fraction} of {len(ds)} training rows leaves an empty split; use a larger fraction or give the file")
    return ds.train_test_split(test_size=n_out, seed=seed, shuffle=True)


# ---------------------------------------------------------------- checking

def require_columns(ds: datasets.Dataset, wanted: dict[str, str | None], source: str) -> None:
    """Each setting's column (setting -> column; None: not used) is one of ds's, else a DataError naming the
    setting: a recipe key (data.text_column) for training, a flag (--text-column) for eval and predict."""
    for key, col in wanted.items():
        if col is not None and col not in ds.column_names:
            fix = f"Give {key} <name>" if key.startswith("--") else f"Set {key}=<name>"
            raise DataError(f"{key}: column {col!r} is not in {source}{did_you_mean(col, ds.column_names)}; "
                            f"its columns are {ds.column_names}. {fix}")


def _check_columns(ds: datasets.Dataset, split: str, cfg: DataConfig) -> None:
    require_columns(ds, {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column,
                         "data.text_pair_column": cfg.text_pair_column}, f"the {split} split")


def _label_key(v) -> str:
    return str(v)


def _filter_bad(ds: datasets.Dataset, split: str, cfg: DataConfig, label_names) -> tuple[datasets.Dataset, int]:
    """Apply the bad_rows policy to empty texts and unknown labels; return the kept rows and the count dropped."""
    known = set(label_names) if label_names is not None else None
    token_task = cfg.task == "token-classification"

    def bad(row) -> str | None:
        text = row[cfg.text_column]
        if text is None or (isinstance(text, str) and not text.strip()) or (isinstance(text, list) and not text):
            return "empty text"
        if cfg.text_pair_column and not str(row[cfg.text_pair_column] or "").strip():
            return "empty text pair"
        label = row[cfg.label_column]
        if label is None:
            return "missing label"
        if token_task:
            if not isinstance(label, list) or len(label) != len(text):
                return "tags and tokens differ in length"
            if known is not None and any(_label_key(t) not in known for t in label):
                return "unknown tag"
        elif known is not None and _label_key(label) not in known:
            return "unknown label"
        elif cfg.task == "regression":
            try:
                float(label)
            except (TypeError, ValueError):
                return "non-numeric label"
        return None

    # column batches straight from Arrow: bounded memory and ~10x faster than row dicts on large files
    cols = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column) if c]
    reasons = []
    for batch in ds.select_columns(cols).iter(batch_size=10_000):
        reasons += [bad({c: batch[c][i] for c in cols}) for i in range(len(batch[cols[0]]))]
    n_bad = sum(r is not None for r in reasons)
    if n_bad:
        examples = sorted({r for r in reasons if r})
        if cfg.bad_rows == "fail":
            first = next(i for i, r in enumerate(reasons) if r)
            raise DataError(f"{split} split: {n_bad} bad row(s) ({', '.join(examples)}), first at row {first}; "
                            "clean the file or set data.bad_rows=drop to drop them with a warning")
        log.warning("%s split: dropped %d bad row(s) (%s) under data.bad_rows=drop", split, n_bad, ", ".join(examples))
        keep = [i for i, r in enumerate(reasons) if r is None]
        ds = ds.select(keep)
    if len(ds) == 0:
        raise DataError(f"{split} split is empty after loading; check the file and the column settings")
    return ds, n_bad


def label_names(train: datasets.Dataset, cfg: DataConfig) -> list[str] | None:
    if cfg.task == "regression":
        return None
    values = train[cfg.label_column][:]  # [:] reads the column at once (iterating it goes row by row)
    if cfg.task == "token-classification":
        found = {str(t) for tags in values if isinstance(tags, list) for t in tags}
    else:
        found = {_label_key(v) for v in values if v is not None}
    if cfg.labels is not None:
        names = [str(x) for x in cfg.labels]
        _check_declared(names, found)
        return names
    if cfg.task == "classification":
        _check_not_fractional(found, cfg.label_column)
    ints = all(u.lstrip("-").isdigit() for u in found)
    names = sorted(found, key=(lambda u: int(u)) if ints else None)
    if len(names) < 2:
        raise DataError(f"data.label_column: column {cfg.label_column!r} of the train split has {len(names)} class(es) {names}; "
                        "classification needs at least two. Check the column, or use data.task=regression for numbers")
    return names


def _check_declared(names: list[str], found: set[str]) -> None:
    """data.labels against the train split's labels: a declared class with no train example is an error (a
    misspelling, when the data has labels data.labels lacks, whose rows would all be dropped as unknown; else a
    class the model could never learn to predict)."""
    unseen = [n for n in names if n not in found]
    if not unseen:
        return
    undeclared = sorted(found - set(names))
    named = ", ".join(f"{n!r}{did_you_mean(n, sorted(found))}" for n in unseen)
    why = (f"whose label(s) {undeclared} are not in data.labels {names}: every row of those would be an unknown "
           "label (dropped, or failing under data.bad_rows=fail)" if undeclared else
           "so the model could never learn to predict it")
    raise DataError(f"data.labels: {named} {'has' if len(unseen) == 1 else 'have'} no example in the train split, {why}. "
                    f"Fix the name(s) in data.labels, or leave the class out (the train split's labels are {sorted(found)})")


_DECIMAL = re.compile(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?")


def _check_not_fractional(found: set[str], column: str) -> None:
    """Numbers with a fraction are a regression target, not classes: as classes, each distinct value would be
    its own class (a classifier over hundreds of 'classes' that trains without complaint)."""
    numbers = [u for u in found if _DECIMAL.fullmatch(u)]
    fractional = sorted((u for u in numbers if not float(u).is_integer()), key=float)
    if fractional and len(numbers) == len(found):
        raise DataError(f"data.label_column: column {column!r} of the train split holds numbers with a fraction "
                        f"({', '.join(fractional[:3])}{', ...' if len(fractional) > 3 else ''}), which are not class "
                        "names under data.task=classification. For a numeric target set "
                        "data.task=regression; for classes, use names or whole numbers")


# ---------------------------------------------------------------- tokenization

def _encode(cfg: DataConfig, tokenizer, label_names):
    label_id = {n: i for i, n in enumerate(label_names or [])}

    def fn(batch):
        trace = os.environ.get("FTDIST_TRACE_DIR")
        if trace:  # tests: record which rank really tokenized (a cache hit never calls this function)
            Path(trace).mkdir(parents=True, exist_ok=True)
            with open(Path(trace) / "tokenized.log", "a") as f:
                f.write(f"{os.environ.get('RANK', '0')} {len(batch[cfg.label_column])}\n")
        if cfg.task == "token-classification":
            enc = tokenizer(batch[cfg.text_column], is_split_into_words=True, truncation=True, max_length=cfg.max_length)
            enc["labels"] = [align_labels(enc.word_ids(i), [label_id[str(t)] for t in tags], cfg.label_all_subwords)
                             for i, tags in enumerate(batch[cfg.label_column])]
        else:
            pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
            enc = tokenizer(batch[cfg.text_column], pair, truncation=True, max_length=cfg.max_length)
            if cfg.task == "regression":
                enc["labels"] = [float(v) for v in batch[cfg.label_column]]
            else:
                enc["labels"] = [label_id[_label_key(v)] for v in batch[cfg.label_column]]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    return fn


def align_labels(word_ids, word_labels, all_subwords: bool) -> list[int]:
    """Word labels -> subword labels. Special tokens get -100; later subwords of a word get -100 unless all_subwords."""
    out, prev = [], None
    for w in word_ids:
        if w is None:
            out.append(-100)
        elif w != prev or all_subwords:
            out.append(word_labels[w])
        else:
            out.append(-100)
        prev = w
    return out


def build(cfg: DataConfig, tokenizer, main_process_first=None, limit: int | None = None) -> Splits:
    """Load, check and tokenize every split. `main_process_first` is accelerate's context manager:
    rank 0 tokenizes and fills the datasets cache, the other ranks then read it. `limit`: the model's
    positions, the most a derived max_length may be."""
    import contextlib
    import dataclasses

    first = main_process_first or contextlib.nullcontext
    with first():
        raw = _load_raw(cfg)
        for split, ds in raw.items():
            if len(ds) == 0:
                raise DataError(f"{split} split is empty; check the file or the split fractions")
            _check_columns(ds, split, cfg)
        names = label_names(raw["train"], cfg)
        dropped = {}
        for split, ds in raw.items():
            raw[split], dropped[split] = _filter_bad(ds, split, cfg, names)
        if cfg.max_length is None:
            cfg = dataclasses.replace(cfg, max_length=lengths.derive_max_length(cfg, tokenizer, raw["train"], limit))
        out = {}
        for split, ds in raw.items():
            ds = ds.add_column("idx", list(range(len(ds))))
            keep = ["idx"]
            ds = ds.map(_encode(cfg, tokenizer, names), batched=True, num_proc=cfg.num_proc,
                        remove_columns=[c for c in ds.column_names if c not in keep],
                        desc=f"tokenizing {split}")
            out[split] = ds
    counts = {}
    if names is not None and cfg.task == "classification":
        import collections
        c = collections.Counter(out["train"]["labels"][:])
        counts = {names[i]: c.get(i, 0) for i in range(len(names))}
    return Splits(out["train"], out.get("validation"), out.get("test"), names, dropped, counts, cfg.max_length)
