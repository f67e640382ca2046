"""Two offline detection sources with different label sets, written as real COCO JSON + PNGs.

Backgrounds are crops of the photographs shipped with scikit-image; objects are filled shapes
(circle, square, triangle, cross) of random colour, size and position. Source ``a`` annotates
circles and squares, source ``b`` triangles and crosses, yet every image of both sources
contains shapes of all four kinds: exactly the situation GroupSoftmax is for (a plain softmax
would teach each source that the other source's classes are background).

Layout: ``<out>/<source>/{train,val,test}.json`` and ``<out>/<source>/images/*.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zoo.boxes import box_iou
from zoo.data.demo import manifest_matches, publish, staging_dir
from zoo.data.demo.pix2pix import PHOTOS, load_photo

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross")
SOURCES = {"a": ("circle", "square"), "b": ("triangle", "cross")}


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
    else:
        w, h = x2 - x1, y2 - y1
        draw.rectangle((x1 + w / 3, y1, x2 - w / 3, y2), fill=colour)
        draw.rectangle((x1, y1 + h / 3, x2, y2 - h / 3), fill=colour)


def make_image(rng: np.random.Generator, photos: list[np.ndarray], size: int, max_objects: int = 5):
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    s = int(rng.integers(min(h, w) // 3, min(h, w)))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    img = Image.fromarray(photo[y : y + s, x : x + s]).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    objects, placed = [], []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        side = int(rng.integers(size // 8, size // 3))
        for _attempt in range(20):  # avoid heavy overlap
            x1, y1 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            box = (x1, y1, x1 + side, y1 + side)
            if not placed or (box_iou(np.array(box, float), np.array(placed, float)) < 0.1).all():
                break
        placed.append(box)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw(draw, shape, box, tuple(int(c) for c in rng.integers(0, 256, 3)))
        objects.append((shape, box))
    return img, objects


def write_demo_detection(
    out_dir: str | Path,
    size: int = 128,
    n_train: int = 120,
    n_val: int = 30,
    n_test: int = 30,
    seed: int = 0,
) -> Path:
    """Write (or reuse, if its manifest matches) both sources under ``out_dir``."""
    out_dir = Path(out_dir)
    spec = {
        "version": GENERATOR_VERSION,
        "size": size,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "sources": {k: list(v) for k, v in SOURCES.items()},
    }
    if manifest_matches(out_dir, spec):
        return out_dir
    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in PHOTOS]
    tmp = staging_dir(out_dir)
    for source, labelled in SOURCES.items():
        (tmp / source / "images").mkdir(parents=True)
        categories = [
            {"id": 10 + i, "name": name} for i, name in enumerate(labelled)
        ]  # source's own ids
        cat_id = {c["name"]: c["id"] for c in categories}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            images, annotations = [], []
            for i in range(n):
                img, objects = make_image(rng, photos, size)
                name = f"{split}_{i:04d}.png"
                img.save(tmp / source / "images" / name)
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": name, "width": size, "height": size})
                for shape, (x1, y1, x2, y2) in objects:
                    if shape in cat_id:  # the other source's shapes stay unannotated
                        annotations.append(
                            {
                                "id": len(annotations) + 1,
                                "image_id": image_id,
                                "category_id": cat_id[shape],
                                "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0,
                            }
                        )
            (tmp / source / f"{split}.json").write_text(
                json.dumps({"images": images, "annotations": annotations, "categories": categories})
            )
    return publish(tmp, out_dir, spec)
