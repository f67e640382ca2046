"""DEAP EEG emotion recognition: 1D-CNN + LSTM / GRU classifiers of valence-arousal quadrants
(HVHA / HVLA / LVHA / LVLA) or binary valence / arousal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.errors import DataError
from zoo.inference import Item, RawInputs, TableWriter
from zoo.models.classification import ClassificationModule
from zoo.outputs import File, Section

NORM_KEYS = ("input_mean", "input_std")
TEST_TRIALS_ARTIFACT = "predictions/test_trials.csv"


def _in_channels(net: nn.Module) -> int:
    """The number of input channels of an EEG network (its ``in_channels``, or its first
    convolution's)."""
    if isinstance(getattr(net, "in_channels", None), int):
        return int(net.in_channels)
    for module in net.modules():
        if isinstance(module, nn.Conv1d):
            return int(module.in_channels)
    raise ValueError(f"{type(net).__name__}: cannot tell its number of input channels")


class EEGEmotionClassifier(ClassificationModule):
    """Windows of multichannel EEG [B, C, T] -> emotion class.

    The network (``zoo.models.components.eeg_nets.CNNRecurrentNet`` with ``rnn=lstm`` or ``gru``)
    is injected from the config, so the LSTM and GRU variants share every line of training code.

    The input is standardised per channel as the first step of ``forward``, with the training
    split's statistics held in the buffers ``input_mean`` / ``input_std``: they are set from
    the data module when fitting starts, and travel in every checkpoint and logged model, so a
    trained model takes windows as the data module (and a user) has them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        channels = _in_channels(self.net)
        self.register_buffer("input_mean", torch.zeros(channels))
        self.register_buffer("input_std", torch.ones(channels))
        self._stats_from_data = False  # a checkpoint from before the buffers: take the data's
        self._register_load_state_dict_pre_hook(self._fill_missing_stats)

    def _fill_missing_stats(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before the statistics moved into the model were trained on
        windows the data module had standardised: load them with the data's statistics."""
        missing = [k for k in NORM_KEYS if prefix + k not in state_dict]
        if missing:
            for k in missing:
                state_dict[prefix + k] = getattr(self, k).detach().clone()
            self._stats_from_data = True

    def set_input_stats(self, stats: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Per-channel (mean, sd) to standardise the input with (None: none)."""
        channels = self.input_mean.numel()
        if stats is None:
            mean, std = np.zeros(channels), np.ones(channels)
        else:
            mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in stats)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(
                f"normalisation statistics for {mean.shape[0]} channels, the network takes "
                f"{channels}"
            )
        with torch.no_grad():  # float32, as the data module's windows
            self.input_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
            self.input_std.copy_(torch.from_numpy(std.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean[:, None]) / self.input_std[:, None]
        return self.net(x)

    def _stats_of_datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "norm_stats"):
            self.set_input_stats(dm.norm_stats)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        if names is not None and list(names) != self.class_names:
            raise ValueError(
                f"model.class_names={self.class_names} but the data module yields {list(names)}"
            )
        self._stats_of_datamodule()

    def on_test_start(self) -> None:
        if self._stats_from_data:
            self._stats_of_datamodule()
        self._test_probs: list[torch.Tensor] = []

    def on_test_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is not None:
            self._test_probs.append(outputs.detach().float().softmax(-1).cpu())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._emit_test_trials()

    def _emit_test_trials(self) -> None:
        """Per-trial answers of the test split (mean window probability, window votes): the
        same records ``predict.py`` writes for a DEAP file, so the two can be compared."""
        dm = getattr(self.trainer, "datamodule", None)
        windows = dm.test_windows() if hasattr(dm, "test_windows") else None
        if windows is None or not self._test_probs or self.trainer.world_size > 1:
            return
        probs = torch.cat(self._test_probs).numpy()
        self._test_probs = []
        n = len(probs)  # limit_test_batches: a prefix of the split
        keys = np.stack([windows["subject"], windows["trial"]], axis=1)
        trials, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        rows = []
        for i, (subject, trial) in enumerate(trials):
            mine = np.flatnonzero(inverse == i)
            if mine.max() >= n:  # a trial the test did not see whole
                continue
            record = trial_record(probs[mine], self.class_names)
            label = self.class_names[int(windows["label"][first[i]])]
            rows.append({"subject": int(subject), "trial": int(trial), "label": label, **record})
        if not rows:
            return
        correct = sum(r["prediction"] == r["label"] for r in rows)
        section = Section("Per-trial predictions")
        section.paragraph(
            f"{len(rows)} test trials, each answered by its windows' mean class probability "
            f"(and counted window votes): trial accuracy {correct / len(rows):.4f}. The table is "
            f"{TEST_TRIALS_ARTIFACT}; predict.py writes the same columns for a DEAP file."
        )
        section.metrics["test/trial_acc"] = correct / len(rows)
        self.emit(section, File(TEST_TRIALS_ARTIFACT, write=_csv_writer(rows)))

    def raw_inputs(self) -> EEGTrials:
        return EEGTrials(self)


def trial_record(window_probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """One trial's answer from its windows' class probabilities [windows, classes]: the class of
    the highest mean probability, the mean probabilities and each class's window votes."""
    mean = window_probs.mean(axis=0)
    votes = np.bincount(window_probs.argmax(axis=1), minlength=len(class_names))
    return {
        "prediction": class_names[int(mean.argmax())],
        "windows": len(window_probs),
        **{f"prob_{c}": float(p) for c, p in zip(class_names, mean)},
        **{f"votes_{c}": int(v) for c, v in zip(class_names, votes)},
    }


def _csv_writer(rows: list[dict[str, Any]]):
    import pandas as pd

    return lambda path: pd.DataFrame.from_records(rows).to_csv(path, index=False)


class EEGTrials(RawInputs):
    """Raw DEAP trials: (40 channels, or the model's channels) x samples at 128 Hz, starting
    with DEAP's 3 s baseline. Each is cut to the model's channels, baseline-corrected,
    band-passed and windowed as in training (``zoo.data.deap.preprocess_trials``); the model
    standardises the windows with its own statistics."""

    kind = "trials"
    suffixes = (".dat", ".mat")
    batch_size = 8

    def __init__(self, module: EEGEmotionClassifier):
        super().__init__(module)
        from zoo.data.deap import ALL_CHANNELS

        self.channels = list(self.spec["channels"])
        self.channel_idx = [ALL_CHANNELS.index(c) for c in self.channels]
        self.window, self.step = int(self.spec["window"]), int(self.spec["step"])
        self.min_samples = int(self.spec["baseline_samples"]) + self.window
        self.class_names = list(module.class_names)

    def check(self, x: Any, where: str) -> np.ndarray:
        """One trial as (channels, samples) float, or a DataError naming ``where``."""
        from zoo.data.deap import N_CHANNELS

        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise DataError(f"{where}: an EEG trial must be numbers, got {x.dtype} values")
        if x.ndim != 2 or x.shape[0] not in (N_CHANNELS, len(self.channels)):
            raise DataError(
                f"{where}: an EEG trial has shape (channels, samples) with {N_CHANNELS} DEAP "
                f"channels or the model's {len(self.channels)}, got shape {x.shape}"
            )
        if x.shape[1] < self.min_samples:
            raise DataError(
                f"{where}: {x.shape[1]} samples is too few: a trial needs the 3 s baseline "
                f"and one {self.window}-sample window, at least {self.min_samples} samples at "
                f"{self.spec['sfreq']} Hz"
            )
        if not np.isfinite(x).all():
            raise DataError(f"{where}: the trial contains NaN or inf values")
        return x

    def read(self, path: Path) -> list[Item]:
        from zoo.data.deap import load_subject, make_labels

        data, ratings = load_subject(path)
        labels = make_labels(ratings, self.spec["target"], self.spec["threshold"])
        names = self.spec["class_names"]
        return [
            Item(
                f"{path.name}#{t}",
                self.check(data[t], f"{path} trial {t}"),
                {"file": path.name, "trial": t, "label": names[int(labels[t])]},
            )
            for t in range(len(data))
        ]

    def is_tensor_input(self, model_input: Any) -> bool:
        """Windows as the network takes them: [B, model channels, window samples]."""
        shape = getattr(model_input, "shape", ())
        return len(shape) == 3 and shape[1:] == (len(self.channels), self.window)

    def parse(self, model_input: Any) -> list[np.ndarray]:
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        if isinstance(model_input, dict | str):
            raise DataError(
                "inputs: an EEG model takes trial arrays (channels, samples) or (trials, channels, "
                f"samples), got {type(model_input).__name__}"
            )
        if isinstance(model_input, list | tuple) and any(
            isinstance(v, str | bytes) for v in model_input
        ):
            raise DataError("inputs: a batch with mixed kinds (text among EEG trials)")
        try:
            x = np.asarray(model_input)
        except ValueError:  # a ragged list: trials of different lengths
            x = None
        if x is None or x.dtype == object:
            return [self.check(v, f"inputs[{i}]") for i, v in enumerate(model_input)]
        if x.ndim == 2:
            return [self.check(x, "inputs")]
        if x.ndim == 3:
            return [self.check(v, f"inputs[{i}]") for i, v in enumerate(x)]
        raise DataError(
            f"inputs: shape {x.shape}; an EEG model takes (channels, samples) or (trials, "
            "channels, samples)"
        )

    def windows(self, trial: np.ndarray) -> np.ndarray:
        """The preprocessed windows [n, channels, window] of one raw trial."""
        from zoo.data.deap import preprocess_trials

        if trial.shape[0] != len(self.channels):
            trial = trial[self.channel_idx]
        idx = list(range(len(self.channels)))
        x = preprocess_trials(
            trial[None],
            idx,
            self.spec["baseline"],
            self.spec["bandpass"],
            int(self.spec["filter_order"]),
        )[0]
        return np.stack([x[:, s : s + self.window] for s in self.windows_starts(trial.shape[-1])])

    def windows_starts(self, samples: int) -> np.ndarray:
        """Where the windows of a raw trial of ``samples`` start (after its baseline is cut)."""
        kept = samples - int(self.spec["baseline_samples"])
        return np.arange(0, kept - self.window + 1, self.step)

    def network_input(self, values: list[np.ndarray]) -> np.ndarray:
        """Every trial's windows, one after the other [windows, channels, window]."""
        return np.concatenate([self.windows(v) for v in values])

    @torch.no_grad()
    def answer(self, values: list[np.ndarray]) -> list[dict[str, Any]]:
        module = self.module
        counts = [len(self.windows_starts(v.shape[-1])) for v in values]
        x = torch.from_numpy(self.network_input(values)).to(module.device)
        probs = torch.cat([module(chunk).softmax(-1) for chunk in x.split(256)]).cpu().numpy()
        records, start = [], 0
        for n in counts:
            records.append(trial_record(probs[start : start + n], self.class_names))
            start += n
        return records

    def writer(self, output: Path) -> TableWriter:
        """predictions.csv: file, trial, label (from the file's ratings), then the answer."""
        return TableWriter(output / "predictions.csv")

    def example(self, datamodule: Any) -> np.ndarray:
        return datamodule.raw_example()
