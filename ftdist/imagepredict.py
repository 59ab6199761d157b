"""`ftdist eval` and `ftdist predict` inputs for image models: the images of a folder or a csv/jsonl of paths,
turned into logits by the model's own image processor (as in training, without augmentation)."""

from __future__ import annotations

import torch

from ftdist import images
from ftdist.config import DataConfig
from ftdist.errors import DataError
from ftdist.imagefeed import ImageCollator


def is_image_model(net) -> bool:
    return "ImageClassification" in type(net).__name__


def rows(file: str, where: str, image_column: str, label_column: str | None):
    """(absolute image paths, labels or None) of a folder (eval: one subfolder per class; predict: every image
    below it) or a csv/jsonl file (paths relative to the file). An unreadable image is an error naming it:
    eval and predict answer for every input, so none is dropped."""
    cfg = DataConfig(task=images.TASK, image_column=image_column, label_column=label_column or "label")
    ds = images.read_images(file, where, cfg, labelled=label_column is not None,
                            column_keys=("--image-column", "--label-column"))
    paths = ds[images.PATH][:]
    bad = [(p, why) for p in paths if (why := images.problem(p))]
    if bad:
        named = "; ".join(f"{p} ({why})" for p, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{where}: {len(bad)} image(s) cannot be used: {named}. Fix or remove them")
    return paths, (ds[cfg.label_column][:] if label_column is not None else None)


def logits(net, processor, paths: list[str], batch_size: int):
    """Each batch's class logits (CPU, float32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).eval()
    collate = ImageCollator(processor, None)
    for i in range(0, len(paths), batch_size):
        pixels = collate.pixels([images.load_rgb(p) for p in paths[i:i + batch_size]])
        with torch.no_grad():
            yield net(pixel_values=pixels.to(device)).logits.float().cpu()
