"""COCO annotations at train2017 size: our reader against pycocotools' ``COCO()`` on one file.

    python benchmarks/coco_annotations.py                  # 118,287 images, ~860k boxes
    python benchmarks/coco_annotations.py --images 20000   # quicker

The file is generated in COCO's format (polygon segmentations, areas, crowd flags, 80
categories) into a temporary folder with an empty file per image, so that the loader's image
check has something to find; nothing is committed. Each reader runs ``--repeat`` times in its
own process (the better time counts) and its peak RSS is read from the kernel. Then a
DataLoader with 4 forked workers reads every record once (boxes, size, path; no image), and the
PSS of the main process and its workers (``/proc/<pid>/smaps_rollup``) is summed: for the flat
``RecordTable`` and, for comparison, the same records as a list of ``Record`` objects.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = """
import resource, sys, time
sys.path.insert(0, {repo!r})
from zoo.data.detection import COCO_CLASSES, load_coco
t = time.perf_counter()
records, report = load_coco({ann!r}, {images!r}, {{c: c for c in COCO_CLASSES}}, list(COCO_CLASSES))
dt = time.perf_counter() - t
n = sum(len(r.labels) for r in records)
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(records), n)
"""

CACHED = """
import sys, time
sys.path.insert(0, {repo!r})
from zoo.data.cache import ArrayCache
from zoo.data.detection import COCO_CLASSES, load_coco
t = time.perf_counter()
table, _ = load_coco({ann!r}, {images!r}, {{c: c for c in COCO_CLASSES}}, list(COCO_CLASSES),
                       cache=ArrayCache({cache!r}, "data.cache"))
print(time.perf_counter() - t, 0, len(table), len(table.labels))
"""

PSS = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
from torch.utils.data import DataLoader, Dataset
from zoo.data.detection import COCO_CLASSES, load_coco

def pss(pid):
    with open(f"/proc/{{pid}}/smaps_rollup") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("Pss:")) * 1024

class Touch(Dataset):  # what a detection dataset reads of a record, without the image
    def __init__(self, records):
        self.records = records
    def __len__(self):
        return len(self.records)
    def __getitem__(self, i):
        r = self.records[i]
        return torch.from_numpy(r.boxes.copy()), r.width, str(r.image)

table, _ = load_coco({ann!r}, {images!r}, {{c: c for c in COCO_CLASSES}}, list(COCO_CLASSES))
records = table if {kind!r} == "table" else list(table)  # the table, or a list of Records
del table
import gc; gc.collect()
alone = pss(os.getpid())
loader = DataLoader(Touch(records), batch_size=2, num_workers=4, persistent_workers=True,
                    collate_fn=lambda b: b, multiprocessing_context="fork")
for _ in loader:
    pass
import psutil
total = pss(os.getpid()) + sum(pss(c.pid) for c in psutil.Process().children())
print(alone, total)
"""

PYCOCO = """
import resource, time
from pycocotools.coco import COCO
t = time.perf_counter()
coco = COCO({ann!r})
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(coco.imgs), len(coco.anns))
"""


def generate(out: Path, n_images: int, per_image: float, seed: int = 0) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    images_dir = out / "train2017"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    counts = rng.poisson(per_image, n_images)
    ann_id = 1
    for i in range(n_images):
        w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
        name = f"{i + 1:012d}.jpg"
        (images_dir / name).touch()
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h, "license": 1})
        for _ in range(counts[i]):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            poly = [round(float(v), 2) for v in (x, y, x + bw, y, x + bw, y + bh, x, y + bh)]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 81)),
                    "bbox": [round(float(v), 2) for v in (x, y, bw, bh)],
                    "area": round(float(bw * bh), 2),
                    "iscrowd": int(rng.random() < 0.01),
                    "segmentation": [poly],
                }
            )
            ann_id += 1
    from zoo.data.detection import COCO_CLASSES

    categories = [
        {"id": k + 1, "name": c, "supercategory": "x"} for k, c in enumerate(COCO_CLASSES)
    ]
    ann = out / "instances_train2017.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return ann


def run(code: str, repeat: int) -> tuple[float, float, str]:
    best, rss, counts = float("inf"), 0.0, ""
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        dt, maxrss, *rest = out.stdout.strip().splitlines()[-1].split()
        best, rss, counts = min(best, float(dt)), max(rss, int(maxrss) / 1024**2), " ".join(rest)
    return best, rss, counts


def section(images: int = 118_287, per_image: float = 7.27, repeat: int = 2) -> None:
    """Generate the file, measure both readers, the cache and the workers' PSS; print tables."""
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="zoo-coco-bench-") as tmp:
        t = time.perf_counter()
        ann = generate(Path(tmp), images, per_image)
        size = ann.stat().st_size / 1e6
        print(f"generated {ann.name}: {size:.0f} MB in {time.perf_counter() - t:.0f} s")
        fmt = {"repo": str(REPO), "ann": str(ann), "images": str(Path(tmp) / "train2017")}
        ref = run(PYCOCO.format(**fmt), repeat)
        ours = run(OURS.format(**fmt), repeat)
        fmt["cache"] = str(Path(tmp) / "cache")
        miss = run(CACHED.format(**fmt), 1)
        hit = run(CACHED.format(**fmt), 1)
        pss = {}
        for kind in ("table", "list of Records"):
            out = subprocess.run(
                [sys.executable, "-c", PSS.format(**fmt, kind=kind)], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            pss[kind] = tuple(int(v) for v in out.stdout.strip().splitlines()[-1].split())
    print(f"\n| reader | time (best of {repeat}) | peak RSS | images, boxes |")
    print("|---|---|---|---|")
    print(f"| pycocotools COCO() | {ref[0]:.1f} s | {ref[1]:.2f} GiB | {ref[2]} |")
    print(f"| zoo.data.detection.load_coco | {ours[0]:.1f} s | {ours[1]:.2f} GiB | {ours[2]} |")
    print(f"ratio (ours / pycocotools): {ours[0] / ref[0]:.2f}× (target ≤ 0.5×; before: 2.11×)")
    print(
        f"cache: first job {miss[0]:.1f} s (parse and write), a later job {hit[0]:.2f} s "
        "(target ≤ 2 s; before: no cache, every job parses)"
    )
    print("\n| records as | PSS, main alone | PSS, main + 4 workers after an epoch | ratio |")
    print("|---|---|---|---|")
    for kind, (alone, total) in pss.items():
        print(
            f"| {kind} | {alone / 2**30:.2f} GiB | {total / 2**30:.2f} GiB | {total / alone:.2f}× |"
        )
    print("(target ≤ 1.25× for the flat table; the list of Records is what the zoo held before)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--per-image", type=float, default=7.27)  # 860k / 118k
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    section(args.images, args.per_image, args.repeat)


if __name__ == "__main__":
    main()
