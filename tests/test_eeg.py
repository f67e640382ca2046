"""The EEG networks (every conf/model/eeg_* config): forward/backward, variants, learning."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF
from zoo.models.components.eeg_nets import CNNRecurrentNet

MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("eeg_*.yaml"))


def _net_cfg(name: str, in_channels: int = 32, num_classes: int = 4):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    for base in cfg.get("defaults", []):
        cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / f"{base}.yaml"), cfg)
    net = cfg.net
    net.in_channels, net.num_classes = in_channels, num_classes
    return net


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_forward_backward(name):
    net = instantiate(_net_cfg(name, in_channels=5, num_classes=3))
    x = torch.randn(4, 5, 256, requires_grad=True)
    out = net(x)
    assert out.shape == (4, 3)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())
    assert isinstance(net.rnn, torch.nn.LSTM if "lstm" in name else torch.nn.GRU)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional,num_layers", [(True, 1), (False, 2)])
def test_variants_and_odd_lengths(rnn, bidirectional, num_layers):
    net = CNNRecurrentNet(
        3,
        2,
        conv_channels=[8, 8],
        rnn=rnn,
        hidden_size=16,
        bidirectional=bidirectional,
        num_layers=num_layers,
    )
    assert net(torch.randn(2, 3, 101)).shape == (2, 2)


def test_gru_has_fewer_parameters_than_lstm():
    n = lambda rnn: sum(p.numel() for p in CNNRecurrentNet(32, 4, rnn=rnn).parameters())  # noqa: E731
    assert n("gru") < n("lstm")


def test_overfits_a_small_batch():
    torch.manual_seed(0)
    net = CNNRecurrentNet(4, 4, conv_channels=[16, 16], hidden_size=32, dropout=0.0)
    x, y = torch.randn(16, 4, 128), torch.arange(16) % 4
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    assert (net.eval()(x).argmax(-1) == y).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rnn="rnn"), "rnn must be"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(conv_channels=[]), "conv_channels"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNNRecurrentNet(4, 4, **kwargs)
    with pytest.raises(ValueError, match="expected input"):
        CNNRecurrentNet(4, 4)(torch.randn(4, 128))


# ------------------------------------------------- what test_experiments checks of this family


def check_experiment_run(cfg, run, arts, html, evaluated, client):
    """What only this family logs, checked after the shared checks of
    tests/test_experiments.py::test_experiment_end_to_end."""
    params, tags = run.data.params, run.data.tags
    assert params["model.net.rnn"] == cfg.model.net.rnn and params["trainer.max_epochs"] == "1"
    assert params["data.channels"] == "eeg" and params["model.net.conv_channels"] == "[32, 64, 64]"
    assert int(params["model/params/total"]) > 10_000
    assert tags["zoo.model"] == f"eeg_cnn_{cfg.model.net.rnn}"
    for key in ("train/acc", "val/f1_macro", "val/f1_macro_best", "test/f1_macro"):
        assert key in run.data.metrics, key
    assert {
        "figures/test/confusion_matrix.png",
        "figures/val/confusion_matrix_epoch000.png",
    } <= arts
    assert {"test/precision/HVHA", "test/recall/LVLA", "test/f1/HVLA"} <= set(evaluated)
    assert "Per-class precision" in html and "Confusion matrix" in html and "Dataset" in html
