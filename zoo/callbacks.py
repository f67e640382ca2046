"""The Lightning callbacks that connect a training job to its mlflow run: what models emit
(``zoo.outputs``) is logged here, on rank 0, once; checkpoints carry the run id and config."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig, OmegaConf

import zoo
from zoo.outputs import DescribesDatasets, EmitsOutputs, Section
from zoo.tracking import TrainingRun


class RunInfo(L.Callback):
    """Stores the mlflow run id and the resolved config in every checkpoint, so a resumed job
    continues the same run and a bare checkpoint can be evaluated without its config."""

    def __init__(self, cfg: DictConfig, run: TrainingRun):
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.run = run

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["zoo"] = {
            "mlflow_run_id": self.run.run_id,
            "config": self.config_yaml,
            "version": zoo.__version__,
        }


class TrackOutputs(L.Callback):
    """Drains the model's outbox after each stage's hooks: figures, files, tags and counts go
    to the run (rank 0, when there is one); report sections of the last test are kept in
    ``sections`` for evaluate.py. Also logs the data module's splits as the run's datasets."""

    def __init__(self, run: TrainingRun | None = None):
        self.run = run
        self.sections: list[Section] = []

    def _logging(self, trainer) -> bool:
        return self.run is not None and self.run.active and trainer.is_global_zero

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if self._logging(trainer) and isinstance(dm, DescribesDatasets):
            self.run.log_datasets(dm.dataset_inputs())

    def drain(self, trainer, pl_module) -> None:
        if not isinstance(pl_module, EmitsOutputs):
            return
        for item in pl_module.outbox.drain():
            if isinstance(item, Section):
                self.sections.append(item)
            elif self._logging(trainer):
                self.run.log_output(item)

    def on_train_start(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)
        self.sections = []

    def on_test_end(self, trainer, pl_module) -> None:
        self.drain(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.drain(trainer, pl_module)  # what on_fit_end emitted (module hooks run last)
