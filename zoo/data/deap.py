"""DEAP EEG emotion dataset: safe loading, preprocessing, leak-free splits, Lightning data module.

DEAP (Koelstra et al., 2012) ships ``data_preprocessed_python/sXX.dat``: one Python pickle per
subject holding a dict with ``data`` (40 trials x 40 channels x 8064 samples at 128 Hz; the first
384 samples are a 3 s pre-trial baseline; channels 0-31 EEG, 32-39 peripheral) and ``labels``
(40 x 4: valence, arousal, dominance, liking, floats in 1-9). Its other official distribution,
``data_preprocessed_matlab/sXX.mat``, holds the same two arrays; both are read here.

At full size (32 subjects) the preprocessed float32 signal is 1.2 GB. It is computed once per
subject into a cache (``zoo.data.cache``: keyed by the source file and every preprocessing
option, shared safely by concurrent jobs) and read back by memory map; windows are index ranges
into it, and the per-channel normalisation is the model's first step (statistics of the training
split, streamed in float64, carried by the checkpoint), so a job's memory does not grow with
the number of subjects.
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import signal
from torch.utils.data import Dataset

from zoo.data.base import FoldPlan, SplitDataModule
from zoo.data.cache import ArrayCache, cache_folder, file_fingerprint
from zoo.data.deap_format import (  # noqa: F401  (re-exported: the format's names)
    ALL_CHANNELS,
    BASELINE_SAMPLES,
    EEG_CHANNELS,
    LABEL_COLUMNS,
    N_CHANNELS,
    N_LABELS,
    N_SAMPLES,
    PERIPHERAL_CHANNELS,
    SFREQ,
)
from zoo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CLASS_NAMES = {
    "quadrant": ["HVHA", "HVLA", "LVHA", "LVLA"],
    "valence": ["LV", "HV"],
    "arousal": ["LA", "HA"],
}
PROTOCOLS = ("trial_kfold", "loso", "cross_subject", "random_windows")


def resolve_channels(spec: Any) -> list[str]:
    """Channel names for a preset ('eeg', 'peripheral', 'all') or an explicit list of names."""
    presets = {"eeg": EEG_CHANNELS, "peripheral": PERIPHERAL_CHANNELS, "all": ALL_CHANNELS}
    if isinstance(spec, str):
        if spec not in presets:
            raise ConfigError(
                f"data.channels={spec!r}: expected one of {sorted(presets)} or a list of channel "
                "names"
            )
        return list(presets[spec])
    names = [str(c) for c in spec]
    unknown = [c for c in names if c not in ALL_CHANNELS]
    if unknown:
        raise ConfigError(
            f"data.channels: unknown DEAP channel(s) {unknown}; known: {ALL_CHANNELS}"
        )
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"data.channels must be a non-empty list without repeats, got {names}")
    return names


def target_class_names(target: str) -> list[str]:
    if target not in CLASS_NAMES:
        raise ConfigError(f"data.target={target!r}: expected one of {sorted(CLASS_NAMES)}")
    return list(CLASS_NAMES[target])


def make_labels(ratings: np.ndarray, target: str, threshold: float = 5.0) -> np.ndarray:
    """Class ids from (trials, 4) ratings: high = rating > threshold.

    quadrant: 0 HVHA, 1 HVLA, 2 LVHA, 3 LVLA; valence/arousal: 0 low, 1 high.
    """
    high_v = ratings[:, 0] > threshold
    high_a = ratings[:, 1] > threshold
    if target == "quadrant":
        return np.where(high_v, np.where(high_a, 0, 1), np.where(high_a, 2, 3)).astype(np.int64)
    if target == "valence":
        return high_v.astype(np.int64)
    if target == "arousal":
        return high_a.astype(np.int64)
    raise ConfigError(f"data.target={target!r}: expected one of {sorted(CLASS_NAMES)}")


# --------------------------------------------------------------------------- safe loading


class _DeapUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (plus dicts/lists/str/numbers, which need no
    globals). Any other global, e.g. ``os.system``, is refused before anything runs."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # DEAP was pickled by Python 2
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode  # how protocol-2 pickles from Python 3 store raw bytes
        if (module, name) not in self._ALLOWED:
            raise DataError(
                f"{self._path}: refusing to unpickle '{module}.{name}'. DEAP files hold only "
                "dicts and numpy arrays; this file is not a DEAP file or may be malicious."
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.split(".", 2)[2]  # numpy>=2 renamed numpy.core
        return super().find_class(module, name)

    def _latin1_encode(self, text: str, encoding: str = "utf-8") -> bytes:
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise DataError(
                f"{self._path}: refusing to unpickle '_codecs.encode' with encoding {encoding!r}"
            )
        return text.encode("latin1")

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: unexpected persistent id in pickle; refusing to load")


def _read_matlab(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        obj = loadmat(path)
    except Exception as exc:  # truncated file, not a MAT file
        raise DataError(
            f"{path}: not a readable DEAP MATLAB file ({type(exc).__name__}: {exc})"
        ) from None
    # MATLAB stores arrays column-major: the C order of the pickles makes the filter's sums
    # (and so the cached signal) the same to the bit
    return {
        k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v
        for k, v in obj.items()
        if not k.startswith("__")
    }


def _read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            unpickler = _DeapUnpickler(fh, path)
            try:
                return unpickler.load()
            finally:
                # the memo holds every array, and a bound method of the unpickler: a cycle that
                # would keep each subject's raw data alive until the next garbage collection
                unpickler.memo.clear()
    except DataError:
        raise
    except Exception as exc:  # truncated/corrupt pickle, wrong file type
        raise DataError(
            f"{path}: not a readable DEAP pickle ({type(exc).__name__}: {exc})"
        ) from None


def load_subject(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one DEAP subject file safely and validate it; returns (data, ratings). ``sXX.dat``
    is read as DEAP's Python pickle (only numpy arrays are rebuilt), ``sXX.mat`` with
    ``scipy.io.loadmat``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: DEAP subject file not found")
    obj = _read_matlab(path) if path.suffix == ".mat" else _read_pickle(path)
    if not isinstance(obj, dict) or not {"data", "labels"} <= set(obj):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: expected a dict with keys 'data' and 'labels', got {keys}")
    data, ratings = obj["data"], obj["labels"]
    for key, arr in (("data", data), ("labels", ratings)):
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
            raise DataError(
                f"{path}: '{key}' must be a numeric numpy array, got {type(arr).__name__}"
            )
    if data.ndim != 3 or data.shape[1] != N_CHANNELS or data.shape[2] <= BASELINE_SAMPLES:
        raise DataError(
            f"{path}: 'data' has shape {data.shape}, expected (trials, {N_CHANNELS}, {N_SAMPLES})"
        )
    if ratings.shape != (data.shape[0], N_LABELS):
        raise DataError(
            f"{path}: 'labels' has shape {ratings.shape}, expected ({data.shape[0]}, {N_LABELS})"
        )
    for key, arr in (("data", data), ("labels", ratings)):
        bad = ~np.isfinite(arr)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(
                f"{path}: '{key}' contains {int(bad.sum())} NaN/inf values (first at index {where})"
            )
    return data, ratings.astype(np.float64)


FORMATS = {"python": ".dat", "matlab": ".mat"}  # data_preprocessed_python | _matlab


def resolve_format(data_dir: Path, fmt: str = "auto") -> str:
    """``python`` or ``matlab``; ``auto``: the format of the files in ``data_dir`` (.dat first)."""
    if fmt == "auto":
        for name, suffix in FORMATS.items():
            if any(Path(data_dir).glob(f"s[0-9][0-9]{suffix}")):
                return name
        return "python"
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}: expected auto, {' or '.join(FORMATS)}")
    return fmt


def subject_path(data_dir: Path, subject: int, fmt: str = "python") -> Path:
    return Path(data_dir) / f"s{subject:02d}{FORMATS[fmt]}"


def discover_subjects(data_dir: Path, fmt: str = "python") -> list[int]:
    pattern = f"s[0-9][0-9]{FORMATS[fmt]}"
    return [int(p.stem[1:]) for p in sorted(Path(data_dir).glob(pattern))]


# --------------------------------------------------------------------------- preprocessing


def preprocess_trials(
    data: np.ndarray,
    channel_idx: list[int],
    baseline: str = "subtract_mean",
    bandpass: tuple[float, float] | None = (4.0, 45.0),
    filter_order: int = 4,
) -> np.ndarray:
    """(trials, 40, samples) raw -> (trials, C, samples - baseline) float32."""
    x = data[:, channel_idx, :].astype(np.float64)
    if baseline == "subtract_mean":
        x = x - x[:, :, :BASELINE_SAMPLES].mean(axis=-1, keepdims=True)
    elif baseline != "none":
        raise ConfigError(f"data.baseline={baseline!r}: expected 'subtract_mean' or 'none'")
    x = x[:, :, BASELINE_SAMPLES:]
    if bandpass is not None:
        lo, hi = float(bandpass[0]), float(bandpass[1])
        if not 0 < lo < hi < SFREQ / 2:
            raise ConfigError(f"data.bandpass={[lo, hi]}: need 0 < low < high < {SFREQ / 2} Hz")
        sos = signal.butter(filter_order, [lo, hi], btype="bandpass", fs=SFREQ, output="sos")
        x = signal.sosfiltfilt(sos, x, axis=-1)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- splits


CACHE_FORMAT = 1  # bump when what preprocess_trials writes changes


class Trials:
    """All loaded trials, one row per (subject, trial). The signal stays in one array per
    subject file (a memory map of its cache entry, or in memory with ``data.cache=off``);
    a row is an index into them, never a copy."""

    def __init__(
        self,
        parts: list[np.ndarray],
        subject: np.ndarray,
        trial: np.ndarray,
        label: np.ndarray,
        part: np.ndarray,
        paths: list[Path | None] | None = None,
    ):
        self.parts = parts  # per subject file: (trials, C, S) float32
        self.subject, self.trial, self.label, self.part = subject, trial, label, part
        self.paths = paths or [None] * len(parts)  # the cache file of a memory-mapped part

    def __len__(self) -> int:
        return len(self.label)

    @property
    def n_channels(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def n_samples(self) -> int:
        return int(self.parts[0].shape[2])

    def signal(self, row: int) -> np.ndarray:
        """One whole trial (C, S), a view into its part."""
        return self.parts[self.part[row]][self.trial[row]]

    def rows_by_part(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``rows`` grouped by the part (subject file) they live in: (part, trial indices)."""
        rows = np.asarray(rows)
        for p in np.unique(self.part[rows]):
            yield int(p), np.sort(self.trial[rows[self.part[rows] == p]])

    def __getstate__(self) -> dict:
        """Memory-mapped parts travel as their paths (to spawned DataLoader workers), not as
        copies of the signal."""
        state = dict(self.__dict__)
        state["parts"] = [
            None if path is not None else arr for arr, path in zip(self.parts, self.paths)
        ]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.parts = [
            np.load(path, mmap_mode="r") if arr is None else arr
            for arr, path in zip(self.parts, self.paths)
        ]


def channel_statistics(trials: Trials, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (+1e-6) of the trials ``rows``, streamed one
    subject file at a time with float64 accumulators (Chan et al.'s pairwise update): the
    training signal is never gathered into one array."""
    n, mean, m2 = 0, np.zeros(trials.n_channels), np.zeros(trials.n_channels)
    for p, idx in trials.rows_by_part(rows):
        x = np.asarray(trials.parts[p][idx], dtype=np.float64)  # one subject's chosen trials
        k = x.shape[0] * x.shape[2]
        mu = x.mean(axis=(0, 2))
        chunk_m2 = ((x - mu[None, :, None]) ** 2).sum(axis=(0, 2))
        delta, total = mu - mean, n + k
        mean = mean + delta * (k / total)
        m2 = m2 + chunk_m2 + delta**2 * (n * k / total)
        n = total
        del x
    if n == 0:
        raise ConfigError("the training split is empty: no normalisation statistics")
    return mean, np.sqrt(m2 / n) + 1e-6


def _stratified_folds(labels: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold id per item, balanced per class."""
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        folds[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)
    return folds


def split_trials(
    trials: Trials,
    protocol: str,
    *,
    n_folds: int = 5,
    fold: int = 0,
    test_subject: int | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """Assign every trial to a split: returns an array of 'train' / 'val' / 'test'.

    Every protocol splits whole trials, so no window of a trial can land in two splits.
    """
    rng = np.random.default_rng(seed)
    n = len(trials.label)
    split = np.full(n, "train", dtype=object)
    subjects = np.unique(trials.subject)
    if protocol == "trial_kfold":
        if not 3 <= n_folds or not 0 <= fold < n_folds:
            raise ConfigError(
                f"data.n_folds={n_folds}, data.fold={fold}: need n_folds >= 3 and 0 <= fold < "
                "n_folds"
            )
        for s in subjects:
            rows = np.flatnonzero(trials.subject == s)
            folds = _stratified_folds(trials.label[rows], n_folds, rng)
            split[rows[folds == fold]] = "test"
            split[rows[folds == (fold + 1) % n_folds]] = "val"
    elif protocol == "loso":
        if len(subjects) < 2:
            raise ConfigError(
                f"data.protocol=loso needs at least 2 subjects, got {subjects.tolist()}"
            )
        test_subject = int(subjects[0]) if test_subject is None else int(test_subject)
        if test_subject not in subjects:
            raise ConfigError(
                f"data.test_subject={test_subject} is not among the loaded subjects "
                f"{subjects.tolist()}"
            )
        split[trials.subject == test_subject] = "test"
        for s in subjects[subjects != test_subject]:
            rows = np.flatnonzero(trials.subject == s)
            n_val = max(1, round(val_fraction * len(rows)))
            split[rng.permutation(rows)[:n_val]] = "val"
    elif protocol == "cross_subject":
        if len(subjects) < 3:
            raise ConfigError(
                f"data.protocol=cross_subject needs at least 3 subjects, got {subjects.tolist()}"
            )
        order = rng.permutation(subjects)
        n_test = max(1, round(test_fraction * len(order)))
        n_val = max(1, round(val_fraction * len(order)))
        split[np.isin(trials.subject, order[:n_test])] = "test"
        split[np.isin(trials.subject, order[n_test : n_test + n_val])] = "val"
    else:
        raise ConfigError(f"data.protocol={protocol!r}: expected one of {list(PROTOCOLS)}")
    for name in ("train", "val", "test"):
        if not (split == name).any():
            raise ConfigError(
                f"data.protocol={protocol}: the '{name}' split is empty with these settings"
            )
    return split


class EEGWindows(Dataset):
    """Fixed-length windows cut on the fly from whole preprocessed trials: a window is a
    (row, start) pair, its samples are read from the trial's array when asked for."""

    def __init__(self, trials: Trials, rows: np.ndarray, window: int, step: int):
        self.trials = trials
        starts = np.arange(0, trials.n_samples - window + 1, step)
        self.rows = np.repeat(rows, len(starts))
        self.starts = np.tile(starts, len(rows))
        self.window = window

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r, s = self.rows[i], self.starts[i]
        x = np.array(self.trials.signal(r)[:, s : s + self.window])  # one window, writable
        return torch.from_numpy(x), int(self.trials.label[r])

    @property
    def labels(self) -> np.ndarray:
        return self.trials.label[self.rows]

    @property
    def trial_keys(self) -> set[tuple[int, int]]:
        """(subject, trial) of every window: used to prove splits do not leak."""
        return set(
            zip(self.trials.subject[self.rows].tolist(), self.trials.trial[self.rows].tolist())
        )


class _RandomWindowSubset(Dataset):
    def __init__(self, base: EEGWindows, index: np.ndarray):
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.base[int(self.index[i])]

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.index]

    @property
    def trial_keys(self) -> set[tuple[int, int]]:
        rows = self.base.rows[self.index]
        t = self.base.trials
        return set(zip(t.subject[rows].tolist(), t.trial[rows].tolist()))


# --------------------------------------------------------------------------- data module


CACHE_PLACES = ("beside", "zoo_cache", "off")


class DeapDataModule(SplitDataModule):
    """DEAP windows for emotion classification with leak-free evaluation protocols.

    ``demo`` (a writer such as ``zoo.data.demo.deap.write_demo_deap``, injected) writes
    DEAP-format files into ``data_dir`` first, so the demo goes through exactly the loader used
    for the real dataset.

    ``cache`` chooses where the preprocessed signal is kept: ``beside`` the data
    (``<data_dir>/.zoo-cache``), under ``zoo_cache`` (``$ZOO_CACHE_DIR/deap``), in a folder
    given by path, or ``off`` (preprocessed in memory by every job, as before the cache).
    The windows it serves are not normalised: ``norm_stats`` (per-channel mean and sd of the
    training split) are what the model standardises its input with.
    """

    sample_unit = "windows"
    digest_keys = ("data.protocol",)  # shown in a report's config digest

    def __init__(
        self,
        data_dir: str,
        subjects: list[int] | None = None,
        channels: str | list[str] = "eeg",
        target: str = "quadrant",
        threshold: float = 5.0,
        baseline: str = "subtract_mean",
        bandpass: list[float] | None = (4.0, 45.0),
        filter_order: int = 4,
        window_seconds: float = 2.0,
        overlap: float = 0.5,
        normalize: bool = True,
        protocol: str = "trial_kfold",
        n_folds: int = 5,
        fold: int = 0,
        test_subject: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        allow_leaky_split: bool = False,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        subset: int | None = None,
        format: str = "auto",
        cache: str = "beside",
        cache_verify: bool = True,
        demo: Callable[..., object] | None = None,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        num_channels: int | None = None,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.channel_names = resolve_channels(channels)
        self.class_names = target_class_names(target)
        for key, given, derived in (
            ("class_names", class_names, self.class_names),
            ("num_classes", num_classes, len(self.class_names)),
            ("num_channels", num_channels, len(self.channel_names)),
        ):
            if given is not None and (list(given) if key == "class_names" else given) != derived:
                raise ConfigError(
                    f"data.{key}={given!r} does not match data.target/channels (expected "
                    f"{derived!r})"
                )
        if protocol not in PROTOCOLS:
            raise ConfigError(f"data.protocol={protocol!r}: expected one of {list(PROTOCOLS)}")
        if protocol == "random_windows" and not allow_leaky_split:
            raise ConfigError(
                "data.protocol=random_windows splits windows of the same trial across train and "
                "test "
                "(overlapping windows leak); set data.allow_leaky_split=true to use it anyway."
            )
        if not 0 <= overlap < 1:
            raise ConfigError(f"data.overlap={overlap}: must be in [0, 1)")
        if format != "auto" and format not in FORMATS:
            raise ConfigError(f"data.format={format!r}: expected auto, {' or '.join(FORMATS)}")
        if not str(cache):
            raise ConfigError(f"data.cache: expected one of {list(CACHE_PLACES)} or a folder")
        self.window = int(round(window_seconds * SFREQ))
        self.step = max(1, int(round(self.window * (1 - overlap))))
        if not 8 <= self.window <= N_SAMPLES - BASELINE_SAMPLES:
            raise ConfigError(
                f"data.window_seconds={window_seconds}: window must be "
                f"8..{N_SAMPLES - BASELINE_SAMPLES} samples"
            )
        self.subjects, self.subset, self.target, self.threshold = (
            subjects,
            subset,
            target,
            threshold,
        )
        self.baseline, self.filter_order, self.normalize = baseline, filter_order, normalize
        self.bandpass = tuple(bandpass) if bandpass is not None else None
        self.protocol, self.allow_leaky_split = protocol, allow_leaky_split
        self.split_kwargs = dict(
            n_folds=n_folds,
            fold=fold,
            test_subject=test_subject,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=split_seed,
        )
        self.format, self.cache, self.cache_verify = format, str(cache), bool(cache_verify)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.demo = demo
        self.datasets: dict[str, Dataset] = {}
        self._train_rows: np.ndarray | None = None
        self._norm_stats: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def file_format(self) -> str:
        return resolve_format(self.data_dir, self.format)

    def _subject_list(self) -> list[int]:
        if self.subjects is not None:
            subjects = [int(s) for s in self.subjects]
        else:
            subjects = discover_subjects(self.data_dir, self.file_format)
            if not subjects:
                raise DataError(
                    f"{self.data_dir}: no DEAP subject files (s01.dat ... s32.dat, or "
                    "s01.mat ... s32.mat) found"
                )
        if self.subset is not None:
            subjects = subjects[: int(self.subset)]
        return subjects

    def _write_demo_subjects(self) -> None:
        if self.demo is not None:
            options = {}
            if self.subset is not None:  # only build what will be read
                n = getattr(self.demo, "keywords", {}).get("n_subjects", self.subset)
                options["n_subjects"] = min(int(n), int(self.subset))
            self.write_demo(**options)

    def prepare_data(self) -> None:
        self._write_demo_subjects()
        if not self.data_dir.is_dir():
            raise DataError(
                f"data.data_dir={self.data_dir}: directory not found (expected DEAP's "
                "data_preprocessed_python or data_preprocessed_matlab folder)"
            )
        fmt = self.file_format
        missing = [
            str(subject_path(self.data_dir, s, fmt))
            for s in self._subject_list()
            if not subject_path(self.data_dir, s, fmt).is_file()
        ]
        if missing:
            raise DataError(f"missing DEAP subject file(s): {', '.join(missing)}")

    # ------------------------------------------------------------------ reading

    def cross_validation(self) -> FoldPlan:
        """The folds of the protocol: ``data.test_subject`` over the subjects (loso), or
        ``data.fold`` over ``data.n_folds`` (trial_kfold). A LOSO fold whose subject file is
        missing cannot run; the others then train on the subjects that are there."""
        if self.protocol == "trial_kfold":
            return FoldPlan("data.fold", list(range(int(self.split_kwargs["n_folds"]))))
        if self.protocol != "loso":
            raise ConfigError(
                f"data.protocol={self.protocol}: a cross-validation study needs "
                "data.protocol=loso or trial_kfold (the other protocols have one split, not folds)"
            )
        self._write_demo_subjects()
        subjects, fmt = self._subject_list(), self.file_format
        present = [s for s in subjects if subject_path(self.data_dir, s, fmt).is_file()]
        if len(present) == len(subjects):
            return FoldPlan("data.test_subject", subjects)
        listed = lambda ss: "data.subjects=[" + ",".join(map(str, sorted(ss))) + "]"  # noqa: E731
        return FoldPlan(
            "data.test_subject",
            subjects,
            shared=[listed(present)],
            unavailable={
                s: (
                    f"{subject_path(self.data_dir, s, fmt)}: file not found",
                    [listed([*present, s])],
                )
                for s in subjects
                if s not in present
            },
        )

    def cache_root(self) -> Path | None:
        """The folder of the preprocessed-signal cache (None: data.cache=off)."""
        return cache_folder(self.cache, self.data_dir, "deap")

    def preprocessing_options(self) -> dict[str, Any]:
        """Everything the cached signal depends on besides its source file."""
        return {
            "format_version": CACHE_FORMAT,
            "channels": self.channel_names,
            "baseline": self.baseline,
            "bandpass": list(self.bandpass) if self.bandpass is not None else None,
            "filter_order": int(self.filter_order),
            "dtype": "float32",
        }

    def _preprocess(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        channel_idx = [ALL_CHANNELS.index(c) for c in self.channel_names]
        data, ratings = load_subject(path)
        x = preprocess_trials(data, channel_idx, self.baseline, self.bandpass, self.filter_order)
        return x, ratings

    def load_trials(self) -> Trials:
        """Every subject's preprocessed trials: from the cache (built on a miss, one subject at
        a time) as memory maps, or preprocessed in memory with data.cache=off."""
        fmt, root = self.file_format, self.cache_root()
        cache = ArrayCache(root, "data.cache", verify=self.cache_verify) if root else None
        parts, paths, subject, trial, label, part = [], [], [], [], [], []
        subjects = self._subject_list()
        started = time.perf_counter()
        for i, s in enumerate(_progress(subjects, "DEAP subjects")):
            path = subject_path(self.data_dir, s, fmt)
            if cache is None:
                x, ratings = self._preprocess(path)
                paths.append(None)
            else:
                source = file_fingerprint(path)
                if self.cache != "beside":  # a shared folder: two datasets may share names
                    source["path"] = str(path.resolve())

                def build(path=path):
                    x, ratings = self._preprocess(path)
                    return x, {"ratings": ratings.tolist()}

                key = {"source": source, **self.preprocessing_options()}
                x, extra = cache.load_or_build(path.stem, key, build)
                ratings = np.asarray(extra["ratings"], dtype=np.float64)
                paths.append(Path(x.filename))
            parts.append(x)
            subject.append(np.full(len(x), s))
            trial.append(np.arange(len(x)))
            label.append(make_labels(ratings, self.target, self.threshold))
            part.append(np.full(len(x), i))
        if cache is not None:
            log.info(
                "DEAP: %d subject(s) read in %.1f s (cache %s: %d hit, %d built)",
                len(subjects),
                time.perf_counter() - started,
                root,
                cache.hits,
                cache.misses,
            )
        return Trials(
            parts,
            np.concatenate(subject),
            np.concatenate(trial),
            np.concatenate(label),
            np.concatenate(part),
            paths,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.data_dir.is_dir():
            self.prepare_data()  # e.g. setup() called directly, outside a Trainer
        trials = self.load_trials()
        if self.protocol == "random_windows":
            warnings.warn(
                "data.protocol=random_windows: windows of one trial are spread over "
                "train/val/test; "
                "test scores will be optimistic (leaky split).",
                stacklevel=2,
            )
            all_windows = EEGWindows(trials, np.arange(len(trials)), self.window, self.step)
            perm = np.random.default_rng(self.split_kwargs["seed"]).permutation(len(all_windows))
            n_test = int(len(perm) * self.split_kwargs["test_fraction"])
            n_val = int(len(perm) * self.split_kwargs["val_fraction"])
            index = {
                "test": perm[:n_test],
                "val": perm[n_test : n_test + n_val],
                "train": perm[n_test + n_val :],
            }
            self._train_rows = np.unique(all_windows.rows[index["train"]])
            self.datasets = {k: _RandomWindowSubset(all_windows, v) for k, v in index.items()}
        else:
            split = split_trials(trials, self.protocol, **self.split_kwargs)
            self._train_rows = np.flatnonzero(split == "train")
            self.datasets = {
                k: EEGWindows(trials, np.flatnonzero(split == k), self.window, self.step)
                for k in ("train", "val", "test")
            }
        self.trials = trials

    @property
    def norm_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel (mean, sd) of the training trials, float64, or None with
        data.normalize=false; computed on first use (a test-only job never needs them)."""
        if not self.normalize:
            return None
        if self._norm_stats is None:
            self.setup()
            self._norm_stats = channel_statistics(self.trials, self._train_rows)
        return self._norm_stats

    def preprocessing_spec(self) -> dict[str, Any]:
        """What turns a raw DEAP trial into the model's windows (the model keeps it; the
        normalisation statistics travel as its buffers)."""
        return {
            "channels": list(self.channel_names),
            "baseline": self.baseline,
            "bandpass": list(self.bandpass) if self.bandpass is not None else None,
            "filter_order": int(self.filter_order),
            "window": int(self.window),
            "step": int(self.step),
            "sfreq": SFREQ,
            "baseline_samples": BASELINE_SAMPLES,
            "class_names": list(self.class_names),
            "target": self.target,
            "threshold": float(self.threshold),
        }

    def raw_example(self) -> np.ndarray:
        """The first trial of the first subject file, (1, 40, samples) float32, cut to its
        baseline and two windows (a small input example for the logged model)."""
        path = subject_path(self.data_dir, self._subject_list()[0], self.file_format)
        data, _ = load_subject(path)
        keep = BASELINE_SAMPLES + self.window + self.step
        return np.ascontiguousarray(data[:1, :, :keep], dtype=np.float32)

    def test_windows(self) -> dict[str, np.ndarray] | None:
        """(subject, trial, start, label) of every test window, in the test loader's order."""
        ds = self.datasets.get("test")
        if isinstance(ds, _RandomWindowSubset):
            rows, starts = ds.base.rows[ds.index], ds.base.starts[ds.index]
        elif isinstance(ds, EEGWindows):
            rows, starts = ds.rows, ds.starts
        else:
            return None
        return {
            "subject": self.trials.subject[rows],
            "trial": self.trials.trial[rows],
            "start": starts,
            "label": self.trials.label[rows],
        }

    def dataset_files(self, split: str) -> list[Path]:
        """The subject files the splits are read from (not the cache beside them)."""
        fmt = self.file_format
        return [subject_path(self.data_dir, s, fmt) for s in self._subject_list()]

    def summary(self) -> dict[str, Any]:
        """What a report needs to describe the data: sizes, class balance, protocol."""
        self.setup()
        out: dict[str, Any] = {
            "dataset": "DEAP (demo, generated in DEAP format)" if self.demo else "DEAP",
            "data_dir": str(self.data_dir),
            "subjects": [int(s) for s in np.unique(self.trials.subject)],
            "channels": f"{len(self.channel_names)} ({', '.join(self.channel_names[:4])}, ...)",
            "target": self.target,
            "window": f"{self.window} samples ({self.window / SFREQ:g} s), step {self.step}",
            "protocol": self.protocol,
        }
        for split, ds in self.datasets.items():
            counts = Counter(ds.labels.tolist())
            per_class = ", ".join(f"{n}={counts.get(i, 0)}" for i, n in enumerate(self.class_names))
            out[f"{split} windows"] = f"{len(ds)} from {len(ds.trial_keys)} trials ({per_class})"
        return out


def _progress(items: list, desc: str):
    """A progress bar over the subjects when there are many (real DEAP: 32)."""
    if len(items) < 4:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="subject", leave=False)
