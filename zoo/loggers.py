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

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        params = params if isinstance(params, dict) else vars(params)
        log_params(self.experiment, self.run_id, flatten_params(params))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Lightning's finalize without its read of the run (which fails during an outage)."""
        if not self._initialized:
            return
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(
            status, status
        )
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        self.experiment.set_terminated(self.run_id, status)
