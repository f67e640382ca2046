"""Scoring COCO files: a ground-truth file and a results file (``evaluate.py task=detection``),
read by the one COCO reader (:mod:`zoo.data.coco`), and COCO dicts as the scorer's tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from zoo.boxes import entry_errors
from zoo.data.coco import read_json
from zoo.errors import DataError
from zoo.metrics.detection import DetectionScorer


def score_coco_files(
    annotations: str | Path, predictions: str | Path
) -> tuple[DetectionScorer, dict]:
    """A scorer filled from a COCO ground-truth file and a COCO results file (a list of
    ``{image_id, category_id, bbox: [x, y, w, h], score}``). Returns (scorer, ground truth)."""
    gt = read_json(annotations, "annotations")
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= set(gt):
        raise DataError(
            f"annotations={annotations}: not COCO ground truth (needs images, annotations, "
            "categories)"
        )
    results = read_json(predictions, "predictions")
    if not isinstance(results, list):
        raise DataError(
            f"predictions={predictions}: a COCO results file is a JSON list of detections"
        )
    preds, targets = coco_to_tensors(
        gt, results, f"annotations={annotations}", f"predictions={predictions}"
    )
    with entry_errors(f"annotations={annotations}: categories"):
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        scorer = DetectionScorer([c["name"] for c in cats], [c["id"] for c in cats])
    for image, p, t in zip(gt["images"], preds, targets):
        t = {**t, "image_id": image["id"], "file_name": image.get("file_name", str(image["id"]))}
        scorer.update([p], [t])
    return scorer, gt


def coco_to_tensors(
    gt: dict, results: list, gt_name: str = "annotations", results_name: str = "predictions"
) -> tuple[list[dict], list[dict]]:
    """COCO ground truth + results (already parsed) as per-image tensors in ``gt["images"]``
    order: predictions ``{boxes (xyxy), scores, labels}`` and targets ``{boxes, labels, iscrowd,
    area}``, boxes float64 (exactly the values pycocotools reads). Every entry is checked;
    errors name ``gt_name`` / ``results_name`` and the entry."""
    with entry_errors(f"{gt_name}: categories / images"):
        cat_ids = {c["id"] for c in gt["categories"]}
        index = {im["id"]: i for i, im in enumerate(gt["images"])}

    def check_ids(entry: dict, where: str) -> None:
        if entry["image_id"] not in index:
            raise DataError(
                f"{where} has image_id {entry['image_id']}, which is not in the ground truth's "
                f"images ({gt_name})"
            )
        if entry["category_id"] not in cat_ids:
            raise DataError(
                f"{where} has category_id {entry['category_id']}, which is not in the ground "
                f"truth's categories {sorted(cat_ids)}"
            )

    targets = [
        {"boxes": [], "xywh": [], "labels": [], "iscrowd": [], "area": []} for _ in gt["images"]
    ]
    for k, a in enumerate(gt["annotations"]):
        with entry_errors(f"{gt_name}: annotations[{k}]"):
            check_ids(a, f"{gt_name}: annotation id {a.get('id')}")
            x, y, w, h = (float(v) for v in a["bbox"])
            t = targets[index[a["image_id"]]]
            t["boxes"].append([x, y, x + w, y + h])
            t["xywh"].append([x, y, w, h])
            t["labels"].append(a["category_id"])
            t["iscrowd"].append(int(a.get("iscrowd", 0)))
            t["area"].append(float(a.get("area", w * h)))
    preds = [{"boxes": [], "xywh": [], "scores": [], "labels": []} for _ in gt["images"]]
    for k, d in enumerate(results):
        missing = (
            {"image_id", "category_id", "bbox", "score"} - set(d)
            if isinstance(d, dict)
            else {"all keys"}
        )
        if missing:
            raise DataError(f"{results_name}: entry {k} lacks {sorted(missing)}")
        check_ids(d, f"{results_name}: entry {k}")
        with entry_errors(f"{results_name}: entry {k}"):
            x, y, w, h = (float(v) for v in d["bbox"])
            score = float(d["score"])
        p = preds[index[d["image_id"]]]
        p["boxes"].append([x, y, x + w, y + h])
        p["xywh"].append([x, y, w, h])
        p["scores"].append(score)
        p["labels"].append(d["category_id"])
    preds = [
        {
            "boxes": torch.tensor(p["boxes"], dtype=torch.float64).reshape(-1, 4),
            "xywh": torch.tensor(p["xywh"], dtype=torch.float64).reshape(-1, 4),
            "scores": torch.tensor(p["scores"], dtype=torch.float64),
            "labels": torch.tensor(p["labels"], dtype=torch.long),
        }
        for p in preds
    ]
    targets = [
        {
            "boxes": torch.tensor(t["boxes"], dtype=torch.float64).reshape(-1, 4),
            "xywh": torch.tensor(t["xywh"], dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor(t["labels"], dtype=torch.long),
            "iscrowd": torch.tensor(t["iscrowd"], dtype=torch.long),
            "area": torch.tensor(t["area"], dtype=torch.float64),
        }
        for t in targets
    ]
    return preds, targets
