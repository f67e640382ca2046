"""The mlflow side of one training job (``TrainingRun``). All writes go through MlflowClient
with an explicit run id (no global "active run"), so multirun jobs cannot leak into each other."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

import zoo
from zoo.errors import one_line
from zoo.tracking.params import (
    CONFIG_ARTIFACT,
    TAG_BEST_CKPT,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_REGISTERED,
    _hydra_choices,
    _hydra_overrides,
    count_parameters,
    flatten_params,
    git_commit,
    log_params,
    system_tags,
)

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)


class TrainingRun:
    """The mlflow side of one training job: tags, params, config and checkpoint artifacts, and
    the run's final status. A no-op without an mlflow logger and on non-zero ranks."""

    def __init__(self, logger: MLFlowLogger | None):
        from lightning.pytorch.utilities import rank_zero_only

        self.logger = logger if rank_zero_only.rank == 0 else None
        self._system_metrics = None

    @property
    def active(self) -> bool:
        return self.logger is not None

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger is not None else None

    @property
    def client(self):
        return self.logger.experiment if self.logger is not None else None

    def start(self, cfg: DictConfig, model, resumed: bool = False) -> None:
        if self.logger is None:
            return
        c, run_id = self.client, self.run_id
        if resumed:
            c.update_run(run_id, status="RUNNING")
        choices = _hydra_choices()
        commit = git_commit()
        tags = system_tags(cfg, commit)
        tags |= {
            "zoo.model": choices.get("model") or str(OmegaConf.select(cfg, "model._target_")),
            "zoo.data": choices.get("data") or str(OmegaConf.select(cfg, "data._target_")),
            "zoo.experiment": str(cfg.get("name") or choices.get("experiment")),
            "zoo.version": zoo.__version__,
            "zoo.command": " ".join(shlex.quote(a) for a in sys.argv),
            TAG_KIND: "train",
            "zoo.git_commit": commit,
        }
        tags.update({f"zoo.tag.{k}": str(v) for k, v in (cfg.get("tags") or {}).items()})
        parent = OmegaConf.select(cfg, "tracking.parent_run_id")
        if parent:  # a study's fold: the mlflow UI nests it under the study's run
            tags["mlflow.parentRunId"] = str(parent)
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        yaml_text = OmegaConf.to_yaml(cfg, resolve=True)
        if resumed:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            c.log_text(run_id, yaml_text, f"config/config-resume-{stamp}.yaml")
            if cfg.get("ckpt_path"):
                c.set_tag(run_id, "zoo.resumed_from", str(cfg.ckpt_path))
        else:
            c.log_text(run_id, yaml_text, CONFIG_ARTIFACT)
        overrides = _hydra_overrides()
        if overrides is not None:
            c.log_text(run_id, "\n".join(overrides) + "\n", "config/overrides.txt")
        changed = log_params(c, run_id, flatten_params(cfg))
        if changed:
            log.warning(
                "Resumed run %s: %d config value(s) changed since the first attempt (kept the "
                "original params; see config/config-resume-*.yaml): %s",
                run_id,
                len(changed),
                ", ".join(sorted(changed)),
            )
        counts = count_parameters(model)
        log_params(c, run_id, {k: str(v) for k, v in counts.items()})

    @contextmanager
    def system_metrics(self, cfg: DictConfig) -> Iterator[None]:
        """System metrics sampled while the block runs, when tracking.system_metrics is on
        (every tracking.system_metrics_interval seconds)."""
        if OmegaConf.select(cfg, "tracking.system_metrics"):
            interval = OmegaConf.select(cfg, "tracking.system_metrics_interval") or 10
            self.start_system_metrics(float(interval))
        try:
            yield
        finally:
            self.stop_system_metrics()

    def start_system_metrics(self, sampling_interval: float = 10.0) -> None:
        """mlflow's system metrics (CPU, memory, disk, network; GPU with pynvml) for this run."""
        if self.logger is None or self._system_metrics is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self.run_id, sampling_interval=sampling_interval, samples_before_logging=1
        )
        self._system_metrics.start()

    def stop_system_metrics(self) -> None:
        """Stop the monitor and log the samples it took since its last point.

        mlflow's monitor drops the samples of an unfinished interval when it stops, so a
        run shorter than one interval would get no system metrics at all.
        """
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is None:
            return
        monitor.finish()
        try:
            if any(getattr(m, "_metrics", None) for m in monitor.monitors):
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as e:  # the run's own results matter more than its last CPU sample
            log.warning("Could not log the last system metrics sample: %s", e)

    def log_output(self, item) -> None:
        """Log one record a model emitted (``zoo.outputs``: Figure, File, Tag, Count, Table)."""
        from zoo.outputs import Count, Figure, File, Table, Tag

        if self.logger is None:
            return
        c, run_id = self.client, self.run_id
        if isinstance(item, Figure):
            from zoo.plotting import close

            fig = item.build()
            try:
                c.log_figure(run_id, fig, item.path)
            finally:
                close(fig)
        elif isinstance(item, File):
            folder, name = os.path.split(item.path)
            with tempfile.TemporaryDirectory(prefix="zoo-file-") as tmp:
                local = Path(tmp) / name
                if item.write is not None:
                    item.write(local)
                else:
                    shutil.copyfile(item.source, local)
                c.log_artifact(run_id, str(local), folder or None)
        elif isinstance(item, Tag):
            c.set_tag(run_id, item.key, item.value)
        elif isinstance(item, Count):
            c.log_metric(run_id, item.key, float(item.value), step=0)
        elif isinstance(item, Table):
            c.log_table(run_id, data=item.build(), artifact_file=item.path)
        else:
            raise TypeError(f"cannot log {type(item).__name__} to mlflow")

    def log_datasets(self, infos) -> None:
        """The data module's splits as the run's inputs (the UI's "Datasets" column)."""
        if self.logger is None or not infos:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for info in infos:
            # what mlflow.data's local artifact source writes for a path
            dataset = Dataset(
                name=info.name,
                digest=info.digest,
                source_type="local",
                source=json.dumps({"uri": info.source}),
                profile=json.dumps({"num_samples": info.num_samples}),
            )
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", info.context)]))
        for attempt in range(5):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as exc:
                # jobs logging the same dataset at once race in mlflow's store ("UNIQUE
                # constraint failed: datasets..." / "duplicate key"): the loser finds it next time
                text = str(exc)
                if attempt == 4 or not ("UNIQUE constraint" in text or "duplicate key" in text):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_model(self, module, cfg: DictConfig, datamodule, registered_model_name=None):
        """The module as an mlflow Model of this run (``zoo.tracking.serving``); returns its
        ModelInfo."""
        if self.logger is None:
            return None
        from zoo.tracking.serving import log_model

        info = log_model(
            module, cfg, datamodule, self.run_id, self.client.tracking_uri, registered_model_name
        )
        self.client.set_tag(self.run_id, TAG_MODEL_URI, info.model_uri)
        if registered_model_name:
            self.client.set_tag(
                self.run_id,
                TAG_REGISTERED,
                f"models:/{registered_model_name}/{info.registered_model_version}",
            )
        return info

    def log_artifact(self, path: str | Path, artifact_dir: str) -> str | None:
        if self.logger is None or not path or not Path(path).is_file():
            return None
        self.client.log_artifact(self.run_id, str(path), artifact_dir)
        return f"{artifact_dir}/{Path(path).name}"

    def log_best_checkpoint(self, path: str | Path) -> str | None:
        artifact = self.log_artifact(path, "checkpoints")
        if artifact:
            self.client.set_tag(self.run_id, TAG_BEST_CKPT, artifact)
        return artifact

    def set_tag(self, key: str, value: str | None) -> None:
        if self.logger is not None and value is not None:
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        # a job that failed before its run was created leaves no empty run behind (another
        # MLFlowLogger than the zoo's cannot say: its run is created to be marked)
        if self.logger is not None and getattr(self.logger, "run_created", True):
            self.client.set_terminated(self.run_id, status)

    @contextmanager
    def guard(self, stopper=None) -> Iterator[None]:
        """Mark the run KILLED (a signal: ``stopper`` is the job's ``zoo.faults.StopSafely``)
        or FAILED, with the reason in tag ``zoo.failure``, if the job dies; what was logged
        stays."""
        try:
            yield
        except BaseException as exc:
            killed = isinstance(exc, KeyboardInterrupt) or (
                stopper is not None and stopper.status == "KILLED"
            )
            if not killed:
                reason = getattr(stopper, "failure", None) or (
                    f"{type(exc).__name__}: {one_line(str(exc))[:400]}"
                )
                self._safe(lambda: self.set_tag("zoo.failure", reason))
            self._safe(lambda: self.finish("KILLED" if killed else "FAILED"))
            raise

    # ---------------------------------------------------------------- outages
    @property
    def _queueing(self):
        """The logger's client when it queues writes through outages (``zoo.tracking.queue``)."""
        from zoo.tracking.queue import QueueingClient

        c = self.client
        return c if isinstance(c, QueueingClient) else None

    @property
    def pending(self) -> int:
        """Writes queued while the tracking server does not answer."""
        c = self._queueing
        return c.pending if c is not None else 0

    def flush(self, wait_s: float = 0.0) -> bool:
        """Deliver queued writes, retrying for up to ``wait_s``; True when none are left."""
        c = self._queueing
        return c.flush(wait_s) if c is not None else True

    def defer_model(self, checkpoint: str, registered_model_name: str | None) -> None:
        """Queue the logging of the mlflow Model (the server is down at the end of the job)."""
        self.client.defer_model(self.run_id, checkpoint, registered_model_name)

    @property
    def queue_dir(self):
        c = self._queueing
        return c.queue.folder if c is not None and c.queue is not None else None

    def _safe(self, write) -> None:
        try:
            write()
        except Exception as exc:  # never hide the original error
            log.warning("could not update mlflow run %s: %s", self.run_id, exc)
