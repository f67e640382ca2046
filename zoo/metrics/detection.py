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
- Figures: precision-recall curves per class and a per-class AP chart.

Ground truth boxes flagged ``iscrowd`` (COCO crowd, VOC difficult) are "ignore" regions: a
detection on them is neither a true nor a false positive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zoo.data.detection import entry_errors
from zoo.errors import DataError
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


# --------------------------------------------------------------------------- figures


def pr_curves_figure(scores: DetectionScores, title: str = "Precision-recall (IoU 0.5)"):
    from zoo.plotting import plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for name, (recall, precision) in scores.pr_curves.items():
        row = next(r for r in scores.per_class if r["class"] == name)
        ax.plot(recall, precision, label=f"{name} (AP@.5 {row['AP_50']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if scores.pr_curves:
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    fig.tight_layout()
    return fig


def per_class_ap_figure(scores: DetectionScores, title: str = "AP per class"):
    from zoo.plotting import plt

    names = [r["class"] for r in scores.per_class]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4.0), dpi=100)
    for off, key, label in ((-0.2, "AP", "AP@[.5:.95]"), (0.2, "AP_50", "AP@.5")):
        vals = [0.0 if np.isnan(r[key]) else r[key] for r in scores.per_class]
        bars = ax.bar(x + off, vals, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def detections_figure(
    images: list,
    targets: list[dict],
    preds: list[dict],
    names: dict[int, str],
    score_threshold: float = 0.5,
    title: str = "",
    cols: int = 3,
):
    """Images with ground truth (green, dashed) and predictions above ``score_threshold``
    (red, with class and score). ``names``: label -> class name."""
    from matplotlib import patches

    from zoo.plotting import plt

    n = len(images)
    cols = min(cols, max(n, 1))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), dpi=100, squeeze=False)

    for ax, image, t, p in zip(axes.flat, images, targets, preds):
        if torch.is_tensor(image):
            image = image.permute(1, 2, 0)
            image = image.numpy() if image.dtype == torch.uint8 else image.clamp(0, 1).numpy()
        ax.imshow(image)
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            ax.add_patch(
                patches.Rectangle(
                    box[:2],
                    box[2] - box[0],
                    box[3] - box[1],
                    fill=False,
                    edgecolor="lime",
                    linewidth=1.5,
                    linestyle="--",
                )
            )
            ax.text(
                box[0],
                box[3],
                str(names.get(label, label)),
                color="black",
                fontsize=6,
                va="top",
                bbox={"facecolor": "lime", "alpha": 0.7, "pad": 1, "linewidth": 0},
            )
        for box, label, score in zip(
            p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()
        ):
            if score < score_threshold:
                continue
            ax.add_patch(
                patches.Rectangle(
                    box[:2],
                    box[2] - box[0],
                    box[3] - box[1],
                    fill=False,
                    edgecolor="red",
                    linewidth=1.2,
                )
            )
            ax.text(
                box[0],
                box[1],
                f"{names.get(label, label)} {score:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "linewidth": 0},
            )
        ax.set_axis_off()
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        title
        or f"ground truth (green, dashed) and predictions with score >= {score_threshold} (red)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- COCO files


def _read_json(path: Path, what: str):
    from zoo.data.coco import read_json

    return read_json(path, what)


def score_coco_files(
    annotations: str | Path, predictions: str | Path
) -> tuple[DetectionScorer, dict]:
    """A scorer filled from a COCO ground-truth file and a COCO results file (a list of
    ``{image_id, category_id, bbox: [x, y, w, h], score}``). Returns (scorer, ground truth)."""
    gt = _read_json(annotations, "annotations")
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= set(gt):
        raise DataError(
            f"annotations={annotations}: not COCO ground truth (needs images, annotations, "
            "categories)"
        )
    results = _read_json(predictions, "predictions")
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
