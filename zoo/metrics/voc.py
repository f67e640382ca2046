"""Pascal VOC average precision, following the reference devkit procedure (voc_eval.py of the
VOC devkit / py-faster-rcnn): detections of a class sorted by score, greedily matched to the
highest-IoU ground truth of the same image (IoU > threshold); a match to a ``difficult`` box is
neither a true nor a false positive, a second match to the same box is a false positive;
recall is over non-difficult boxes.

- VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t.
- VOC2010+ all-point AP: area under the monotone (running-max) precision envelope.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zoo.boxes import box_iou


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t].max() if np.any(recall >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def voc_class_pr(
    detections: Sequence[tuple[int, float, Sequence[float]]],
    ground_truth: dict[int, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
    pixel_inclusive: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Recall and precision curves of one class.

    detections: (image id, score, xyxy box); ground_truth: image id -> (boxes [K, 4],
    difficult [K]) of this class. Returns (recall, precision, number of non-difficult boxes)."""
    npos = int(sum((~np.asarray(d, bool)).sum() for _, d in ground_truth.values()))
    used = {img: np.zeros(len(b), bool) for img, (b, _) in ground_truth.items()}
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, i in enumerate(order):
        image, _, box = detections[i]
        gt_boxes, gt_difficult = ground_truth.get(image, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(gt_boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(np.asarray(box, float), np.asarray(gt_boxes, float), pixel_inclusive)
        j = int(np.argmax(ious))
        if ious[j] > iou_threshold:
            if gt_difficult[j]:
                continue  # neither true nor false positive
            if not used[image][j]:
                tp[rank], used[image][j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(npos, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    return recall, precision, npos


def voc_average_precision(
    detections: Sequence[tuple[int, float, Sequence[float]]],
    ground_truth: dict[int, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    pixel_inclusive: bool = False,
) -> float:
    """AP of one class (NaN when the class has no non-difficult ground truth)."""
    recall, precision, npos = voc_class_pr(detections, ground_truth, iou_threshold, pixel_inclusive)
    if npos == 0:
        return float("nan")
    return voc_ap(recall, precision, use_07_metric)
