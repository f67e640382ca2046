"""A Lightning module for any classifier: loss, shared metric names, confusion matrices, and the
report sections evaluate.py writes. Model families subclass it or use it directly."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from zoo.errors import ConfigError
from zoo.models.base import OptimizerFactory, SchedulerFactory, ZooModule, scheduler_config
from zoo.outputs import Figure, File
from zoo.reports.classification import classification_sections

TEST_CONFUSION_ARTIFACT = "metrics/test_confusion_matrix.json"


class ClassificationModule(ZooModule):
    """Cross-entropy classifier around an injected ``net``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/f1_macro`` (and their
    ``*_best``), ``test/loss``, ``test/acc``, ``test/f1_macro``; a confusion-matrix figure per
    validation epoch and for the test split.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None,
        class_names: Sequence[str],
        scheduler: SchedulerFactory | None = None,
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
        # sanity-check batches must not count towards the epoch's values
        self.val_loss.reset()
        self.val_metrics.reset()
        self.val_cm.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the best values so far (a resumed job continues them; torchmetrics states are not
        # part of the state dict)
        checkpoint["val_best"] = {
            "acc": self.val_acc_best.max_value.detach().clone(),
            "f1_macro": self.val_f1_best.max_value.detach().clone(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        best = checkpoint.get("val_best") or {}
        for key, metric in (("acc", self.val_acc_best), ("f1_macro", self.val_f1_best)):
            metric.reset()
            if key in best and torch.isfinite(best[key]):
                metric.update(best[key])

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_loss(loss)
        self.val_metrics(logits, y)
        self.val_cm.update(logits, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        if not self.trainer.sanity_checking:  # sanity-check batches are not an epoch
            self.val_acc_best(values["val/acc"])
            self.val_f1_best(values["val/f1_macro"])
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
            self.log("val/f1_macro_best", self.val_f1_best.compute(), sync_dist=True)
        cm = self.val_cm.compute()
        self.val_cm.reset()
        if self.epoch_due(self.cm_every):
            self._emit_confusion(
                cm,
                f"figures/val/confusion_matrix_epoch{self.current_epoch:03d}.png",
                f"val confusion matrix, epoch {self.current_epoch}",
            )

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Returns the logits (``on_test_batch_end`` sees them, e.g. per-trial answers)."""
        loss, logits, y = self._step(batch)
        self.test_loss(loss)
        self.test_metrics(logits, y)
        self.test_cm.update(logits, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)
        return logits.detach()

    def on_test_epoch_end(self) -> None:
        cm = self.test_cm.compute().cpu().numpy()
        self.test_cm.reset()
        self._emit_confusion(cm, "figures/test/confusion_matrix.png", "test confusion matrix")
        self.emit(File(TEST_CONFUSION_ARTIFACT, write=self._confusion_writer(cm)))
        self.emit(*classification_sections(cm, self.class_names, "test"))

    def _confusion_writer(self, cm: np.ndarray):
        """The test confusion matrix as counts (what a study pools over its folds)."""
        data = {"class_names": self.class_names, "counts": np.asarray(cm).astype(int).tolist()}
        return lambda path: path.write_text(json.dumps(data))

    def _emit_confusion(self, cm, path: str, title: str) -> None:
        from zoo.plotting import confusion_matrix_figure

        cm = np.asarray(cm.cpu() if torch.is_tensor(cm) else cm)
        self.emit(Figure(path, lambda: confusion_matrix_figure(cm, self.class_names, title)))

    def optimizer_params(self):
        """What the optimizer gets: all parameters (subclasses may return param groups)."""
        return self.parameters()

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ConfigError("model.optimizer is not set: training needs an optimizer partial")
        optimizer = self.optimizer_factory(params=self.optimizer_params())
        scheduler = scheduler_config(self.scheduler_factory, optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> np.ndarray:
        return batch[0].detach().cpu().numpy()

    @torch.no_grad()
    def serve(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities [B, classes] for a batch of inputs."""
        x = torch.as_tensor(inputs, device=self.device)
        if x.is_floating_point():  # float64 from JSON or numpy: the weights' float32
            x = x.float()
        return self(x).softmax(-1).cpu().numpy()

    def export_network(self):
        """What ``serve`` computes, over tensors: inputs [B, ...] -> probabilities."""
        return _Probabilities(self), ["inputs"], ["probabilities"], {"inputs": {0: "batch"}}


class _Probabilities(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).softmax(-1)
