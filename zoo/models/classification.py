"""A Lightning module for any classifier: loss, shared metric names, confusion matrices, and the
predictions evaluate.py turns into a report. Model families subclass it or use it directly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from zoo.tracking import log_figure


class ClassificationModule(L.LightningModule):
    """Cross-entropy classifier around an injected ``net``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/f1_macro`` (and their
    ``*_best``), ``test/loss``, ``test/acc``, ``test/f1_macro``; a confusion-matrix figure per
    validation epoch and for the test split.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        class_names: Sequence[str],
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        confusion_matrix_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.class_names = [str(c) for c in class_names]
        # plain types only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "class_names": self.class_names,
                "label_smoothing": float(label_smoothing),
                "confusion_matrix_every_n_epochs": int(confusion_matrix_every_n_epochs),
            },
            logger=False,
        )
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        n = len(self.class_names)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(n, average="micro"),
                "f1_macro": MulticlassF1Score(n, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_cm = MulticlassConfusionMatrix(n)
        self.test_cm = MulticlassConfusionMatrix(n)
        self.val_acc_best, self.val_f1_best = MaxMetric(), MaxMetric()
        self.cm_every = confusion_matrix_every_n_epochs
        self.test_outputs: dict[str, torch.Tensor] = {}
        self._test_parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return self.criterion(logits, y), logits, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._step(batch)
        self.train_loss(loss)
        self.train_metrics(logits, y)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def on_train_start(self) -> None:
        # sanity-check batches must not count towards the best values
        self.val_loss.reset()
        self.val_metrics.reset()
        self.val_cm.reset()
        self.val_acc_best.reset()
        self.val_f1_best.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_loss(loss)
        self.val_metrics(logits, y)
        self.val_cm.update(logits, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_acc_best(values["val/acc"])
        self.val_f1_best(values["val/f1_macro"])
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        self.log("val/f1_macro_best", self.val_f1_best.compute(), sync_dist=True)
        cm = self.val_cm.compute()
        self.val_cm.reset()
        if not self.trainer.sanity_checking and self.current_epoch % max(1, self.cm_every) == 0:
            self._log_confusion(
                cm,
                f"figures/val/confusion_matrix_epoch{self.current_epoch:03d}.png",
                f"val confusion matrix, epoch {self.current_epoch}",
            )

    def on_test_epoch_start(self) -> None:
        self._test_parts = []

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.test_loss(loss)
        self.test_metrics(logits, y)
        self.test_cm.update(logits, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)
        self._test_parts.append((logits.detach().softmax(-1).cpu(), y.detach().cpu()))

    def on_test_epoch_end(self) -> None:
        cm = self.test_cm.compute()
        self.test_cm.reset()
        probs = (
            torch.cat([p for p, _ in self._test_parts])
            if self._test_parts
            else torch.empty(0, len(self.class_names))
        )
        target = (
            torch.cat([t for _, t in self._test_parts])
            if self._test_parts
            else torch.empty(0, dtype=torch.long)
        )
        self.test_outputs = {"probs": probs, "target": target, "confusion_matrix": cm.cpu()}
        self._log_confusion(cm, "figures/test/confusion_matrix.png", "test confusion matrix")

    def _log_confusion(self, cm: torch.Tensor, path: str, title: str) -> None:
        if self.trainer.is_global_zero and self.logger is not None:
            from zoo.plotting import confusion_matrix_figure

            log_figure(
                self.trainer,
                confusion_matrix_figure(cm.cpu().numpy(), self.class_names, title),
                path,
            )

    def optimizer_params(self):
        """What the optimizer gets: all parameters (subclasses may return param groups)."""
        return self.parameters()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.optimizer_params())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer=optimizer),
                "interval": "epoch",
            },
        }

    def add_report_sections(
        self, report, outputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Per-class precision/recall/F1 and the confusion matrix of the last test run; returns
        the per-class metrics (``test/f1/<class>``, ...) for metrics.json."""
        from zoo.reports.classification import add_classification_sections

        return add_classification_sections(report, outputs or self.test_outputs, self.class_names)
