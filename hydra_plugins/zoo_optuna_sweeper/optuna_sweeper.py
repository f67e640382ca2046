"""The plugin class Hydra discovers. Hydra imports every module of ``hydra_plugins`` at each
start, so this one stays light: Optuna is imported by ``_impl`` when a sweep starts."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Optuna's ask-and-tell loop over whichever Hydra launcher is configured (see
    conf/hydra/sweeper/optuna.yaml for the options)."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        worker_id: int | None = None,
        trial_tags: str | None = "tags",
        heartbeat_interval: int | None = 60,
        grace_period: int | None = None,
    ) -> None:
        from hydra_plugins.zoo_optuna_sweeper._impl import OptunaSweep

        self._sweep = OptunaSweep(
            sampler=sampler,
            direction=direction,
            storage=storage,
            study_name=study_name,
            n_trials=n_trials,
            n_jobs=n_jobs,
            max_failure_rate=max_failure_rate,
            params=params,
            worker_id=worker_id,
            trial_tags=trial_tags,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self._sweep.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self._sweep.sweep(arguments)
