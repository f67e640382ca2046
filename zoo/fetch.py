"""Files by URI: a local path, or an mlflow artifact URI (``runs:/<run id>/<path>``,
``models:/...``, ``mlflow-artifacts:/...``) downloaded from a tracking store. What a model
reads from an earlier run (e.g. SparseBERT's stage-1 mask) comes through here, so models never
talk to mlflow themselves."""

from __future__ import annotations

from pathlib import Path

from zoo.errors import ConfigError
from zoo.tracking.lookup import download
from zoo.tracking.store import resolve_tracking_uri

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


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
