"""Every zoo model as an mlflow Model (the ``python_function`` flavour).

The logged model holds the resolved training config and the weights (a state dict, loaded with
``weights_only=True``: no pickled module), and its code is
``zoo/tracking/pyfunc_model.py`` (mlflow's "models from code"): ``mlflow.pyfunc.load_model``
rebuilds the Lightning module from the config with Hydra, and ``predict`` answers
what a user holds (a DEAP trial, sentences, uint8 images) through the family's raw inputs
(``zoo.inference.respond``: the code ``predict.py`` runs), and the network's own tensor input
through ``serve`` (``zoo.outputs.Servable``). The input example is the raw form, and the
signature has no input schema, only the output's: the family's ``parse`` checks what comes in,
in every form a user holds (a model without recorded preprocessing: one real batch of the run's
data module, and the signature inferred from it).

Bad input (``zoo.errors.DataError``) is raised as an ``MlflowException`` with
INVALID_PARAMETER_VALUE, which ``mlflow models serve`` answers with HTTP 400 and the message.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import zoo
from zoo.outputs import Servable
from zoo.tracking.store import global_tracking_uri

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in the run
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")


class ZooPyfuncModel(mlflow.pyfunc.PythonModel):
    """The pyfunc ``python_model``: load_context rebuilds the module, predict serves it."""

    def load_context(self, context) -> None:
        self.module = load_module(
            OmegaConf.load(context.artifacts["config"]), context.artifacts["weights"]
        )

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        # np.ndarray is one of mlflow's hints that infer no schema: the signature comes from
        # the logged input example, and lists, dicts of arrays and DataFrames are accepted too
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from zoo.errors import ZooError, one_line
        from zoo.inference import respond

        try:
            return respond(self.module, model_input)
        except ZooError as exc:
            raise MlflowException(one_line(exc), error_code=INVALID_PARAMETER_VALUE) from None


def load_module(cfg: DictConfig, weights: str | Path) -> Any:
    """The Lightning module of a training config, with the weights of a state-dict file."""
    from hydra.utils import instantiate

    import zoo.config  # noqa: F401  (the resolvers the config may use)

    module = instantiate(cfg.model)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module.eval()


def example_batch(datamodule) -> Any:
    """One batch of the test split (or validation, or training) on CPU."""
    for stage, loader in (
        ("test", "test_dataloader"),
        ("validate", "val_dataloader"),
        ("fit", "train_dataloader"),
    ):
        try:
            datamodule.setup(stage)
            return next(iter(getattr(datamodule, loader)()))
        except (StopIteration, KeyError, NotImplementedError, AttributeError):
            continue
    raise ValueError(f"{type(datamodule).__name__} yields no batch to take an input example from")


def log_model(
    module: Any,
    cfg: DictConfig,
    datamodule,
    run_id: str,
    tracking_uri: str,
    registered_model_name: str | None = None,
    max_examples: int = 2,
):
    """Log ``module`` (its current weights) to ``run_id`` as an mlflow Model; returns mlflow's
    ModelInfo (``model_uri``, ``registered_model_version``)."""
    import mlflow
    from mlflow.models import Model

    if not isinstance(module, Servable):
        raise TypeError(f"{type(module).__name__} has no serving_input/serve: cannot be logged")
    module = module.cpu().eval()
    example, signature = _example_and_signature(module, datamodule, max_examples)
    with tempfile.TemporaryDirectory(prefix="zoo-model-") as tmp:
        config, weights = Path(tmp) / "config.yaml", Path(tmp) / "weights.pt"
        config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        torch.save(module.state_dict(), weights)
        with global_tracking_uri(tracking_uri):
            # created here, in the run's experiment: left to Model.log, a model logged without
            # an active fluent run lands in the Default experiment
            client = mlflow.MlflowClient(tracking_uri)
            logged = client.create_logged_model(
                experiment_id=client.get_run(run_id).info.experiment_id,
                name=MODEL_NAME,
                source_run_id=run_id,
                model_type=type(module).__name__,
            )
            return Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(CODE_FILE),
                artifacts={"config": str(config), "weights": str(weights)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=registered_model_name,
                await_registration_for=60 if registered_model_name else 0,
                flavor_name="python_model",
                model_id=logged.model_id,
            )


def _example_and_signature(module: Any, datamodule, max_examples: int):
    """The raw form when the model carries its preprocessing, else one batch's tensors."""
    from mlflow.models import infer_signature

    from zoo.inference import respond

    if getattr(module, "preprocessing", None):
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        raw = module.raw_inputs()
        example = raw.example(datamodule)
        spec = raw.output_spec()
        if spec:
            outputs = Schema([TensorSpec(np.dtype(spec[0]), spec[1])])
        else:
            outputs = infer_signature(None, respond(module, example)).outputs
        # no input schema: mlflow's check is stricter than the family's own ``parse`` (a float64
        # trial, one image without its batch axis, a dict of text columns, a list of pairs)
        return example, ModelSignature(inputs=None, outputs=outputs)
    example = _head(module.serving_input(example_batch(datamodule)), max_examples)
    return example, infer_signature(example, module.serve(example))


def _head(inputs: Any, n: int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def _requirements() -> list[str]:
    """What serving needs: this zoo and its torch (no inference by re-importing the model)."""
    import lightning
    import torchvision

    return [
        f"zoo=={zoo.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"lightning=={lightning.__version__}",
    ]
