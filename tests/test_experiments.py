"""Every experiment with an offline demo, end to end: compose, instantiate, a ``debug=fast``
train into mlflow, ``evaluate.py run_id=``, and the logged mlflow Model loaded with
``mlflow.pyfunc`` predicting on its input example exactly as the Lightning module does.

New experiments join automatically (any ``conf/experiment/*.yaml`` whose data config has a
``demo``); what only one family logs is checked by that family's entry in ``FAMILY_CHECKS``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import EXPERIMENTS, artifacts, compose_cfg, pycocotools_eval
from zoo import tracking
from zoo.models.sparsebert import random_mask
from zoo.pipeline import build, evaluate, read_checkpoint, train


def _has_demo(experiment: str) -> bool:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="zoo-compose-"))
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp, tmp, f"sqlite:///{tmp}/m.db")
    return bool(cfg.data.get("demo"))


DEMO_EXPERIMENTS = [e for e in EXPERIMENTS if _has_demo(e)]


# stage-2 experiments: (the stage-1 experiment, the key that takes its run id)
UPSTREAM = {
    "sparsebert_finetune_demo": ("sparsebert_dam_search_demo", "model.mask.from_run"),
    "sparsebert_minilm_finetune": ("sparsebert_minilm_search", "model.mask.from_run"),
}


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


def test_demo_experiments_cover_every_family():
    families = {e.split("_")[0] for e in DEMO_EXPERIMENTS}
    assert families == {"eeg", "pix2pix", "detection", "sparsebert"}, DEMO_EXPERIMENTS
    assert not set(families) - set(FAMILY_CHECKS)


@pytest.mark.parametrize("experiment", DEMO_EXPERIMENTS)
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
    expected = module.eval().serve(example)
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

    FAMILY_CHECKS[cfg.tags.family](cfg, run, arts, html, evaluated, client)


# --------------------------------------------------------------------------- family-specific


def _eeg(cfg, run, arts, html, evaluated, client):
    params, tags = run.data.params, run.data.tags
    assert params["model.net.rnn"] == cfg.model.net.rnn and params["trainer.max_epochs"] == "1"
    assert params["data.channels"] == "eeg" and params["model.net.conv_channels"] == "[32, 64, 64]"
    assert int(params["model/params/total"]) > 10_000
    assert tags["zoo.model"] == f"eeg_cnn_{cfg.model.net.rnn}"
    for key in ("train/acc", "val/f1_macro", "val/f1_macro_best", "test/f1_macro"):
        assert key in run.data.metrics, key
    assert {
        "figures/test/confusion_matrix.png",
        "figures/val/confusion_matrix_epoch000.png",
    } <= arts
    assert {"test/precision/HVHA", "test/recall/LVLA", "test/f1/HVLA"} <= set(evaluated)
    assert "Per-class precision" in html and "Confusion matrix" in html and "Dataset" in html


def _pix2pix(cfg, run, arts, html, evaluated, client):
    m, params = run.data.metrics, run.data.params
    for key in ("train/loss_D", "train/loss_G", "train/loss_G_L1", "val/psnr", "test/ssim"):
        assert key in m, key
    assert 0 < m["val/ssim"] <= 1 and m["val/psnr"] > 0
    assert int(params["model/params/generator"]) > 1_000_000
    assert int(params["model/params/discriminator"]) > 100_000
    assert params["model.generator.netG"] == "unet_64" and params["model.lambda_L1"] == "100.0"
    assert run.data.tags["zoo.fid"].startswith(("skipped", "on"))
    assert {"figures/val/grid_epoch000.png", "figures/test/grid.png"} <= arts
    assert "Test results" in html and "test/ssim" in html


def _detection(cfg, run, arts, html, evaluated, client):
    m = run.data.metrics
    for key in (
        "train/loss_classifier",
        "train/loss_objectness",
        "val/mAP",
        "val/AR_100",
        "val/voc07_mAP_50",
        "test/mAP_75",
        "test/voc_mAP_50",
    ):
        assert key in m, key
    assert 0 <= m["val/mAP"] <= 1
    assert run.data.params["model.net.loss"] == cfg.model.net.loss
    assert run.data.tags["zoo.group_table"] == "a: [0, 1, 2, 0, 0]; b: [0, 0, 0, 3, 4]"
    assert {
        "figures/test/pr_curves.png",
        "figures/test/ap_per_class.png",
        "figures/test/detections.png",
        "predictions/test_results.json",
    } <= arts
    assert "Detection results" in html and "AP per class" in html and "group table" in html.lower()
    # the logged test mAP is pycocotools' COCOeval of what was scored, within 1e-9
    folder = tempfile.mkdtemp()
    gt = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "predictions/test_groundtruth.json", folder)
        ).read_text()
    )
    results = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "predictions/test_results.json", folder)
        ).read_text()
    )
    if results:
        ev = pycocotools_eval(gt, results)
        from zoo.metrics.detection import STAT_NAMES

        for name, value in zip(STAT_NAMES, ev.stats):
            if value >= 0:  # -1: no ground truth of that size, not logged
                assert abs(m[f"test/{name}"] - value) <= 1e-9, (name, m[f"test/{name}"], value)


def _sparsebert(cfg, run, arts, html, evaluated, client):
    m = run.data.metrics
    assert m["val/mask_density"] + m["val/mask_sparsity"] == pytest.approx(1.0)
    tokenizer = "tokenizer/tokenizer.json" if cfg.model.pretrained else "tokenizer/vocab.txt"
    assert {
        "figures/val/attention_masks_epoch000.png",
        "masks/attention_mask.pt",
        tokenizer,
    } <= arts
    if cfg.model.mask.mode == "dense":
        assert m["val/mask_density"] == 1.0
    if cfg.model.mask.mode == "random":  # the density asked for, and the seed's mask
        mask = _logged_mask(client, run.info.run_id)
        assert mask.float().mean().item() == pytest.approx(cfg.model.mask.density, abs=1e-3)
        spec = cfg.model.mask
        assert torch.equal(
            mask, random_mask(mask.shape[1], mask.shape[-1], spec.density, spec.seed)
        )
    if cfg.model.mask.mode in ("dam_u", "dam_s"):
        assert {"train/mask_density", "train/loss_sparsity"} <= set(m)
    assert evaluated["test/mask_density"] == pytest.approx(m["val/mask_density"], abs=1e-6)
    assert "Attention masks" in html
    if cfg.model.mask.mode == "dam_s":  # the logged mask is Toeplitz, and what stage 2 reads
        mask = _logged_mask(client, run.info.run_id)
        assert mask.dtype == torch.bool and torch.equal(mask[..., 1:, 1:], mask[..., :-1, :-1])
    if cfg.model.mask.mode == "fixed":
        stage1 = _logged_mask(client, cfg.model.mask.from_run)
        assert m["val/mask_density"] == pytest.approx(stage1.float().mean().item(), abs=1e-6)


def _logged_mask(client, run_id: str) -> torch.Tensor:

    path = client.download_artifacts(run_id, "masks/attention_mask.pt", tempfile.mkdtemp())
    return torch.load(path, weights_only=True)["mask"]


FAMILY_CHECKS = {
    "eeg": _eeg,
    "pix2pix": _pix2pix,
    "detection": _detection,
    "sparsebert": _sparsebert,
}
