"""zoo: a PyTorch model zoo with Hydra configs, Lightning training and mlflow tracking."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zoo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from zoo.errors import ConfigError, DataError, ZooError  # noqa: E402

__all__ = ["ConfigError", "DataError", "ZooError", "__version__"]
