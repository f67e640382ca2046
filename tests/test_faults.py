"""Faults as real processes meet them: an unreachable tracking server, and many jobs starting at
once on one new sqlite store."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli, start_cli
from zoo import tracking
from zoo.errors import ConfigError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast_with_one_paragraph(tmp_path, data_dir):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    proc = run_cli("train.py", ["debug=fast"], tmp_path, {"MLFLOW_TRACKING_URI": uri}, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the mlflow tracking server {uri} is not reachable (connection refused" in proc.stderr
    # the check itself gives up within its budget; the process around it (imports: 10-25 s
    # here, more on a loaded machine) ends far below mlflow's own retries (259 s measured)
    checked = re.search(r"(\d+) attempts in (\d+) s", proc.stderr)
    assert checked and int(checked.group(2)) <= tracking.SERVER_CHECK_BUDGET_S + 2, proc.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s to give up on {uri}"
    assert "mlflow server --host 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # failed before any training


def test_sqlite_store_in_a_missing_folder_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=f"the folder {tmp_path / 'nope'} does not exist"):
        tracking.open_store(uri)


OPEN_AT_ONCE = """
import os, sys, time
from zoo import tracking
uri, go, name = sys.argv[1], sys.argv[2], sys.argv[3]
print("ready", flush=True)
while not os.path.exists(go):  # every process reaches the store at the same moment
    time.sleep(0.001)
print(tracking.create_run(uri, "zoo", name, {}))
"""


@pytest.mark.slow
def test_processes_opening_a_new_sqlite_store_at_the_same_moment(tmp_path):
    """mlflow's first use of a new sqlite store migrates its schema, which fails when processes
    race ("duplicate column name: step": 5 and 6 of 6 processes failed in two tries here
    without the lock). open_store creates it once, under a file lock; the experiment too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, uri, str(go), f"job{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for p in procs:  # all imported and waiting
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    exp = MlflowClient(uri).get_experiment_by_name("zoo")
    runs = MlflowClient(uri).search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]


@pytest.mark.slow
def test_four_training_jobs_start_at_once_on_a_new_store(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = []
    for i in range(4):
        out = tmp_path / f"job{i}"
        out.mkdir()
        procs.append(
            start_cli(
                "train.py",
                ["debug=fast", f"hydra.run.dir={out}"],
                out,
                {"MLFLOW_TRACKING_URI": uri},
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert len(runs) == 4
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in runs)
