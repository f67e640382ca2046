"""Report sections for classifiers: per-class precision / recall / F1 and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zoo.reports.report import Report


def per_class_metrics(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(class_names)
    }


def add_classification_sections(
    report: Report, outputs: dict, class_names: Sequence[str], split: str = "test"
) -> dict[str, float]:
    """Adds the sections; returns flat per-class metrics (``test/precision/HVHA``, ...)."""
    from zoo.plotting import confusion_matrix_figure

    cm = np.asarray(outputs["confusion_matrix"])
    per_class = per_class_metrics(cm, class_names)
    report.heading("Per-class precision, recall and F1")
    rows = [
        [name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in per_class.items()
    ]
    # like torchmetrics' macro average: classes never seen nor predicted do not count
    present = [m for i, m in enumerate(per_class.values()) if cm[i, :].sum() + cm[:, i].sum() > 0]
    macro = [
        float(np.mean([m[k] for m in present])) if present else 0.0
        for k in ("precision", "recall", "f1")
    ]
    rows.append(["macro average", *macro, int(cm.sum())])
    report.table(["class", "precision", "recall", "F1", "support"], rows)
    report.heading("Confusion matrix")
    report.image(
        confusion_matrix_figure(cm, class_names, f"{split} confusion matrix"),
        f"{split} confusion matrix (counts; colour = fraction of the true class)",
        "confusion_matrix",
    )
    flat = {}
    for name, m in per_class.items():
        for k in ("precision", "recall", "f1"):
            flat[f"{split}/{k}/{name}"] = m[k]
    return flat
