"""Lightning loggers of the zoo."""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from zoo.tracking import flatten_params, log_params, open_store


class ZooMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, with hyper-parameters logged without silent truncation
    (Lightning cuts every value to 250 characters)."""

    def __init__(self, *args, tracking_uri: str | None = None, **kwargs):
        super().__init__(*args, tracking_uri=open_store(tracking_uri), **kwargs)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        params = params if isinstance(params, dict) else vars(params)
        log_params(self.experiment, self.run_id, flatten_params(params))
