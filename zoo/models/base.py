"""What every zoo Lightning module shares: an outbox for what it produces (``zoo.outputs``) and
optimizers and schedulers injected from the config as Hydra partials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from zoo.outputs import Outbox, Output

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class ZooModule(L.LightningModule):
    """A LightningModule that emits figures, files, tags and report sections instead of
    logging them (``zoo.tracking.lightning.TrackOutputs`` does that, on rank 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox = Outbox()

    def emit(self, *items: Output) -> None:
        self.outbox.emit(*items)

    def epoch_due(self, every_n_epochs: int) -> bool:
        """Whether per-epoch pictures are due now (never during the sanity check)."""
        if self._trainer is not None and self.trainer.sanity_checking:
            return False
        return self.current_epoch % max(1, int(every_n_epochs)) == 0

    def parameter_groups(self) -> dict[str, nn.Module]:
        """Named parts whose parameter counts are logged (``model/params/<name>``)."""
        return {}


def scheduler_config(
    factory: SchedulerFactory | None, optimizer: torch.optim.Optimizer, interval: str = "epoch"
) -> dict[str, Any] | None:
    """Lightning's lr-scheduler dict for an injected scheduler partial (None without one)."""
    if factory is None:
        return None
    return {"scheduler": factory(optimizer=optimizer), "interval": interval}
