"""Helpers the op modules share."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a kernel's statistics (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checking() -> bool:
    """Value checks need the data (a sync on GPU); skipped while torch.compile or torch.export
    traces."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def check_range(name: str, t: torch.Tensor, lo: int, hi: int, ignore: int | None = None) -> None:
    values = t[t != ignore] if ignore is not None else t
    if values.numel() == 0:
        return
    bad = (values < lo) | (values >= hi)
    if bool(bad.any()):
        first = int(values[bad][0])
        raise ValueError(f"{name} has value {first} outside [{lo}, {hi})")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
