"""Detection report sections (per-class AP, PR curves, AP chart, images with boxes), and the
report of an external COCO results file scored without a model
(``python evaluate.py task=detection annotations=<gt json> predictions=<results json>``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from zoo.data.detection import decode_rgb
from zoo.errors import ConfigError
from zoo.metrics.coco_files import score_coco_files
from zoo.metrics.detection_figures import detections_figure, per_class_ap_figure, pr_curves_figure
from zoo.outputs import Section
from zoo.reports.report import Report


def _images_figure(scorer, gt: dict, image_dir: Path, n: int, threshold: float):
    names = dict(zip(scorer.label_ids, scorer.class_names))
    picked = [i for i, t in enumerate(scorer.targets) if len(t["labels"])][:n]
    images, targets, preds = [], [], []
    for i in picked:
        path = image_dir / gt["images"][i]["file_name"]
        if not path.is_file():
            raise ConfigError(
                f"images={image_dir}: {path.name} (image id {gt['images'][i]['id']}) not found "
                "there"
            )
        images.append(decode_rgb(path))  # uint8, as training reads it
        targets.append(scorer.targets[i])
        preds.append(scorer.preds[i])
    if not images:
        return None
    return detections_figure(images, targets, preds, names, threshold)


def detection_sections(scores, draw_detections: Callable[[], Any] | None = None) -> list[Section]:
    """Per-class AP table, PR curves, AP chart and (when ``draw_detections`` is given, a
    callable returning the figure) images with boxes drawn."""
    headers, rows = scores.table()
    section = Section("AP per class").table(headers, rows)
    section.image(
        "pr_curves",
        "precision-recall curves per class (IoU 0.5, all areas, 100 detections)",
        lambda: pr_curves_figure(scores),
    )
    section.image("ap_per_class", "AP per class", lambda: per_class_ap_figure(scores))
    if draw_detections is not None:
        section.image("detections", "test images: ground truth and predictions", draw_detections)
    return [section]


TASK_PARAMS = ("annotations", "predictions")  # logged as the evaluation run's params


def task_stem(cfg: DictConfig) -> str:
    """The report folder's name for ``evaluate.py task=detection``."""
    return f"detection-{Path(str(cfg.predictions)).stem}"


def task_report(cfg: DictConfig) -> tuple[Report, dict[str, float]]:
    """The report and metrics of ``annotations=`` + ``predictions=`` (+ ``images=``)."""
    annotations, predictions = cfg.get("annotations"), cfg.get("predictions")
    if not annotations or not predictions:
        raise ConfigError(
            "task=detection scores a COCO results file: give annotations=<coco ground-truth "
            "json> and predictions=<coco results json> (optionally images=<folder> to draw boxes)"
        )
    scorer, gt = score_coco_files(annotations, predictions)
    scores = scorer.compute()
    metrics = {f"test/{k}": v for k, v in scores.metrics.items()}
    n_empty = sum(1 for t in scorer.targets if len(t["labels"]) == 0)
    report = Report("Detection report: COCO results file")
    report.key_values(
        {
            "annotations": str(annotations),
            "predictions": str(predictions),
            "images": f"{len(scorer)} ({n_empty} without objects)",
            "ground-truth boxes": sum(len(t["labels"]) for t in scorer.targets),
            "detections": sum(len(p["labels"]) for p in scorer.preds),
            "categories": len(scorer.class_names),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    report.heading("Metrics")
    report.paragraph(
        "COCO metrics: pycocotools' COCOeval as faster-coco-eval computes it (float64, equal "
        "to pycocotools within 1e-9); -1 means no ground truth in that area range. VOC "
        "AP@.5 treats crowd boxes as 'difficult' (ignored)."
    )
    report.table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    draw = None
    if cfg.get("images"):
        fig = _images_figure(
            scorer,
            gt,
            Path(cfg.images),
            int(cfg.get("figure_images", 6)),
            float(cfg.get("figure_score_threshold", 0.5)),
        )
        draw = (lambda: fig) if fig is not None else None
    for section in detection_sections(scores, draw):
        report.add(section)
    return report, metrics
