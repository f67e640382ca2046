"""What a run records about its job: the config as params (never truncated), mlflow's system
tags, the git commit, parameter counts, and the zoo's own tag names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import zoo
from zoo.config import iter_flat

CONFIG_ARTIFACT = "config/config.yaml"
TAG_KIND = "zoo.kind"
TAG_BEST_CKPT = "zoo.best_checkpoint"
TAG_MODEL_URI = "zoo.model_uri"
TAG_REGISTERED = "zoo.registered_model"


def max_param_length() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except ImportError:  # pragma: no cover - very old mlflow
        return 500


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def flatten_params(cfg: DictConfig | dict, artifact: str = CONFIG_ARTIFACT) -> dict[str, str]:
    """Flatten a config into mlflow params. Values longer than mlflow allows are not cut:
    the param says where the whole value is (the config artifact)."""
    limit = max_param_length()
    out: dict[str, str] = {}
    for key, value in iter_flat(cfg):
        text = _param_value(value)
        if len(text) > limit:
            text = (
                f"<{len(text)} characters: too long for an mlflow param; see artifact {artifact}>"
            )
        out[key[:250]] = text
    return out


def system_tags(cfg: DictConfig, commit: str) -> dict[str, str]:
    """mlflow's own system tags, so the UI shows the source, its commit, the user and the
    experiment's description."""
    import getpass

    from mlflow.entities import SourceType

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    tags = {
        "mlflow.source.type": SourceType.to_string(SourceType.LOCAL),
        "mlflow.user": getpass.getuser(),
    }
    if script is not None and script.is_file():
        tags["mlflow.source.name"] = str(script)
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        repo = _git(["remote", "get-url", "origin"])
        if repo:
            tags["mlflow.source.git.repoURL"] = repo
    description = cfg.get("description")
    if description:
        tags["mlflow.note.content"] = str(description).strip()
    return tags


def _git(args: list[str]) -> str | None:
    here = Path(zoo.__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    here = Path(zoo.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {
        "model/params/total": total,
        "model/params/trainable": trainable,
        "model/params/non_trainable": total - trainable,
    }
    extra = getattr(model, "parameter_groups", None)
    if callable(extra):
        for name, module in extra().items():
            out[f"model/params/{name}"] = sum(p.numel() for p in module.parameters())
    return out


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Log params in batches; keys already logged with another value (a resumed run whose
    config changed) are not re-logged but returned as {key: (old, new)}."""
    from mlflow.entities import Param

    from zoo.tracking.queue import is_outage

    try:
        existing = mlflow_client.get_run(run_id).data.params
    except Exception as exc:  # server down: log them all (the queue delivers them later)
        if not is_outage(exc):
            raise
        existing = {}
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(todo), 100):
        mlflow_client.log_batch(run_id, params=todo[i : i + 100])
    return changed


def _hydra_choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except (ValueError, ImportError):
        return {}


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):
        return None
