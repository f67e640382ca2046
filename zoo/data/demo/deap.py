"""Write synthetic subjects in DEAP's exact ``data_preprocessed_python/sXX.dat`` format.

Each file is a pickle of ``{"data": float64 (40, 40, 8064), "labels": float64 (40, 4)}`` with the
real channel order and a 3 s pre-trial baseline. The EEG carries a learnable, physiologically
flavoured class structure: valence scales frontal alpha (8-12 Hz) power, arousal scales
central/parietal beta (16-26 Hz) power, on top of 1/f background noise, subject-specific channel
gains and per-trial DC offsets (removed by baseline subtraction). Nothing is learnable in the
baseline segment, only during the trial.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np

from zoo.data.deap_format import (
    ALL_CHANNELS,
    BASELINE_SAMPLES,
    EEG_CHANNELS,
    N_CHANNELS,
    N_SAMPLES,
    SFREQ,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
_FRONTAL = {"Fp1", "AF3", "F3", "F7", "FC5", "FC1", "Fp2", "AF4", "Fz", "F4", "F8", "FC6", "FC2"}
_CENTRO_PARIETAL = {"C3", "CP5", "CP1", "P3", "P7", "Pz", "Cz", "C4", "CP6", "CP2", "P4", "P8"}


def _band_noise(
    rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float
) -> np.ndarray:
    """Unit-variance noise restricted to [lo, hi] Hz (random-phase narrow-band oscillation)."""
    spec = np.fft.rfft(rng.standard_normal(shape), axis=-1)
    freqs = np.fft.rfftfreq(shape[-1], 1 / SFREQ)
    spec[..., (freqs < lo) | (freqs > hi)] = 0
    x = np.fft.irfft(spec, n=shape[-1], axis=-1)
    return x / (x.std(axis=-1, keepdims=True) + 1e-12)


def _pink_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(shape), axis=-1)
    freqs = np.fft.rfftfreq(shape[-1], 1 / SFREQ)
    spec[..., 1:] /= np.sqrt(freqs[1:])
    spec[..., 0] = 0
    x = np.fft.irfft(spec, n=shape[-1], axis=-1)
    return x / x.std(axis=-1, keepdims=True)


def make_subject(subject: int, seed: int = 0, n_trials: int = 40, effect: float = 0.6) -> dict:
    """One subject's dict, exactly as DEAP's pickles hold it."""
    rng = np.random.default_rng([seed, subject])
    quadrant = rng.permutation(np.arange(n_trials) % 4)  # balanced HVHA/HVLA/LVHA/LVLA
    high_v = np.isin(quadrant, (0, 1))
    high_a = np.isin(quadrant, (0, 2))
    ratings = np.empty((n_trials, 4))
    ratings[:, 0] = np.where(
        high_v, rng.uniform(5.2, 9.0, n_trials), rng.uniform(1.0, 4.8, n_trials)
    )
    ratings[:, 1] = np.where(
        high_a, rng.uniform(5.2, 9.0, n_trials), rng.uniform(1.0, 4.8, n_trials)
    )
    ratings[:, 2:] = rng.uniform(1.0, 9.0, (n_trials, 2))
    ratings = np.round(ratings, 2)

    n_eeg = len(EEG_CHANNELS)
    shape = (n_trials, n_eeg, N_SAMPLES)
    gain = rng.lognormal(0.0, 0.15, size=(1, n_eeg, 1))
    eeg = 8.0 * _pink_noise(rng, shape)
    alpha = _band_noise(rng, shape, 8.0, 12.0)
    beta = _band_noise(rng, shape, 16.0, 26.0)
    frontal = np.array([c in _FRONTAL for c in EEG_CHANNELS])[None, :, None]
    central = np.array([c in _CENTRO_PARIETAL for c in EEG_CHANNELS])[None, :, None]
    # class-dependent band power, only after the 3 s baseline
    in_trial = (np.arange(N_SAMPLES) >= BASELINE_SAMPLES)[None, None, :]
    alpha_amp = 3.0 * (1 + effect * (high_v[:, None, None] & frontal & in_trial))
    beta_amp = 2.0 * (1 + effect * (high_a[:, None, None] & central & in_trial))
    eeg = gain * (eeg + alpha_amp * alpha + beta_amp * beta)
    eeg += rng.normal(0, 20.0, size=(n_trials, n_eeg, 1))  # per-trial DC offsets

    t = np.arange(N_SAMPLES) / SFREQ
    periph = np.empty((n_trials, N_CHANNELS - n_eeg, N_SAMPLES))
    periph[:, 0:4] = 30.0 * _pink_noise(rng, (n_trials, 4, N_SAMPLES))  # EOG, EMG
    gsr_level = rng.uniform(500, 5000, (n_trials, 1)) * (1 + 0.2 * high_a[:, None])
    periph[:, 4] = gsr_level + np.cumsum(rng.normal(0, 2.0, (n_trials, N_SAMPLES)), axis=-1)
    resp_f = rng.uniform(0.2, 0.35, (n_trials, 1))
    periph[:, 5] = 1000 * np.sin(2 * np.pi * resp_f * t) + rng.normal(0, 20, (n_trials, N_SAMPLES))
    pulse_f = rng.uniform(1.0, 1.5, (n_trials, 1))
    periph[:, 6] = 500 * np.sin(2 * np.pi * pulse_f * t) ** 8 + rng.normal(
        0, 10, (n_trials, N_SAMPLES)
    )
    periph[:, 7] = rng.uniform(28, 34, (n_trials, 1)) + 0.001 * np.cumsum(
        rng.normal(0, 1, (n_trials, N_SAMPLES)), axis=-1
    )

    data = np.concatenate([eeg, periph], axis=1).astype(np.float64)
    assert data.shape == (n_trials, len(ALL_CHANNELS), N_SAMPLES)
    return {"labels": ratings, "data": data}


def write_demo_deap(
    out_dir: str | Path, n_subjects: int = 4, seed: int = 0, n_trials: int = 40, effect: float = 0.6
) -> list[Path]:
    """Write ``s01.dat`` ... into ``out_dir`` (skipped when an identical set is already there).
    Jobs started together take turns: the first writes, the others find its files (and so share
    one preprocessing cache entry, keyed by the files' modification times)."""
    from zoo.data.cache import file_lock

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / ".demo.lock"):
        return _write_demo_deap(out_dir, n_subjects, seed, n_trials, effect)


def _write_demo_deap(
    out_dir: Path, n_subjects: int, seed: int, n_trials: int, effect: float
) -> list[Path]:
    spec = {
        "generator": "zoo.data.demo.deap",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_trials": n_trials,
        "effect": effect,
    }
    manifest = out_dir / "demo.json"
    paths = [out_dir / f"s{s:02d}.dat" for s in range(1, n_subjects + 1)]
    done: list[int] = []
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if {k: old.get(k) for k in spec} == spec:
            done = old.get("subjects", [])
    todo = [s for s in range(1, n_subjects + 1) if s not in done or not paths[s - 1].is_file()]
    if not todo:
        return paths
    log.info("Writing %d demo DEAP subject file(s) to %s", len(todo), out_dir)
    from tqdm.auto import tqdm

    for s in tqdm(todo, desc="demo DEAP subjects", unit="subject", leave=False):
        tmp = out_dir / f".s{s:02d}.dat.{os.getpid()}.tmp"
        with tmp.open("wb") as fh:
            pickle.dump(
                make_subject(s, seed, n_trials, effect), fh, protocol=2
            )  # as DEAP (Python 2)
        tmp.replace(paths[s - 1])
        done = sorted(set(done) | {s})
        manifest.write_text(json.dumps({**spec, "subjects": done}, indent=1))
    return paths
