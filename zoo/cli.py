"""Entry-point glue: validate the composed config, and turn user errors into a short message
and a non-zero exit instead of a wall of traceback."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig

from zoo.config import check_override_types, resolve
from zoo.errors import ConfigError, ZooError, one_line

log = logging.getLogger("zoo")

EXIT_USER_ERROR = 2


def _defaults_without_value_overrides(cfg: DictConfig) -> DictConfig | None:
    """The config composed with the command line's group choices but none of its key=value
    overrides: the reference for the type check of those overrides."""
    try:
        from hydra import compose
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        hc = HydraConfig.get()
        keep = []
        for line in hc.overrides.task:
            key = line.split("=", 1)[0].lstrip("+~")
            current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
            # group choices: model=..., data@x=..., and groups that only merge (experiment=, debug=)
            if (
                "@" in key
                or isinstance(current, DictConfig)
                or (current is None and "." not in key)
            ):
                keep.append(line)
        return compose(config_name=hc.job.config_name, overrides=keep)
    except Exception as exc:  # the check is a courtesy; never block a run because of it
        log.debug("override type check skipped: %s", exc)
        return None


def prepare(cfg: DictConfig) -> DictConfig:
    """Check the command-line overrides' types, then resolve every interpolation."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app (tests compose configs directly)
        overrides = []
    if overrides:
        check_override_types(overrides, cfg, _defaults_without_value_overrides(cfg))
    resolve(cfg)
    return cfg


class JobFailed(CompactHydraException):
    """A multirun job's user error. Hydra records the job as failed, so the sweep decides what
    to do (the Optuna sweeper marks the trial FAIL and goes on; Hydra's basic sweeper ends the
    multirun once its jobs are done), and prints this message alone, without a traceback."""


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def friendly_message(exc: BaseException) -> str:
    if isinstance(exc, InstantiationException):
        return f"could not build an object from the config: {one_line(str(exc))}"
    return str(exc)


def exit_cleanly_on_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task: user errors print one paragraph and exit with status 2 (3: the job
    finished but its tracking records are still queued)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        try:
            prepare(cfg)
            return task(cfg)
        except (ZooError, InstantiationException) as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            msg = friendly_message(exc)
            kind = (
                "config error"
                if isinstance(exc, (ConfigError, InstantiationException))
                else "error"
            )
            if _in_multirun():
                raise JobFailed(f"{kind}: {msg}") from None
            print(
                f"\n{kind}: {msg}\n(set HYDRA_FULL_ERROR=1 to see the traceback)", file=sys.stderr
            )
            log.debug("user error", exc_info=exc)
            sys.exit(getattr(exc, "exit_code", EXIT_USER_ERROR))

    return wrapped


# options that live in Hydra or its plugins rather than in conf/
_BUILTIN_OPTIONS = {"hydra/launcher": ["basic"], "hydra/sweeper": ["basic"]}


def _refuse(message: str) -> None:
    print(f"config error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Before Hydra composes: a `group=option` override naming an option that does not exist in
    conf/<group>/ exits with status 2 and one paragraph listing the available options (Hydra's
    own message lists them one per line with its search path, which grows with the zoo). The
    same for `hydra.launcher.<key>=` overrides naming no option of the chosen launcher."""
    launcher = None
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or "." in key or key.startswith(("~", "-")) or "(" in value:
            continue
        group = conf_dir / key
        if not group.is_dir() or ("/" in key and key not in _BUILTIN_OPTIONS):
            continue
        available = sorted(
            [*(p.stem for p in group.glob("*.yaml")), *_BUILTIN_OPTIONS.get(key, [])]
        )
        for option in value.split(","):
            option = option.strip()
            if option and option != "null" and option not in available:
                _refuse(
                    f"{key}={option!r} is not an option of '{key}' (conf/{key}/): choose one of "
                    f"{', '.join(available)}."
                )
        if key == "hydra/launcher":
            launcher = value.strip()
    if launcher and (conf_dir / "hydra" / "launcher" / f"{launcher}.yaml").is_file():
        path = conf_dir / "hydra" / "launcher" / f"{launcher}.yaml"
        options = [k for k in yaml_keys(path) if not k.startswith("_")]
        for arg in argv:
            key, sep, _ = arg.partition("=")
            if sep and key.startswith("hydra.launcher."):
                name = key.removeprefix("hydra.launcher.").split(".")[0]
                if name not in options:
                    _refuse(
                        f"{key}: '{name}' is not an option of hydra/launcher={launcher} "
                        f"(conf/hydra/launcher/{launcher}.yaml): choose one of "
                        f"{', '.join(options)}."
                    )


def yaml_keys(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(k) for k in OmegaConf.load(path).keys()]
