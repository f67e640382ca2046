"""Tracking: everything between a job and its mlflow store.

- ``store``: the tracking URI, the store's start-up checks (sqlite created under a lock, a
  server's health and login), new runs and experiments;
- ``params``: the config as params (never truncated), mlflow's system tags, the git commit,
  the zoo's tag names;
- ``run``: ``TrainingRun``, the mlflow side of one training job;
- ``queue`` and ``delivery``: writes queued on disk while a server is down, delivered later;
- ``lightning``: the Lightning logger and the callbacks that connect a job to its run;
- ``serving``: every zoo model as an mlflow pyfunc Model (``pyfunc_model`` is its code);
- ``lookup``: runs, artifacts and models looked up for evaluate.py and studies.

The names below are the package's API; Lightning is imported only by ``lightning``.
"""

from zoo.tracking.lookup import (
    LocalModel,
    download_artifact,
    download_model,
    get_run,
    load_run_config,
)
from zoo.tracking.params import (
    CONFIG_ARTIFACT,
    TAG_BEST_CKPT,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_REGISTERED,
    flatten_params,
    log_params,
)
from zoo.tracking.run import TrainingRun
from zoo.tracking.store import (
    SERVER_CHECK_BUDGET_S,
    client,
    create_run,
    ensure_experiment,
    global_tracking_uri,
    open_store,
    resolve_tracking_uri,
)

__all__ = [
    "CONFIG_ARTIFACT",
    "SERVER_CHECK_BUDGET_S",
    "TAG_BEST_CKPT",
    "TAG_KIND",
    "TAG_MODEL_URI",
    "TAG_REGISTERED",
    "LocalModel",
    "TrainingRun",
    "client",
    "create_run",
    "download_artifact",
    "download_model",
    "ensure_experiment",
    "flatten_params",
    "get_run",
    "global_tracking_uri",
    "load_run_config",
    "log_params",
    "open_store",
    "resolve_tracking_uri",
]
