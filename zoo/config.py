"""Config helpers: OmegaConf resolvers, validation of command-line overrides, flattening."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from zoo.errors import ConfigError, one_line


def _call(path: str, *args: Any) -> Any:
    """``${zoo_fn:package.module.function,arg,...}``: a family's own function computes a config
    value (its class names, its channel list), so shared code knows no family. Lists and
    mappings come back as configs, so that other resolvers can take them."""
    from hydra.utils import get_method

    result = get_method(path)(*args)
    return OmegaConf.create(result) if isinstance(result, (list, tuple, dict)) else result


def _job_dir_name(fallback: str) -> str:
    """The launcher's job id where there is one, so that every process of a job (torchrun
    ranks, SLURM tasks) and a requeued SLURM job share one output dir; else ``fallback``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"slurm-{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return fallback


_RESOLVERS = {
    "len": lambda x: len(x),
    "zoo_cwd": lambda: os.getcwd(),
    "zoo_job_dir": _job_dir_name,
    "zoo_add": lambda *xs: sum(int(x) for x in xs),
    "zoo_fn": _call,
    "zoo_concat": lambda *lists: OmegaConf.create([x for lst in lists for x in lst]),
    # a label map sending each name to itself
    "zoo_identity_map": lambda names: OmegaConf.create({str(n): str(n) for n in names}),
}


def register_resolvers() -> None:
    """Register the resolvers our configs use (idempotent)."""
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()

# conf/hydra/launcher/{joblib,submitit_*}.yaml share their names with the launcher plugins'
# schemas, which Hydra 1.3 still uses to type-check them (a misspelt hydra.launcher key is
# refused) while warning that this is deprecated; the files are complete on their own for when
# it goes. (Here rather than in train.py: joblib's worker processes import this module too.)
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against")


def resolve(cfg: DictConfig) -> None:
    """Resolve every interpolation in place, turning failures into a ConfigError naming the key.

    (OmegaConf.resolve cannot store list-valued resolver results in a leaf, hence the copy.)
    """
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(
            f"config key '{key}' must be set (it is '???' in the config); e.g. python train.py "
            f"{key}=<value>"
        ) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"config key '{key}' could not be resolved: {msg}") from None
    except (ValueError, KeyError, TypeError) as exc:  # raised inside our resolvers
        raise ConfigError(f"a config value could not be resolved: {exc}") from None
    except ImportError as exc:  # zoo_fn naming a function that does not exist
        raise ConfigError(f"a config value could not be resolved: {exc}") from None
    with open_dict(cfg):
        for key, value in resolved.items():
            cfg[key] = value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    if value is None:
        return "none"
    return "str"


_EXPECTED = {"bool": "true or false", "number": "a number", "list": "a list", "dict": "a mapping"}


def check_override_types(
    overrides: list[str], cfg: DictConfig, defaults: DictConfig | None
) -> None:
    """Refuse `key=value` overrides whose value has the wrong kind for the key's default.

    Hydra accepts `trainer.max_epochs=abc` (the config has no schema), and the string then fails
    deep inside Lightning. Here the value is compared with the key's value in `defaults` (the
    config composed without the value overrides): a number must stay a number, a bool a bool,
    a list a list. `null` defaults accept anything, and numbers may replace strings
    (e.g. `trainer.devices=2` where the default is "auto").
    """
    if defaults is None:
        return
    for line in overrides:
        if "=" not in line or line.startswith(("+", "~")):
            continue
        key = line.split("=", 1)[0].strip()
        if "@" in key or key.startswith("hydra."):
            continue
        new = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if isinstance(new, (DictConfig,)):  # a config group choice, e.g. model=eeg_cnn_gru
            continue
        try:
            old = OmegaConf.select(defaults, key, throw_on_missing=False, default=None)
        except OmegaConfBaseException:
            continue
        old_kind, new_kind = _kind(old), _kind(new)
        if old_kind in ("none", "str") or new_kind == "none" or old_kind == new_kind:
            continue
        value = line.split("=", 1)[1]
        raise ConfigError(
            f"bad value for '{key}': got {value!r}, expected {_EXPECTED[old_kind]} "
            f"(its default is "
            f"{_show(old)})."
        )


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_yaml(value).strip()
    return repr(value)


def iter_flat(cfg: Any, prefix: str = "", sep: str = ".") -> Iterator[tuple[str, Any]]:
    """Yield (dotted.key, leaf value) pairs of a nested config or mapping."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        if not cfg and prefix:
            yield prefix, {}
        for k, v in cfg.items():
            yield from iter_flat(v, f"{prefix}{sep}{k}" if prefix else str(k), sep)
    else:
        yield prefix, cfg


def build(node: DictConfig, key: str, **kwargs) -> Any:
    """hydra.utils.instantiate with errors that name the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        raise ConfigError(f"could not build '{key}': {one_line(str(exc))}") from exc


def build_all(group: DictConfig | None, key: str, **kwargs) -> list[Any]:
    if not group:
        return []
    return [
        build(node, f"{key}.{name}", **kwargs)
        for name, node in group.items()
        if isinstance(node, DictConfig) and "_target_" in node
    ]
