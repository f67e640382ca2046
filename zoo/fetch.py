"""Files by URI: a local path, or an mlflow artifact URI (``runs:/<run id>/<path>``,
``models:/...``, ``mlflow-artifacts:/...``) downloaded from a tracking store. What a model
reads from an earlier run (e.g. SparseBERT's stage-1 mask) comes through here, so models never
talk to mlflow themselves."""

from __future__ import annotations

import tempfile
from pathlib import Path

from zoo.errors import ConfigError, one_line
from zoo.tracking.store import resolve_tracking_uri

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def download(artifact_uri: str, tracking_uri: str, failure: str, dst: str | None = None) -> Path:
    """mlflow's download of ``artifact_uri``; a failure raises ConfigError("<failure> (why)")."""
    import mlflow.artifacts

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri,
                dst_path=dst or tempfile.mkdtemp(prefix="zoo-fetch-"),
                tracking_uri=tracking_uri,
            )
        )
    except Exception as exc:
        raise ConfigError(f"{failure} ({type(exc).__name__}: {one_line(str(exc))[:300]})") from None


def fetch(uri: str | Path, key: str, tracking_uri: str | None = None) -> Path:
    """The local path of ``uri`` (downloaded if it is an mlflow artifact URI); ``key`` names
    the config key in errors."""
    text = str(uri)
    if not text.startswith(MLFLOW_SCHEMES):
        path = Path(text.removeprefix("file://"))
        if not path.is_file():
            raise ConfigError(f"{key}={text}: file not found")
        return path
    store = resolve_tracking_uri(tracking_uri)
    return download(text, store, f"{key}={text}: could not download it from tracking store {store}")
