"""Lightning's side of tracking: the mlflow logger (untruncated params, writes that survive an
outage) and the callbacks that connect a job to its run (what models emit, ``zoo.outputs``, is
logged here, on rank 0, once; checkpoints carry the run id and config)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import zoo
from zoo.outputs import DescribesDatasets, EmitsOutputs, File, Section
from zoo.tracking.params import flatten_params, log_params
from zoo.tracking.queue import QueueingClient, is_outage
from zoo.tracking.run import TrainingRun
from zoo.tracking.store import open_store


class ZooMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, with

    - hyper-parameters logged without silent truncation (Lightning cuts every value to 250
      characters);
    - writes that survive a tracking-server outage: with ``queue_dir`` (the job's output dir
      by default, see conf/logger/mlflow.yaml) they are queued on disk while the server does
      not answer and delivered when it does (``zoo.tracking.queue``).
    """

    def __init__(self, *args, tracking_uri: str | None = None, queue_dir: str | None = None, **kw):
        uri = open_store(tracking_uri)
        super().__init__(*args, tracking_uri=uri, **kw)
        # the seam: MLFlowLogger keeps its client in _mlflow_client and offers no way to pass
        # one in; ours queues writes through outages (a subclass of MlflowClient)
        self._mlflow_client = QueueingClient(uri, queue_dir=queue_dir)
        self._resumed_at: int | None = None
        self._logged_after: set[tuple[str, int]] | None = None

    @property
    def run_created(self) -> bool:
        """Whether the mlflow run exists yet: MLFlowLogger creates it on the first use of
        ``experiment`` and keeps that in ``_initialized``, with no public accessor (the seam)."""
        return self._initialized

    def resume_after(self, step: int) -> None:
        """This job resumes its run from a checkpoint logged up to step ``step`` (Lightning's
        logging step, ``zoo.pipeline.logged_step``): the batches from there on are trained
        again, and the points a killed job logged for them before dying (its last epoch's
        metrics may reach mlflow before its checkpoint is written; a step's own metrics are
        logged at the step count before it) are kept once, not logged twice."""
        self._resumed_at, self._logged_after = int(step), None

    def _points_after(self, step: int) -> set[tuple[str, int]]:
        c = self.experiment
        try:
            keys = list(c.get_run(self.run_id).data.metrics)
            return {
                (key, m.step)
                for key in keys
                for m in c.get_metric_history(self.run_id, key)
                if m.step >= step
            }
        except Exception as exc:  # server down: nothing known to skip
            if not is_outage(exc):
                raise
            return set()

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if self._resumed_at is not None and step is not None and step >= self._resumed_at:
            if self._logged_after is None:
                self._logged_after = self._points_after(self._resumed_at)
            metrics = {k: v for k, v in metrics.items() if (k, step) not in self._logged_after}
            if not metrics:
                return
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        params = params if isinstance(params, dict) else vars(params)
        log_params(self.experiment, self.run_id, flatten_params(params))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Logs configured checkpoints but leaves the run's status to the job
        (``zoo.tracking.TrainingRun.finish`` / ``guard``). Lightning calls this at the end of
        fit (before the test), on an exception, and from its SLURM requeue signal handler,
        where FINISHED is wrong (the job goes on, and is requeued) and a write can interrupt
        another write of the same process (sqlite: "database is locked")."""
        # MLFlowLogger.finalize without its status update: its own checkpoint scan, unchanged
        if self._initialized and self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)


class RunInfo(L.Callback):
    """Stores the mlflow run id and the resolved config in every checkpoint, so a resumed job
    continues the same run and a bare checkpoint can be evaluated without its config."""

    def __init__(self, cfg: DictConfig, run: TrainingRun):
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.run = run

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["zoo"] = {
            "mlflow_run_id": self.run.run_id,
            "config": self.config_yaml,
            "version": zoo.__version__,
        }


class TrackOutputs(L.Callback):
    """Drains the model's outbox after each stage's hooks: figures, files, tags and counts go
    to the run (rank 0, when there is one); report sections of the last test are kept in
    ``sections`` for evaluate.py. Also logs the data module's splits as the run's datasets."""

    def __init__(self, run: TrainingRun | None = None):
        self.run = run
        self.sections: list[Section] = []
        self.test_files: list[File] = []  # what the last test emitted (evaluate.py keeps them)

    def _logging(self, trainer) -> bool:
        return self.run is not None and self.run.active and trainer.is_global_zero

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if self._logging(trainer) and isinstance(dm, DescribesDatasets):
            self.run.log_datasets(dm.dataset_inputs())

    def drain(self, trainer, pl_module) -> None:
        if not isinstance(pl_module, EmitsOutputs):
            return
        for item in pl_module.outbox.drain():
            if isinstance(item, Section):
                self.sections.append(item)
                continue
            if isinstance(item, File) and trainer.testing:
                self.test_files.append(item)
            if self._logging(trainer):
                self.run.log_output(item)

    def on_train_start(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)
        self.sections, self.test_files = [], []

    def on_test_end(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.drain(trainer, pl_module)  # what on_fit_end emitted (module hooks run last)
