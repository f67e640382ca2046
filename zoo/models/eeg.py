"""DEAP EEG emotion recognition: 1D-CNN + LSTM / GRU classifiers of valence-arousal quadrants
(HVHA / HVLA / LVHA / LVLA) or binary valence / arousal."""

from __future__ import annotations

from zoo.models.classification import ClassificationModule


class EEGEmotionClassifier(ClassificationModule):
    """Windows of multichannel EEG [B, C, T] -> emotion class.

    The network (``zoo.models.components.eeg_nets.CNNRecurrentNet`` with ``rnn=lstm`` or ``gru``)
    is injected from the config, so the LSTM and GRU variants share every line of training code.
    """

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        if names is not None and list(names) != self.class_names:
            raise ValueError(
                f"model.class_names={self.class_names} but the data module yields {list(names)}"
            )
