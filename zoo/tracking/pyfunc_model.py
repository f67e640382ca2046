"""The code of every logged zoo model (mlflow "models from code"): see zoo.tracking.serving."""

from mlflow.models import set_model

from zoo.tracking.serving import ZooPyfuncModel

set_model(ZooPyfuncModel())
