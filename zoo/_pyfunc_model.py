"""The code of every logged zoo model (mlflow "models from code"): see zoo.serving."""

from mlflow.models import set_model

from zoo.serving import ZooPyfuncModel

set_model(ZooPyfuncModel())
