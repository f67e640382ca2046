"""A real ``mlflow server``, as a team uses it: a multirun of two experiments trains into it
(one run per job, artifacts uploaded), ``evaluate.py`` reports on a run through it, and the
mlflow UI in headless chromium shows the run page (description, source commit, datasets,
metrics, params), a logged figure and the compare page of the two runs."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import chromium, run_cli


def _wait_for_text(driver, texts: list[str], timeout: float = 60.0) -> str:
    """The page's text once every one of ``texts`` shows (the UI renders asynchronously)."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    pytest.fail(f"the mlflow UI never showed {missing}; it showed:\n{body[:3000]}")


@pytest.mark.services
def test_multirun_into_a_server_then_evaluate_and_browse(tmp_path, data_dir, mlflow_server):
    url, artifact_root = mlflow_server
    work = tmp_path / "work"
    work.mkdir()
    env = {"MLFLOW_TRACKING_URI": url}
    proc = run_cli(
        "train.py",
        [
            "-m",
            "experiment=eeg_cnn_lstm,eeg_cnn_gru",
            "debug=fast",
            "tracking.experiment_name=team",
        ],
        work,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (work / "mlflow.db").exists()  # nothing went to the local default store
    assert "zoo run summary" in proc.stdout and url in proc.stdout
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("team")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.tags["zoo.experiment"] for r in runs] == ["eeg_cnn_lstm", "eeg_cnn_gru"]
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in runs)
    assert list(artifact_root.rglob("config.yaml")), "artifacts were not uploaded to the server"

    run = runs[0]
    out = tmp_path / "report"
    proc = run_cli("evaluate.py", [f"run_id={run.info.run_id}", f"output_dir={out}"], work, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout and (out / "report.html").is_file()
    assert any(a.path == "report" for a in client.list_artifacts(run.info.run_id))
    commit = run.data.tags["mlflow.source.git.commit"]
    assert run.data.tags["mlflow.source.name"].endswith("train.py")

    with chromium(tmp_path / "profile", window="1600,1200") as driver:
        driver.get(f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}")
        _wait_for_text(
            driver,
            [
                run.data.tags["mlflow.note.content"],  # the experiment's description
                "test/f1_macro",  # metrics
                "val/loss",
                "model.net.rnn",  # params
                "deap_demo-train",  # datasets
                "train.py",  # source
                commit[:7],  # and its commit
            ],
        )

        figure = "figures/test/confusion_matrix.png"
        driver.get(
            f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/{figure}"
        )
        deadline, shown = time.monotonic() + 60, []
        while time.monotonic() < deadline and not shown:
            shown = driver.execute_script(
                "return Array.from(document.images)"
                ".filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 300)"
                ".map(i => [i.naturalWidth, i.naturalHeight])"
            )
            time.sleep(0.5)
        assert shown, "the confusion-matrix figure was not displayed"

        ids = json.dumps([r.info.run_id for r in runs])
        driver.get(f"{url}/#/compare-runs?runs={ids}&experiments={json.dumps([exp.experiment_id])}")
        body = _wait_for_text(
            driver,
            [
                "Comparing 2 Runs",
                runs[0].info.run_name,
                runs[1].info.run_name,
                "model.net.rnn",
                "test/acc",
            ],
        )
        assert "lstm" in body and "gru" in body  # the param that differs, side by side
