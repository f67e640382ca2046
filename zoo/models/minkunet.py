"""LiDAR semantic segmentation with MinkUNet on sparse voxels (``zoo.sparse``): raw points in,
a class per point out.

The model voxelises its input itself, with the voxel size and range its data module recorded
(``preprocessing``), so a trained model takes points as a ``.bin`` holds them: (x, y, z,
remission). Points outside the range get no class (-1; written as SemanticKITTI's raw 0,
"unlabeled") and do not count in the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from zoo.errors import ConfigError, DataError
from zoo.inference import Item, RawInputs, Writer
from zoo.models.base import OptimizerFactory, SchedulerFactory, ZooModule, scheduler_config
from zoo.outputs import Figure, File, Section
from zoo.sparse import devoxelize, voxelize

TEST_CONFUSION_ARTIFACT = "metrics/test_confusion_matrix.json"
IGNORE = -1


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU (tp / (tp + fp + fn)) and which classes the ground truth holds (the mean
    IoU is over those: a class with no points cannot be scored)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    present = cm.sum(1) > 0
    return np.where(union > 0, tp / np.maximum(union, 1), 0.0), present


class LidarSegmenter(ZooModule):
    """Point clouds -> per-point classes, through ``net`` (``MinkUNet``) on the voxels.

    Logs ``train/loss``; ``val/loss``, ``val/miou`` (and ``val/miou_best``), ``val/acc``,
    ``val/iou/<class>``; ``test/miou``, ``test/acc``, ``test/iou/<class>``; per validation
    epoch and for test a bird's-eye view of the first scan coloured by ground truth and by
    prediction, and the confusion matrix.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None,
        class_names: list[str],
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        figures_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.class_names = [str(c) for c in class_names]
        self.save_hyperparameters(
            {
                "class_names": self.class_names,
                "label_smoothing": float(label_smoothing),
                "figures_every_n_epochs": int(figures_every_n_epochs),
            },
            logger=False,
        )
        if getattr(net, "num_classes", len(self.class_names)) != len(self.class_names):
            raise ConfigError(
                f"model.net has {net.num_classes} classes, model.class_names "
                f"{len(self.class_names)}"
            )
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        n = len(self.class_names)
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=label_smoothing)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_cm = MulticlassConfusionMatrix(n, ignore_index=IGNORE)
        self.test_cm = MulticlassConfusionMatrix(n, ignore_index=IGNORE)
        self.val_miou_best = MaxMetric()
        self.figures_every = int(figures_every_n_epochs)
        self._shown: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the network

    def voxels(self, points: torch.Tensor, batch: torch.Tensor | None, batch_size: int | None):
        spec = self.preprocessing
        if not spec:
            raise ConfigError(
                "this LidarSegmenter has no voxel size and range yet: they come from its data "
                "module when fitting starts (or from the checkpoint it was loaded from)"
            )
        return voxelize(points, spec["voxel_size"], spec["point_range"], batch, batch_size)

    def forward(
        self, points: torch.Tensor, batch: torch.Tensor | None = None, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-point logits [P, classes], each point's voxel [P], -1 outside the range)."""
        vox = self.voxels(points, batch, batch_size)
        logits = self.net(vox.tensor)
        return devoxelize(logits, vox.point_voxel), vox.point_voxel

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, point_voxel = self(batch["points"], batch["batch"], batch["batch_size"])
        labels = torch.where(point_voxel >= 0, batch["labels"], IGNORE)
        if bool((labels != IGNORE).any()):
            loss = self.criterion(logits, labels)
        else:  # nothing labelled in range: no gradient, not NaN
            loss = logits.sum() * 0.0
        return loss, logits, labels

    # ------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch)
        self.train_loss(loss)
        self.log(
            "train/loss",
            self.train_loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["batch_size"],
        )
        return loss

    def on_train_start(self) -> None:
        self.val_loss.reset()
        self.val_cm.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_best"] = {"miou": self.val_miou_best.max_value.detach().clone()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        best = (checkpoint.get("val_best") or {}).get("miou")
        self.val_miou_best.reset()
        if best is not None and torch.isfinite(best):
            self.val_miou_best.update(best)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.val_loss(loss)
        self.val_cm.update(logits, labels)
        self.log(
            "val/loss",
            self.val_loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["batch_size"],
        )
        if batch_idx == 0:
            self._keep_first_scan(batch, logits)

    def _keep_first_scan(self, batch, logits: torch.Tensor) -> None:
        first = batch["batch"] == 0
        self._shown = {
            "points": batch["points"][first, :2].detach().cpu().numpy(),
            "labels": batch["labels"][first].cpu().numpy(),
            "pred": logits[first].argmax(-1).cpu().numpy(),
            "name": batch["names"][0],
        }

    def on_validation_epoch_end(self) -> None:
        cm, _, _, miou, _ = self._log_scores("val", self.val_cm)
        if self.trainer.sanity_checking:
            return
        self.val_miou_best(torch.tensor(miou))
        self.log("val/miou_best", self.val_miou_best.compute())
        if self.epoch_due(self.figures_every):
            epoch = self.current_epoch
            self._emit_figures(cm, f"figures/val/{{}}_epoch{epoch:03d}.png", f"val, epoch {epoch}")

    def _log_scores(self, split: str, confusion: MulticlassConfusionMatrix):
        """Log ``<split>/miou``, ``/acc`` and ``/iou/<class>`` (classes the ground truth holds)
        from the split's confusion matrix, which is then reset; returns (counts, per-class IoU,
        present, mIoU, accuracy)."""
        cm = confusion.compute().cpu().numpy()
        confusion.reset()
        iou, present = iou_from_confusion(cm)
        miou = float(iou[present].mean()) if present.any() else 0.0
        acc = float(np.trace(cm) / max(cm.sum(), 1))
        self.log(f"{split}/miou", miou, prog_bar=split == "val")
        self.log(f"{split}/acc", acc)
        for name, value, here in zip(self.class_names, iou, present):
            if here:
                self.log(f"{split}/iou/{name}", float(value))
        return cm, iou, present, miou, acc

    def _emit_figures(self, cm: np.ndarray, path: str, title: str) -> None:
        from zoo.plotting import confusion_matrix_figure

        shown, names = self._shown, self.class_names
        if shown is not None:
            colors = self.preprocessing.get("colors")
            self.emit(
                Figure(
                    path.format("bev"),
                    lambda: bev_figure(shown, names, colors, f"{shown['name']} ({title})"),
                )
            )
        self.emit(
            Figure(
                path.format("confusion_matrix"),
                lambda: confusion_matrix_figure(cm, names, f"{title} confusion matrix"),
            )
        )

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.test_loss(loss)
        self.test_cm.update(logits, labels)
        self.log(
            "test/loss",
            self.test_loss,
            on_step=False,
            on_epoch=True,
            batch_size=batch["batch_size"],
        )
        if batch_idx == 0:
            self._keep_first_scan(batch, logits)

    def on_test_epoch_end(self) -> None:
        cm, iou, present, miou, acc = self._log_scores("test", self.test_cm)
        self._emit_figures(cm, "figures/test/{}.png", "test")
        section = Section("Per-class IoU")
        section.paragraph(
            f"Mean IoU {miou:.4f} over the {int(present.sum())} classes the test split's ground "
            f"truth holds; point accuracy {acc:.4f} over {int(cm.sum())} labelled points in "
            "range."
        )
        section.table(
            ["class", "IoU", "points (truth)", "points (predicted)"],
            [
                [name, float(v) if here else "-", int(cm[i].sum()), int(cm[:, i].sum())]
                for i, (name, v, here) in enumerate(zip(self.class_names, iou, present))
            ],
        )
        from zoo.plotting import confusion_matrix_figure

        names, shown, colors = self.class_names, self._shown, self.preprocessing.get("colors")
        pictures = Section("Test scans and confusion matrix")
        if shown is not None:
            pictures.image(
                "bev",
                f"{shown['name']} from above: ground truth (left) and prediction (right)",
                lambda: bev_figure(shown, names, colors, f"{shown['name']} (test)"),
            )
        pictures.image(
            "confusion_matrix",
            "test confusion matrix (points; colour = fraction of the true class)",
            lambda: confusion_matrix_figure(cm, names, "test confusion matrix"),
        )
        data = {"class_names": self.class_names, "counts": cm.astype(int).tolist()}
        self.emit(
            section,
            pictures,
            File(TEST_CONFUSION_ARTIFACT, write=lambda p: p.write_text(json.dumps(data))),
        )

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ConfigError("model.optimizer is not set: training needs an optimizer partial")
        optimizer = self.optimizer_factory(params=self.parameters())
        scheduler = scheduler_config(self.scheduler_factory, optimizer)
        return (
            optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}
        )

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> np.ndarray:
        return batch["points"][batch["batch"] == 0].cpu().numpy()

    @torch.no_grad()
    def serve(self, inputs: np.ndarray) -> np.ndarray:
        """Class ids [N] (-1 outside the range) for one scan's points [N, 4]."""
        points = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=self.device)
        logits, point_voxel = self(points)
        return torch.where(point_voxel >= 0, logits.argmax(-1), IGNORE).cpu().numpy()

    def export_network(self):
        raise ConfigError(
            "MinkUNet models are not exported: the network's kernel maps (which voxel feeds "
            "which through each kernel tap) have data-dependent sizes, and its sparse "
            "convolutions are zoo's own torch custom ops, which ONNX has no operator for and "
            "a torch.export program can only run where zoo is installed; serve it with the "
            "logged mlflow Model (raw points in, a class per point out) instead"
        )

    def raw_inputs(self) -> ScanInputs:
        return ScanInputs(self)


def bev_figure(shown: dict[str, Any], class_names: list[str], colors, title: str):
    """A bird's-eye view of one scan: ground truth beside prediction, one colour per class."""
    import matplotlib.pyplot as plt

    palette = np.asarray(colors or plt.get_cmap("tab20").colors[: len(class_names)], dtype=float)
    palette = palette / 255 if palette.max() > 1 else palette
    xy = shown["points"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6), dpi=100, sharex=True, sharey=True)
    for ax, key, name in zip(axes, ("labels", "pred"), ("ground truth", "prediction")):
        cls = shown[key]
        keep = cls >= 0
        ax.scatter(xy[~keep, 0], xy[~keep, 1], s=0.3, c="0.85", linewidths=0)
        ax.scatter(xy[keep, 0], xy[keep, 1], s=0.3, c=palette[cls[keep]], linewidths=0)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
    axes[0].set_ylabel("y (m)")
    seen = sorted(
        set(shown["labels"][shown["labels"] >= 0]) | set(shown["pred"][shown["pred"] >= 0])
    )
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=palette[c], label=class_names[c]) for c in seen
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


class ScanInputs(RawInputs):
    """Raw LiDAR scans: float32 (x, y, z, remission) points, as SemanticKITTI's ``.bin`` files
    hold them, or as arrays [N, 4] (a DataFrame of 4 columns from REST). Each is answered with a
    class per point."""

    kind = "scans"
    suffixes = (".bin",)
    batch_size = 2
    one_per_file = True

    def __init__(self, module: LidarSegmenter):
        super().__init__(module)
        self.class_names = list(module.class_names)
        self.raw_labels = np.asarray(self.spec["raw_labels"], dtype=np.uint32)

    def check(self, x: Any, where: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise DataError(f"{where}: a scan must be numbers, got {x.dtype} values")
        if x.ndim != 2 or x.shape[1] != 4:
            raise DataError(
                f"{where}: a scan is [points, 4] (x, y, z, remission), got shape {x.shape}"
            )
        if len(x) == 0:
            raise DataError(f"{where}: the scan is empty (0 points)")
        if not np.isfinite(x).all():
            raise DataError(f"{where}: the scan holds NaN or inf values")
        return x.astype(np.float32, copy=False)

    def read(self, path: Path) -> list[Item]:
        from zoo.data.semantickitti import read_scan

        points = read_scan(path)
        return [Item(path.name, points, {"file": path.name, "points": len(points)})]

    def parse(self, model_input: Any) -> list[np.ndarray]:
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        if isinstance(model_input, dict | str | bytes):
            raise DataError(
                f"inputs: a LiDAR model takes points [N, 4] or scans [B, N, 4], got "
                f"{type(model_input).__name__}"
            )
        try:
            x = np.asarray(model_input)
        except ValueError:  # scans of different sizes
            x = None
        if x is None or x.dtype == object:
            return [self.check(v, f"inputs[{i}]") for i, v in enumerate(model_input)]
        if x.ndim == 3:
            return [self.check(v, f"inputs[{i}]") for i, v in enumerate(x)]
        return [self.check(x, "inputs")]

    @torch.no_grad()
    def answer(self, values: list[np.ndarray]) -> list[dict[str, Any]]:
        module = self.module
        points = torch.from_numpy(np.concatenate(values)).to(module.device)
        batch = torch.cat(
            [torch.full((len(v),), i, dtype=torch.int64) for i, v in enumerate(values)]
        ).to(module.device)
        logits, point_voxel = module(points, batch, len(values))
        classes = torch.where(point_voxel >= 0, logits.argmax(-1), IGNORE).cpu().numpy()
        records, start = [], 0
        for v in values:
            mine = classes[start : start + len(v)]
            start += len(v)
            records.append({"classes": mine, "out_of_range": int((mine < 0).sum())})
        return records

    def raw_label(self, classes: np.ndarray) -> np.ndarray:
        """SemanticKITTI's raw ids (uint32) of classes; -1 (out of range) is 0, "unlabeled"."""
        return np.where(classes >= 0, self.raw_labels[np.maximum(classes, 0)], 0).astype(np.uint32)

    def table(self, records: list[dict[str, Any]]):
        """One row per point: its scan, class id (-1 outside the range), class name and
        SemanticKITTI raw label."""
        import pandas as pd

        names = np.asarray([*self.class_names, "out of range"])
        frames = [
            pd.DataFrame(
                {
                    "scan": np.full(len(r["classes"]), i, dtype=np.int64),
                    "class_id": r["classes"].astype(np.int64),
                    "class_name": names[r["classes"]],
                    "raw_label": self.raw_label(r["classes"]).astype(np.int64),
                }
            )
            for i, r in enumerate(records)
        ]
        return pd.concat(frames, ignore_index=True)

    def writer(self, output: Path) -> LabelWriter:
        return LabelWriter(output, self)

    def example(self, datamodule: Any) -> np.ndarray:
        return datamodule.raw_example()


class LabelWriter(Writer):
    """For each scan ``<name>.bin``: ``<name>.label`` in SemanticKITTI's format (uint32 per
    point, the raw semantic id in the lower 16 bits, instance 0) and ``<name>.png``, a bird's-eye
    view coloured by prediction; ``predictions.csv`` counts each scan's points per class."""

    def __init__(self, output: Path, raw: ScanInputs):
        self.output, self.raw = output, raw
        self.written: list[Path] = []
        self.rows: list[dict[str, Any]] = []

    def add(self, items: list[Item], records: list[dict[str, Any]]) -> None:
        import matplotlib.pyplot as plt

        for item, record in zip(items, records):
            stem = Path(item.name).stem
            label = self.output / f"{stem}.label"
            self.raw.raw_label(record["classes"]).astype("<u4").tofile(label)
            shown = {
                "points": item.value[:, :2],
                "pred": record["classes"],
                "labels": record["classes"],
                "name": item.name,
            }
            fig = bev_figure(shown, self.raw.class_names, self.raw.spec.get("colors"), item.name)
            fig.axes[0].remove()  # prediction only: a raw scan has no ground truth here
            image = self.output / f"{stem}.png"
            fig.savefig(image)
            plt.close(fig)
            self.written += [label, image]
            counts = np.bincount(
                record["classes"][record["classes"] >= 0], minlength=len(self.raw.class_names)
            )
            self.rows.append(
                {
                    **item.meta,
                    "out_of_range": record["out_of_range"],
                    **{f"points_{c}": int(n) for c, n in zip(self.raw.class_names, counts)},
                }
            )

    def close(self) -> list[Path]:
        import pandas as pd

        table = self.output / "predictions.csv"
        pd.DataFrame.from_records(self.rows).to_csv(table, index=False)
        return [*self.written, table]
