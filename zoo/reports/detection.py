"""``python evaluate.py task=detection annotations=<coco gt json> predictions=<coco results json>``:
score an external COCO results file without a model and write the detection report (the same
sections a trained detector's report has). The scores are also logged to a new mlflow run
(tag ``zoo.kind=evaluation``) so they sit next to trained runs in the mlflow UI."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from zoo import tracking
from zoo.errors import ConfigError
from zoo.metrics.detection import detections_figure, score_coco_files
from zoo.reports import Report


def _images_figure(scorer, gt: dict, image_dir: Path, n: int, threshold: float):
    names = dict(zip(scorer.label_ids, scorer.class_names))
    picked = [i for i, t in enumerate(scorer.targets) if len(t["labels"])][:n]
    images, targets, preds = [], [], []
    for i in picked:
        path = image_dir / gt["images"][i]["file_name"]
        if not path.is_file():
            raise ConfigError(
                f"images={image_dir}: {path.name} (image id {gt['images'][i]['id']}) not found there"
            )
        with Image.open(path) as im:
            images.append(
                torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float()
                / 255
            )
        targets.append(scorer.targets[i])
        preds.append(scorer.preds[i])
    if not images:
        return None
    return detections_figure(images, targets, preds, names, threshold)


def coco_files_report(cfg: DictConfig) -> dict[str, float]:
    annotations, predictions = cfg.get("annotations"), cfg.get("predictions")
    if not annotations or not predictions:
        raise ConfigError(
            "task=detection scores a COCO results file: give annotations=<coco ground-truth json> "
            "and predictions=<coco results json> (optionally images=<folder> to draw boxes)"
        )
    scorer, gt = score_coco_files(annotations, predictions)
    scores = scorer.compute()
    metrics = {f"test/{k}": v for k, v in scores.metrics.items()}
    n_dets = sum(len(p["labels"]) for p in scorer.preds)
    report = Report("Detection report: COCO results file")
    report.key_values(
        {
            "annotations": str(annotations),
            "predictions": str(predictions),
            "images": f"{len(scorer)} ({sum(1 for t in scorer.targets if len(t['labels']) == 0)} without objects)",
            "ground-truth boxes": sum(len(t["labels"]) for t in scorer.targets),
            "detections": n_dets,
            "categories": len(scorer.class_names),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    report.heading("Metrics")
    report.paragraph(
        "COCO metrics from torchmetrics' MeanAveragePrecision (faster_coco_eval backend, the "
        "numbers of pycocotools' COCOeval); -1 means no ground truth in that area range. VOC AP@.5 "
        "treats crowd boxes as 'difficult' (ignored)."
    )
    report.table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    fig = None
    if cfg.get("images"):
        fig = _images_figure(
            scorer,
            gt,
            Path(cfg.images),
            int(cfg.get("figure_images", 6)),
            float(cfg.get("figure_score_threshold", 0.5)),
        )
    from zoo.models.detection import add_detection_sections

    add_detection_sections(report, scores, fig)
    out_dir = Path(
        cfg.get("output_dir")
        or Path(cfg.paths.log_dir)
        / "reports"
        / f"detection-{Path(str(predictions)).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    files = report.write(out_dir, metrics)
    run_id = _log_run(cfg, metrics, out_dir)
    print(
        f"\nDetection report written to {out_dir}\n  {files['html']}\n  {files['markdown']}\n  {files['metrics']}"
        + (
            f"\n  (logged to new mlflow run {run_id}, tag {tracking.TAG_KIND}=evaluation)"
            if run_id
            else ""
        ),
        flush=True,
    )
    return metrics


def _log_run(cfg: DictConfig, metrics: dict[str, float], out_dir: Path) -> str | None:
    if not cfg.get("log_to_mlflow", True):
        return None
    client = tracking.client(cfg.tracking.tracking_uri)
    rid = tracking.create_run(
        cfg.tracking.tracking_uri,
        cfg.tracking.experiment_name,
        f"detection-eval-{time.strftime('%Y%m%d-%H%M%S')}",
        {tracking.TAG_KIND: "evaluation", "zoo.task": "detection"},
    )
    client.log_param(rid, "annotations", str(cfg.annotations))
    client.log_param(rid, "predictions", str(cfg.predictions))
    for k, v in metrics.items():
        if v == v and v >= 0:
            client.log_metric(rid, k, v)
    client.log_artifacts(rid, str(out_dir), "report")
    client.set_terminated(rid, "FINISHED")
    return rid
