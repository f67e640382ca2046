"""Every experiment with an offline demo, end to end: compose, instantiate, a ``debug=fast``
train into mlflow, ``evaluate.py run_id=``, and the logged mlflow Model loaded with
``mlflow.pyfunc`` predicting on its (raw) input example exactly as the Lightning module does.

New experiments join automatically (any ``conf/experiment/*.yaml`` whose data config has a
``demo``); what only one family logs is checked by ``check_experiment_run`` in the family's own
``tests/test_<family>.py`` (the family is the experiment's ``tags.family``).
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, artifacts, compose_cfg
from zoo import tracking
from zoo.inference import respond
from zoo.pipeline import build, evaluate, read_checkpoint, train


def _family_and_demo(experiment: str) -> tuple[str, bool]:
    """The experiment's ``tags.family``, and whether its data has an offline demo."""
    tmp = Path(tempfile.mkdtemp(prefix="zoo-compose-"))
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp, tmp, f"sqlite:///{tmp}/m.db")
    return str(cfg.tags.family), bool(cfg.data.get("demo"))


COMPOSED = {e: _family_and_demo(e) for e in EXPERIMENTS}
FAMILY_OF = {e: family for e, (family, demo) in COMPOSED.items() if demo}
DEMO_EXPERIMENTS = sorted(FAMILY_OF)


def family_tests(family: str):
    """A family's own test module, ``tests/test_<family>.py``: its ``check_experiment_run``
    checks what only that family logs, and its ``UPSTREAM`` names stage-2 experiments (the
    stage-1 experiment and the key that takes its run id), its ``E2E_ONLY`` the experiments
    too slow for the fast tier (they run with ``--full``)."""
    return importlib.import_module(f"tests.test_{family}")


UPSTREAM = {
    e: up
    for f in set(FAMILY_OF.values())
    for e, up in getattr(family_tests(f), "UPSTREAM", {}).items()
}


# experiments a family runs only in the e2e tier (its ``E2E_ONLY``): too slow for the fast one
E2E_ONLY = {e for f in set(FAMILY_OF.values()) for e in getattr(family_tests(f), "E2E_ONLY", ())}
CASES = [pytest.param(e, marks=pytest.mark.e2e) if e in E2E_ONLY else e for e in DEMO_EXPERIMENTS]


def upstream_run(make_cfg, tracking_uri: str, experiment: str) -> str:
    """The run of ``experiment`` from this session's store (trained here if this test runs
    alone)."""
    client = MlflowClient(tracking_uri)
    # its own test's run, or one trained here (in another experiment: that test counts its runs)
    names = (f"e2e-{experiment}", f"e2e-upstream-{experiment}")
    ids = [e.experiment_id for n in names if (e := client.get_experiment_by_name(n))]
    runs = client.search_runs(ids, "attributes.status = 'FINISHED'") if ids else []
    if not runs:
        train(
            make_cfg(
                [
                    f"experiment={experiment}",
                    "debug=fast",
                    f"tracking.experiment_name=e2e-upstream-{experiment}",
                ]
            )
        )
        return upstream_run(make_cfg, tracking_uri, experiment)
    return runs[0].info.run_id


def test_every_family_has_a_demo_experiment_and_its_own_checks():
    """Each family (an experiment's ``tags.family``) trains offline on a demo and has a test
    module with its own end-to-end checks."""
    families = set(FAMILY_OF.values())
    everyone = {family for family, _ in COMPOSED.values()}
    assert families == everyone, f"families without a demo experiment: {everyone - families}"
    for family in families:
        assert callable(getattr(family_tests(family), "check_experiment_run", None)), family


@pytest.mark.parametrize("experiment", CASES)
def test_experiment_end_to_end(make_cfg, tracking_uri, tmp_path, monkeypatch, experiment):
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", tracking_uri
    )  # pyfunc.load_model resolves models:/ there
    name = f"e2e-{experiment}"
    overrides = [f"experiment={experiment}", "debug=fast", f"tracking.experiment_name={name}"]
    if experiment in UPSTREAM:
        upstream, key = UPSTREAM[experiment]
        overrides.append(f"{key}={upstream_run(make_cfg, tracking_uri, upstream)}")
    cfg = make_cfg(overrides)
    # instantiate: the model and data module build from the composed config alone
    assert build(cfg.model, "model") is not None and build(cfg.data, "data") is not None

    best = train(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    run_id, tags, metrics = run.info.run_id, run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert cfg.monitor.metric in metrics and best is not None and np.isfinite(best)

    # mlflow's own conventions: system tags, description, datasets
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.name"] and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlflow.note.content"] == cfg.description and cfg.description
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs if d.tags}
    assert {"train", "val", "test"} <= set(inputs), inputs
    assert all(
        len(d.digest) == 12 and Path(json.loads(d.source)["uri"]).exists() for d in inputs.values()
    )

    arts = artifacts(client, run_id)
    assert "config/config.yaml" in arts and tags[tracking.TAG_BEST_CKPT] in arts

    # the logged mlflow Model: loads with pyfunc and predicts what the module predicts
    model_uri = tags[tracking.TAG_MODEL_URI]
    logged = client.get_logged_model(model_uri.rsplit("/", 1)[-1])
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run_id
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    assert pyfunc.metadata.signature is not None
    example = pyfunc.metadata.load_input_example(
        mlflow.artifacts.download_artifacts(model_uri, tracking_uri=tracking_uri)
    )
    served = pyfunc.predict(example)
    module = build(cfg.model, "model")
    ckpt = read_checkpoint(
        client.download_artifacts(run_id, tags[tracking.TAG_BEST_CKPT], str(tmp_path))
    )
    module.load_state_dict(ckpt["state_dict"])
    expected = respond(module.eval(), example)  # raw example: the family's raw inputs
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(served.reset_index(drop=True), expected, atol=1e-4)
    else:
        assert served.shape == expected.shape and np.allclose(served, expected, atol=1e-4)

    # evaluate.py run_id=: the same test metrics, a report logged back to the run
    out = tmp_path / "report"
    evaluated = evaluate(
        make_cfg([f"run_id={run_id}", f"output_dir={out}"], config_name="evaluate")
    )
    test_keys = [k for k in metrics if k.startswith("test/") and k.count("/") == 1]
    assert test_keys
    for key in test_keys:
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-5), key
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Config digest" in html
    assert {"report/report.html", "report/metrics.json"} <= artifacts(client, run_id)

    family_tests(cfg.tags.family).check_experiment_run(cfg, run, arts, html, evaluated, client)
