"""Image classification data: image folders and files of image paths, checked and split like text rows.

A split holds image *paths*, never pixels: images are decoded (and augmented) only when a micro-batch is
collated (ftdist.imagefeed), so a data set far larger than memory trains like a small one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from ftdist import data
from ftdist.config import DataConfig
from ftdist.errors import DataError

log = logging.getLogger("ftdist")

PATH = "path"  # the column of absolute image paths every split is normalised to
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FIX = ("give a folder with one subfolder of images per class (train/cat/1.png, train/dog/2.png...), or a csv/jsonl "
       "file with a column of image paths (data.image_column, relative to the file) and a label column")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def read_images(path: str, where: str, cfg: DataConfig, labelled: bool = True,
                column_keys: tuple[str, str] = ("data.image_column", "data.label_column")) -> datasets.Dataset:
    """The rows of an image folder or a csv/jsonl file of paths: PATH (absolute) and, if `labelled`, the label
    column (cfg.label_column). `where` names the setting in errors (data.train_file, --data, FILE);
    `column_keys` the settings naming the image and label columns (recipe keys, or eval/predict flags)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{where}: {path!r} does not exist (relative paths are from the folder you run in); {FIX}")
    if p.is_dir():
        return _folder(p, where, cfg.label_column, labelled)
    ds = data.read_file(path, where)
    wanted = {column_keys[0]: cfg.image_column, **({column_keys[1]: cfg.label_column} if labelled else {})}
    data.require_columns(ds, wanted, repr(path))
    base = p.resolve().parent

    def absolute(batch):
        # a missing path stays None: a bad row under data.bad_rows, not a crash
        return {PATH: [None if v is None or not str(v).strip() else str(base / str(v).strip())
                       for v in batch[cfg.image_column]]}

    keep = [cfg.label_column] if labelled else []
    return ds.map(absolute, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])


def _folder(root: Path, where: str, label_column: str, labelled: bool) -> datasets.Dataset:
    if not labelled:  # predict: every image below the folder, class subfolders or not
        found = _images_under(root)
        if not found:
            raise DataError(f"{where}: folder {str(root)!r} holds no image files ({', '.join(sorted(EXTENSIONS))})")
        return datasets.Dataset.from_dict({PATH: [str(f.resolve()) for f in found]})
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for d in classes:
        for f in _images_under(d):
            paths.append(str(f.resolve()))
            labels.append(d.name)
    if not paths:
        loose = len(_images_under(root))
        what = f"{loose} image(s) directly in it and " if loose else ""
        raise DataError(f"{where}: folder {str(root)!r} has {what}no class subfolders with images; {FIX}")
    return datasets.Dataset.from_dict({PATH: paths, label_column: labels})


def load_rgb(path: str):
    """The image at `path`, decoded, as RGB: grayscale, palette, CMYK and RGBA (alpha dropped) alike, which is
    what image processors and pretrained vision models expect."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def problem(path: str | None) -> str | None:
    """Why the image at `path` cannot be used (None if it can). Reads the header and checks the file's structure
    (PIL's verify) without decoding the pixels: one cheap pass over the data set at load time."""
    if path is None:
        return "no image path"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        return "missing image file"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable image ({type(e).__name__})"
    return None


def filter_bad(ds: datasets.Dataset, split: str, cfg: DataConfig, label_names: list[str] | None):
    """data.bad_rows for images: missing or unreadable files and missing or unknown labels are dropped with a
    warning that counts them and names the files, or fail naming the first. Returns (kept rows, count dropped)."""
    known = set(label_names) if label_names is not None else None
    paths = ds[PATH][:]
    labels = ds[cfg.label_column][:] if cfg.label_column in ds.column_names else [None] * len(paths)
    reasons = []
    for path, label in zip(paths, labels):
        why = problem(path)
        if why is None and known is not None:
            why = "missing label" if label is None else "unknown label" if str(label) not in known else None
        reasons.append(why)
    bad = [(i, r) for i, r in enumerate(reasons) if r]
    if bad:
        named = "; ".join(f"{paths[i]} ({r})" for i, r in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        if cfg.bad_rows == "fail":
            raise DataError(f"{split} split: {len(bad)} bad row(s): {named}. Fix or remove the files, or set "
                            "data.bad_rows=drop to drop them with a warning")
        log.warning("%s split: dropped %d bad row(s) under data.bad_rows=drop: %s", split, len(bad), named)
        ds = ds.select([i for i, r in enumerate(reasons) if r is None])
    if len(ds) == 0:
        raise DataError(f"{split} split has no usable image; check the folder or file and data.image_column")
    return ds, len(bad)


TASK = "image-classification"


def _read_split(cfg: DataConfig, key: str) -> datasets.Dataset:
    return read_images(getattr(cfg, key), f"data.{key}", cfg)


def build(cfg: DataConfig, main_process_first=None) -> data.Splits:
    """Every split's rows (idx, PATH, labels, length), checked under data.bad_rows; labels as the text path
    finds them (data.labels, else the train split's sorted classes). No pixels are read here but headers."""
    import collections
    import contextlib

    if cfg.dataset is not None:
        raise DataError(f"data.dataset: {cfg.dataset!r}: image classification reads local data; download the images "
                        "and point data.train_file at their folder (one subfolder per class) or a csv/jsonl of paths")
    first = main_process_first or contextlib.nullcontext
    with first():
        raw = {"train": _read_split(cfg, "train_file")}
        for key, split in (("validation_file", "validation"), ("test_file", "test")):
            if getattr(cfg, key):
                raw[split] = _read_split(cfg, key)
        raw = data.carve_splits(raw, cfg)
        names = data.label_names(raw["train"], cfg)
        label_id = {n: i for i, n in enumerate(names)}
        out, dropped = {}, {}
        for split, ds in raw.items():
            ds, dropped[split] = filter_bad(ds, split, cfg, names)
            out[split] = ds.map(
                lambda batch, ids: {"idx": ids, "labels": [label_id[str(v)] for v in batch[cfg.label_column]],
                                    # one item per image: the length-grouped sampler has nothing to group
                                    "length": [1] * len(ids)},
                batched=True, with_indices=True, remove_columns=[cfg.label_column], desc=f"checking {split}")
    c = collections.Counter(out["train"]["labels"][:])
    counts = {names[i]: c.get(i, 0) for i in range(len(names))}
    return data.Splits(out["train"], out.get("validation"), out.get("test"), names, dropped, counts, None)
