"""DEAP at full size: the preprocessed-signal cache (hits, misses, invalidation, damage,
concurrent builders), the memory-mapped path against the in-memory one, the normalisation
statistics in the model, the MATLAB distribution and the cross-validation folds."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from scipy.io import savemat

from tests.conftest import ROOT
from zoo.data.deap import DeapDataModule, channel_statistics, load_subject
from zoo.data.demo.deap import write_demo_deap
from zoo.errors import DataError
from zoo.models.components.eeg_nets import CNNRecurrentNet
from zoo.models.eeg import EEGEmotionClassifier


@pytest.fixture(scope="module")
def deap_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deap")
    write_demo_deap(path, n_subjects=3, n_trials=8)
    return path


def _dm(deap_dir, cache, **kwargs) -> DeapDataModule:
    kwargs.setdefault("protocol", "loso")
    return DeapDataModule(str(deap_dir), cache=str(cache), **kwargs)


def _loaded(dm):
    dm.setup()
    return dm.trials


def test_a_miss_builds_each_subject_once_and_a_hit_reads_memory_maps(deap_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _dm(deap_dir, cache)
    t1 = _loaded(first)
    assert len(list(cache.glob("s0?-*.npy"))) == 3
    second = _dm(deap_dir, cache)
    t2 = _loaded(second)
    assert all(isinstance(p, np.memmap) for p in t2.parts)  # read by memory map, not copied
    for a, b in zip(t1.parts, t2.parts):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(t1.label, t2.label)
    # the memory map is what was computed in memory, bit for bit
    off = _loaded(_dm(deap_dir, "off"))
    assert not any(isinstance(p, np.memmap) for p in off.parts)
    for a, b in zip(off.parts, t2.parts):
        np.testing.assert_array_equal(a, b)


def test_an_option_or_a_changed_file_never_reuses_an_entry(tmp_path):
    data = tmp_path / "deap"
    write_demo_deap(data, n_subjects=2, n_trials=4)
    cache = tmp_path / "cache"
    base = _loaded(_dm(data, cache, subjects=[1, 2]))
    assert len(list(cache.glob("*.npy"))) == 2
    other = _loaded(_dm(data, cache, subjects=[1, 2], bandpass=[8.0, 30.0]))
    assert len(list(cache.glob("*.npy"))) == 4  # new entries, the old ones kept
    assert not np.array_equal(base.parts[0], other.parts[0])
    # a source file changed after its entry was written: rebuilt from the new content
    raw = json.loads((data / "demo.json").read_text())
    from zoo.data.demo.deap import make_subject

    subject = make_subject(2, seed=raw["seed"] + 1, n_trials=4)
    import pickle

    with open(data / "s01.dat", "wb") as fh:
        pickle.dump(subject, fh, protocol=2)
    changed = _loaded(_dm(data, cache, subjects=[1, 2]))
    assert not np.array_equal(changed.parts[0], base.parts[0])
    fresh = _loaded(_dm(data, "off", subjects=[1, 2]))
    np.testing.assert_array_equal(changed.parts[0], fresh.parts[0])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_entry_is_detected_and_rebuilt_with_a_warning(deap_dir, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    good = np.array(_loaded(_dm(deap_dir, cache)).parts[0])
    (entry,) = cache.glob("s01-*.npy")
    raw = bytearray(entry.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # same size, one byte of the signal changed: only the checksum sees it
        raw[len(raw) // 2] ^= 0xFF
    entry.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="zoo.data.cache"):
        again = _loaded(_dm(deap_dir, cache))
    assert any("damaged" in r.message and "s01-" in r.message for r in caplog.records)
    np.testing.assert_array_equal(again.parts[0], good)


@pytest.mark.multiprocess
def test_two_processes_building_the_same_cache_share_the_work(deap_dir, tmp_path):
    """Two real processes start on an empty cache at once: each subject is built once, by
    one of them, and both read the same arrays."""
    cache = tmp_path / "cache"
    code = textwrap.dedent(
        f"""
        import json, sys
        from zoo.data import deap
        built = []
        original = deap.DeapDataModule._preprocess
        def counting(self, path):
            built.append(path.name)
            return original(self, path)
        deap.DeapDataModule._preprocess = counting
        dm = deap.DeapDataModule({str(deap_dir)!r}, cache={str(cache)!r}, protocol="loso")
        dm.setup()
        print(json.dumps({{"built": built, "sums": [float(p.sum()) for p in dm.trials.parts]}}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=240)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    built = sorted(results[0]["built"] + results[1]["built"])
    assert built == ["s01.dat", "s02.dat", "s03.dat"]  # each once, by one process or the other
    assert results[0]["sums"] == results[1]["sums"]
    assert not list(cache.glob(".*.tmp"))


def test_an_unwritable_cache_folder_is_one_paragraph_naming_it_and_the_key(deap_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError) as err:
        _loaded(_dm(deap_dir, blocker / "cache"))
    text = str(err.value)
    assert str(blocker / "cache") in text and "data.cache" in text and "\n" not in text


def test_statistics_are_streamed_from_the_training_trials_only(deap_dir, tmp_path):
    dm = _dm(deap_dir, tmp_path / "cache", test_subject=2)
    dm.setup()
    train_rows = np.unique(dm.datasets["train"].rows)
    whole = np.stack([dm.trials.signal(r) for r in train_rows]).astype(np.float64)
    mean, std = dm.norm_stats
    np.testing.assert_allclose(mean, whole.mean(axis=(0, 2)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(std, whole.std(axis=(0, 2)) + 1e-6, rtol=1e-10)
    assert 2 not in set(dm.trials.subject[train_rows].tolist())
    # trials given in any order, the same figures
    shuffled = channel_statistics(dm.trials, train_rows[::-1])
    np.testing.assert_allclose(shuffled[0], mean, rtol=1e-12)


def _model(channels: int, n_classes: int = 4) -> EEGEmotionClassifier:
    torch.manual_seed(0)
    net = CNNRecurrentNet(channels, n_classes, conv_channels=[8], hidden_size=8, dropout=0.0)
    opt = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    return EEGEmotionClassifier(net, opt, ["HVHA", "HVLA", "LVHA", "LVLA"])


def _fit_and_test(dm, tmp_path, name: str):
    L.seed_everything(0, workers=True)
    model = _model(len(dm.channel_names))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        limit_test_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path / name,
        deterministic=True,
    )
    trainer.fit(model, datamodule=dm)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    return model, trainer, metrics


def test_memory_map_and_in_memory_paths_train_to_the_same_bits(deap_dir, tmp_path):
    mapped = _dm(deap_dir, tmp_path / "cache", subjects=[1, 2], batch_size=16)
    memory = _dm(deap_dir, "off", subjects=[1, 2], batch_size=16)
    mapped.setup(), memory.setup()
    for split in ("train", "val", "test"):
        for i in (0, len(mapped.datasets[split]) // 2, len(mapped.datasets[split]) - 1):
            a, b = mapped.datasets[split][i], memory.datasets[split][i]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
    _, _, m1 = _fit_and_test(mapped, tmp_path, "mapped")
    model, _, m2 = _fit_and_test(memory, tmp_path, "memory")
    assert m1 == m2  # bit-equal metrics on a fixed seed
    # the model's first step is the z-score the data module used to apply to its signal
    x = mapped.datasets["test"][0][0][None]
    mean, std = mapped.norm_stats
    old = (x.numpy() - mean[None, :, None].astype(np.float32)) / std[None, :, None].astype(
        np.float32
    )
    ours = (x - model.input_mean[:, None]) / model.input_std[:, None]
    assert np.array_equal(ours.numpy(), old)


def test_the_statistics_travel_with_the_checkpoint(deap_dir, tmp_path):
    dm = _dm(deap_dir, tmp_path / "cache", subjects=[1, 2], batch_size=16)
    model, trainer, metrics = _fit_and_test(dm, tmp_path, "ckpt")
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    mean, std = dm.norm_stats
    assert torch.equal(state["input_mean"], torch.from_numpy(mean.astype(np.float32)))
    assert torch.equal(state["input_std"], torch.from_numpy(std.astype(np.float32)))
    fresh = _model(len(dm.channel_names))
    fresh.load_state_dict(state)  # no data module needed: the model standardises by itself
    x = dm.datasets["test"][0][0][None]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # a checkpoint from before the statistics lived in the model takes the data's at test time
    legacy = {k: v for k, v in state.items() if k not in ("input_mean", "input_std")}
    old = _model(len(dm.channel_names))
    old.load_state_dict(legacy)
    assert torch.equal(old.input_std, torch.ones_like(old.input_std))
    tester = L.Trainer(logger=False, enable_progress_bar=False, limit_test_batches=2)
    assert tester.test(old, datamodule=dm, verbose=False)[0] == metrics
    assert torch.equal(old.input_mean, state["input_mean"])


def test_the_matlab_distribution_reads_as_the_pickles(deap_dir, tmp_path):
    mat = tmp_path / "data_preprocessed_matlab"
    mat.mkdir()
    for s in (1, 2, 3):
        data, ratings = load_subject(deap_dir / f"s{s:02d}.dat")
        savemat(mat / f"s{s:02d}.mat", {"data": data, "labels": ratings})
    a = _loaded(_dm(mat, tmp_path / "cache-mat"))
    b = _loaded(_dm(deap_dir, tmp_path / "cache-dat"))
    assert DeapDataModule(str(mat)).file_format == "matlab"
    for x, y in zip(a.parts, b.parts):
        np.testing.assert_array_equal(x, y)
    savemat(mat / "s04.mat", {"data": np.zeros((2, 40, 100))[..., :10], "labels": np.zeros((2, 4))})
    with pytest.raises(DataError, match=r"s04\.mat: 'data' has shape"):
        load_subject(mat / "s04.mat")
    (mat / "s05.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match=r"s05\.mat: not a readable DEAP MATLAB file"):
        load_subject(mat / "s05.mat")


def test_folds_of_each_protocol_and_a_missing_subject(deap_dir, tmp_path):
    loso = _dm(deap_dir, "off").cross_validation()
    assert (loso.key, loso.values, loso.unavailable) == ("data.test_subject", [1, 2, 3], {})
    kfold = _dm(deap_dir, "off", protocol="trial_kfold", n_folds=4).cross_validation()
    assert (kfold.key, kfold.values) == ("data.fold", [0, 1, 2, 3])
    gap = _dm(deap_dir, "off", subjects=[1, 2, 3, 9]).cross_validation()
    assert gap.shared == ["data.subjects=[1,2,3]"]
    reason, overrides = gap.unavailable[9]
    assert "s09.dat: file not found" in reason and overrides == ["data.subjects=[1,2,3,9]"]
    assert os.path.isdir(deap_dir)
