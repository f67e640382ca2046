"""Files by URI: a local path, or an mlflow artifact URI (``runs:/<run id>/<path>``,
``models:/...``, ``mlflow-artifacts:/...``) downloaded from a tracking store. What a model
reads from an earlier run (e.g. SparseBERT's stage-1 mask) comes through here, so models never
talk to mlflow themselves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from zoo.errors import ConfigError, one_line

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # mlflow's own default store


def fetch(uri: str | Path, key: str, tracking_uri: str | None = None) -> Path:
    """The local path of ``uri`` (downloaded if it is an mlflow artifact URI); ``key`` names
    the config key in errors."""
    text = str(uri)
    if not text.startswith(MLFLOW_SCHEMES):
        path = Path(text.removeprefix("file://"))
        if not path.is_file():
            raise ConfigError(f"{key}={text}: file not found")
        return path
    import mlflow.artifacts

    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=text,
                dst_path=tempfile.mkdtemp(prefix="zoo-fetch-"),
                tracking_uri=store,
            )
        )
    except Exception as exc:
        raise ConfigError(
            f"{key}={text}: could not download it from tracking store {store} "
            f"({type(exc).__name__}: {one_line(str(exc))[:300]})"
        ) from None
