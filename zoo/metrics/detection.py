"""Detection scoring shared by training (val/test) and ``evaluate.py task=detection``.

- COCO metrics (mAP@[.5:.95], mAP@.5, mAP@.75, small/medium/large, AR@1/10/100) come from
  faster-coco-eval's ``COCOeval_faster`` driven with COCO dicts in the scored images' own ids
  and detection order: pycocotools' COCOeval numbers in float64, several times faster (tested
  against pycocotools on real COCO val2014 annotations, benchmarked in benchmarks/map_eval.py).
  Not through torchmetrics' ``MeanAveragePrecision``: it renumbers images in update order, which
  changes how pycocotools' stable sort breaks ties between equal scores of different images
  (mAP off by up to 1e-4 on real results with 3-decimal scores), and returns float32.
- VOC AP@.5 per class, VOC2007 11-point and VOC2010+ all-point, from :mod:`zoo.metrics.voc`.
- Joint datasets: each image is scored only on the classes its source annotates (predictions of
  other classes on it can be neither confirmed nor refuted, so they are dropped before scoring).
- Figures (:mod:`zoo.metrics.detection_figures`) and COCO files
  (:mod:`zoo.metrics.coco_files`) live beside this module.

Ground truth boxes flagged ``iscrowd`` (COCO crowd, VOC difficult) are "ignore" regions: a
detection on them is neither a true nor a false positive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from zoo.metrics.voc import voc_ap, voc_class_pr

COCO_KEYS = {
    "map": "mAP",
    "map_50": "mAP_50",
    "map_75": "mAP_75",
    "map_small": "mAP_small",
    "map_medium": "mAP_medium",
    "map_large": "mAP_large",
    "mar_1": "AR_1",
    "mar_10": "AR_10",
    "mar_100": "AR_100",
    "mar_small": "AR_small",
    "mar_medium": "AR_medium",
    "mar_large": "AR_large",
}


STAT_NAMES = list(COCO_KEYS.values())  # COCOeval.stats order


@dataclass
class CocoEvaluation:
    metrics: dict[str, float]  # the 12 COCO numbers (float64; -1: no ground truth in the range)
    precision: np.ndarray  # [T, R, K, A, M] as pycocotools' eval["precision"] (-1: no gt)
    recall: np.ndarray  # [T, K, A, M]
    cat_ids: list[int]  # the K axis


def coco_eval(gt: dict, results: list[dict]) -> CocoEvaluation:
    """pycocotools' COCOeval (bbox) of a COCO ground truth dict and a results list, computed
    by faster-coco-eval in float64. Image ids, category ids and the order of the results are
    used as given: pycocotools breaks ties between equal scores by image id, then by order."""
    from faster_coco_eval import COCO, COCOeval_faster

    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # summary tables at INFO
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    n_t, n_r, n_k = 10, 101, len(cat_ids)
    if not results or not gt["images"]:  # pycocotools cannot load an empty results list
        has_gt = any(not a.get("iscrowd", 0) for a in gt["annotations"])
        value = 0.0 if has_gt else -1.0
        precision = np.full((n_t, n_r, n_k, 4, 3), -1.0)
        recall = np.full((n_t, n_k, 4, 3), -1.0)
        return CocoEvaluation(dict.fromkeys(STAT_NAMES, value), precision, recall, cat_ids)
    coco_gt = COCO(gt)
    evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    metrics = {name: float(stats[i]) for i, name in enumerate(STAT_NAMES)}
    return CocoEvaluation(
        metrics,
        np.asarray(evaluator.eval["precision"], dtype=np.float64),
        np.asarray(evaluator.eval["recall"], dtype=np.float64),
        [int(c) for c in evaluator.params.catIds],
    )


@dataclass
class DetectionScores:
    metrics: dict[str, float]  # flat names (mAP, mAP_50, ..., voc07_mAP_50, voc_mAP_50)
    per_class: list[dict]  # {class, gt, AP, AP_50, AR_100, voc07_AP_50, voc_AP_50}
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # IoU .5

    def table(self) -> tuple[list[str], list[list]]:
        headers = [
            "class",
            "gt boxes",
            "AP@[.5:.95]",
            "AP@.5",
            "AR@100",
            "VOC07 AP@.5",
            "VOC AP@.5",
        ]
        keys = ["class", "gt", "AP", "AP_50", "AR_100", "voc07_AP_50", "voc_AP_50"]
        return headers, [[row[k] for k in keys] for row in self.per_class]


class DetectionScorer:
    """Accumulate predictions and targets image by image, then :meth:`compute`.

    ``class_names[i]`` names label ``label_ids[i]`` (default 1..C). ``group_table`` ([S, C+1],
    optional) says which classes each source annotates: table[s, c] != 0."""

    def __init__(
        self,
        class_names: list[str],
        label_ids: list[int] | None = None,
        group_table: torch.Tensor | None = None,
    ):
        self.class_names = list(class_names)
        self.label_ids = (
            list(label_ids) if label_ids is not None else list(range(1, len(class_names) + 1))
        )
        self.group_table = group_table
        self.reset()

    def reset(self) -> None:
        self.preds: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.targets)

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        for p, t in zip(preds, targets):
            # float64 like pycocotools' JSON numbers (lossless for float32 model outputs)
            p = {
                "boxes": p["boxes"].detach().cpu().double().reshape(-1, 4),
                "scores": p["scores"].detach().cpu().double(),
                "labels": p["labels"].detach().cpu().long(),
                **({"xywh": p["xywh"]} if "xywh" in p else {}),  # a results file's own boxes
            }
            if self.group_table is not None and "source" in t:
                labelled = self.group_table[int(t["source"])].to(p["labels"].device) != 0
                keep = labelled[p["labels"]]
                p = {k: v[keep] for k, v in p.items()}
            boxes = t["boxes"].detach().cpu().double().reshape(-1, 4)
            target = {
                "boxes": boxes,
                **({"xywh": t["xywh"]} if "xywh" in t else {}),
                "labels": t["labels"].detach().cpu().long(),
                "iscrowd": t.get("iscrowd", torch.zeros(len(boxes), dtype=torch.bool)).cpu().long(),
            }
            target["area"] = (
                t["area"].detach().cpu().double()
                if "area" in t
                else (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            )
            if "image_id" in t:
                target["image_id"] = int(t["image_id"])
            if "file_name" in t:
                target["file_name"] = str(t["file_name"])
            self.preds.append(p)
            self.targets.append(target)

    def gather(self) -> None:
        """Under torch.distributed, replace this rank's images by all ranks' (same order on every
        rank, each image once), so that every rank computes the mAP of the whole split."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (self.preds, self.targets))
        seen, self.preds, self.targets = set(), [], []
        for preds, targets in parts:
            for p, t in zip(preds, targets):
                key = t.get("image_id")  # DistributedSampler pads shards by repeating images
                if key is None or key not in seen:
                    seen.add(key)
                    self.preds.append(p)
                    self.targets.append(t)

    def to_coco(self) -> tuple[dict, list[dict]]:
        """What is scored, as COCO dicts: (ground truth, results). Images keep their ids (their
        position where ids are missing or repeat), results keep their order, and boxes loaded
        from COCO files keep their own [x, y, w, h]: COCOeval on these is what
        :meth:`compute` reports (ignored boxes become ``iscrowd``)."""
        ids = [t.get("image_id") for t in self.targets]
        if None in ids or len(set(ids)) < len(ids):
            ids = list(range(len(self.targets)))
        images, anns, results = [], [], []
        for image_id, p, t in zip(ids, self.preds, self.targets):
            image_id = int(image_id)
            images.append({"id": image_id, "file_name": str(t.get("file_name", image_id))})
            for box, label, crowd, area in zip(
                _xywh(t), t["labels"].tolist(), t["iscrowd"].tolist(), t["area"].tolist()
            ):
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": box,
                        "area": area,
                        "iscrowd": int(crowd),
                    }
                )
            for box, label, score in zip(_xywh(p), p["labels"].tolist(), p["scores"].tolist()):
                results.append(
                    {"image_id": image_id, "category_id": int(label), "bbox": box, "score": score}
                )
        cats = [{"id": int(i), "name": n} for i, n in zip(self.label_ids, self.class_names)]
        return {"images": images, "annotations": anns, "categories": cats}, results

    # ------------------------------------------------------------------ scoring

    def compute(self) -> DetectionScores:
        # per-class numbers come from the accumulated precision/recall arrays (exactly what
        # pycocotools' summarize() averages)
        evaluation = coco_eval(*self.to_coco())
        metrics = dict(evaluation.metrics)
        precision, recall = evaluation.precision, evaluation.recall  # [T, R, K, A, M], [T, K, A, M]
        seen = evaluation.cat_ids
        dets_by_class, gt_by_class = self._voc_inputs()
        per_class, curves, voc07, voc = [], {}, [], []
        for name, label in zip(self.class_names, self.label_ids):
            gt = gt_by_class.get(label, {})
            rec, prec, npos = voc_class_pr(dets_by_class.get(label, []), gt)
            v07 = voc_ap(rec, prec, True) if npos else float("nan")
            vall = voc_ap(rec, prec, False) if npos else float("nan")
            if npos:
                voc07.append(v07)
                voc.append(vall)
            ap = ap50 = ar = float("nan")
            if label in seen:
                k = seen.index(label)
                p_all, r_all = precision[:, :, k, 0, -1], recall[:, k, 0, -1]  # all areas, 100 dets
                if (p_all > -1).any():  # -1: the class has no ground truth
                    ap, ap50 = float(p_all[p_all > -1].mean()), float(p_all[0].mean())
                    ar = float(r_all[r_all > -1].mean())
                    curves[name] = (np.linspace(0, 1, p_all.shape[1]), p_all[0])
            per_class.append(
                {
                    "class": name,
                    "gt": int(sum(int((~d).sum()) for _, d in gt.values())),
                    "AP": ap,
                    "AP_50": ap50,
                    "AR_100": ar,
                    "voc07_AP_50": v07,
                    "voc_AP_50": vall,
                }
            )
        metrics["voc07_mAP_50"] = float(np.mean(voc07)) if voc07 else float("nan")
        metrics["voc_mAP_50"] = float(np.mean(voc)) if voc else float("nan")
        return DetectionScores(metrics, per_class, curves)

    def _voc_inputs(self):
        """Per class: detections [(image, score, box)] and ground truth {image: (boxes, ignore)}."""
        dets: dict[int, list] = {}
        for i, p in enumerate(self.preds):
            for label, score, box in zip(
                p["labels"].tolist(), p["scores"].tolist(), p["boxes"].numpy()
            ):
                dets.setdefault(label, []).append((i, score, box))
        gt: dict[int, dict] = {}
        for i, t in enumerate(self.targets):
            labels = t["labels"].numpy()
            for label in np.unique(labels):
                sel = labels == label
                gt.setdefault(int(label), {})[i] = (
                    t["boxes"][sel].numpy(),
                    t["iscrowd"][sel].numpy().astype(bool),
                )
        return dets, gt


def _xywh(boxes: dict) -> list[list[float]]:
    """COCO [x, y, w, h] boxes: a COCO file's own values where kept, else from xyxy."""
    if "xywh" in boxes:
        return boxes["xywh"].tolist()
    b = boxes["boxes"]
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()
