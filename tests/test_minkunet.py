"""The MinkUNet LiDAR family: SemanticKITTI's on-disk format (the demo writer and the loader, bad
files), the networks of every conf/model/minkunet_* config, raw scans in and SemanticKITTI
``.label`` files out, and (end to end) a trained demo model through the logged model, predict.py
and ``mlflow models serve``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF, failure_text, run_cli
from zoo.data.demo.semantickitti import make_scan, write_demo_semantickitti
from zoo.data.semantickitti import (
    SemanticKITTIDataModule,
    read_labels,
    read_learning_map,
    read_scan,
)
from zoo.errors import ConfigError, DataError
from zoo.inference import predict_path, respond
from zoo.pipeline import build
from zoo.sparse import voxelize

MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("minkunet_*.yaml"))
SMALL = {0: 2, 8: 1}  # sequences: scans


def small_demo(root: Path) -> Path:
    return write_demo_semantickitti(root, sequences=SMALL, density=6.0)


def net_cfg(name: str):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    for base in cfg.get("defaults", []):
        cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / f"{base}.yaml"), cfg)
    cfg.net.num_classes = 19
    return cfg.net


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_width_builds_and_runs_forward_backward(name):
    torch.manual_seed(0)
    net = instantiate(net_cfg(name))
    widths = {"minkunet_w16": 16, "minkunet_w20": 20, "minkunet_w32": 32}
    assert net.stem[0].out_channels == widths[name]
    points = torch.from_numpy(make_scan(0, 1, extent=8.0, density=3.0)[0])
    vox = voxelize(points, 0.2, (-8.0, -8.0, -3.2, 8.0, 8.0, 3.2))
    logits = net(vox.tensor)
    assert logits.shape == (len(vox.tensor.indices), 19) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_the_demo_is_semantickitti_on_disk(tmp_path):
    root = small_demo(tmp_path / "demo")
    assert json.loads((root / "demo.json").read_text())["generator"] == "semantickitti"
    lut = read_learning_map()["lut"]
    names = read_learning_map()["class_names"]
    seen = set()
    for seq, count in SMALL.items():
        scans = sorted((root / "sequences" / f"{seq:02d}" / "velodyne").glob("*.bin"))
        assert [s.name for s in scans] == [f"{i:06d}.bin" for i in range(count)]
        for scan in scans:
            raw = np.fromfile(scan, dtype="<f4")
            assert raw.size % 4 == 0
            label_file = scan.parent.parent / "labels" / f"{scan.stem}.label"
            raw_labels = np.fromfile(label_file, dtype="<u4")
            assert len(raw_labels) == raw.size // 4
            assert (raw_labels >> 16).max() > 0  # instances in the upper 16 bits
            learned = read_labels(label_file, raw.size // 4, lut)
            seen |= {names[c] for c in np.unique(learned) if c >= 0}
    assert {"road", "sidewalk", "building", "car", "vegetation", "pole", "terrain"} <= seen
    # written once: a second call with the same spec reuses it
    before = (root / "demo.json").stat().st_mtime_ns
    small_demo(tmp_path / "demo")
    assert (root / "demo.json").stat().st_mtime_ns == before


def test_the_loader_reads_the_splits_and_batches_scans(tmp_path):
    root = small_demo(tmp_path / "demo")
    dm = SemanticKITTIDataModule(
        str(root), {"train": [0], "val": [8], "test": [8]}, voxel_size=0.2, batch_size=2
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 1
    batch = next(iter(dm.train_dataloader()))
    n0 = len(read_scan(dm.datasets["train"].files[0]))
    n1 = len(read_scan(dm.datasets["train"].files[1]))
    assert batch["points"].shape == (n0 + n1, 4) and batch["batch_size"] == 2
    assert batch["labels"].shape == (n0 + n1,) and batch["labels"].min() >= -1
    assert batch["batch"].bincount().tolist() in ([n0, n1], [n1, n0])
    assert {f.suffix for f in dm.dataset_files("train")} == {".bin", ".label"}
    spec = dm.preprocessing_spec()
    assert spec["voxel_size"] == [0.2] * 3 and len(spec["raw_labels"]) == 19


def test_bad_files_get_an_error_naming_them(tmp_path):
    root = small_demo(tmp_path / "demo")
    lut = read_learning_map()["lut"]
    velodyne = root / "sequences" / "00" / "velodyne"
    scan, label = velodyne / "000000.bin", root / "sequences" / "00" / "labels" / "000000.label"
    n = len(read_scan(scan))

    odd = tmp_path / "odd.bin"
    odd.write_bytes(scan.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"odd\.bin: .* not a whole number of points"):
        read_scan(odd)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.bin: the scan is empty"):
        read_scan(empty)
    with pytest.raises(DataError, match=rf"000000\.label: {n} labels for a scan of {n + 1} points"):
        read_labels(label, n + 1, lut)
    wrong = tmp_path / "wrong.label"
    raw = np.fromfile(label, dtype="<u4")
    raw[5] = 123  # not a SemanticKITTI label
    raw.tofile(wrong)
    with pytest.raises(DataError, match=r"wrong\.label: point 5 has semantic label 123"):
        read_labels(wrong, n, lut)
    (root / "sequences" / "08" / "labels" / "000000.label").unlink()
    dm = SemanticKITTIDataModule(str(root), {"train": [0], "val": [8], "test": [8]})
    with pytest.raises(DataError, match=r"08/labels/000000\.label: missing"):
        dm.setup("fit")
    with pytest.raises(DataError, match="sequence 03 not found"):
        SemanticKITTIDataModule(str(root), {"train": [3], "val": [8], "test": [8]}).setup("fit")
    with pytest.raises(ConfigError, match="data.point_range"):
        SemanticKITTIDataModule(
            str(root), {"train": [0], "val": [8], "test": [8]}, point_range=[0, 0, 0, 1, -1, 1]
        )


# --------------------------------------------------------------------------- raw scans


@pytest.fixture
def prepared(make_cfg):
    cfg = make_cfg(["experiment=minkunet_demo"])
    dm = build(cfg.data, "data")
    dm.prepare_data()
    torch.manual_seed(0)
    module = build(cfg.model, "model")
    module.preprocessing = dm.preprocessing_spec()
    return module.eval(), dm


def scans(n: int = 2) -> list[np.ndarray]:
    return [make_scan(5, i, extent=20.0, density=5.0)[0] for i in range(n)]


def test_raw_scans_in_every_form_get_a_class_per_point(prepared):
    module, dm = prepared
    a, b = scans()
    one = respond(module, a)
    assert list(one.columns) == ["scan", "class_id", "class_name", "raw_label"]
    assert len(one) == len(a) and set(one.scan) == {0}
    assert one.class_id.between(-1, 18).all()
    inverse = set(read_learning_map()["inverse"]) | {0}
    assert set(one.raw_label) <= inverse
    both = respond(module, [a, b])
    assert len(both) == len(a) + len(b)
    assert both[both.scan == 0].class_id.tolist() == one.class_id.tolist()
    as_float64 = respond(module, a.astype(np.float64))
    assert as_float64.class_id.tolist() == one.class_id.tolist()
    frame = respond(module, pd.DataFrame(a, columns=["x", "y", "z", "remission"]))
    assert frame.class_id.tolist() == one.class_id.tolist()
    same_size = respond(module, np.stack([a[:500], b[:500]]))
    assert np.bincount(same_size.scan).tolist() == [500, 500]


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((10, 3), np.float32), "got shape (10, 3)"),
        (np.zeros((0, 4), np.float32), "the scan is empty"),
        (np.full((5, 4), np.nan, np.float32), "NaN"),
        ({"x": [1.0]}, "got dict"),
    ],
)
def test_bad_raw_scans_are_one_paragraph_naming_the_input(prepared, value, message):
    module, _ = prepared
    with pytest.raises(DataError, match="inputs") as caught:
        respond(module, value)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_predict_writes_label_files_and_skips_bad_scans(prepared, tmp_path):
    module, _ = prepared
    folder = tmp_path / "in"
    folder.mkdir()
    values = scans()
    for i, v in enumerate(values):
        v.astype("<f4").tofile(folder / f"{i:06d}.bin")
    (folder / "broken.bin").write_bytes(b"\x00" * 20)  # 20 bytes: not whole points
    (folder / "empty.bin").write_bytes(b"")
    done = predict_path(module.raw_inputs(), folder, tmp_path / "out", batch_size=2, progress=False)
    assert done.items == 2
    assert sorted(s.name for s in done.skipped) == ["broken.bin", "empty.bin"]
    expected = respond(module, values)
    for i, v in enumerate(values):
        written = np.fromfile(tmp_path / "out" / f"{i:06d}.label", dtype="<u4")
        assert len(written) == len(v)
        assert (written & 0xFFFF).tolist() == expected[expected.scan == i].raw_label.tolist()
        assert (tmp_path / "out" / f"{i:06d}.png").stat().st_size > 1000
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table.file.tolist() == ["000000.bin", "000001.bin"]
    with pytest.raises(DataError, match="broken.bin"):
        predict_path(module.raw_inputs(), folder / "broken.bin", tmp_path / "o2", 1, False)


def test_export_refuses_and_says_why(prepared):
    module, _ = prepared
    with pytest.raises(ConfigError, match="data-dependent sizes"):
        module.export_network()


def test_a_few_steps_learn_a_scan(prepared):
    """The loss of one demo scan falls under a few optimiser steps (the model learns)."""
    module, dm = prepared
    module.train()
    raw_points, raw_labels = make_scan(0, 3, extent=10.0, density=4.0)
    points = torch.from_numpy(raw_points)
    labels = torch.from_numpy(read_learning_map()["lut"][raw_labels & 0xFFFF])
    batch = {
        "points": points,
        "labels": labels,
        "batch": torch.zeros(len(points), dtype=int),
        "batch_size": 1,
    }
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _, _ = module._step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# ------------------------------------------------- what test_experiments checks of this family


def check_experiment_run(cfg, run, arts, html, evaluated, client):
    """What only this family logs, checked after the shared checks of
    tests/test_experiments.py::test_experiment_end_to_end."""
    m, params = run.data.metrics, run.data.params
    for key in ("train/loss", "val/loss", "val/miou", "val/miou_best", "val/acc", "test/miou"):
        assert key in m, key
    assert 0 <= m["test/miou"] <= 1 and 0 <= m["test/acc"] <= 1
    assert any(k.startswith("test/iou/") for k in m)
    assert params["model.net.base_channels"] == "16"
    assert {
        "figures/test/bev.png",
        "figures/test/confusion_matrix.png",
        "figures/val/bev_epoch000.png",
        "metrics/test_confusion_matrix.json",
    } <= arts
    assert "test/miou" in evaluated and "Per-class IoU" in html


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
@pytest.mark.services
def test_a_trained_model_through_every_documented_path(
    make_cfg, tracking_uri, tmp_path, monkeypatch
):
    """The demo's logged model: pyfunc on points, predict.py on .bin files (the same classes,
    as .label files), and a real `mlflow models serve` answering the same points over REST."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from tests.test_experiments import upstream_run
    from tests.test_predict import _start_server
    from zoo import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    run_id = upstream_run(make_cfg, tracking_uri, "minkunet_demo")
    model_uri = MlflowClient(tracking_uri).get_run(run_id).data.tags[tracking.TAG_MODEL_URI]
    values = [v[:3000] for v in scans()]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, v in enumerate(values):
        v.astype("<f4").tofile(folder / f"{i:06d}.bin")
    with tracking.global_tracking_uri(tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    by_pyfunc = pyfunc.predict(values[0])
    assert len(by_pyfunc) == 3000 and pyfunc.predict(values).scan.max() == 1

    out = tmp_path / "out"
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "ZOO_DATA_DIR": str(tmp_path / "data")}
    args = [f"model_uri={model_uri}", f"input={folder}", f"output={out}"]
    proc = run_cli("predict.py", args, tmp_path, env)
    assert proc.returncode == 0, failure_text(proc)
    assert "predicted 2 scans" in proc.stdout and "0 skipped" in proc.stdout
    written = np.fromfile(out / "000000.label", dtype="<u4")
    assert written.tolist() == by_pyfunc.raw_label.tolist()

    server, port = _start_server(model_uri, tracking_uri, tmp_path)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": values[0].tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
        served = pd.DataFrame.from_records(body["predictions"])
        assert served.class_id.tolist() == by_pyfunc.class_id.tolist()
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": [[1.0, 2.0, 3.0]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(bad, timeout=60)
        assert "(x, y, z, remission)" in caught.value.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)
