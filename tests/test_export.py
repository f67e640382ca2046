"""Exported networks (``zoo.export``) against the eager ones: ONNX (run by ONNX Runtime) and
``torch.export`` programs, on other batch sizes and lengths than the example they were traced
with; the CLI on a trained run logs them under ``export/``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, artifacts, build_model, cli_env
from zoo.errors import ConfigError
from zoo.export import TOLERANCE, export_module, onnx_run
from zoo.pipeline import train


def _eeg(b: int) -> np.ndarray:
    return np.random.default_rng(b).normal(size=(b, 32, 256)).astype(np.float32) * 20


def _image(b: int) -> np.ndarray:
    return np.random.default_rng(b).uniform(-1, 1, size=(b, 3, 64, 64)).astype(np.float32)


def _tokens(b: int, length: int = 24) -> dict[str, np.ndarray]:
    g = np.random.default_rng(b * 100 + length)
    mask = np.ones((b, length), np.int64)
    mask[0, length // 2 :] = 0  # a padded sequence
    ids = g.integers(5, 90, size=(b, length))
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# (overrides, example maker, other inputs the exported network must also get right)
MODELS = {
    "eeg": (["experiment=eeg_cnn_lstm"], _eeg, [_eeg(5), _eeg(1)]),
    "pix2pix": (["experiment=pix2pix_demo"], _image, [_image(3)]),
    # dam_s: the learned mask and the kernels' masked attention (their fakes, their reference)
    "sparsebert_dam_s": (
        ["experiment=sparsebert_dam_search_demo"],
        _tokens,
        [_tokens(3, 64), _tokens(1, 7)],  # the longest length the mask allows, and a short one
    ),
    "sparsebert_dam_u": (
        ["experiment=sparsebert_dam_search_demo", "model.mask.mode=dam_u"],
        _tokens,
        [_tokens(3, 64)],
    ),
}


def _run(path, fmt: str, names: list[str], inputs) -> torch.Tensor:
    tensors = tuple(
        torch.as_tensor(inputs[n] if isinstance(inputs, dict) else inputs) for n in names
    )
    if fmt == "onnx":
        return torch.from_numpy(onnx_run(path, names, tensors)[0])
    return torch.export.load(path).module()(*tensors)


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
@pytest.mark.parametrize("family", list(MODELS))
def test_the_exported_network_computes_what_the_eager_one_does(tmp_path, family, fmt):
    overrides, example, others = MODELS[family]
    torch.manual_seed(0)
    module = build_model(overrides).eval()
    record = export_module(module, example(2), fmt, tmp_path)
    assert record["max_abs_error"] <= TOLERANCE
    assert json.loads((tmp_path / "export.json").read_text()) == record
    net, names, _, _ = module.export_network()
    for inputs in others:  # free batch (and length) dimensions
        tensors = [
            torch.as_tensor(inputs[n] if isinstance(inputs, dict) else inputs) for n in names
        ]
        with torch.no_grad():
            eager = net(*tensors)
        exported = _run(tmp_path / record["file"], fmt, names, inputs)
        assert exported.shape == eager.shape
        torch.testing.assert_close(exported.float(), eager.float(), atol=TOLERANCE, rtol=0)


def test_detection_and_bad_formats_are_clear_errors(tmp_path):
    detector = build_model(["experiment=detection_groupsoftmax_demo"])
    with pytest.raises(ConfigError, match="detection models are not exported: torchvision"):
        export_module(detector, np.zeros((1, 3, 32, 32), np.float32), "onnx", tmp_path)
    with pytest.raises(ConfigError, match="format='tflite': choose one of onnx, torch_export"):
        export_module(build_model(["experiment=eeg_cnn_lstm"]), _eeg(2), "tflite", tmp_path)


def _export_cli(*args: str, cwd, uri: str):
    return subprocess.run(
        [sys.executable, "-m", "zoo.export", *args],
        cwd=cwd,
        env=cli_env({"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.e2e
def test_the_cli_exports_a_trained_run_into_its_export_folder(
    make_cfg, tracking_uri, tmp_path, capsys
):
    from zoo.export import main

    uri = tracking_uri
    train(make_cfg(["experiment=eeg_cnn_lstm", "debug=fast", "tracking.experiment_name=export"]))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("export").experiment_id])
    # by run id and by the logged model's URI, each in a process of its own
    sources = (run.info.run_id, run.data.tags["zoo.model_uri"])
    for source, fmt, file in zip(sources, ("onnx", "torch_export"), ("model.onnx", "model.pt2")):
        out = tmp_path / fmt
        proc = _export_cli(source, f"format={fmt}", f"output={out}", cwd=tmp_path, uri=uri)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"logged to run {run.info.run_id} under export/" in proc.stdout
        assert json.loads((out / "export.json").read_text())["max_abs_error"] <= TOLERANCE
        assert {f"export/{file}", "export/export.json"} <= artifacts(client, run.info.run_id)
    # bad input: one line, exit status 2
    capsys.readouterr()  # what training printed
    for args, expected in (
        ((run.info.run_id, "format=tflite"), "format='tflite': choose one of onnx, torch_export"),
        (("0123456789abcdef", "format=onnx"), "run_id=0123456789abcdef: no such mlflow run"),
        ((run.info.run_id, "fromat=onnx"), "fromat=: not an option of zoo.export"),
    ):
        assert main([*args, f"tracking_uri={uri}"]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
