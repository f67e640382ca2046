"""The job's place in a cluster: checks that the trainer's devices and nodes match what the
launcher started (torchrun's processes, SLURM's tasks), before any work is done.

Lightning checks this too, but deep inside the Trainer and with the variable names of the
launcher only; these messages name the config keys to change and both ways to fix it."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from omegaconf import DictConfig

from zoo.errors import ConfigError


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _slurm_tasks_per_node(value: str | None) -> int | None:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_TASKS_PER_NODE ("4(x2),3")."""
    if not value:
        return None
    match = re.match(r"\d+", value)
    return int(match.group()) if match else None


def slurm_managed(env: Mapping[str, str]) -> bool:
    """Lightning's rule: SLURM starts the processes unless the job is an interactive shell."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def check_allocation(trainer: DictConfig, env: Mapping[str, str] | None = None) -> None:
    """Refuse trainer.devices / trainer.num_nodes that do not match the processes the launcher
    started: a mismatch would hang at the rendezvous or train on part of the allocation."""
    env = os.environ if env is None else env
    devices = _int(trainer.get("devices"))
    nodes = _int(trainer.get("num_nodes", 1)) or 1
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env:
        local, world = _int(env.get("LOCAL_WORLD_SIZE")), _int(env.get("WORLD_SIZE"))
        if devices is not None and local is not None and devices != local:
            raise ConfigError(
                f"trainer.devices={devices}, but torchrun started {local} processes on this node "
                f"(--nproc-per-node={local}): set trainer.devices={local}, or start torchrun "
                f"with --nproc-per-node={devices}."
            )
        if devices is not None and world is not None and devices * nodes != world:
            raise ConfigError(
                f"trainer.num_nodes={nodes} with trainer.devices={devices} makes "
                f"{devices * nodes} processes, but torchrun's job has {world} (WORLD_SIZE): set "
                f"trainer.num_nodes={max(1, world // max(devices, 1))}, or start torchrun with "
                f"--nnodes={nodes}."
            )
        return
    if slurm_managed(env):
        per_node = _int(env.get("SLURM_NTASKS_PER_NODE")) or _slurm_tasks_per_node(
            env.get("SLURM_TASKS_PER_NODE")
        )
        slurm_nodes = _int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES"))
        if devices is not None and per_node is not None and devices != per_node:
            raise ConfigError(
                f"trainer.devices={devices}, but this SLURM job runs {per_node} tasks per node "
                f"(SLURM_NTASKS_PER_NODE): Lightning needs one task per device. Set "
                f"trainer.devices={per_node}, or submit with --ntasks-per-node={devices} "
                f"(hydra.launcher.tasks_per_node follows trainer.devices)."
            )
        if slurm_nodes is not None and nodes != slurm_nodes:
            raise ConfigError(
                f"trainer.num_nodes={nodes}, but this SLURM job has {slurm_nodes} nodes "
                f"(SLURM_NNODES): set trainer.num_nodes={slurm_nodes}, or submit with "
                f"--nodes={nodes}."
            )
