"""Figures of detection scores: precision-recall curves per class, a per-class AP chart, and
images with their ground truth and predictions drawn."""

from __future__ import annotations

import numpy as np
import torch

from zoo.metrics.detection import DetectionScores


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
