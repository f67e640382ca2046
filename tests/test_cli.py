"""The command line as users run it: DDP (Optuna sweeps, launchers, multi-node:
tests/test_scaleout.py; multirun into a real mlflow server: tests/test_tracking_server.py)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli


def _runs(uri: str, experiment: str = "zoo"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.multiprocess
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


@pytest.mark.e2e
def test_a_job_prints_each_log_message_once_without_advertisements(tmp_path, data_dir):
    """Lightning's own stderr handler does not double the lines Hydra's handler prints, and
    known noise (advertisements, third-party deprecations, mlflow's progress bars) is gone;
    the messages still reach the job's log file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("train.py", ["debug=fast"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in (
        "litlogger",  # Lightning's advertisement
        "Skipping setting a default `ModelSummary`",
        "Add type hints to the `predict` method",  # mlflow, about our pyfunc model
        "Downloading artifacts",  # mlflow's progress bars while the model is logged
        "is deprecated",  # third-party deprecation notices
        "Traceback",
    ):
        assert noise not in text, noise
    messages = [
        line.split("] - ", 1)[1] if "] - " in line else line.removeprefix("INFO: ")
        for line in text.splitlines()
        if line.startswith(("INFO: ", "[20"))
    ]
    assert "Seed set to 42" in messages
    repeated = {m for m in messages if messages.count(m) > 1}
    assert not repeated, repeated
    (log_file,) = (tmp_path / "logs" / "train" / "runs").glob("*/train.log")
    assert "GPU available" in log_file.read_text()
