"""Exported networks (``zoo.export``) against the eager ones: ONNX (run by ONNX Runtime) and
``torch.export`` programs, on other batch sizes and lengths than the example they were traced
with; bad arguments to the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, build_model, cli_env
from zoo.errors import ConfigError
from zoo.export import TOLERANCE, export_module, onnx_run


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
    record = export_module(module, example(1), fmt, tmp_path)  # traced from one: still free
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


def export_cli(*args: str, cwd):
    """``python -m zoo.export`` in a process of its own (the store: MLFLOW_TRACKING_URI)."""
    return subprocess.run(
        [sys.executable, "-m", "zoo.export", *args],
        cwd=cwd,
        env=cli_env({"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_cli_refuses_bad_arguments_in_one_line(tracking_uri, capsys):
    """Bad input: one line, exit status 2. (Each family's trained run is exported by the CLI in
    tests/test_predict.py's end-to-end test.)"""
    from mlflow.tracking import MlflowClient

    from zoo.export import main

    MlflowClient(tracking_uri).search_experiments()  # the store exists (its creation logs)
    capsys.readouterr()
    for args, expected in (
        (
            ("0123456789abcdef", "format=tflite"),
            "format='tflite': choose one of onnx, torch_export",
        ),
        (("0123456789abcdef", "format=onnx"), "run_id=0123456789abcdef: no such mlflow run"),
        (("0123456789abcdef", "fromat=onnx"), "fromat=: not an option of zoo.export"),
        (("format=onnx",), "which model?"),
    ):
        assert main([*args, f"tracking_uri={tracking_uri}"]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
