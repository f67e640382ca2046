"""The command line as users run it: DDP (Optuna sweeps, launchers, multi-node:
tests/test_scaleout.py; multirun into a real mlflow server: tests/test_tracking_server.py)."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli


def _runs(uri: str, experiment: str = "zoo"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.multiprocess
def test_ddp_two_cpu_processes_log_one_run(sqlite_uri, tmp_path, data_dir):
    uri = sqlite_uri
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
    known noise (advertisements, third-party hints and deprecations, mlflow's progress bars and
    INFO lines, a FLOPs column of zeros) is gone; the metric names in the progress bar are
    whole; the messages still reach the job's log file. The default trainer settings (only
    less data and one epoch), on a new store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["data.subset=1", "trainer.max_epochs=1", "data.num_workers=0"]
    proc = run_cli("train.py", args, tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in (
        "litlogger",  # Lightning's advertisement
        "Skipping setting a default `ModelSummary`",
        "was configured so 100% of the batches",  # Lightning, about limit_*_batches=1.0
        "FLOPs",  # Lightning's summary counts none without an example input: a column of 0
        "Add type hints to the `predict` method",  # mlflow, about our pyfunc model
        "Inferred schema contains integer column",  # mlflow's hint, about missing values
        "Creating initial MLflow database tables",  # mlflow's INFO lines
        "Validating input example against model signature",
        "Downloading artifacts",  # mlflow's progress bars while the model is logged
        "is deprecated",  # third-party deprecation notices
        "v_num",
        "Traceback",
    ):
        assert noise not in text, noise
    for name in ("train/loss", "val/loss", "val/acc", "val/f1_macro"):  # not wrapped mid-name
        assert re.search(rf"{re.escape(name)}: \d", text), name
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
