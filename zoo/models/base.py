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
    logging them (``zoo.tracking.lightning.TrackOutputs`` does that, on rank 0).

    It also carries its **preprocessing**: what turns a user's raw input (a DEAP trial, a
    sentence, a photo) into the network's input, as the data module describes it when fitting
    starts (its ``preprocessing_spec()``: plain values, e.g. channels and filter settings, a
    tokenizer's JSON, an image size). It travels in the state dict as the module's extra state,
    so every checkpoint, logged model and evaluate.py source has it; ``raw_inputs()`` (a family's
    ``zoo.inference.RawInputs``) applies it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outbox = Outbox()
        self.preprocessing: dict[str, Any] = {}
        self._register_load_state_dict_pre_hook(self._allow_missing_extra_state)

    def get_extra_state(self) -> dict[str, Any]:
        return {"preprocessing": self.preprocessing}

    def set_extra_state(self, state: Any) -> None:
        self.preprocessing = dict((state or {}).get("preprocessing") or {})

    def _allow_missing_extra_state(self, state_dict, prefix, *args) -> None:
        """State dicts from before the preprocessing travelled load with none."""
        state_dict.setdefault(prefix + "_extra_state", {})

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        spec = getattr(dm, "preprocessing_spec", None)
        if callable(spec):
            self.preprocessing = spec()

    def raw_inputs(self) -> Any:
        """This model's ``zoo.inference.RawInputs`` (families that answer raw inputs)."""
        from zoo.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} does not answer raw inputs")

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
