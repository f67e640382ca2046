"""Configs logged with flat model keys, upgraded so their runs and checkpoints still evaluate.

Earlier versions of pix2pix and detection took flat keyword arguments (``model.netG``, ``model.lr``,
``model.backbone``, ...) and built their networks, optimizers and schedules in code; now those
are injected from the config. A training config logged by an older zoo (in a run's
``config/config.yaml`` or inside a checkpoint) is rewritten to the new shape here, with the
same values; the weights' names did not change.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

PIX2PIX = "zoo.models.pix2pix.Pix2Pix"
DETECTOR = "zoo.models.detection.GroupSoftmaxDetector"


def upgrade(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its model node in the current shape (unchanged when it already is)."""
    model = cfg.get("model")
    if model is None:
        return cfg
    node = OmegaConf.to_container(model, resolve=True)
    target = node.get("_target_")
    if target == PIX2PIX and "generator" not in node:
        node = _pix2pix(node)
    elif target == DETECTOR and "net" not in node:
        node = _detector(node)
    else:
        return cfg
    upgraded = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    upgraded.model = node
    return upgraded


def _pix2pix(old: dict[str, Any]) -> dict[str, Any]:
    input_nc, output_nc, norm = old.get("input_nc", 3), old.get("output_nc", 3), old["norm"]
    return {
        "_target_": PIX2PIX,
        "generator": {
            "_target_": "zoo.models.components.pix2pix_nets.define_generator",
            "netG": old["netG"],
            "input_nc": input_nc,
            "output_nc": output_nc,
            "ngf": old["ngf"],
            "norm": norm,
            "use_dropout": not old.get("no_dropout", False),
        },
        "discriminator": {
            "_target_": "zoo.models.components.pix2pix_nets.define_discriminator",
            "netD": old["netD"],
            "input_nc": input_nc + output_nc,
            "ndf": old["ndf"],
            "n_layers_D": old["n_layers_D"],
            "norm": norm,
        },
        "optimizer": {
            "_target_": "torch.optim.Adam",
            "_partial_": True,
            "_convert_": "all",
            "lr": old["lr"],
            "betas": [old["beta1"], 0.999],
        },
        "scheduler": {
            "_target_": "torch.optim.lr_scheduler.LambdaLR",
            "_partial_": True,
            "lr_lambda": {
                "_target_": "zoo.models.pix2pix.linear_decay",
                "n_epochs": old["n_epochs"],
                "n_epochs_decay": old["n_epochs_decay"],
                "epoch_count": old.get("epoch_count", 1),
            },
        },
        **{
            k: old[k]
            for k in (
                "init_gain",
                "gan_mode",
                "lambda_L1",
                "lambda_gp",
                "grid_images",
                "grid_every_n_epochs",
                "fid",
            )
        },
    }


def _detector(old: dict[str, Any]) -> dict[str, Any]:
    net_keys = (
        "backbone",
        "loss",
        "backbone_weights",
        "trainable_backbone_layers",
        "anchor_sizes",
        "min_size",
        "max_size",
    )
    return {
        "_target_": DETECTOR,
        "_convert_": "all",
        "classes": old["classes"],
        "sources": old["sources"],
        "net": {
            "_target_": "zoo.models.detection.build_faster_rcnn",
            "_partial_": True,
            **{k: old.get(k) for k in net_keys},
            **(old.get("detector") or {}),
        },
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": old["lr"],
            "momentum": old["momentum"],
            "weight_decay": old["weight_decay"],
        },
        "scheduler": {
            "_target_": "zoo.models.detection.warmup_multistep_lr",
            "_partial_": True,
            "warmup_iters": old["warmup_iters"],
            "warmup_factor": old["warmup_factor"],
            "lr_steps": old["lr_steps"],
            "gamma": old["lr_gamma"],
        },
        **{
            k: old[k] for k in ("figure_images", "figure_score_threshold", "figures_every_n_epochs")
        },
    }
