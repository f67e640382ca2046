"""End-to-end: debug runs of every experiment, mlflow contents, resume, train -> evaluate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import artifacts
from zoo import tracking
from zoo.pipeline import evaluate, train


def _runs(client: MlflowClient, experiment: str = "zoo"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_long_param_values_point_to_the_artifact():
    params = tracking.flatten_params({"a": {"b": "x" * 10_000, "c": [1, 2]}, "d": None})
    assert params["a.b"].startswith("<10000 characters") and "config/config.yaml" in params["a.b"]
    assert params["a.c"] == "[1, 2]" and params["d"] == "None"


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri("sqlite:///other.db") == "sqlite:///other.db"


def test_resume_continues_the_same_run(make_cfg, tracking_uri, tmp_path):
    name = "resume"
    first = make_cfg(["debug=fast", f"tracking.experiment_name={name}", "test=false"])
    train(first)
    client = MlflowClient(tracking_uri)
    (run,) = _runs(client, name)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    second = make_cfg(
        [
            "debug=fast",
            f"tracking.experiment_name={name}",
            f"ckpt_path={last}",
            "trainer.max_epochs=2",
            "paths.output_dir=" + str(tmp_path / "second"),
        ]
    )
    train(second)
    runs = _runs(client, name)
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # no second run
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(history) == 2  # epoch 0 from the first job, epoch 1 from the resumed one
    assert runs[0].info.status == "FINISHED" and "test/acc" in runs[0].data.metrics
    assert runs[0].data.tags["zoo.resumed_from"] == str(last)
    assert any(a.startswith("config/config-resume-") for a in artifacts(client, run.info.run_id))


def test_train_then_evaluate_round_trip(make_cfg, tracking_uri, tmp_path):
    name = "roundtrip"
    cfg = make_cfg(
        ["debug=fast", f"tracking.experiment_name={name}", "trainer.limit_test_batches=3"]
    )
    train(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = _runs(client, name)
    run_id = run.info.run_id
    out = tmp_path / "report"
    metrics = evaluate(make_cfg([f"run_id={run_id}", f"output_dir={out}"], config_name="evaluate"))
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-6), key
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(metrics["test/acc"])
    assert {"test/precision/HVHA", "test/recall/LVLA", "test/f1/HVLA"} <= set(saved)
    md = (out / "report.md").read_text()
    for text in (
        "Test metrics",
        "Per-class precision",
        "Confusion matrix",
        "Dataset",
        "Config digest",
        "HVHA",
    ):
        assert text in md, text
    assert (out / "images" / "confusion_matrix.png").stat().st_size > 1000
    # the header says how much of the test split was evaluated (3 batches of 64 windows), and
    # the per-class support adds up to exactly that
    total = int(re.search(r"test windows\W+(\d+) from", md).group(1))
    assert f"evaluated on | 192 of {total} test windows (limit_test_batches=3" in md, md[:800]
    support = re.search(r"macro average \|[^\n]*\| (\d+) \|", md)
    assert support and int(support.group(1)) == 192 < total
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    arts = artifacts(client, run_id)
    assert {"report/report.md", "report/report.html", "report/metrics.json"} <= arts

    # the same checkpoint, evaluated from the file (its config travels inside it)
    ckpt = client.download_artifacts(run_id, run.data.tags[tracking.TAG_BEST_CKPT], str(tmp_path))
    again = evaluate(
        make_cfg(
            [f"ckpt_path={ckpt}", "experiment=eeg_cnn_lstm", f"output_dir={tmp_path / 'r2'}"],
            config_name="evaluate",
        )
    )
    assert again["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_comparison_report(make_cfg, tracking_uri, tmp_path):
    name = "compare"
    for exp in ("eeg_cnn_lstm", "eeg_cnn_gru"):
        train(make_cfg([f"experiment={exp}", "debug=fast", f"tracking.experiment_name={name}"]))
    client = MlflowClient(tracking_uri)
    ids = [r.info.run_id for r in _runs(client, name)]
    out = tmp_path / "cmp"
    result = evaluate(
        make_cfg(
            [
                f"run_ids=[{ids[0]},{ids[1]}]",
                f"output_dir={out}",
                f"tracking.experiment_name={name}",
            ],
            config_name="evaluate",
        )
    )
    new = client.get_run(result["comparison_run_id"])
    assert new.data.tags["zoo.kind"] == "comparison" and new.data.tags[
        "zoo.compared_runs"
    ] == ",".join(ids)
    md = (out / "report.md").read_text()
    assert "Final metrics" in md and "Learning curves" in md and "model.net.rnn" in md
    assert ids[0][:8] in md and ids[1][:8] in md
    assert (out / "images" / "learning_curves.png").is_file()
    assert "report/report.html" in artifacts(client, new.info.run_id)


def test_evaluate_errors(make_cfg, tmp_path):
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="needs run_id"):
        evaluate(make_cfg([], config_name="evaluate"))
    with pytest.raises(ConfigError, match="run_id=deadbeef: no such mlflow run"):
        evaluate(make_cfg(["run_id=deadbeef"], config_name="evaluate"))
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        evaluate(make_cfg([f"ckpt_path={tmp_path / 'none.ckpt'}"], config_name="evaluate"))


def test_explicit_run_id_and_failed_job(make_cfg, tracking_uri, tmp_path):
    from zoo.errors import DataError

    name = "failing"
    cfg = make_cfg(
        [
            "debug=fast",
            f"tracking.experiment_name={name}",
            "data=deap",
            f"data.data_dir={tmp_path / 'nope'}",
        ]
    )
    with pytest.raises(DataError, match="nope: directory not found"):
        train(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = _runs(client, name)
    assert run.info.status == "FAILED"
    assert run.data.params["data.data_dir"] == str(tmp_path / "nope")  # what was logged stays
    assert "config/config.yaml" in artifacts(client, run.info.run_id)
    # re-run the job into the same run with run_id=
    train(
        make_cfg(
            [
                "debug=fast",
                f"tracking.experiment_name={name}",
                f"run_id={run.info.run_id}",
                "test=false",
            ]
        )
    )
    runs = _runs(client, name)
    assert [r.info.run_id for r in runs] == [run.info.run_id] and runs[0].info.status == "FINISHED"
    assert "val/loss" in runs[0].data.metrics


def test_registered_model_is_evaluated_from_the_registry(make_cfg, tracking_uri, tmp_path):
    name = "registry"
    cfg = make_cfg(
        [
            "debug=fast",
            f"tracking.experiment_name={name}",
            "registry.model_name=eeg-demo",
            "tracking.system_metrics=true",
            "tracking.system_metrics_interval=1",
        ]
    )
    train(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = _runs(client, name)
    (version,) = client.search_model_versions("name='eeg-demo'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert run.data.tags[tracking.TAG_REGISTERED] == "models:/eeg-demo/1"
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics

    out = tmp_path / "report"
    metrics = evaluate(
        make_cfg(["model_uri=models:/eeg-demo/1", f"output_dir={out}"], config_name="evaluate")
    )
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-5), key
    assert "mlflow model models:/eeg-demo/1" in (out / "report.md").read_text()
    assert "report/report.html" in artifacts(client, run.info.run_id)  # the model's run

    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="model_uri=models:/eeg-demo/7: no such model"):
        evaluate(make_cfg(["model_uri=models:/eeg-demo/7"], config_name="evaluate"))
    with pytest.raises(ConfigError, match="give one of run_id=, ckpt_path=, model_uri="):
        evaluate(
            make_cfg([f"run_id={run.info.run_id}", "model_uri=models:/eeg-demo/1"], "evaluate")
        )


def test_a_model_that_cannot_be_logged_keeps_the_run(make_cfg, tracking_uri, monkeypatch):
    import zoo.tracking.serving

    def broken(*args, **kwargs):
        raise RuntimeError("no space left on the artifact store")

    monkeypatch.setattr(zoo.tracking.serving, "log_model", broken)
    train(make_cfg(["debug=fast", "tracking.experiment_name=unloggable", "test=false"]))
    (run,) = _runs(MlflowClient(tracking_uri), "unloggable")
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
    assert "no space left" in run.data.tags["zoo.model_error"]
    assert tracking.TAG_MODEL_URI not in run.data.tags and run.data.tags[tracking.TAG_BEST_CKPT]
