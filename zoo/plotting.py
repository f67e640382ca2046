"""Matplotlib figures logged to mlflow and embedded in reports (Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_figure(
    cm: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix"
):
    """Counts in each cell, colour = row-normalised rate (recall per true class)."""
    cm = np.asarray(cm, dtype=np.int64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 1.8), dpi=100)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{rates[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return fig


def learning_curves_figure(
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    title: str = "Learning curves",
):
    """histories: metric name -> run label -> [(step, value), ...]; one panel per metric."""
    metrics = list(histories)
    cols = min(2, max(1, len(metrics)))
    rows = max(1, -(-len(metrics) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), dpi=100, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for label, points in histories[metric].items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid_figure(
    rows: Sequence[Sequence[np.ndarray]],
    column_titles: Sequence[str],
    title: str = "",
    row_labels: Sequence[str] | None = None,
):
    """A grid of images (H x W x 3 floats in [0, 1], or H x W grayscale): one row per sample,
    one column per kind (e.g. input | generated | target)."""
    n_rows, n_cols = max(1, len(rows)), len(column_titles)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows + 0.4), dpi=100, squeeze=False
    )
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r, c]
            img = np.clip(np.asarray(img), 0, 1)
            ax.imshow(
                img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def mask_heatmaps_figure(masks: np.ndarray, title: str = "", row_label: str = "layer"):
    """masks [S, H, L, L] in [0, 1]: one heatmap per (set, head); white = attend, black =
    dropped."""
    masks = np.asarray(masks, dtype=np.float32)
    s, h = masks.shape[:2]
    fig, axes = plt.subplots(s, h, figsize=(2.0 * h + 0.6, 2.0 * s + 0.6), dpi=100, squeeze=False)
    for i in range(s):
        for j in range(h):
            ax = axes[i, j]
            ax.imshow(masks[i, j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"head {j}: {masks[i, j].mean():.0%} kept", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{row_label} {i}" if s > 1 else "all layers", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def density_accuracy_figure(rows, chance: float = 0.5, x: str = "density"):
    """Test accuracy against attention density: every run a small dot, each method's mean over
    seeds (± one sd) joined by a line; dense attention as a band at density 1. ``rows`` have
    ``method``, ``density``, ``acc`` (zoo.studies.sparse_attention.Row); ``x="token_density"``
    puts the density on the real tokens (padding left out) on the x axis."""
    styles = {
        "dense": ("black", "s", "dense"),
        "dam_s": ("tab:blue", "o", "DAM_s (learned, Toeplitz) + fine-tune"),
        "dam_u": ("tab:green", "^", "DAM_u (learned, unstructured) + fine-tune"),
        "random": ("tab:red", "x", "random mask + fine-tune"),
        "search:dam_s": ("tab:blue", ".", "DAM_s search run (joint)"),
        "search:dam_u": ("tab:green", ".", "DAM_u search run (joint)"),
    }
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    for method, (color, marker, label) in styles.items():
        mine = [r for r in rows if r.method == method]
        if not mine:
            continue
        search = method.startswith("search:")
        if method == "dense":
            accs = [r.acc for r in mine]
            mean, sd = np.mean(accs), _sd(accs)
            ax.axhspan(mean - sd, mean + sd, color="0.85", lw=0)
            ax.axhline(mean, color=color, lw=1, ls="--")
        pooled: dict[float, list[float]] = {}
        for r in mine:
            pooled.setdefault(round(getattr(r, x), 3), []).append(r.acc)
        xs = np.array(sorted(pooled))
        means = np.array([np.mean(pooled[x]) for x in xs])
        sds = np.array([_sd(pooled[x]) for x in xs])
        ax.scatter(
            [getattr(r, x) for r in mine],
            [r.acc for r in mine],
            color=color,
            marker=marker,
            s=12,
            alpha=0.35 if not search else 0.6,
        )
        if not search:
            ax.errorbar(xs, means, yerr=sds, color=color, marker=marker, capsize=3, label=label)
        else:
            ax.scatter([], [], color=color, marker=marker, label=label)
    ax.axhline(chance, color="0.5", lw=0.8, ls=":", label="chance")
    ax.set_xlabel(
        "attention density (share of positions kept)"
        if x == "density"
        else "density on tokens (share kept among the pairs of real tokens, padding left out)"
    )
    ax.set_ylabel("test accuracy")
    ax.set_xlim(0, 1.05)
    ax.set_title(
        "Test accuracy against attention density (each dot one run; bars: ± sd over seeds)"
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def reward_kl_frontier_figure(rows, reference: float | None = None):
    """RLHF's reward–KL frontier: the mean test score (y) against the mean KL to the reference
    (x) of each KL coefficient, ± one sd over seeds both ways, labelled by the coefficient and
    joined in order of KL; every run a faint dot; the reference policy's score as a dashed
    line. ``rows`` have ``kl_coef``, ``kl``, ``score`` (zoo.studies.rlhf_frontier.Row)."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=100)
    pooled: dict[float, list] = {}
    for r in rows:
        pooled.setdefault(r.kl_coef, []).append(r)
    ax.scatter([r.kl for r in rows], [r.score for r in rows], s=14, color="tab:blue", alpha=0.3)
    points = []
    for coef in sorted(pooled):
        kls, scores = [r.kl for r in pooled[coef]], [r.score for r in pooled[coef]]
        points.append((float(np.mean(kls)), float(np.mean(scores)), coef))
        ax.errorbar(
            points[-1][0],
            points[-1][1],
            xerr=_sd(kls),
            yerr=_sd(scores),
            color="tab:blue",
            marker="o",
            capsize=3,
        )
    points.sort()
    for i, (x, y, coef) in enumerate(points):  # neighbours' labels above and below, alternately
        ax.annotate(
            f"kl_coef={coef:g}",
            (x, y),
            fontsize=8,
            xytext=(5, 6 if i % 2 == 0 else -13),
            textcoords="offset points",
        )
    ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", lw=1, alpha=0.6)
    ax.errorbar([], [], color="tab:blue", marker="o", capsize=3, label="mean over seeds ± sd")
    ax.scatter([], [], s=14, color="tab:blue", alpha=0.3, label="one run")
    if reference is not None and np.isfinite(reference):
        ax.axhline(reference, color="0.4", lw=1, ls="--", label="reference (initial policy)")
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("test KL to the reference (summed over the completion)")
    ax.set_ylabel("test score (mean reward, greedy completions)")
    ax.set_title("Reward–KL frontier over PPO's KL coefficient")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _sd(values) -> float:
    """The sample standard deviation (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def close(fig) -> None:
    plt.close(fig)
