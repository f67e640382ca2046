"""Runs and checkpoints of earlier versions (flat pix2pix / detection model keys) still
evaluate: their logged configs are upgraded to the injected shape with the same values."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from tests.conftest import build_model
from zoo import legacy
from zoo.pipeline import build

OLD_PIX2PIX = {  # conf/model/pix2pix.yaml as pix2pix_demo resolved it with flat model keys
    "_target_": "zoo.models.pix2pix.Pix2Pix",
    "netG": "unet_64",
    "netD": "basic",
    "input_nc": 3,
    "output_nc": 3,
    "ngf": 8,
    "ndf": 8,
    "n_layers_D": 3,
    "norm": "batch",
    "no_dropout": False,
    "init_gain": 0.02,
    "gan_mode": "lsgan",
    "lambda_L1": 100.0,
    "lambda_gp": 10.0,
    "lr": 0.0003,
    "beta1": 0.4,
    "n_epochs": 10,
    "n_epochs_decay": 10,
    "epoch_count": 1,
    "grid_images": 6,
    "grid_every_n_epochs": 1,
    "fid": "off",
}

OLD_DETECTOR = {
    "_target_": "zoo.models.detection.GroupSoftmaxDetector",
    "_convert_": "all",
    "classes": ["circle", "square", "triangle", "cross"],
    "sources": {
        "a": {"label_map": {"circle": "circle", "square": "square"}},
        "b": {"label_map": {"triangle": "triangle", "cross": "cross"}},
    },
    "backbone": "mobilenet_v3_large_fpn",
    "loss": "softmax",
    "backbone_weights": None,
    "trainable_backbone_layers": None,
    "anchor_sizes": None,
    "min_size": 128,
    "max_size": 128,
    "detector": {"box_batch_size_per_image": 64},
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "warmup_iters": 100,
    "warmup_factor": 0.001,
    "lr_steps": [8],
    "lr_gamma": 0.1,
    "figure_images": 6,
    "figure_score_threshold": 0.5,
    "figures_every_n_epochs": 1,
}


def _upgraded(model: dict):
    cfg = legacy.upgrade(OmegaConf.create({"name": "old", "model": model}))
    return cfg, build(cfg.model, "model")


def test_an_old_pix2pix_config_builds_the_same_model():
    cfg, old = _upgraded(OLD_PIX2PIX)
    assert cfg.model.generator.netG == "unet_64" and cfg.model.discriminator.input_nc == 6
    assert cfg.model.optimizer.betas == [0.4, 0.999] and old.hparams.gan_mode == "lsgan"
    new = build_model(
        ["experiment=pix2pix_demo", "model.generator.ngf=8", "model.discriminator.ndf=8"]
    )

    def shapes(module):  # the tensors; ``_extra_state`` is the preprocessing, a dict
        return {k: getattr(v, "shape", type(v)) for k, v in module.state_dict().items()}

    assert shapes(old) == shapes(new)
    old.load_state_dict(new.state_dict())  # an old checkpoint's weights load as they are
    (opt, _), _ = old.configure_optimizers()
    assert opt.defaults["lr"] == 0.0003 and tuple(opt.defaults["betas"]) == (0.4, 0.999)


def test_an_old_detection_config_builds_the_same_model():
    cfg, old = _upgraded(OLD_DETECTOR)
    assert cfg.model.net.loss == "softmax" and cfg.model.net.box_batch_size_per_image == 64
    assert cfg.model.scheduler.gamma == 0.1 and cfg.model.optimizer.lr == 0.01
    assert old.net.transform.min_size == (128,)
    assert old.net.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert torch.equal(old.group_table, torch.tensor([[0, 1, 2, 0, 0], [0, 0, 0, 3, 4]]))


def test_current_configs_are_left_alone():
    cfg = OmegaConf.create({"model": {"_target_": "zoo.models.pix2pix.Pix2Pix", "generator": {}}})
    assert legacy.upgrade(cfg) is cfg


def test_models_logged_by_earlier_versions_find_their_pyfunc_class():
    """A logged model's code is a copy of the pyfunc module as it was: earlier ones import
    ZooPyfuncModel from zoo.serving."""
    import zoo.serving
    from zoo.tracking.serving import ZooPyfuncModel

    assert zoo.serving.ZooPyfuncModel is ZooPyfuncModel


def test_a_pretrained_sparsebert_config_from_before_architecture_builds_the_same_model():
    """Configs logged before ``model.architecture`` was resolved with the config: a pretrained
    model gets its checkpoint's architecture (all-MiniLM-L6-v2: 6 layers, 384 hidden)."""
    from hydra.utils import instantiate

    from zoo.models.sparsebert import SparseBert

    node = {
        "_target_": "zoo.models.sparsebert.SparseBert",
        "class_names": ["a", "b"],
        "pretrained": "pkg:all_minilm_l6_v2/model.zip",
        "bert": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1},
        "mask": {"mode": "dense"},
    }
    cfg = legacy.upgrade(OmegaConf.create({"name": "old", "model": node}))
    arch = cfg.model.architecture
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads) == (384, 6, 12)
    module = instantiate(cfg.model)
    assert module.bert_config.hidden_size == 384 and not module.resolved  # weights not read yet
    assert legacy.upgrade(cfg) is cfg  # already in today's shape
    assert SparseBert.upgrade_config({**node, "pretrained": None}) is None
