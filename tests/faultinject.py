"""Faults injected into real training processes by the fault tests, as Lightning callbacks
added from the command line (``+callbacks.<name>._target_=tests.faultinject.<Class>``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch


class NaNBatch(L.Callback):
    """Turns the inputs of the batch at global step ``at_step`` into NaN (a corrupt sample)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            batch[0].fill_(float("nan"))


class SlowEpochs(L.Callback):
    """Each training epoch ends ``seconds`` later: a job long enough to outlive an outage."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)


class AwaitSignalAt(L.Callback):
    """After global step ``at_step``, touches the file ``ready`` and waits up to ``seconds``
    for a stop signal: a test's signal then lands at a known step, not by chance at an epoch
    boundary."""

    def __init__(self, at_step: int, ready: str, seconds: float = 60):
        self.at_step, self.ready, self.seconds = at_step, Path(ready), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.at_step:
            return
        self.ready.touch()
        deadline = time.monotonic() + self.seconds
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


_torch_save = torch.save


class HoldEpoch(L.Callback):
    """Holds the end of epoch ``at_epoch`` until the file ``until`` exists (a test's signal)."""

    def __init__(self, at_epoch: int, until: str):
        self.at_epoch, self.until = at_epoch, Path(until)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.at_epoch:
            while not self.until.exists():
                time.sleep(0.2)


def slow_torch_save(obj, f, chunks: int = 20, pause: float = 0.25) -> None:
    """torch.save that writes its bytes slowly, announcing the first chunk on stdout (patched
    over torch.save by a test)."""
    import io

    buffer = io.BytesIO()
    _torch_save(obj, buffer)
    data = buffer.getvalue()
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        f.write(data[i : i + step])
        f.flush()
        if i == 0:
            print("writing", flush=True)
        time.sleep(pause)


class KillFoldAt(L.Callback):
    """SIGKILLs its own process (no handler runs, the run stays RUNNING) at global step
    ``at_step`` of the DEAP fold whose test subject is ``test_subject``: a study's fold killed
    mid-way, the others untouched."""

    def __init__(self, at_step: int, test_subject: int):
        self.at_step, self.test_subject = at_step, test_subject

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        import os
        import signal

        fold = trainer.datamodule.split_kwargs.get("test_subject")
        if trainer.global_step == self.at_step and fold == self.test_subject:
            os.kill(os.getpid(), signal.SIGKILL)
