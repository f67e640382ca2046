"""Lightning loggers of the zoo."""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from zoo.queueing import QueueingClient
from zoo.tracking import flatten_params, log_params, open_store


class ZooMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, with

    - hyper-parameters logged without silent truncation (Lightning cuts every value to 250
      characters);
    - writes that survive a tracking-server outage: with ``queue_dir`` (the job's output dir
      by default, see conf/logger/mlflow.yaml) they are queued on disk while the server does
      not answer and delivered when it does (``zoo.queueing``).
    """

    def __init__(self, *args, tracking_uri: str | None = None, queue_dir: str | None = None, **kw):
        uri = open_store(tracking_uri)
        super().__init__(*args, tracking_uri=uri, **kw)
        self._mlflow_client = QueueingClient(uri, queue_dir=queue_dir)
        self._resumed_at: int | None = None
        self._logged_after: set[tuple[str, int]] | None = None

    def resume_after(self, step: int) -> None:
        """This job resumes its run from a checkpoint of global step ``step``: the steps after
        it are trained again, and the points a killed job logged for them before dying (its
        last epoch's metrics may reach mlflow before its checkpoint is written) are kept once,
        not logged twice."""
        self._resumed_at, self._logged_after = int(step), None

    def _points_after(self, step: int) -> set[tuple[str, int]]:
        from zoo.queueing import is_outage

        c = self.experiment
        try:
            keys = list(c.get_run(self.run_id).data.metrics)
            return {
                (key, m.step)
                for key in keys
                for m in c.get_metric_history(self.run_id, key)
                if m.step > step
            }
        except Exception as exc:  # server down: nothing known to skip
            if not is_outage(exc):
                raise
            return set()

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if self._resumed_at is not None and step is not None and step > self._resumed_at:
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
        if self._initialized and self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
