"""Looking runs and models up (what evaluate.py and studies read), and files by URI."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from zoo.errors import ConfigError, one_line
from zoo.tracking.params import CONFIG_ARTIFACT
from zoo.tracking.store import client, global_tracking_uri, open_store, resolve_tracking_uri


def _scratch() -> str:
    """A fresh folder for one download, removed when the process exits: evaluate.py and
    predict.py download a whole logged model (100+ MB) per call, which must not pile up in
    /tmp."""
    folder = tempfile.mkdtemp(prefix="zoo-fetch-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def download(artifact_uri: str, tracking_uri: str, failure: str, dst: str | None = None) -> Path:
    """mlflow's download of ``artifact_uri``; a failure raises ConfigError("<failure> (why)").
    mlflow resolves a ``models:/<model id>`` URI through its global tracking URI whatever
    ``tracking_uri`` says, so that is set to ``tracking_uri`` for the call (in-process callers,
    e.g. tests, may have pointed it at another store)."""
    import mlflow.artifacts

    try:
        with global_tracking_uri(tracking_uri):
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri,
                    dst_path=dst or _scratch(),
                    tracking_uri=tracking_uri,
                )
            )
    except Exception as exc:
        raise ConfigError(f"{failure} ({type(exc).__name__}: {one_line(str(exc))[:300]})") from None


def get_run(run_id: str, uri: str | None = None):
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        return c, c.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(
            f"run_id={run_id}: no such mlflow run in tracking store {resolve_tracking_uri(uri)} "
            f"({str(exc).splitlines()[0]})"
        ) from None


def download_artifact(
    run_id: str, artifact_path: str, uri: str | None = None, dst: str | None = None
) -> Path:
    return download(
        f"runs:/{run_id}/{artifact_path}",
        resolve_tracking_uri(uri),
        f"run {run_id}: could not download artifact '{artifact_path}'",
        dst,
    )


def load_run_config(run_id: str, uri: str | None = None) -> DictConfig:
    """The resolved config a training run logged (config/config.yaml)."""
    path = download_artifact(run_id, CONFIG_ARTIFACT, uri)
    return OmegaConf.load(path)


@dataclass
class LocalModel:
    """A zoo model downloaded from mlflow: its artifacts (name -> local file) and source run."""

    path: Path
    artifacts: dict[str, Path]
    run_id: str | None


def download_model(model_uri: str, uri: str | None = None) -> LocalModel:
    """Download a logged or registered zoo model (``models:/<name>/<version>``,
    ``runs:/<run id>/model``, ``models:/<model id>``) and find its config and weights."""
    from mlflow.models import Model

    tracking_uri = open_store(uri)
    failure = f"model_uri={model_uri}: no such model in tracking store {tracking_uri}"
    local = download(model_uri, tracking_uri, failure)
    try:
        meta = Model.load(str(local))
    except Exception as exc:
        raise ConfigError(f"{failure} ({type(exc).__name__}: {one_line(str(exc))[:300]})") from None
    flavor = meta.flavors.get("python_function", {})
    artifacts = {
        name: local / spec["path"] for name, spec in (flavor.get("artifacts") or {}).items()
    }
    if not {"config", "weights"} <= set(artifacts):
        raise ConfigError(
            f"model_uri={model_uri}: not a zoo model (its python_function flavour has no config "
            "and weights artifacts)"
        )
    return LocalModel(local, artifacts, meta.run_id)
