"""What keeps a training job's work when it is killed, signalled or diverges.

- ``AtomicCheckpointIO``: checkpoints are written to a temporary file beside the target, synced
  and renamed over it, so a kill during the write never leaves a torn ``last.ckpt``.
- ``RandomState``: the RNG states (torch, CUDA, numpy, python) travel in every checkpoint and
  are restored on resume, so a resumed seeded run draws what the uninterrupted one drew (data
  order included: the samplers and DataLoader workers seed themselves from torch's RNG).
- ``CarryCheckpoints``: a resumed job, whatever its output dir, keeps the checkpoint callback's
  state (best score and path, top-k, last) and carries the earlier best checkpoints forward.
- ``StopSafely``: SIGINT and SIGTERM stop at the next batch boundary, save ``last.ckpt`` and
  end the run KILLED; a non-finite loss stops the job at once and keeps the last good
  checkpoint.
- ``resume_checkpoint``: where a job resumes from (``ckpt_path=``, or on SLURM the newest of
  Lightning's ``hpc_ckpt_*.ckpt`` and ``last.ckpt`` in the job's output dir after a requeue).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zoo.errors import ConfigError, ZooError

log = logging.getLogger(__name__)


class NonFiniteLoss(ZooError):
    """The loss became NaN or infinite: training stopped."""


# --------------------------------------------------------------------------- atomic saves


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import (setting it is process-wide)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the target's folder, fsync, then rename over the
    target: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
        with suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes. (Lightning's own "transaction" writes
    to the system temp dir and moves the file, which is a copy, not a rename, whenever /tmp is
    another filesystem, and never syncs.) Remote URLs keep Lightning's path."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


# --------------------------------------------------------------------------- RNG state


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values (loadable with
    torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def mid_epoch(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` is inside a training epoch (some of its batches done, not all): what
    a checkpoint saved now must carry besides an epoch's end."""
    if trainer is None or not trainer.training:
        return False
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return 0 < done < trainer.num_training_batches


class RandomState(L.Callback):
    """Saves the RNG states in every checkpoint and restores them when a job resumes.

    Lightning restores callback states before the sanity check (which it runs inside
    ``isolate_rng``) and before the first training batch draws, so a job resumed from an
    end-of-epoch checkpoint draws exactly what the uninterrupted job drew after that save. A
    checkpoint saved mid-epoch (a signal, a preemption) is restored again just before the first
    training batch: whatever the resumed job's start-up drew (the uninterrupted job, already in
    its epoch, drew nothing there) is undone. (Loaders draw their workers' seeds from their own
    generator: ``zoo.data.base.worker_seed_generator``.) With DDP each rank restores rank 0's
    states (the checkpoint is rank 0's)."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {**rng_states(), "mid_epoch": mid_epoch(self._trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            states = {k: v for k, v in state_dict.items() if k != "mid_epoch"}
            set_rng_states(states)
            self._pending = states if state_dict.get("mid_epoch") else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


# The two seams into other libraries' private state, for EpochAccumulators: neither library
# offers a public way. Lightning keeps an epoch's accumulated ``on_epoch`` values in its epoch
# loop's result collection; torchmetrics' ``merge_state`` keeps no update count (which its
# mean-reduced states and ``compute`` read) and refuses full-state metrics.


def _epoch_results(trainer: L.Trainer):
    """Lightning's accumulators of the running training epoch (a ``_ResultCollection``)."""
    return trainer.fit_loop.epoch_loop._results


def _set_metric_state(metric, state: dict[str, Any], count: int) -> None:
    """Set a torchmetrics metric back to a saved state after ``count`` updates."""
    for attr, value in state.items():
        if isinstance(value, list):
            value = [v.to(metric.device) for v in value]
        else:
            value = value.to(metric.device)
        setattr(metric, attr, value)  # states are the metric's registered attributes
    metric._update_count = count
    metric._computed = None  # the cached compute() of the state before


class EpochAccumulators(L.Callback):
    """Carries what the interrupted epoch had accumulated for its epoch-level metrics across a
    mid-epoch checkpoint, so the resumed epoch's ``train/loss`` (and every ``on_epoch`` value)
    is the mean over the whole epoch, as the uninterrupted job's is.

    Two kinds are kept: torchmetrics objects of the module that were updated this epoch (their
    states are not part of the module's state_dict), restored before the first training batch;
    and Lightning's own accumulators for plain values logged with ``on_epoch=True``, added to
    the resumed job's once its first batch has logged them. An end-of-epoch checkpoint carries
    nothing (the epoch's metrics were logged)."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if not mid_epoch(trainer) or trainer.lightning_module is None:
            return {}
        from torchmetrics import Metric

        metrics = {}
        for name, module in trainer.lightning_module.named_modules():
            if isinstance(module, Metric) and module.update_count > 0:
                metrics[name] = {"state": dict(module.metric_state), "count": module.update_count}
        logged = {}
        for key, result in _epoch_results(trainer).items():
            if result.is_tensor and result.meta.on_epoch and not result.has_reset:
                logged[key] = {"value": result.value.detach().cpu()}
                if result.meta.is_mean_reduction:
                    logged[key]["batches"] = result.cumulated_batch_size.detach().cpu()
        return {"metrics": metrics, "logged": logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict or {})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        metrics = self._pending.pop("metrics", None)
        if not metrics:
            return
        modules = dict(pl_module.named_modules())
        for name, saved in metrics.items():
            metric = modules.get(name)
            if metric is None:
                continue
            _set_metric_state(metric, saved["state"], int(saved["count"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        logged = self._pending.pop("logged", None)
        if not logged:
            return
        results = _epoch_results(trainer)
        for key, saved in logged.items():
            result = results.get(key)
            if result is None or not result.is_tensor:
                continue
            value = saved["value"].to(result.value.device, result.value.dtype)
            if result.meta.is_mean_reduction or result.meta.is_sum_reduction:
                result.value = result.value + value
                if "batches" in saved:
                    result.cumulated_batch_size = result.cumulated_batch_size + saved["batches"]
            elif result.meta.is_max_reduction or result.meta.is_min_reduction:
                result.value = result.meta.reduce_fx(result.value, value)


# --------------------------------------------------------------------------- resume


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():  # a distributed checkpoint: its shard files are rewritten in place, so
        shutil.rmtree(dst, ignore_errors=True)  # a link would change the old one too: copy
        shutil.copytree(src, dst)
        return
    with suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)  # checkpoints are replaced by rename, never rewritten: a link is safe
    except OSError:
        shutil.copy2(src, dst)


class CarryCheckpoints(L.Callback):
    """A job resumed from ``ckpt_path`` keeps what its checkpoint callbacks knew.

    Lightning drops a ModelCheckpoint's best score, top-k and last path when the checkpoint
    folder changed (a resumed job writes to a new output dir), so the resumed job's "best"
    restarts from scratch and the test uses a worse model. Before Lightning restores the
    callbacks, this copies (hard-links) the earlier best/top-k/last checkpoints into the new
    folder and rewrites the saved state to point there.

    Only a resumed *fit* carries. Lightning calls this hook again whenever it restores a
    checkpoint, and ``trainer.test(ckpt_path="best")`` restores a best checkpoint that was itself
    carried, so its saved state still names the first job's folder: carrying it again would
    replace (for a distributed checkpoint: delete and copy) the very file the other ranks are
    reading at that moment."""

    def __init__(self, ckpt_path: str | Path | None):
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        saved = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = saved.get(cb.state_key)
            if not isinstance(cb, ModelCheckpoint) or not state or not cb.dirpath:
                continue
            old_dir = state.get("dirpath")
            if old_dir and os.path.realpath(old_dir) == os.path.realpath(cb.dirpath):
                continue
            # every rank rewrites its state; rank 0 alone writes the files (shared folder)
            state.update(self._carried(state, Path(cb.dirpath), trainer.is_global_zero))
            state["dirpath"] = cb.dirpath

    def _find(self, path: str) -> Path | None:
        if not path:
            return None
        p = Path(path)
        if p.exists():  # a file, or a distributed checkpoint's folder
            return p
        if self.ckpt_path is not None:  # the folder moved: look beside the resumed checkpoint
            beside = self.ckpt_path.parent / p.name
            if beside.exists():
                return beside
        log.warning("checkpoint %s from before the resume is gone: not carried forward", path)
        return None

    def _carried(self, state: dict, new_dir: Path, write: bool) -> dict[str, Any]:
        moved: dict[str, str] = {}

        def carry(path: str) -> str:
            if path in moved:
                return moved[path]
            src = self._find(path)
            if src is None:
                moved[path] = ""
                return ""
            dst = new_dir / src.name
            if write:
                _link_or_copy(src, dst)
            moved[path] = str(dst)
            return str(dst)

        top_k = {carry(p): v for p, v in (state.get("best_k_models") or {}).items()}
        return {
            "best_k_models": {p: v for p, v in top_k.items() if p},
            "best_model_path": carry(state.get("best_model_path", "")),
            "kth_best_model_path": carry(state.get("kth_best_model_path", "")),
            "last_model_path": carry(state.get("last_model_path", "")),
        }


def read_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True: tensors and plain containers only).
    ``weights=False``: what a resuming job reads (step, the run id); a distributed checkpoint
    then reads its metadata only."""
    path = Path(path)
    if path.is_dir():  # a distributed checkpoint (trainer=model_parallel): gathered whole
        from zoo import parallel

        return parallel.load_distributed_checkpoint(path, weights=weights)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: checkpoint file not found")
    try:
        # mmap: reading the run id of a resumed checkpoint must not read all its tensors
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConfigError(
            f"ckpt_path={path}: not a loadable checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]})"
        ) from None


def _hpc_version(path: Path) -> int:
    match = re.search(r"hpc_ckpt_(\d+)\.ckpt$", path.name)
    return int(match.group(1)) if match else -1


def resume_checkpoint(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint a job resumes from: ``ckpt_path=`` when given. On SLURM (where the output
    dir is pinned by the job id, so a requeued job finds its own): the newest of Lightning's HPC
    checkpoint (saved on the requeue signal) and, once SLURM has restarted the job
    (``SLURM_RESTART_COUNT``), ``checkpoints/last.ckpt`` (saved on SIGTERM)."""
    if ckpt_path:
        return str(ckpt_path)
    if not SLURMEnvironment.detect():
        return None
    out = Path(output_dir)
    candidates = sorted(out.glob("hpc_ckpt_*.ckpt"), key=_hpc_version)[-1:]
    last = out / "checkpoints" / "last.ckpt"
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 and last.exists():  # file or folder
        candidates.append(last)
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    log.info("SLURM job %s: resuming from %s", os.environ.get("SLURM_JOB_ID"), newest)
    return str(newest)


# --------------------------------------------------------------------------- stopping safely


class StopSafely(L.Callback):
    """Stops a job so that nothing is lost.

    - SIGINT (Ctrl-C) and SIGTERM: the current batch finishes, ``last.ckpt`` is saved, the run
      ends KILLED and the process exits with 130 / 143. A second signal stops at once. Inside
      a trainer both go through Lightning's own graceful stop (its SIGTERM flag, checked at
      each batch boundary and broadcast to every DDP rank, so all ranks save the same step);
      outside one (between fit and test, while the model is logged) they stop the job at once.
    - A NaN or infinite loss: the job stops before anything else is saved (the last good
      checkpoint stays the last one), with a message naming the epoch and step.
    """

    def __init__(self) -> None:
        self.signal: int | None = None  # the signal that stopped the job
        self.failure: str | None = None  # why the job failed, for the run's zoo.failure tag
        self._trainer = None
        self._previous: dict[int, Any] = {}

    # ---------------------------------------------------------------- process signals
    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a job run by a threaded launcher)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM handled as above while the block runs; a job they stopped exits
        with 130 / 143 (the run is KILLED)."""
        self.install_signal_handlers()
        try:
            yield
        except BaseException:
            if self.exit_code is not None:
                raise SystemExit(self.exit_code) from None
            raise
        finally:
            self.restore_signal_handlers()

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous.items():
            with suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        first = self.signal is None
        if first:
            self.signal = signum
        connector = getattr(self._trainer, "_signal_connector", None)
        if first and connector is not None:
            connector.received_sigterm = True  # Lightning stops at the next batch boundary
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: stopping after this batch and saving last.ckpt (again: now)")
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SIGTERMException()

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._trainer = None

    # ---------------------------------------------------------------- batch checks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bad = _non_finite(outputs)
        if bad is None:
            return
        name, value = bad
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was saved yet"
        self.failure = (
            f"non-finite loss: {name} = {value} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step} (batch {batch_idx})"
        )
        raise NonFiniteLoss(
            f"training stopped: {name} became {value} at epoch {trainer.current_epoch}, "
            f"step {trainer.global_step} (batch {batch_idx} of the epoch); {kept}, and the "
            "run is marked FAILED (tag zoo.failure). Lower the learning rate, clip "
            "gradients (trainer.gradient_clip_val) or look for bad values in the data."
        )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLoss):
            return
        if self.signal is None:  # a signal that reached Lightning's handler only
            if isinstance(exception, SIGTERMException):
                self.signal = signal.SIGTERM
            elif isinstance(exception, KeyboardInterrupt):
                self.signal = signal.SIGINT
        if self.signal is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            save_last(trainer)

    @property
    def status(self) -> str:
        """The mlflow status of a job that ended with an exception."""
        return "KILLED" if self.signal is not None and self.failure is None else "FAILED"

    @property
    def exit_code(self) -> int | None:
        return None if self.signal is None else 128 + int(self.signal)


def save_last(trainer) -> str | None:
    """Save the trainer's current state as its checkpoint callback's ``last.ckpt``."""
    cb = trainer.checkpoint_callback
    if not isinstance(cb, ModelCheckpoint) or not cb.dirpath or not cb.save_last:
        return None
    path = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    trainer.save_checkpoint(path)
    cb.last_model_path = path
    log.warning("saved %s (epoch %d, step %d)", path, trainer.current_epoch, trainer.global_step)
    return path


def _non_finite(outputs) -> tuple[str, float] | None:
    """The first non-finite scalar loss in a training step's outputs (a tensor, or a dict of
    them: manual-optimisation modules return their losses by name)."""
    if isinstance(outputs, torch.Tensor):
        items = [("loss", outputs)]
    elif isinstance(outputs, dict):
        items = [(k, v) for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    else:
        return None
    for name, value in items:
        if value.numel() == 1 and not torch.isfinite(value.detach()).all():
            return name, float(value.detach())
    return None
