"""DEAP EEG emotion recognition: 1D-CNN + LSTM / GRU classifiers of valence-arousal quadrants
(HVHA / HVLA / LVHA / LVLA) or binary valence / arousal."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from zoo.models.classification import ClassificationModule

NORM_KEYS = ("input_mean", "input_std")


def _in_channels(net: nn.Module) -> int:
    """The number of input channels of an EEG network (its ``in_channels``, or its first
    convolution's)."""
    if isinstance(getattr(net, "in_channels", None), int):
        return int(net.in_channels)
    for module in net.modules():
        if isinstance(module, nn.Conv1d):
            return int(module.in_channels)
    raise ValueError(f"{type(net).__name__}: cannot tell its number of input channels")


class EEGEmotionClassifier(ClassificationModule):
    """Windows of multichannel EEG [B, C, T] -> emotion class.

    The network (``zoo.models.components.eeg_nets.CNNRecurrentNet`` with ``rnn=lstm`` or ``gru``)
    is injected from the config, so the LSTM and GRU variants share every line of training code.

    The input is standardised per channel as the first step of ``forward``, with the training
    split's statistics held in the buffers ``input_mean`` / ``input_std``: they are set from
    the data module when fitting starts, and travel in every checkpoint and logged model, so a
    trained model takes windows as the data module (and a user) has them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        channels = _in_channels(self.net)
        self.register_buffer("input_mean", torch.zeros(channels))
        self.register_buffer("input_std", torch.ones(channels))
        self._stats_from_data = False  # a checkpoint from before the buffers: take the data's
        self._register_load_state_dict_pre_hook(self._fill_missing_stats)

    def _fill_missing_stats(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before the statistics moved into the model were trained on
        windows the data module had standardised: load them with the data's statistics."""
        missing = [k for k in NORM_KEYS if prefix + k not in state_dict]
        if missing:
            for k in missing:
                state_dict[prefix + k] = getattr(self, k).detach().clone()
            self._stats_from_data = True

    def set_input_stats(self, stats: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Per-channel (mean, sd) to standardise the input with (None: none)."""
        channels = self.input_mean.numel()
        if stats is None:
            mean, std = np.zeros(channels), np.ones(channels)
        else:
            mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in stats)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(
                f"normalisation statistics for {mean.shape[0]} channels, the network takes "
                f"{channels}"
            )
        with torch.no_grad():  # float32, as the data module's windows
            self.input_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
            self.input_std.copy_(torch.from_numpy(std.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean[:, None]) / self.input_std[:, None]
        return self.net(x)

    def _stats_of_datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "norm_stats"):
            self.set_input_stats(dm.norm_stats)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        if names is not None and list(names) != self.class_names:
            raise ValueError(
                f"model.class_names={self.class_names} but the data module yields {list(names)}"
            )
        self._stats_of_datamodule()

    def on_test_start(self) -> None:
        if self._stats_from_data:
            self._stats_of_datamodule()
