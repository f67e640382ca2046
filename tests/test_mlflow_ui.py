"""What a user sees in the mlflow UI (a real ``mlflow server``, headless chromium): a run page
with the description, source and commit, datasets, metrics and params; a logged figure; and the
compare page of two runs."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import chromium
from zoo.pipeline import train


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


@pytest.mark.slow
def test_run_and_compare_pages_show_metrics_params_and_figures(make_cfg, mlflow_server, tmp_path):
    url, _ = mlflow_server
    for experiment in ("eeg_cnn_lstm", "eeg_cnn_gru"):
        cfg = make_cfg([f"experiment={experiment}", "debug=fast", "tracking.experiment_name=ui"])
        cfg.tracking.tracking_uri = url
        cfg.logger.mlflow.tracking_uri = url
        train(cfg)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("ui")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    run = runs[0]
    commit = run.data.tags["mlflow.source.git.commit"]

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
                commit[:7],  # source commit
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
