"""The offline image demo's material: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), written as
image folders, and the tiny ViT the demo pretrains.

    python3 -m ftdist.digits [OUT]      (default runs/digits-data)

Two disjoint halves of the digits, split by a fixed seed, with a real domain shift between them:
    pretrain/{train,val}/<digit>/   white digits on black, upsampled to 16x16: the pretraining task
    finetune/{train,val,test}/      the other half, drawn as dark ink on light paper with a blur: the task the
                                    pretrained model is fine-tuned on, with few labelled examples (10 per digit)
    vit-tiny/                       the architecture both steps train (config and image processor, no weights)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ftdist.errors import FtdistError

SIZE = 16
FEW_SHOT = 10  # fine-tuning examples per digit: few labels, the case where pretraining matters


def _pretrain_look(pixels: np.ndarray):
    from PIL import Image

    img = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
    return img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def _finetune_look(pixels: np.ndarray):
    """Another domain: dark ink on light paper, blurred, at another scale (the digit fills 12 of 16 pixels)."""
    from PIL import Image, ImageFilter, ImageOps

    ink = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L").resize((12, 12), Image.Resampling.BICUBIC)
    page = Image.new("L", (SIZE, SIZE), 0)
    page.paste(ink, (2, 2))
    return ImageOps.invert(page.filter(ImageFilter.GaussianBlur(0.6)))


def _write(root: Path, images: np.ndarray, labels: np.ndarray, look) -> int:
    for k, (pixels, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        look(pixels).save(folder / f"{k:04d}.png")
    return len(labels)


def write(out: str, limit: int | None = None) -> dict[str, int]:
    """Write the demo's folders and model under `out`; returns the image count of each folder. `limit`: use
    only that many digits (a quick check of the layout; the demo uses all)."""
    import transformers

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FtdistError("the image demo's digits ship with scikit-learn, which is not installed: "
                          "pip install scikit-learn (or pip install -e '.[images-demo]')") from None

    digits = load_digits()
    x, y = digits.images, digits.target
    order = np.random.default_rng(0).permutation(len(y))[:limit]
    half = len(order) // 2
    pre, fine = order[:half], order[half:]
    root = Path(out)
    counts = {}
    n_val = len(pre) // 10
    counts["pretrain/train"] = _write(root / "pretrain" / "train", x[pre[n_val:]], y[pre[n_val:]], _pretrain_look)
    counts["pretrain/val"] = _write(root / "pretrain" / "val", x[pre[:n_val]], y[pre[:n_val]], _pretrain_look)
    # few-shot training set: the first FEW_SHOT of each digit in the fine-tuning half's order; 100 for validation
    shots = np.concatenate([fine[y[fine] == d][:FEW_SHOT] for d in range(10)])
    rest = np.array([i for i in fine if i not in set(shots.tolist())])
    parts = {"train": shots, "val": rest[:100], "test": rest[100:]}
    for name, idx in parts.items():
        counts[f"finetune/{name}"] = _write(root / "finetune" / name, x[idx], y[idx], _finetune_look)
    model = root / "vit-tiny"
    transformers.ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=128).save_pretrained(model)
    transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(model)
    return counts


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/digits-data"
    try:
        counts = write(target)
    except FtdistError as e:
        sys.exit(f"error: {e}")
    for folder, n in counts.items():
        print(f"{Path(target) / folder}: {n} images")
    print(f"{Path(target) / 'vit-tiny'}: the ViT both steps train")
