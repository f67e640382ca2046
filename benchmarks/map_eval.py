"""COCO mAP evaluation speed: ours (zoo.metrics.detection.coco_eval: faster-coco-eval's
COCOeval_faster, what training and evaluate.py use) vs pycocotools' COCOeval, on the same
synthetic data.

    python benchmarks/map_eval.py                  # 5,000 images
    python benchmarks/map_eval.py --images 1000

The data: COCO-like 640x480 images with 1-15 objects of 20 classes (10 % crowd, some images
empty) and noisy detections (true boxes jittered, wrong classes, false alarms) with random
scores. Prints both timings, their ratio, every COCO summary number side by side and the
largest difference. Also times our full scorer (COCO + VOC07/VOC AP per class) for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
from zoo.metrics.coco_files import coco_to_tensors  # noqa: E402
from zoo.metrics.detection import STAT_NAMES, DetectionScorer, coco_eval  # noqa: E402

NAMES = STAT_NAMES  # pycocotools' stats order


def synthetic(n_images: int, n_classes: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(n_images):
        images.append({"id": i + 1, "width": 640, "height": 480, "file_name": f"{i:06d}.jpg"})
        if rng.random() < 0.05:
            continue  # an image without objects
        for _ in range(int(rng.integers(1, 16))):
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.integers(1, n_classes + 1))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": float(w * h),
                    "iscrowd": int(rng.random() < 0.1),
                }
            )
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                label = c if rng.random() < 0.85 else int(rng.integers(1, n_classes + 1))
                results.append(
                    {
                        "image_id": i + 1,
                        "category_id": label,
                        "bbox": [
                            x + jitter[0],
                            y + jitter[1],
                            max(1.0, w + jitter[2]),
                            max(1.0, h + jitter[3]),
                        ],
                        "score": float(rng.random()),
                    }
                )
        for _ in range(int(rng.integers(0, 4))):  # false alarms
            w, h = rng.uniform(10, 150, 2)
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, n_classes + 1)),
                    "bbox": [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), w, h],
                    "score": float(rng.random()),
                }
            )
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, n_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, results


def run_pycocotools(gt: dict, results: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def run_ours(gt: dict, results: list[dict]):
    metrics = coco_eval(gt, results).metrics
    return [metrics[n] for n in NAMES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    gt, results = synthetic(args.images, args.classes)
    run_ours(*synthetic(5, args.classes, seed=1))  # imports outside the timings
    run_pycocotools(*synthetic(5, args.classes, seed=1))
    preds, targets = coco_to_tensors(gt, results)  # float64 boxes: what pycocotools reads
    print(
        f"{args.images} images, {len(gt['annotations'])} ground-truth boxes "
        f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(results)} detections, "
        f"{args.classes} classes"
    )

    t0 = time.perf_counter()
    theirs = run_pycocotools(gt, results)
    t_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = run_ours(gt, results)
    t_ours = time.perf_counter() - t0
    scorer = DetectionScorer(
        [c["name"] for c in gt["categories"]], [c["id"] for c in gt["categories"]]
    )
    t0 = time.perf_counter()
    scorer.update(preds, targets)
    full = scorer.compute()
    t_full = time.perf_counter() - t0

    print(f"\n{'metric':<12}{'pycocotools':>14}{'ours':>14}{'|diff|':>12}")
    for name, a, b in zip(NAMES, theirs, ours):
        print(f"{name:<12}{a:>14.6f}{b:>14.6f}{abs(a - b):>12.2e}")
    worst = max(abs(a - b) for a, b in zip(theirs, ours))
    print(
        f"\nlargest difference: {worst:.2e} "
        f"({'identical within 1e-9' if worst <= 1e-9 else 'DIFFERENT'})"
    )
    print(f"pycocotools COCOeval (loadRes + evaluate + accumulate + summarize): {t_theirs:7.2f} s")
    print(f"ours (zoo coco_eval: faster-coco-eval COCOeval_faster, float64):    {t_ours:7.2f} s")
    print(f"ratio: ours is {t_theirs / t_ours:.2f}x faster")
    print(
        f"\nour full scorer (COCO per class + VOC07/VOC AP@.5 per class): {t_full:.2f} s "
        f"(VOC07 mAP@.5 {full.metrics['voc07_mAP_50']:.4f}, VOC mAP@.5 "
        f"{full.metrics['voc_mAP_50']:.4f})"
    )


if __name__ == "__main__":
    main()
