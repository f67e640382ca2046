"""Training configs logged by earlier versions, upgraded so their runs and checkpoints still
evaluate.

A model class whose config shape changed defines ``upgrade_config(node) -> node | None``: given
the logged model node (a plain dict), it returns the node in today's shape with the same
values, or None when the node already has it. A training config logged by an older zoo (in a
run's ``config/config.yaml`` or inside a checkpoint) goes through its model's hook here; the
weights' names never change.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def upgrade(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its model node in the current shape (unchanged when it already is)."""
    from hydra.utils import get_class

    model = cfg.get("model")
    if model is None:
        return cfg
    node = OmegaConf.to_container(model, resolve=True)
    try:
        hook = getattr(get_class(str(node.get("_target_"))), "upgrade_config", None)
    except Exception:  # an unknown class: building the model names it
        return cfg
    new = hook(node) if hook is not None else None
    if new is None:
        return cfg
    upgraded = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    upgraded.model = new
    return upgraded
