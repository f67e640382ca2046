"""The command line as users run it: DDP, optuna sweeps (multirun and a real mlflow server:
tests/test_tracking_server.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli


def _runs(uri: str, experiment: str = "zoo"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.slow
def test_ddp_two_cpu_processes_log_one_run(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        "train.py",
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "debug=fast"],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(uri)
    assert len(runs) == 1
    (run,) = runs
    assert (
        run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    )
    assert run.info.status == "FINISHED" and {"val/loss", "test/acc"} <= set(run.data.metrics)
    assert "ddp" in (proc.stdout + proc.stderr).lower()  # really launched the distributed strategy


@pytest.mark.slow
def test_optuna_sweep(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        "train.py",
        [
            "hparams_search=eeg_optuna",
            "debug=fast",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
        ],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(uri)
    assert len(runs) == 2
    lrs = {r.data.params["model.optimizer.lr"] for r in runs}
    assert len(lrs) == 2 and all(lr != "0.001" for lr in lrs)  # sampled, not the default
    best = next(
        Path(tmp_path, "logs", "train", "optuna", "eeg").glob("optimization_results.yaml")
    ).read_text()
    assert "best_value" in best
