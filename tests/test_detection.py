"""GroupSoftmax Faster R-CNN: the two loss seams, the joint data module, COCO/VOC scoring against
pycocotools, scoring external COCO results files, and debug runs of both demo experiments."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import zoo.kernels as K
from tests.conftest import build_model, pycocotools_eval, render_in_chromium
from zoo.data.detection import DetectionDataModule, DetectionDataset
from zoo.errors import ConfigError, DataError
from zoo.metrics.coco_files import coco_to_tensors, score_coco_files
from zoo.metrics.detection import STAT_NAMES, DetectionScorer
from zoo.models.detection import (
    GroupSoftmaxDetector,
    rpn_group_table,
    warmup_multistep,
)
from zoo.pipeline import evaluate

CLASSES = ["circle", "square", "triangle", "cross"]
SOURCES = {
    "a": {"label_map": {"circle": "circle", "square": "square"}},
    "b": {"label_map": {"triangle": "triangle", "cross": "cross"}},
}
SMALL = [  # the demo experiment's config, lighter still
    "model.net.min_size=128",
    "model.net.max_size=128",
    "model.net.box_batch_size_per_image=64",
    "model.net.rpn_pre_nms_top_n_train=300",
    "model.net.rpn_post_nms_top_n_train=100",
    "model.net.rpn_pre_nms_top_n_test=300",
    "model.net.rpn_post_nms_top_n_test=100",
]


def detector(*overrides: str, small: bool = True, **kwargs) -> GroupSoftmaxDetector:
    """The detection demo's model from conf/, with overrides (CLASSES and SOURCES are the
    demo data's)."""
    return build_model(
        ["experiment=detection_groupsoftmax_demo", *(SMALL if small else []), *overrides],
        **kwargs,
    )


def _batch(source: int, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(n)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 60.0, 120.0, 110.0]]),
            "labels": torch.tensor([1, 2]) if source == 0 else torch.tensor([3, 4]),
            "source": torch.tensor(source),
        }
        for _ in range(n)
    ]
    return images, targets


@pytest.fixture
def record_group_softmax(monkeypatch):
    """Record every GroupSoftmax call (logits kept with their gradient) made by the model."""
    calls = []
    original = K.group_softmax_cross_entropy

    def recording(logits, target, table, rows, *args, **kwargs):
        logits.retain_grad()
        calls.append((logits, target, table, rows))
        return original(logits, target, table, rows, *args, **kwargs)

    monkeypatch.setattr(K, "group_softmax_cross_entropy", recording)
    return calls


def test_rpn_group_table():
    assert rpn_group_table(2).tolist() == [[0, 1, 0], [0, 0, 2]]
    assert rpn_group_table(3)[1].tolist() == [0, 0, 2, 0]


def test_group_softmax_heads_never_teach_unlabelled_classes_as_background(record_group_softmax):
    """Source a's background RoIs / anchors must not push down b's classes (or b's RPN foreground);
    the plain softmax baseline does push them down."""
    torch.manual_seed(0)
    model = detector()
    model.train()
    losses = model.net(*_batch(source=0))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    (rpn_logits, rpn_target, rpn_table, rpn_rows), (box_logits, box_target, box_table, box_rows) = (
        record_group_softmax
    )
    assert rpn_logits.shape[1] == 3 and rpn_table.tolist() == rpn_group_table(2).tolist()
    assert box_logits.shape[1] == 5 and box_table.tolist() == model.group_table.tolist()
    assert (rpn_rows == 0).all() and (box_rows == 0).all()
    assert (
        set(rpn_target.tolist()) <= {0, 1} and (rpn_target == 1).any()
    )  # a's foreground is RPN class 1
    bg = box_target == 0
    assert bg.any() and (box_target[~bg] <= 2).all()
    # background rows: b's classes share background's group -> gradient <= 0 (pulled up with it)
    assert (box_logits.grad[bg][:, 3:] <= 1e-9).all()
    assert (box_logits.grad[bg][:, 1:3] > 0).all()  # a's own classes are pushed down
    rpn_bg = rpn_target == 0
    assert (rpn_logits.grad[rpn_bg][:, 2] <= 1e-9).all() and (
        rpn_logits.grad[rpn_bg][:, 1] > 0
    ).all()

    record_group_softmax.clear()
    baseline = detector("model.net.loss=softmax")
    baseline.train()
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["logits"] = out

    baseline.net.roi_heads.box_predictor.cls_score.register_forward_hook(keep)
    sum(baseline.net(*_batch(source=0)).values()).backward()
    assert not record_group_softmax  # plain F.cross_entropy / BCE
    assert (captured["logits"].grad[:, 3:] > 0).any()  # b's classes are taught as "not here"


@pytest.mark.parametrize("loss", ["group_softmax", "softmax"])
def test_resnet50_fpn_trains_and_predicts(loss):
    torch.manual_seed(0)
    model = detector(
        "model.net.backbone=resnet50_fpn",
        f"model.net.loss={loss}",
        "model.net.anchor_sizes=[16,32,64,128,256]",
    )
    assert sum(p.numel() for p in model.net.backbone.parameters()) > 25_000_000
    assert model.net.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    model.train()
    images, targets = _batch(source=1, n=1)
    losses = model.net(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert (
        model.net.backbone.body.conv1.weight.grad is not None
    )  # every stage trains without weights
    model.eval()
    with torch.no_grad():
        (out,) = model(images)
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(
        out["labels"]
    )
    with pytest.raises(ConfigError, match="5 FPN levels"):
        detector("model.net.backbone=resnet50_fpn", "model.net.anchor_sizes=[32,64]")


def test_proposal_score_is_one_minus_background_probability(monkeypatch):
    torch.manual_seed(0)
    model = detector().eval()
    rpn = model.net.rpn
    seen = {}
    original = rpn.filter_proposals

    def spy(proposals, objectness, *args):
        seen["objectness"] = objectness
        return original(proposals, objectness, *args)

    monkeypatch.setattr(rpn, "filter_proposals", spy)
    head_out = {}
    rpn.head.cls_logits.register_forward_hook(
        lambda m, i, out: head_out.setdefault("levels", []).append(out) or None
    )
    with torch.no_grad():
        model.net([torch.rand(3, 128, 128)])
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    levels = head_out["levels"]
    deltas = [torch.zeros(o.shape[0], o.shape[1] // 3 * 4, *o.shape[2:]) for o in levels]
    logits, _ = concat_box_prediction_layers(levels, deltas)
    p_bg = logits.softmax(1)[:, 0]
    torch.testing.assert_close(torch.sigmoid(seen["objectness"]), 1 - p_bg, atol=1e-5, rtol=1e-4)


def test_warmup_multistep_schedule():
    f = warmup_multistep(10, 0.001, [20, 30], 0.1)
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.5005) and f(10) == 1.0
    assert f(19) == 1.0 and f(20) == pytest.approx(0.1) and f(35) == pytest.approx(0.01)


def test_backbone_weights_are_loaded_from_a_local_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(1)
    ref = mobilenet_v3_large()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(ref.state_dict(), path)
    model = detector(f"model.net.backbone_weights={path}")
    body = model.net.backbone.body
    assert not torch.equal(body["0"][0].weight, ref.features[0][0].weight)  # nothing read yet
    model.configure_model()  # what a trainer calls first: the weights are read
    torch.testing.assert_close(body["0"][0].weight, ref.features[0][0].weight)
    assert not body["0"][0].weight.requires_grad  # torchvision: 3 trainable stages with weights
    # trained weights win: a module given them never reads the backbone file (gone by now)
    path.unlink()
    served = detector(f"model.net.backbone_weights={path}")
    served.load_state_dict(model.state_dict())
    served.configure_model()
    torch.testing.assert_close(served.net.backbone.body["0"][0].weight, body["0"][0].weight)
    with pytest.raises(ConfigError, match="not found"):
        detector(f"model.net.backbone_weights={tmp_path / 'nope.pth'}").configure_model()
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        detector(f"model.net.backbone_weights={tmp_path / 'other.pth'}").configure_model()
    # b no longer labels triangles (kwargs merge into the config's sources: None drops it)
    other = detector(sources={"b": {"label_map": {"triangle": None}}})
    assert other.group_table.tolist() != model.group_table.tolist()
    with pytest.raises(ConfigError, match="trained with the group table"):
        other.load_state_dict(model.state_dict())
    with pytest.raises(ConfigError, match="model.net.loss"):
        detector("model.net.loss=focal")


# --------------------------------------------------------------------------- data module


def _write_coco(root, name, boxes_per_image, categories, crowd=()):
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(
            root / "images" / f"{name}{i}.png"
        )
        images.append({"id": i + 1, "file_name": f"{name}{i}.png", "width": 64, "height": 48})
        for cat, (x, y, w, h) in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "iscrowd": int(len(anns) + 1 in crowd),
                }
            )
    (root / f"{name}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )


def _coco_source(root) -> dict:
    """A COCO source spec over ``_write_coco``'s ``train`` split in ``root``."""
    return {
        "format": "coco",
        "root": str(root),
        "label_map": {"ball": "circle"},
        "train": {"annotations": "train.json", "images": "images"},
    }


def test_joint_data_module(tmp_path):
    cats_a = [{"id": 1, "name": "round"}, {"id": 2, "name": "box"}]
    cats_b = [{"id": 5, "name": "tri"}]
    _write_coco(
        tmp_path / "a",
        "train",
        [[(1, (5, 5, 10, 10)), (2, (30, 10, 20, 20))], []],
        cats_a,
        crowd={2},
    )
    _write_coco(tmp_path / "b", "train", [[(5, (0, 0, 8, 8))]], cats_b)
    sources = {
        "a": {
            "format": "coco",
            "root": str(tmp_path / "a"),
            "label_map": {"round": "circle", "box": "square"},
            "train": {"annotations": "train.json", "images": "images"},
        },
        "b": {
            "format": "coco",
            "root": str(tmp_path / "b"),
            "label_map": {"tri": "triangle"},
            "train": {"annotations": "train.json", "images": "images"},
        },
    }
    dm = DetectionDataModule(CLASSES, sources, batch_size=3, flip=1.0)
    assert dm.group_table.tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 3, 0]]
    records = dm.records("train")
    assert [r.source for r in records] == [0, 0, 1] and len(
        {r.image_id for r in records}
    ) == 3  # renumbered
    only_a = DetectionDataModule(CLASSES, {"a": sources["a"]}).records("train")
    assert [r.image_id for r in only_a] == [1, 2]  # COCO's own ids kept when they do not collide
    ds = DetectionDataset(records, train=True, flip=1.0)
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8  # uint8 until the model
    # the crowd box is not trained on; the other is flipped with the image (64 px wide)
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [
        [49.0, 5.0, 59.0, 15.0]
    ]
    assert int(target["source"]) == 0
    _, target_b = ds[2]
    assert int(target_b["source"]) == 1 and target_b["labels"].tolist() == [3]
    _, evaluation = DetectionDataset(records, train=False)[0]
    assert evaluation["iscrowd"].tolist() == [False, True]  # kept (ignored) for scoring
    with pytest.raises(ConfigError, match="'val' split"):
        dm.records("val")
    with pytest.raises(ConfigError, match="format"):
        DetectionDataModule(
            CLASSES, {"a": {"format": "yolo", "label_map": {"x": "circle"}, "train": {}}}
        ).records("train")
    with pytest.raises(ConfigError, match="label_map"):
        DetectionDataModule(CLASSES, {"a": {"format": "coco", "train": {}}}).records("train")


def test_data_module_joins_coco_cctsdb_and_voc_sources(tmp_path):
    _write_coco(tmp_path / "coco", "train", [[(1, (5, 5, 10, 10))]], [{"id": 1, "name": "ball"}])
    (tmp_path / "signs" / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "signs" / "img" / "s.png")
    (tmp_path / "signs" / "train.txt").write_text(
        "s.png;3;4;20;30;warn\ns.png;1;1;70;9;warn\n"
    )  # 2nd: outside
    voc = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets/Main/trainval.txt").write_text("000001\n")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(voc / "JPEGImages/000001.jpg")
    (voc / "Annotations/000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><size><width>64</width><height>48</height></size>"
        "<object><name>x</name><difficult>1</difficult><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax>"
        "<ymax>9</ymax></bndbox></object><object><name>x</name><difficult>0</difficult><bndbox><xmin>21</xmin>"
        "<ymin>11</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object></annotation>"
    )
    sources = {
        "coco": _coco_source(tmp_path / "coco"),
        "signs": {
            "format": "cctsdb",
            "root": str(tmp_path / "signs"),
            "label_map": {"warn": "triangle"},
            "train": {"annotations": "train.txt", "images": "img"},
        },
        "voc": {
            "format": "voc",
            "root": str(voc),
            "label_map": {"x": "cross"},
            "train": {"image_set": "trainval"},
        },
    }
    with pytest.raises(
        DataError,
        match=r"train.txt:2 box \[1.0, 1.0, 70.0, 9.0\] in a 64x48 image: outside image \(set "
        r"data.on_bad=skip",
    ):
        DetectionDataModule(CLASSES, sources).setup("fit")
    dm = DetectionDataModule(CLASSES, sources, on_bad="skip", batch_size=3, flip=0.0)
    assert dm.group_table.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 3, 0], [0, 0, 0, 0, 4]]
    dm.datasets["train"] = DetectionDataset(dm.records("train"), train=True, flip=0.0)
    images, targets, unreadable = next(iter(dm.train_dataloader()))
    assert unreadable == []
    by_source = {int(t["source"]): t for t in targets}
    assert len(images) == 3 and set(by_source) == {0, 1, 2}
    assert by_source[0]["labels"].tolist() == [1] and by_source[1]["labels"].tolist() == [3]
    assert by_source[2]["labels"].tolist() == [4]  # the difficult box is not trained on
    assert by_source[2]["boxes"].tolist() == [[20.0, 10.0, 40.0, 30.0]]
    assert dm.skipped() == {"train/outside_image": 1}
    assert dm.summary()["skipped annotations"] == "train/outside_image 1"
    with pytest.raises(ConfigError, match="image_set"):
        DetectionDataModule(
            CLASSES,
            {
                "v": {
                    "format": "voc",
                    "root": str(voc),
                    "label_map": {"x": "cross"},
                    "train": {"images": "x"},
                }
            },
        ).records("train")


# --------------------------------------------------------------------------- scoring


def _coco_fixture(tmp_path, seed=0, n_images=40):
    """Random ground truth with crowd boxes and images without objects, and noisy detections."""
    rng = np.random.default_rng(seed)
    images = [
        {"id": 100 + i, "width": 320, "height": 240, "file_name": f"{i}.png"}
        for i in range(n_images)
    ]
    anns, results = [], []
    for im in images:
        if im["id"] % 6 == 0:  # no objects, but a false detection
            results.append(
                {"image_id": im["id"], "category_id": 3, "bbox": [5, 5, 40, 30], "score": 0.7}
            )
            continue
        for _ in range(rng.integers(1, 7)):
            x, y = rng.uniform(0, 220, 2)
            w, h = rng.uniform(4, 120, 2)
            c = int(rng.choice([1, 3, 7]))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im["id"],
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.12),
                }
            )
            for _ in range(rng.integers(0, 4)):
                results.append(
                    {
                        "image_id": im["id"],
                        "category_id": c if rng.random() < 0.8 else 1,
                        "bbox": [
                            x + rng.normal(0, 5),
                            y + rng.normal(0, 5),
                            w * rng.uniform(0.7, 1.3),
                            h * rng.uniform(0.7, 1.3),
                        ],
                        "score": float(rng.random()),
                    }
                )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "cat"},
            {"id": 3, "name": "dog"},
            {"id": 7, "name": "eel"},
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert any(a["iscrowd"] for a in anns)
    return tmp_path / "gt.json", tmp_path / "results.json"


def _pycocotools_stats(gt_path, res_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_pycocotools(tmp_path, seed):
    gt_path, res_path = _coco_fixture(tmp_path, seed)
    ev = _pycocotools_stats(gt_path, res_path)
    scorer, _ = score_coco_files(gt_path, res_path)
    scores = scorer.compute()
    ours = [scores.metrics[k] for k in STAT_NAMES]
    np.testing.assert_allclose(ours, ev.stats, rtol=0, atol=1e-9)
    assert ev.stats[0] > 0.05  # a meaningful, non-degenerate case
    # per class: COCO AP@[.5:.95] from pycocotools' precision array
    for k, row in enumerate(scores.per_class):
        p = ev.eval["precision"][:, :, k, 0, -1]
        assert row["AP"] == pytest.approx(float(p[p > -1].mean()), abs=1e-9)
        assert row["AP_50"] == pytest.approx(
            float(ev.eval["precision"][0, :, k, 0, -1].mean()), abs=1e-9
        )
        assert 0 <= row["voc07_AP_50"] <= 1 and 0 <= row["voc_AP_50"] <= 1


def test_scores_only_count_classes_the_source_labels():
    """A y detection on an image of a source that does not label y can be neither confirmed nor
    refuted: it is dropped before scoring (without the group table it is a false positive)."""
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    preds = [
        {
            "boxes": box.repeat(2, 1),
            "scores": torch.tensor([0.9, 0.95]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2])},
    ]
    targets = [
        {"boxes": box, "labels": torch.tensor([1]), "source": torch.tensor(0)},
        {"boxes": box, "labels": torch.tensor([2]), "source": torch.tensor(1)},
    ]
    grouped = DetectionScorer(["x", "y"], group_table=torch.tensor([[0, 1, 0], [0, 0, 2]]))
    grouped.update(preds, targets)
    assert len(grouped.preds[0]["labels"]) == 1
    assert grouped.compute().metrics["mAP"] == pytest.approx(1.0)
    plain = DetectionScorer(["x", "y"])
    plain.update(preds, targets)
    assert plain.compute().metrics["mAP"] < 0.9


def _gather_worker(
    rank: int, world: int, port: int, gt_path: str, res_path: str, out_dir: str
) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        full, _ = score_coco_files(gt_path, res_path)
        shard = DetectionScorer(full.class_names, full.label_ids)
        shard.preds, shard.targets = full.preds[rank::world], full.targets[rank::world]
        if rank == 1:  # DistributedSampler's padding repeats an image of the other shard
            shard.preds, shard.targets = (
                shard.preds + full.preds[:1],
                shard.targets + full.targets[:1],
            )
        shard.gather()
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(shard.compute().metrics))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_ddp_ranks_score_the_whole_split(tmp_path):
    """Each rank holds half of the images; after gather() every rank reports the full split's
    mAP."""
    import socket

    gt_path, res_path = _coco_fixture(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(
        _gather_worker, args=(2, port, str(gt_path), str(res_path), str(tmp_path)), nprocs=2
    )
    full = score_coco_files(gt_path, res_path)[0].compute().metrics
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["mAP"] == pytest.approx(full["mAP"], abs=1e-9)
        assert got["voc_mAP_50"] == pytest.approx(full["voc_mAP_50"], abs=1e-9)
    half = DetectionScorer(["a", "b", "c"], [1, 3, 7])
    scorer = score_coco_files(gt_path, res_path)[0]
    half.preds, half.targets = scorer.preds[::2], scorer.targets[::2]
    assert half.compute().metrics["mAP"] != pytest.approx(
        full["mAP"], abs=1e-4
    )  # a shard alone differs


def test_coco_files_errors_name_the_file_and_entry(tmp_path):
    gt_path, res_path = _coco_fixture(tmp_path)
    bad = json.loads(res_path.read_text())
    bad[3]["image_id"] = 99999
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json: entry 3 has image_id 99999"):
        score_coco_files(gt_path, tmp_path / "bad.json")
    bad[3]["image_id"], bad[4]["category_id"] = 100 + 1, 42
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"entry 4 has category_id 42"):
        score_coco_files(gt_path, tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: malformed JSON"):
        score_coco_files(gt_path, tmp_path / "broken.json")
    bad[4]["category_id"], bad[5]["score"] = bad[3]["category_id"], "high"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json: entry 5: malformed entry \(ValueError"):
        score_coco_files(gt_path, tmp_path / "bad.json")
    gt = json.loads(gt_path.read_text())
    del gt["annotations"][2]["bbox"]
    (tmp_path / "gt_bad.json").write_text(json.dumps(gt))
    with pytest.raises(
        DataError, match=r"gt_bad.json: annotations\[2\]: malformed entry \(missing key 'bbox'\)"
    ):
        score_coco_files(tmp_path / "gt_bad.json", res_path)


REAL_COCO = Path(__file__).parent / "data" / "coco_val2014_100"
REAL_GT = REAL_COCO / "instances_val2014_100_bbox.json"
REAL_RESULTS = REAL_COCO / "instances_val2014_fakebbox100_results.json"
STATS = STAT_NAMES


def test_stat_names_follow_cocoeval_stats_order():
    """The one place the test suite states COCOeval.summarize()'s order; everything else zips
    ``STAT_NAMES`` with ``COCOeval.stats``."""
    assert STAT_NAMES == [
        *("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large"),
        *("AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large"),
    ]


def test_real_coco_annotations_score_exactly_like_pycocotools(make_cfg, tmp_path):
    """Real COCO val2014 annotations (crowd regions, mask areas unlike box areas) and the COCO
    API's published results for them (3-decimal scores, many tied across images): all 12
    numbers equal pycocotools' within 1e-9, through evaluate.py (metrics.json) and through the
    scorer that training uses (boxes as xyxy tensors in loader order, as a model gives them)."""
    gt = json.loads(REAL_GT.read_text())
    results = json.loads(REAL_RESULTS.read_text())
    scores = [round(r["score"], 3) for r in results]
    assert len(scores) - len(set(scores)) > 100  # ties: the order pycocotools breaks them in
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 9
    assert any(abs(a["area"] - a["bbox"][2] * a["bbox"][3]) > 1 for a in gt["annotations"])
    ev = _pycocotools_stats(REAL_GT, REAL_RESULTS)

    evaluate(
        make_cfg(
            [
                "task=detection",
                f"annotations={REAL_GT}",
                f"predictions={REAL_RESULTS}",
                f"output_dir={tmp_path / 'report'}",
                "log_to_mlflow=false",
            ],
            config_name="evaluate",
        )
    )
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    np.testing.assert_allclose([written[f"test/{k}"] for k in STATS], ev.stats, rtol=0, atol=1e-9)

    # the training path: per-image xyxy tensors in the loader's order (here: reversed), as a
    # model gives them: float64 (the file's values) must equal pycocotools on the files; float32
    # (a model's outputs) must equal pycocotools on those same float32 values
    preds, targets = coco_to_tensors(gt, results)
    names, ids = [c["name"] for c in gt["categories"]], [c["id"] for c in gt["categories"]]
    for dtype in (torch.float64, torch.float32):
        scorer = DetectionScorer(names, ids)
        for i in reversed(range(len(targets))):
            p = {k: preds[i][k].to(dtype) for k in ("boxes", "scores")}
            t = {k: v for k, v in targets[i].items() if k != "xywh"}
            scorer.update([{**p, "labels": preds[i]["labels"]}], [{**t, "image_id": ids_of(gt)[i]}])
        ours = [scorer.compute().metrics[k] for k in STATS]
        ref = ev.stats if dtype == torch.float64 else pycocotools_eval(*scorer.to_coco()).stats
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9, err_msg=str(dtype))


def test_logged_coco_metrics_keep_float64(tmp_path):
    """What the detector logs (Lightning's logged metrics, which loggers receive) is the
    scorer's float64 value, not Lightning's float32 default: pycocotools' within 1e-9."""
    import lightning as L

    from zoo.models.detection import GroupSoftmaxDetector

    gt = json.loads(REAL_GT.read_text())
    preds, targets = coco_to_tensors(gt, json.loads(REAL_RESULTS.read_text()))
    names, ids = [c["name"] for c in gt["categories"]], [c["id"] for c in gt["categories"]]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def test_step(self, batch, batch_idx):
            pass

        def on_test_epoch_end(self):
            scorer = DetectionScorer(names, ids)
            for image, p, t in zip(gt["images"], preds, targets):
                scorer.update([p], [{**t, "image_id": image["id"]}])
            GroupSoftmaxDetector._log_scores(self, "test", scorer)

    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(Probe(), dataloaders=torch.utils.data.DataLoader([torch.zeros(1)]))
    ev = _pycocotools_stats(REAL_GT, REAL_RESULTS)
    logged = trainer.logged_metrics
    assert logged["test/mAP"].dtype == torch.float64
    np.testing.assert_allclose(
        [float(logged[f"test/{k}"]) for k in STATS], ev.stats, rtol=0, atol=1e-9
    )


def ids_of(gt: dict) -> list[int]:
    return [im["id"] for im in gt["images"]]


def test_evaluate_scores_a_results_file_and_writes_the_report(make_cfg, tmp_path, tracking_uri):
    gt_path, res_path = _coco_fixture(tmp_path)
    for im in json.loads(gt_path.read_text())["images"]:
        Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(tmp_path / im["file_name"])
    out = tmp_path / "report"
    metrics = evaluate(
        make_cfg(
            [
                "task=detection",
                f"annotations={gt_path}",
                f"predictions={res_path}",
                f"images={tmp_path}",
                f"output_dir={out}",
            ],
            config_name="evaluate",
        )
    )
    ev = _pycocotools_stats(gt_path, res_path)
    np.testing.assert_allclose([metrics[f"test/{k}"] for k in STATS], ev.stats, rtol=0, atol=1e-9)
    html = (out / "report.html").read_text()
    for text in ("AP per class", "precision-recall", "VOC07 AP@.5", "eel", "test/mAP_50"):
        assert text in html, text
    assert html.count("data:image/png;base64") == 3  # PR curves, AP chart, images with boxes
    page = render_in_chromium(out / "report.html", tmp_path / "profile")
    assert len(page["images"]) == 3 and all(
        ok and w > 300 and h > 200 for ok, w, h in page["images"]
    ), page
    assert page["table_rows"] >= 3 + 13 + 4 and page["external_requests"] == []
    assert json.loads((out / "metrics.json").read_text())["test/mAP"] == metrics["test/mAP"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`zoo.kind` = 'evaluation'"
    )
    assert any(r.data.metrics.get("test/mAP") == pytest.approx(metrics["test/mAP"]) for r in runs)


def test_coco_cctsdb_config_group_table(make_cfg):
    from omegaconf import OmegaConf

    from zoo.boxes import derive_group_table
    from zoo.data.detection import COCO_CLASSES

    cfg = make_cfg(["experiment=detection_coco_cctsdb"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["classes"] == [*COCO_CLASSES, "prohibitory", "warning", "mandatory"]
    table = derive_group_table([s["label_map"] for s in data["sources"].values()], data["classes"])
    assert (table[0, 1:81] > 0).all() and (table[0, 81:] == 0).all()  # COCO: its 80 classes only
    assert (table[1, 1:81] == 0).all() and table[1, 81:].tolist() == [81, 82, 83]
    assert cfg.model.net.backbone == "resnet50_fpn" and cfg.trainer.max_epochs == 26


# --------------------------------------------------------------------------- input pipeline


def test_grouped_batches_share_an_aspect_ratio_and_cover_each_index_once():
    from torch.utils.data import DistributedSampler, RandomSampler

    from zoo.data.detection import aspect_ratio_groups
    from zoo.data.sampling import GroupedBatchSampler

    rng = np.random.default_rng(0)
    n = 103
    landscape = rng.random(n) < 0.7
    widths, heights = np.where(landscape, 640, 480), np.where(landscape, 480, 640)
    widths[:5], heights[:5] = 1000, 480  # a third, rarer shape (2.08: past the last edge)
    groups = aspect_ratio_groups(widths, heights, factor=3)
    assert len(np.unique(groups)) == 3 and groups[0] == 7  # 7 edges: groups 0..7
    data = list(range(n))
    batches = list(GroupedBatchSampler(RandomSampler(data), groups, 4))
    assert sorted(i for b in batches for i in b) == data  # each index once
    assert len(batches) == len(GroupedBatchSampler(RandomSampler(data), groups, 4)) == 26
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 3  # only left-overs mix groups, at most one batch per group
    assert all(len(b) == 4 for b in batches[:-1])
    # under DDP every rank gets the same number of batches (DistributedSampler pads to n/ranks)
    per_rank = []
    for rank in range(3):
        sampler = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=1)
        got = list(GroupedBatchSampler(sampler, groups, 4))
        assert len(got) == len(GroupedBatchSampler(sampler, groups, 4))
        per_rank.append(got)
    assert len({len(b) for b in per_rank}) == 1
    assert {i for b in per_rank for batch in b for i in batch} == set(data)
    dropped = list(GroupedBatchSampler(RandomSampler(data), groups, 4, drop_last=True))
    assert len(dropped) == 25 and all(len(b) == 4 for b in dropped)


def test_lightning_puts_its_distributed_sampler_into_the_grouped_batch_sampler(tmp_path):
    """What Lightning does to a train loader under DDP (its own re-instantiation code, with the
    init arguments it captures while the hook runs)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from zoo.data.sampling import GroupedBatchSampler

    _write_coco(tmp_path / "a", "train", [[(1, (5, 5, 10, 10))]] * 6, [{"id": 1, "name": "ball"}])
    dm = DetectionDataModule(
        CLASSES, {"a": _coco_source(tmp_path / "a")}, batch_size=2, cache="off"
    )
    dm.datasets["train"] = DetectionDataset(dm.records("train"), train=True)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    shard = DistributedSampler(dm.datasets["train"], num_replicas=2, rank=1, shuffle=True)
    distributed = _update_dataloader(loader, shard)
    assert isinstance(distributed.batch_sampler, GroupedBatchSampler)
    assert distributed.batch_sampler.sampler is shard and len(distributed) == 2
    # the epoch a resumed job is about to run reaches the substituted sampler too
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        later = DataLoader(
            dm.datasets["train"],
            batch_sampler=GroupedBatchSampler(loader.batch_sampler.sampler, None, 2, epoch=3),
        )
    assert _update_dataloader(later, shard).batch_sampler.sampler.epoch == 3 == shard.epoch
    images, targets, _ = next(iter(distributed))
    assert len(images) == 2 and images[0].dtype == torch.uint8


def test_an_image_that_cannot_be_decoded_is_named_or_skipped_and_counted(tmp_path):
    from zoo.data.detection import detection_collate

    _write_coco(tmp_path / "a", "train", [[(1, (5, 5, 10, 10))]] * 3, [{"id": 1, "name": "ball"}])
    (tmp_path / "a" / "images" / "train1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dm = DetectionDataModule(CLASSES, {"a": _coco_source(tmp_path / "a")}, cache="off")
    records = dm.records("train")
    with pytest.raises(DataError, match=r"train1\.png: could not decode image"):
        DetectionDataset(records, train=True)[1]
    ds = DetectionDataset(records, train=True, on_bad="skip")
    images, targets, unreadable = detection_collate([ds[0], ds[1], ds[2]])
    assert len(images) == len(targets) == 2 and unreadable == [
        str(tmp_path / "a/images/train1.png")
    ]


def test_the_detector_takes_uint8_images_and_normalises_them_as_torchvision_does():
    from zoo.models.detection import build_faster_rcnn

    torch.manual_seed(0)
    net = build_faster_rcnn(
        "mobilenet_v3_large_fpn", 3, 1, torch.ones(1, 4, dtype=torch.long), min_size=64, max_size=96
    ).eval()
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    ours = net.transform.normalize(image)
    reference = (image.float() / 255 - torch.tensor(net.transform.image_mean)[:, None, None]) / (
        torch.tensor(net.transform.image_std)[:, None, None]
    )
    assert ours.dtype == torch.float32 and torch.allclose(ours, reference, atol=1e-5)
    with torch.no_grad():
        a, b = net([image]), net([image.float() / 255])
    assert torch.allclose(a[0]["boxes"], b[0]["boxes"], atol=1e-3)


# ------------------------------------------------- what test_experiments checks of this family


def check_experiment_run(cfg, run, arts, html, evaluated, client):
    """What only this family logs, checked after the shared checks of
    tests/test_experiments.py::test_experiment_end_to_end."""
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
