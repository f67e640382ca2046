"""pix2pix "aligned" datasets: every image file holds the pair side by side, A on the left half
and B on the right (the format of facades, maps, edges2shoes, cityscapes, ... as distributed by
the pix2pix authors), in ``train/``, ``val/`` and ``test/`` folders.

Preprocessing follows the reference's options: ``resize_and_crop`` (resize to load_size, random
crop_size crop), ``crop`` (random crop of the original), ``scale_width`` (width to load_size,
then random crop), ``none`` (sizes rounded to a multiple of 4); plus a horizontal flip. The same
random parameters are applied to A and B, so the pair stays aligned. Validation and test take a
centred crop without flipping, so their metrics are comparable across epochs and runs.
Values are scaled to [-1, 1].
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
from zoo.errors import ConfigError, DataError

IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}
PREPROCESS = ("resize_and_crop", "crop", "scale_width", "none")


def list_images(folder: Path) -> list[Path]:
    """Image files of a split folder, sorted; anything else in it is an error (so a stray file
    is reported instead of silently ignored)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder not found")
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        (files if p.suffix.lower() in IMG_EXTENSIONS else others).append(p)
    if others:
        raise DataError(f"{others[0]}: not an image file (extensions: {sorted(IMG_EXTENSIONS)})")
    if not files:
        raise DataError(f"{folder}: no images")
    return files


def check_aligned_image(path: Path) -> tuple[int, int]:
    """Open the header of an aligned image; returns (width, height) or raises DataError."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if w % 2:
        raise DataError(
            f"{path}: width {w} is odd; an aligned image is A|B side by side (width = 2 x A's "
            "width)"
        )
    return w, h


def load_pair(path: Path, direction: str) -> tuple[Image.Image, Image.Image]:
    try:
        with Image.open(path) as im:
            ab = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: could not decode image ({type(exc).__name__}: {exc})") from None
    w, h = ab.size
    a, b = ab.crop((0, 0, w // 2, h)), ab.crop((w // 2, 0, w, h))
    return (a, b) if direction == "AtoB" else (b, a)


def _make_multiple(size: int, base: int = 4) -> int:
    return max(base, int(round(size / base) * base))


class AlignedDataset(Dataset):
    def __init__(
        self,
        files: list[Path],
        direction: str = "AtoB",
        preprocess: str = "resize_and_crop",
        load_size: int = 286,
        crop_size: int = 256,
        flip: bool = True,
        train: bool = True,
        input_nc: int = 3,
        output_nc: int = 3,
    ):
        self.files = files
        self.direction, self.preprocess = direction, preprocess
        self.load_size, self.crop_size = load_size, crop_size
        self.flip, self.train = flip, train
        self.input_nc, self.output_nc = input_nc, output_nc

    def __len__(self) -> int:
        return len(self.files)

    def params(self, w: int, h: int) -> dict:
        """The random (train) or centred (val/test) parameters shared by A and B."""
        if self.preprocess == "resize_and_crop":
            new_w = new_h = self.load_size
        elif self.preprocess == "scale_width":
            new_w, new_h = self.load_size, max(self.crop_size, self.load_size * h // w)
        else:
            new_w, new_h = w, h
        crop = self.preprocess != "none"
        if crop and (new_w < self.crop_size or new_h < self.crop_size):
            raise ConfigError(
                f"data.crop_size={self.crop_size} is larger than the {new_w}x{new_h} images "
                f"after data.preprocess={self.preprocess} (data.load_size={self.load_size})"
            )
        if crop and self.train:
            x, y = (
                random.randint(0, new_w - self.crop_size),
                random.randint(0, new_h - self.crop_size),
            )
        elif crop:
            x, y = (new_w - self.crop_size) // 2, (new_h - self.crop_size) // 2
        else:
            x = y = 0
        return {
            "size": (new_w, new_h),
            "crop": (x, y) if crop else None,
            "flip": self.train and self.flip and random.random() > 0.5,
        }

    def transform(self, img: Image.Image, p: dict, channels: int) -> torch.Tensor:
        if p["size"] != img.size:
            img = img.resize(p["size"], Image.BICUBIC)
        if p["crop"] is not None:
            x, y = p["crop"]
            img = img.crop((x, y, x + self.crop_size, y + self.crop_size))
        elif self.preprocess == "none":
            w, h = img.size
            if (w, h) != (_make_multiple(w), _make_multiple(h)):
                img = img.resize((_make_multiple(w), _make_multiple(h)), Image.BICUBIC)
        if p["flip"]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if channels == 1:
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        t = torch.from_numpy(arr)
        return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        a, b = load_pair(path, self.direction)
        p = self.params(*a.size)
        return {
            "A": self.transform(a, p, self.input_nc),
            "B": self.transform(b, p, self.output_nc),
            "path": str(path),
        }


class AlignedDataModule(SplitDataModule):
    """Aligned A|B image pairs from ``data_dir/{train,val,test}``.

    ``demo`` (a writer such as ``zoo.data.demo.pix2pix.write_demo_aligned``, injected) first
    writes an offline
    dataset built from scikit-image's sample photographs into ``data_dir`` in this format.
    ``subset`` keeps the first N images of each split (debug runs).
    """

    sample_unit = "image pairs"

    def __init__(
        self,
        data_dir: str,
        direction: str = "AtoB",
        preprocess: str = "resize_and_crop",
        load_size: int = 286,
        crop_size: int = 256,
        no_flip: bool = False,
        input_nc: int = 3,
        output_nc: int = 3,
        batch_size: int = 1,
        num_workers: int = 0,
        val_split: str = "val",
        subset: int | None = None,
        demo: Callable[..., object] | None = None,
    ):
        super().__init__()
        if direction not in ("AtoB", "BtoA"):
            raise ConfigError(f"data.direction={direction!r}: expected AtoB or BtoA")
        if preprocess not in PREPROCESS:
            raise ConfigError(f"data.preprocess={preprocess!r}: expected one of {list(PREPROCESS)}")
        if preprocess in ("resize_and_crop", "scale_width") and load_size < crop_size:
            raise ConfigError(f"data.load_size={load_size} must be >= data.crop_size={crop_size}")
        self.data_dir = Path(data_dir)
        self.direction, self.preprocess = direction, preprocess
        self.load_size, self.crop_size, self.flip = load_size, crop_size, not no_flip
        self.input_nc, self.output_nc = input_nc, output_nc
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_split, self.subset, self.demo = val_split, subset, demo
        self.datasets: dict[str, AlignedDataset] = {}

    def prepare_data(self) -> None:
        self.write_demo()

    def _dataset(self, split: str, train: bool) -> AlignedDataset:
        files = list_images(self.data_dir / split)
        if self.subset:
            files = files[: int(self.subset)]
        sizes = {check_aligned_image(f) for f in files}
        if len(sizes) > 1 and self.preprocess == "none" and self.batch_size > 1:
            raise DataError(
                f"{self.data_dir / split}: images differ in size ({sorted(sizes)[:3]} ...); "
                "data.preprocess=none needs one size for batches > 1"
            )
        return AlignedDataset(
            files,
            self.direction,
            self.preprocess,
            self.load_size,
            self.crop_size,
            self.flip and train,
            train,
            self.input_nc,
            self.output_nc,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.demo:  # single-process runs without prepare_data (e.g. evaluate.py)
            self.prepare_data()
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = self._dataset("train", train=True)
            self.datasets["val"] = self._dataset(self.val_split, train=False)
        if stage in (None, "fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self._dataset(self.val_split, train=False)
        if stage in (None, "test") and "test" not in self.datasets:
            self.datasets["test"] = self._dataset("test", train=False)

    def preprocessing_spec(self) -> dict:
        """What turns a raw image into the generator's input: it works at crop_size (the
        size it was trained at); the direction says which side of the pairs was the input."""
        return {
            "size": int(self.crop_size),
            "direction": self.direction,
            "input_nc": int(self.input_nc),
            "output_nc": int(self.output_nc),
            "preprocess": self.preprocess,
            "load_size": int(self.load_size),
        }

    def raw_example(self) -> np.ndarray:
        """The input side of the first test pair, uint8 (H, W, 3)."""
        self.setup("test")
        a, _ = load_pair(self.datasets["test"].files[0], self.direction)
        return np.asarray(a.convert("RGB" if self.input_nc == 3 else "L"), dtype=np.uint8)

    def summary(self) -> dict[str, str]:
        out = {
            "data_dir": str(self.data_dir),
            "direction": self.direction,
            "preprocess": f"{self.preprocess} (load {self.load_size}, crop {self.crop_size}, "
            f"flip {'on' if self.flip else 'off'} for training)",
        }
        for split, ds in self.datasets.items():
            out[f"{split} images"] = str(len(ds))
        return out
