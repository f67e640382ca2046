"""Detection groundwork: label maps -> group table, COCO / CCTSDB / VOC loaders on written
fixtures, bad-annotation policy, and VOC average precision against hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.kernels as K
from tests.conftest import ROOT
from zoo.boxes import derive_group_table
from zoo.data.detection import load_cctsdb, load_coco, load_voc
from zoo.errors import ConfigError, DataError
from zoo.metrics.voc import voc_ap, voc_average_precision, voc_class_pr

CLASSES = ["person", "car", "sign_prohibitory", "sign_warning"]
COCO_MAP = {"person": "person", "car": "car"}
CCTSDB_MAP = {"prohibitory": "sign_prohibitory", "warning": "sign_warning", "mandatory": None}


def test_group_table_from_label_maps():
    table = derive_group_table([COCO_MAP, CCTSDB_MAP], CLASSES)
    assert table.tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 3, 4]]
    with pytest.raises(ConfigError, match="'bike'"):
        derive_group_table([{"bicycle": "bike"}], CLASSES)


def test_unlabelled_classes_get_no_negative_gradient_from_that_source():
    """Background samples of the COCO source must not push traffic-sign logits down (COCO does
    not annotate signs), while the CCTSDB source does push them down."""
    table = derive_group_table([COCO_MAP, CCTSDB_MAP], CLASSES)
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.tensor([0, 0])  # background in both sources
    loss = K.group_softmax_cross_entropy(
        logits, target, table, torch.tensor([0, 1]), reduction="sum"
    )
    loss.backward()
    coco_row, cctsdb_row = logits.grad
    # COCO row: signs share background's group -> their gradient is p_c - p_c / P_g <= 0 (pulled up
    # together with background), never the positive "push down" a negative class gets
    assert (coco_row[3:] <= 1e-7).all() and (coco_row[1:3] > 0).all()
    assert (cctsdb_row[3:] > 0).all() and (cctsdb_row[1:3] <= 1e-7).all()
    # with singleton groups the loss is plain cross-entropy
    singleton = torch.arange(5)[None]
    torch.testing.assert_close(
        K.group_softmax_cross_entropy(logits, target, singleton, torch.zeros(2, dtype=torch.long)),
        torch.nn.functional.cross_entropy(logits, target),
    )


def _image(path, w=64, h=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _coco(tmp_path, annotations, images=None):
    images = images or [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
    ]
    for im in images:
        if im["file_name"] != "missing.png":
            _image(tmp_path / "img" / im["file_name"])
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "person"}, {"id": 9, "name": "car"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json", tmp_path / "img"


def test_coco_loader(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 9, "bbox": [10, 5, 20, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 30, 40], "iscrowd": 1},
    ]
    records, report = load_coco(*_coco(tmp_path, anns), COCO_MAP, CLASSES, source=0)
    a, b = sorted(records, key=lambda r: r.image_id)
    assert a.boxes.tolist() == [[10, 5, 30, 15], [0, 0, 30, 40]]
    assert a.labels.tolist() == [2, 1] and a.iscrowd.tolist() == [
        False,
        True,
    ]  # ids remapped: car=2, person=1
    assert len(b.labels) == 0 and not report.skipped  # an image without objects is kept


@pytest.mark.parametrize(
    "ann, reason",
    [
        ({"id": 5, "image_id": 1, "category_id": 9, "bbox": [50, 5, 30, 10]}, "outside image"),
        ({"id": 5, "image_id": 1, "category_id": 9, "bbox": [10, 5, 0, 10]}, "zero area"),
        ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [10, 5, 5, 5]}, "unknown category"),
    ],
)
def test_coco_bad_annotations_error_or_counted_skip(tmp_path, ann, reason):
    good = {"id": 1, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]}
    files = _coco(tmp_path, [good, ann])
    with pytest.raises(DataError, match=rf"ann\.json: annotation id 5.*{reason}"):
        load_coco(*files, COCO_MAP, CLASSES)
    records, report = load_coco(*files, COCO_MAP, CLASSES, on_bad="skip")
    assert sum(report.skipped.values()) == 1 and sum(len(r.labels) for r in records) == 1


def test_coco_missing_image_and_malformed_json(tmp_path):
    images = [{"id": 1, "file_name": "missing.png", "width": 64, "height": 48}]
    files = _coco(tmp_path, [], images)
    with pytest.raises(DataError, match="missing image"):
        load_coco(*files, COCO_MAP, CLASSES)
    assert load_coco(*files, COCO_MAP, CLASSES, on_bad="skip")[1].skipped["missing_image"] == 1
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON"):
        load_coco(tmp_path / "bad.json", tmp_path, COCO_MAP, CLASSES)


def test_coco_malformed_entries_name_the_entry(tmp_path):
    # valid JSON, but an annotation without a bbox / an image without a width
    files = _coco(tmp_path, [{"id": 3, "image_id": 1, "category_id": 9}])
    with pytest.raises(
        DataError,
        match=r"ann\.json: annotation id 3 \(annotations\[0\]\): malformed "
        r"entry \(missing key 'bbox'\)",
    ):
        load_coco(*files, COCO_MAP, CLASSES, on_bad="skip")
    files = _coco(tmp_path, [{"id": 3, "image_id": 1, "category_id": 9, "bbox": [1, 2, "wide", 4]}])
    with pytest.raises(DataError, match=r"annotation id 3 .*malformed entry \(ValueError"):
        load_coco(*files, COCO_MAP, CLASSES)
    files = _coco(tmp_path, [], [{"id": 1, "file_name": "a.png", "height": 48}])
    with pytest.raises(
        DataError, match=r"ann\.json: images\[0\]: malformed entry \(missing key 'width'\)"
    ):
        load_coco(*files, COCO_MAP, CLASSES)


def test_cctsdb_loader(tmp_path):
    _image(tmp_path / "img" / "0001.png")
    (tmp_path / "gt.txt").write_text(
        "0001.png;3;4;20;30;prohibitory\n0001.png;30;4;40;30;warning\n0001.png;1;1;9;9;mandatory\n"
    )
    (rec,), report = load_cctsdb(
        tmp_path / "gt.txt", tmp_path / "img", CCTSDB_MAP, CLASSES, source=1
    )
    assert (
        rec.labels.tolist() == [3, 4]
        and rec.source == 1
        and rec.boxes[0].tolist() == [3, 4, 20, 30]
    )
    (tmp_path / "gt.txt").write_text("0001.png;3;4;20\n")
    with pytest.raises(DataError, match=r"gt\.txt:1: expected 'filename;x1;y1;x2;y2;class'"):
        load_cctsdb(tmp_path / "gt.txt", tmp_path / "img", CCTSDB_MAP, CLASSES)
    (tmp_path / "gt.txt").write_text("0001.png;3;4;20;30;speed\n")
    with pytest.raises(DataError, match=r"gt\.txt:1: class 'speed'.*unknown category"):
        load_cctsdb(tmp_path / "gt.txt", tmp_path / "img", CCTSDB_MAP, CLASSES)


def test_voc_loader(tmp_path):
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("000001\n")
    _image(tmp_path / "JPEGImages" / "000001.jpg", 64, 48)
    (tmp_path / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><size><width>64</width><height>48</height></size>"
        "<object><name>car</name><difficult>1</difficult><bndbox><xmin>11</xmin><ymin>6</ymin>"
        "<xmax>30</xmax><ymax>15</ymax></bndbox></object>"
        "<object><name>person</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>20</xmax><ymax>40</ymax></bndbox></object></annotation>"
    )
    (rec,), _ = load_voc(tmp_path, "val", COCO_MAP, CLASSES)
    assert rec.boxes.tolist() == [[10, 5, 30, 15], [0, 0, 20, 40]]
    assert rec.labels.tolist() == [2, 1] and rec.difficult.tolist() == [True, False]
    (tmp_path / "Annotations" / "000001.xml").write_text("<annotation>")
    with pytest.raises(DataError, match=r"000001\.xml: malformed XML"):
        load_voc(tmp_path, "val", COCO_MAP, CLASSES)
    (tmp_path / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>64</width><height>48</height></size>"
        "<object><name>car</name></object></annotation>"
    )
    with pytest.raises(DataError, match=r"000001\.xml: object 0: bndbox: malformed entry"):
        load_voc(tmp_path, "val", COCO_MAP, CLASSES)


# --------------------------------------------------------------------------- VOC AP


def test_voc_ap_hand_computed():
    # 2 ground-truth boxes; detections ranked: TP, FP, TP
    gt = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, False]))}
    dets = [(0, 0.9, [0, 0, 10, 10]), (0, 0.8, [50, 50, 60, 60]), (0, 0.7, [20, 20, 30, 30])]
    recall, precision, npos = voc_class_pr(dets, gt)
    assert npos == 2
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    # all-point: 0.5 * 1 + 0.5 * 2/3 ; 11-point: (6 * 1 + 5 * 2/3) / 11
    assert voc_average_precision(dets, gt) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_average_precision(dets, gt, use_07_metric=True) == pytest.approx(
        (6 + 5 * 2 / 3) / 11
    )


def test_voc_ap_difficult_duplicates_and_misses():
    gt = {
        0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, True])),
        1: (np.array([[0, 0, 10, 10]], float), np.array([False])),
    }
    dets = [
        (0, 0.9, [0, 0, 10, 10]),  # TP
        (0, 0.8, [0, 0, 10, 10]),  # duplicate of the same box: FP
        (0, 0.7, [20, 20, 30, 30]),  # difficult: ignored
        (1, 0.6, [40, 40, 50, 50]),
    ]  # miss: FP
    recall, precision, npos = voc_class_pr(dets, gt)
    assert npos == 2  # the difficult box does not count
    np.testing.assert_allclose(recall, [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(precision, [1.0, 0.5, 0.5, 1 / 3])
    assert voc_average_precision(dets, gt) == pytest.approx(0.5)
    assert voc_ap(np.array([]), np.array([])) == 0.0
    assert np.isnan(voc_average_precision([], {0: (np.zeros((0, 4)), np.zeros(0, bool))}))


def test_demo_sources_share_images_of_all_classes_but_label_disjoint_sets(tmp_path):
    from zoo.data.demo.detection import SOURCES, write_demo_detection

    out = write_demo_detection(tmp_path / "det", size=96, n_train=6, n_val=2, n_test=2)
    label_maps = {
        "a": {"circle": "circle", "square": "square"},
        "b": {"triangle": "triangle", "cross": "cross"},
    }
    classes = ["circle", "square", "triangle", "cross"]
    labelled = {}
    for s, source in enumerate(SOURCES):
        records, report = load_coco(
            out / source / "train.json", out / source / "images", label_maps[source], classes, s
        )
        assert len(records) == 6 and not report.skipped
        labelled[source] = {int(x) for r in records for x in r.labels}
        img = np.asarray(Image.open(records[0].image))
        assert img.shape == (96, 96, 3) and img.std() > 10  # a real photo background
    assert labelled["a"] <= {1, 2} and labelled["b"] <= {3, 4} and labelled["a"] and labelled["b"]
    table = derive_group_table(list(label_maps.values()), classes)
    assert table.tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 3, 4]]


def test_the_bulk_coco_reader_matches_the_entry_by_entry_one_on_real_annotations(tmp_path):
    """COCO val2014's real annotations (100 images, 839 boxes, crowd regions): the numpy
    reader gives exactly the records of the reader that checks one entry at a time."""
    from zoo.data import coco, detection
    from zoo.data.detection import COCO_CLASSES, AnnotationChecker

    ann = ROOT / "tests/data/coco_val2014_100/instances_val2014_100_bbox.json"
    data = coco.read_coco(ann)
    images = tmp_path / "val2014"
    images.mkdir()
    for im in data["images"]:
        (images / im["file_name"]).touch()
    label_map = {name: name for name in COCO_CLASSES}
    classes = list(COCO_CLASSES)
    listing = coco.FolderListing(images)
    bulk = detection._coco_records_bulk(data, ann, images, listing, label_map, classes, 1)
    check = AnnotationChecker(ann.name, "error")
    slow = detection._coco_records(data, ann, images, listing, label_map, classes, 1, check)
    typed = coco.read_coco_boxes(ann)  # the msgspec decode training uses
    assert typed is not None
    fast = detection._coco_records_bulk(typed, ann, images, listing, label_map, classes, 1)
    for name in fast.COLUMNS:
        assert np.array_equal(getattr(fast, name), getattr(bulk, name)), name
    assert len(bulk) == len(slow) == 100
    assert sum(len(r.labels) for r in bulk) == 839
    assert any(r.iscrowd.any() for r in bulk)
    for a, b in zip(bulk, slow):
        assert (a.image, a.width, a.height, a.image_id, a.source) == (
            b.image,
            b.width,
            b.height,
            b.image_id,
            b.source,
        )
        for key in ("boxes", "labels", "iscrowd", "difficult"):
            x, y = getattr(a, key), getattr(b, key)
            assert x.dtype == y.dtype and np.array_equal(x, y), key
    # one image file gone: the listing sees it, and the loader reports it like before
    (images / data["images"][0]["file_name"]).unlink()
    records, report = detection.load_coco(ann, images, label_map, classes, on_bad="skip")
    assert len(records) == 99 and report.skipped["missing_image"] == 1


def test_a_record_table_gives_back_the_records_it_holds():
    from zoo.data.detection import Record, RecordTable

    def rec(i, k):
        boxes = np.arange(4 * k, dtype=np.float32).reshape(k, 4) + i
        return Record(
            Path(f"/data/imgé/{i}.jpg"),
            10 + i,
            20 + i,
            boxes,
            np.arange(k) + 1,
            source=i % 2,
            iscrowd=np.arange(k) % 2 == 0,
            difficult=np.arange(k) % 3 == 0,
            image_id=100 + i,
        )

    records = [rec(i, k) for i, k in enumerate([2, 0, 3, 1])]
    table = RecordTable.from_records(records)
    assert len(table) == 4 and table.nbytes < 1000

    def same(a, b):
        assert (a.image, a.width, a.height, a.source, a.image_id) == (
            b.image,
            b.width,
            b.height,
            b.source,
            b.image_id,
        )
        for key in ("boxes", "labels", "iscrowd", "difficult"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), key

    for a, b in zip(table, records):
        same(a, b)
    for a, b in zip(table.take([3, 1, 0]), [records[3], records[1], records[0]]):
        same(a, b)
    for a, b in zip(table[1:3], records[1:3]):
        same(a, b)
    joined = RecordTable.concat([table[:2], table[2:]])
    for a, b in zip(joined, records):
        same(a, b)
    same(table[-1], records[-1])
    with pytest.raises(IndexError):
        table[4]


def test_parsed_coco_records_are_cached_and_a_changed_file_is_never_reused(tmp_path, caplog):
    """A second load reads the table's columns by memory map; editing the annotation file
    (or the image folder) gives a new entry."""
    import logging

    from zoo.data.cache import ArrayCache

    anns = [
        {"id": 1, "image_id": 1, "category_id": 9, "bbox": [10, 5, 20, 10]},
        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 5, 0, 10]},  # zero area
    ]
    ann, images = _coco(tmp_path, anns)
    cache = ArrayCache(tmp_path / "cache", "data.cache")
    first, report = load_coco(ann, images, COCO_MAP, CLASSES, 0, "skip", cache)
    assert (cache.misses, cache.hits) == (1, 0) and report.skipped["zero_area"] == 1
    with caplog.at_level(logging.WARNING):
        second, report2 = load_coco(ann, images, COCO_MAP, CLASSES, 0, "skip", cache)
    assert (cache.misses, cache.hits) == (1, 1)
    assert isinstance(second.boxes, np.memmap) and report2.skipped == report.skipped
    assert "skipped 1 bad annotation" in caplog.text  # still reported on a hit
    for a, b in zip(first, second):
        assert a.image == b.image and np.array_equal(a.boxes, b.boxes)
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [1, 1, 3, 3]
    ann.write_text(json.dumps(data))
    third, _ = load_coco(ann, images, COCO_MAP, CLASSES, 0, "skip", cache)
    assert cache.misses == 2 and third[0].boxes.tolist() == [[1, 1, 4, 4]]
