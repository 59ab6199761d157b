"""Image micro-batches: decode each image when its micro-batch is collated, augment training images, and turn
them into the model's pixel values with its image processor (size, normalisation).

Augmentation is a pure function of (train.seed, epoch, example index): the random numbers of an example's view
come from its own generator, never from a stream shared with other examples. So the view does not depend on
which rank or micro-batch the example lands in (1 process and N processes see the same pixels), nor on loader
workers, and a resumed run draws exactly the views the uninterrupted run drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ftdist import images
from ftdist.config import DataConfig
from ftdist.errors import DataError

AUGMENTATIONS = ("random_resized_crop", "horizontal_flip")


@dataclass(frozen=True)
class Augment:
    crop: bool
    flip: bool
    min_scale: float
    seed: int


def augment_of(cfg: DataConfig, seed: int) -> Augment | None:
    if not cfg.augment:
        return None
    return Augment("random_resized_crop" in cfg.augment, "horizontal_flip" in cfg.augment, cfg.crop_scale, seed)


def crop_box(width: int, height: int, rng: np.random.Generator, min_scale: float) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: area in [min_scale, 1] of the image, aspect ratio in [3/4, 4/3]
    (log-uniform), ten tries, else the whole image clipped to the ratio range."""
    area = width * height
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * 4 / 3), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def view(img, aug: Augment, epoch: int, idx: int):
    """The training view of example `idx` in `epoch`: cropped and flipped by its own random numbers. The
    processor resizes the crop to the model's input size afterwards."""
    from PIL import Image

    rng = np.random.default_rng([aug.seed, epoch, idx])
    if aug.crop:
        img = img.crop(crop_box(img.width, img.height, rng, aug.min_scale))
    if aug.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


class ImageRows(torch.utils.data.Dataset):
    """Rows by key (index, real) or, for augmented training, (index, real, epoch); returns (row, real, epoch)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        cols = self.ds[[k[0] for k in keys]]
        rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
        return [(row, k[1], k[2] if len(k) > 2 else None) for row, k in zip(rows, keys)]


class EpochKeys:
    """The training batch sampler with the epoch in every key, so that the collator (in a loader worker too)
    knows which view to draw. Everything else is the wrapped GlobalBatchSampler's."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        for micro in self.sampler:
            yield [(i, real, epoch) for i, real in micro]

    def __len__(self):
        return len(self.sampler)


class ImageCollator:
    def __init__(self, processor, augment: Augment | None):
        self.processor, self.augment = processor, augment

    def pixels(self, pictures) -> torch.Tensor:
        return self.processor(images=pictures, return_tensors="pt")["pixel_values"]

    def __call__(self, items):
        pictures = []
        for row, _, epoch in items:
            try:
                img = images.load_rgb(row[images.PATH])
            except OSError as e:  # the load-time check reads headers only: a file truncated inside fails here
                raise DataError(f"image {row[images.PATH]!r} could not be decoded ({type(e).__name__}: {e}); "
                                "replace or remove the file") from None
            if self.augment is not None and epoch is not None:
                img = view(img, self.augment, epoch, row["idx"])
            pictures.append(img)
        return {"pixel_values": self.pixels(pictures),
                "labels": torch.tensor([row["labels"] for row, _, _ in items]),
                "real": torch.tensor([real for _, real, _ in items], dtype=torch.bool),
                "idx": torch.tensor([row["idx"] for row, _, _ in items])}


@dataclass
class ImageFeed:
    """What the run's loaders need for images: rows, the training batch sampler, and a collator per use."""

    processor: Any
    augment: Augment | None

    def dataset(self, ds):
        return ImageRows(ds)

    def batch_sampler(self, sampler):
        return EpochKeys(sampler)

    def collator(self, train: bool) -> ImageCollator:
        return ImageCollator(self.processor, self.augment if train else None)
