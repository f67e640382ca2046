"""Report sections for classifiers: per-class precision / recall / F1 and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zoo.outputs import Section


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


def classification_sections(
    confusion_matrix: np.ndarray, class_names: Sequence[str], split: str = "test"
) -> list[Section]:
    """Per-class precision / recall / F1 (with flat metrics ``test/precision/HVHA``, ...) and
    the confusion matrix, from a confusion matrix (rows: true, columns: predicted)."""
    from zoo.plotting import confusion_matrix_figure

    cm = np.asarray(confusion_matrix)
    per_class = per_class_metrics(cm, class_names)
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
    scores = Section("Per-class precision, recall and F1")
    scores.table(["class", "precision", "recall", "F1", "support"], rows)
    for name, m in per_class.items():
        for k in ("precision", "recall", "f1"):
            scores.metrics[f"{split}/{k}/{name}"] = m[k]
    matrix = Section("Confusion matrix").image(
        "confusion_matrix",
        f"{split} confusion matrix (counts; colour = fraction of the true class)",
        lambda: confusion_matrix_figure(cm, class_names, f"{split} confusion matrix"),
    )
    return [scores, matrix]
