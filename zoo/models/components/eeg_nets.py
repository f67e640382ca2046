"""1D-CNN + recurrent networks for multichannel EEG windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CNNRecurrentNet(nn.Module):
    """Temporal 1D convolutions (feature extraction + downsampling), then an LSTM or GRU over
    the downsampled sequence, then a linear head on the last hidden state(s).

    Input [B, C, T] (channels x samples); output logits [B, num_classes].
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv_channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 7,
        pool: int = 2,
        rnn: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.3,
    ):
        super().__init__()
        if rnn not in ("lstm", "gru"):
            raise ValueError(f"rnn must be 'lstm' or 'gru', got {rnn!r}")
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("kernel_size", kernel_size),
            ("pool", pool),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not conv_channels or any(int(c) < 1 for c in conv_channels):
            raise ValueError(
                f"conv_channels must be a non-empty list of positive ints, got "
                f"{list(conv_channels)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in conv_channels:
            layers += [
                nn.Conv1d(c_in, int(c_out), kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(int(c_out)),
                nn.ELU(inplace=True),
                nn.MaxPool1d(pool) if pool > 1 else nn.Identity(),
                nn.Dropout(dropout),
            ]
            c_in = int(c_out)
        self.features = nn.Sequential(*layers)
        rnn_cls = nn.LSTM if rnn == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            input_size=c_in,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.in_channels = in_channels
        self.num_directions = 2 if bidirectional else 1
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size * self.num_directions, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"expected input [batch, channels, time], got shape {tuple(x.shape)}")
        h = self.features(x).transpose(1, 2)  # [B, T', F]
        _, state = self.rnn(h)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        last = h_n[-self.num_directions :]  # last layer, every direction: [dirs, B, H]
        return self.head(last.transpose(0, 1).reshape(x.shape[0], -1))
