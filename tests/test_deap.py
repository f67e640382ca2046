"""DEAP loader, preprocessing and leak-free splits, on files generated in DEAP's format."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from zoo.data.deap import (
    ALL_CHANNELS,
    EEG_CHANNELS,
    N_SAMPLES,
    DeapDataModule,
    load_subject,
    make_labels,
)
from zoo.data.demo.deap import make_subject, write_demo_deap
from zoo.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def deap_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deap")
    write_demo_deap(path, n_subjects=3, n_trials=12)
    return path


def test_demo_files_have_deap_format(deap_dir):
    data, ratings = load_subject(deap_dir / "s01.dat")
    assert data.shape == (12, 40, N_SAMPLES) and data.dtype == np.float64
    assert ratings.shape == (12, 4) and ratings.min() >= 1 and ratings.max() <= 9
    assert (
        len(EEG_CHANNELS) == 32
        and len(ALL_CHANNELS) == 40
        and ALL_CHANNELS[:3] == ["Fp1", "AF3", "F3"]
        and ALL_CHANNELS[31] == "O2"
    )
    with open(deap_dir / "s01.dat", "rb") as fh:  # a plain dict of arrays, as DEAP ships
        raw = pickle.load(fh, encoding="latin1")
    assert set(raw) == {"data", "labels"}


def test_demo_generation_is_cached_and_deterministic(tmp_path):
    a = make_subject(1, seed=3, n_trials=4)
    b = make_subject(1, seed=3, n_trials=4)
    np.testing.assert_array_equal(a["data"], b["data"])
    paths = write_demo_deap(tmp_path, n_subjects=1, n_trials=4)
    mtime = paths[0].stat().st_mtime_ns
    write_demo_deap(tmp_path, n_subjects=1, n_trials=4)
    assert paths[0].stat().st_mtime_ns == mtime


def test_labels_quadrants_and_threshold():
    r = np.array(
        [[7, 7, 1, 1], [7, 3, 1, 1], [3, 7, 1, 1], [3, 3, 1, 1], [5, 5, 1, 1]], dtype=float
    )
    assert make_labels(r, "quadrant").tolist() == [0, 1, 2, 3, 3]  # 5 is not high with threshold 5
    assert make_labels(r, "quadrant", threshold=4).tolist() == [0, 1, 2, 3, 0]
    assert make_labels(r, "valence").tolist() == [1, 1, 0, 0, 0]
    assert make_labels(r, "arousal").tolist() == [1, 0, 1, 0, 0]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    bad = tmp_path / "s01.dat"
    bad.write_bytes(pickle.dumps({"data": payload, "labels": np.zeros((1, 4))}, protocol=2))
    with pytest.raises(DataError, match=r"s01\.dat.*refusing to unpickle.*system"):
        load_subject(bad)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    bad = tmp_path / "s02.dat"
    bad.write_bytes(b"cbuiltins\neval\n(V__import__('os').system('true')\ntR.")
    with pytest.raises(DataError, match="builtins.eval"):
        load_subject(bad)


@pytest.mark.parametrize(
    "obj, match",
    [
        (
            {"data": np.zeros((2, 40, 8064)), "labels": np.zeros((3, 4))},
            r"'labels' has shape \(3, 4\)",
        ),
        (
            {"data": np.zeros((2, 32, 8064)), "labels": np.zeros((2, 4))},
            r"'data' has shape \(2, 32, 8064\)",
        ),
        ({"data": np.zeros((2, 40, 8064))}, "keys 'data' and 'labels'"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, obj, match):
    path = tmp_path / "s03.dat"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=match) as err:
        load_subject(path)
    assert str(path) in str(err.value)


def test_nan_and_truncated_and_missing(tmp_path):
    data = np.zeros((2, 40, 8064))
    data[1, 5, 100] = np.nan
    path = tmp_path / "s04.dat"
    path.write_bytes(pickle.dumps({"data": data, "labels": np.ones((2, 4))}, protocol=2))
    with pytest.raises(DataError, match=r"s04\.dat.*NaN.*\(1, 5, 100\)"):
        load_subject(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"s04\.dat: not a readable DEAP pickle"):
        load_subject(path)
    with pytest.raises(DataError, match=r"s09\.dat: DEAP subject file not found"):
        load_subject(tmp_path / "s09.dat")


def test_missing_directory_and_subject(tmp_path, deap_dir):
    with pytest.raises(DataError, match="directory not found"):
        DeapDataModule(str(tmp_path / "nope")).prepare_data()
    with pytest.raises(DataError, match=r"s07\.dat"):
        DeapDataModule(str(deap_dir), subjects=[1, 7]).prepare_data()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(protocol="trial_kfold", n_folds=4, fold=1),
        dict(protocol="loso", test_subject=2),
        dict(protocol="cross_subject"),
    ],
)
def test_no_trial_crosses_splits(deap_dir, kwargs):
    dm = DeapDataModule(str(deap_dir), **kwargs)
    dm.setup()
    keys = {k: ds.trial_keys for k, ds in dm.datasets.items()}
    assert keys["train"] and keys["val"] and keys["test"]
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    n_trials = len(dm.trials.label)
    assert sum(len(v) for v in keys.values()) == n_trials  # every trial used exactly once
    if kwargs["protocol"] == "loso":
        assert {s for s, _ in keys["test"]} == {2} and 2 not in {s for s, _ in keys["train"]}
    if kwargs["protocol"] == "cross_subject":
        subj = {k: {s for s, _ in v} for k, v in keys.items()}
        assert not subj["train"] & subj["test"] and not subj["train"] & subj["val"]


def test_leaky_split_needs_explicit_flag(deap_dir):
    with pytest.raises(ConfigError, match="allow_leaky_split"):
        DeapDataModule(str(deap_dir), protocol="random_windows")
    dm = DeapDataModule(str(deap_dir), protocol="random_windows", allow_leaky_split=True, subset=1)
    with pytest.warns(UserWarning, match="leaky"):
        dm.setup()
    assert dm.datasets["train"].trial_keys & dm.datasets["test"].trial_keys  # it really does leak


def test_windows_preprocessing_and_train_only_normalisation(deap_dir):
    dm = DeapDataModule(
        str(deap_dir), subset=2, window_seconds=1.0, overlap=0.5, channels=["Fz", "Cz", "Pz"]
    )
    dm.setup()
    x, y = dm.datasets["train"][0]
    assert tuple(x.shape) == (3, 128) and x.dtype == torch.float32
    assert 0 <= y < 4
    n_samples = N_SAMPLES - 384
    per_trial = (n_samples - 128) // 64 + 1
    assert len(dm.datasets["test"]) == per_trial * len(dm.datasets["test"].trial_keys)
    # statistics of the training trials only, streamed; the windows themselves stay raw
    train_rows = np.unique(dm.datasets["train"].rows)
    train = np.stack([dm.trials.signal(r) for r in train_rows])
    mean, std = dm.norm_stats
    np.testing.assert_allclose(mean, train.mean(axis=(0, 2), dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(std, train.std(axis=(0, 2), dtype=np.float64) + 1e-6, rtol=1e-7)
    np.testing.assert_array_equal(
        x.numpy(), dm.trials.signal(dm.datasets["train"].rows[0])[:, :128]
    )
    test_rows = np.unique(dm.datasets["test"].rows)
    test = np.stack([dm.trials.signal(r) for r in test_rows])
    assert not np.allclose(test.mean(axis=(0, 2)), mean, atol=1e-4)


def test_bad_options_are_config_errors(deap_dir):
    for kwargs, match in [
        (dict(channels=["Fp1", "XX"]), "unknown DEAP channel"),
        (dict(target="dominance"), "data.target='dominance'"),
        (dict(protocol="nope"), "data.protocol='nope'"),
        (dict(overlap=1.0), "data.overlap"),
        (dict(num_classes=3), "data.num_classes=3"),
    ]:
        with pytest.raises(ConfigError, match=match):
            DeapDataModule(str(deap_dir), **kwargs)
    with pytest.raises(ConfigError, match="data.bandpass"):
        DeapDataModule(str(deap_dir), bandpass=[30, 80], subset=1).setup()
    with pytest.raises(ConfigError, match="at least 3 subjects"):
        DeapDataModule(str(deap_dir), protocol="cross_subject", subset=2).setup()
    assert len(EEG_CHANNELS) == 32
