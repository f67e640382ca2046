"""An offline pix2pix dataset from real photographs: the colour sample images that ship inside
scikit-image (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry,
retina, motorcycle). Random square crops become aligned A|B pairs for a real translation task,

- ``edges``: A = Canny edge map (black lines on white, like edges2shoes), B = the photo;
- ``colorize``: A = the grayscale photo, B = the colour photo;

written as PNG files in the aligned format (``train/ val/ test/``) and read back by the same
loader as the real datasets. Splits come from disjoint vertical bands of every photo (left 60 %
train, next 20 % val, last 20 % test), so no pixel of a test image was seen in training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from zoo.data.demo import manifest_matches, publish, staging_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
)
BANDS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
TASKS = ("edges", "colorize")


def load_photo(name: str) -> np.ndarray:
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return np.ascontiguousarray(img[..., :3])


def make_input(photo: np.ndarray, task: str, sigma: float = 1.2) -> np.ndarray:
    """The A side for a B photo (uint8 HxWx3)."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    gray = rgb2gray(photo)
    if task == "colorize":
        g = np.round(gray * 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    edges = canny(gray, sigma=sigma)
    return np.repeat(np.where(edges, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _crops(
    photo: np.ndarray, band: tuple[float, float], n: int, size: int, rng: np.random.Generator
):
    h, w = photo.shape[:2]
    x0, x1 = int(band[0] * w), int(band[1] * w)
    hi = min(x1 - x0, h, 4 * size)
    lo = min(hi, max(size, hi // 2))
    for _ in range(n):
        s = int(rng.integers(lo, hi + 1))
        x = int(rng.integers(x0, x1 - s + 1))
        y = int(rng.integers(0, h - s + 1))
        crop = Image.fromarray(photo[y : y + s, x : x + s]).resize((size, size), Image.LANCZOS)
        yield np.asarray(crop)


def write_demo_aligned(
    out_dir: str | Path,
    task: str = "edges",
    size: int = 64,
    n_train: int = 320,
    n_val: int = 32,
    n_test: int = 32,
    seed: int = 0,
) -> Path:
    """Write (or reuse, if its manifest matches) the demo dataset under ``out_dir``."""
    if task not in TASKS:
        raise ValueError(f"demo task {task!r}: expected one of {TASKS}")
    out_dir = Path(out_dir)
    spec = {
        "version": GENERATOR_VERSION,
        "task": task,
        "size": size,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "photos": list(PHOTOS),
    }
    if manifest_matches(out_dir, spec):
        return out_dir
    log.info("Writing the pix2pix demo dataset (%s, %dpx) to %s", task, size, out_dir)
    rng = np.random.default_rng(seed)
    photos = {name: load_photo(name) for name in PHOTOS}
    tmp = staging_dir(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, total in counts.items():
        (tmp / split).mkdir()
        per_photo = [total // len(PHOTOS) + (i < total % len(PHOTOS)) for i in range(len(PHOTOS))]
        for (name, photo), n in zip(photos.items(), per_photo):
            for i, b in enumerate(_crops(photo, BANDS[split], n, size, rng)):
                ab = np.concatenate([make_input(b, task), b], axis=1)
                Image.fromarray(ab).save(tmp / split / f"{name}_{i:03d}.png")
    return publish(tmp, out_dir, spec)
