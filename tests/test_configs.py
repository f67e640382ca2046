"""Every config composes and resolves; bad overrides fail with a short, precise message."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, EXPERIMENTS, run_cli
from zoo.errors import ConfigError


def test_experiments_exist():
    assert {"eeg_cnn_lstm", "eeg_cnn_gru"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(make_cfg, experiment):
    cfg = make_cfg([f"experiment={experiment}"])
    assert cfg.name == experiment
    assert "_target_" in cfg.model and "_target_" in cfg.data and "_target_" in cfg.trainer
    assert not OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "debug", "hparams_search"])
def test_every_group_option_composes(make_cfg, group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = make_cfg([f"{group}={option}"])
        assert cfg.name == "eeg_cnn_lstm"


def test_gru_experiment_really_uses_gru(make_cfg):
    assert make_cfg(["experiment=eeg_cnn_gru"]).model.net.rnn == "gru"
    assert make_cfg([]).model.net.rnn == "lstm"


def test_derived_data_keys(make_cfg):
    cfg = make_cfg(["data.target=valence", "data.channels=[Fz,Cz]"])
    assert cfg.data.num_classes == 2 and cfg.model.net.num_classes == 2
    assert cfg.model.net.in_channels == 2 and cfg.model.class_names == ["LV", "HV"]


def test_debug_fast_shrinks_the_run(make_cfg):
    cfg = make_cfg(["debug=fast"])
    assert (
        cfg.trainer.max_epochs == 1
        and cfg.trainer.limit_train_batches == 2
        and cfg.data.subset == 1
    )


def test_evaluate_config_composes(make_cfg):
    cfg = make_cfg(["run_id=abc"], config_name="evaluate")
    assert cfg.run_id == "abc" and cfg.get("model") is None
    cfg = make_cfg(["experiment=eeg_cnn_gru", "ckpt_path=x.ckpt"], config_name="evaluate")
    assert cfg.model.net.rnn == "gru"


def test_wrong_value_type_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs.*'abc'.*a number"):
        make_cfg(["trainer.max_epochs=abc"])
    with pytest.raises(ConfigError, match=r"data\.normalize.*true or false"):
        make_cfg(["data.normalize=3"])
    # compatible replacements are fine
    assert make_cfg(["trainer.devices=2", "trainer.limit_train_batches=0.5"]).trainer.devices == 2


def test_missing_mandatory_value(make_cfg):
    with pytest.raises(ConfigError, match=r"data\.data_dir.*must be set"):
        make_cfg(["data=deap"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=nope", "nope"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("trainer.max_epoch=3", "max_epoch"),
        ("experiment=eeg_cnn_lstmm", "eeg_cnn_lstmm"),
        ("data.protocol=leaky", "data.protocol='leaky'"),
        ("model.net.hidden_size=-4", "hidden_size must be a positive integer"),
    ],
)
@pytest.mark.e2e
def test_bad_overrides_exit_nonzero_with_short_message(tmp_path, data_dir, override, expected):
    proc = run_cli("train.py", [override, "debug=fast", "logger=none"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) <= 15, proc.stderr
