"""Model parallelism on PyTorch's native engine: Megatron-style tensor parallelism
(``torch.distributed.tensor.parallel``) over the ``tensor_parallel`` dimension of a 2-D
``DeviceMesh`` and FSDP2 (``fully_shard``) over its ``data_parallel`` dimension, as Lightning's
``ModelParallelStrategy`` composes them (``trainer=model_parallel``).

A model takes part by implementing ``configure_model`` (Lightning's hook) with a plan; the
transformer blocks' plan is Megatron-LM's:

- attention: Q, K, V projections column-wise (each rank computes the heads it owns, so the
  attention kernel runs on local heads with no communication), the output projection
  row-wise (one all-reduce);
- MLP: up-projection column-wise, down-projection row-wise (one all-reduce);
- LayerNorm, dropout, residuals on the replicated activations between blocks.

One all-reduce per sub-block in the forward pass, one in the backward (the column-wise
layers' input gradients).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import ConfigError

TP, DP = "tensor_parallel", "data_parallel"


def world_size_of(trainer_cfg: Any) -> int | None:
    """The number of processes a trainer config asks for (devices × nodes; the launcher's
    WORLD_SIZE where torchrun or SLURM set one); None where ``devices=auto`` leaves it open."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return None if devices == -1 else devices * nodes
    if isinstance(devices, str):  # auto, or a "0,1" device list
        return None if devices == "auto" else len(devices.strip(",").split(",")) * nodes
    return len(devices) * nodes  # a list of device indices


def model_parallel_strategy(trainer_cfg: Any) -> Any | None:
    """The trainer's strategy node when it is Lightning's ModelParallelStrategy, else None."""
    strategy = trainer_cfg.get("strategy")
    if hasattr(strategy, "get") and "ModelParallelStrategy" in str(strategy.get("_target_", "")):
        return strategy
    return None


def check_layout(trainer_cfg: Any) -> None:
    """``tensor_parallel_size × data_parallel_size`` must be the world size (a ConfigError
    naming the keys, before any process group exists)."""
    strategy = model_parallel_strategy(trainer_cfg)
    if strategy is None:
        return
    world = world_size_of(trainer_cfg)
    tp, dp = strategy.get("tensor_parallel_size"), strategy.get("data_parallel_size")
    for key, value in (("tensor_parallel_size", tp), ("data_parallel_size", dp)):
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"trainer.strategy.{key}={value!r}: expected a positive integer (or auto)"
            )
    if world is not None and tp != "auto" and dp != "auto" and tp * dp != world:
        raise ConfigError(
            f"trainer.strategy.tensor_parallel_size={tp} × trainer.strategy.data_parallel_size="
            f"{dp} = {tp * dp} processes, but the job has {world} (trainer.devices="
            f"{trainer_cfg.get('devices')} × trainer.num_nodes={trainer_cfg.get('num_nodes', 1)}"
            f"{', WORLD_SIZE from the launcher' if os.environ.get('WORLD_SIZE') else ''}): make "
            "the product equal the number of processes"
        )


def check_model(model: nn.Module, trainer_cfg: Any) -> None:
    """Under ``trainer=model_parallel`` the model must bring a parallel plan."""
    strategy = model_parallel_strategy(trainer_cfg)
    if strategy is None:
        return
    if not callable(getattr(model, "parallelize", None)):
        raise ConfigError(
            f"trainer=model_parallel: the model {type(model).__name__} has no tensor-parallel "
            "plan (a parallelize(mesh) method; SparseBERT has one). Train it with trainer=ddp, "
            "or give it a plan"
        )
    tp = strategy.get("tensor_parallel_size")
    check = getattr(model, "check_tensor_parallel", None)
    if isinstance(tp, int) and callable(check):
        check(tp)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor (gathered, differentiable); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_heads(t: torch.Tensor, mesh, dim: int = 1) -> torch.Tensor:
    """Split a per-head tensor (mask logits [S, H, ...], a mask [S, H, L, L]) across the
    tensor-parallel ranks along its head dimension, as the heads themselves are split."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(t.detach(), mesh, [Shard(dim)])


def check_heads(heads: int, tp: int) -> None:
    if heads % tp:
        raise ConfigError(
            f"model: num_attention_heads={heads} is not divisible by "
            f"trainer.strategy.tensor_parallel_size={tp}: tensor parallelism gives every rank "
            "the same number of whole heads (choose a divisor of the head count)"
        )


def transformer_block_plan() -> dict[str, Any]:
    """Megatron's plan for one BERT layer (HuggingFace's module names)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "attention.self.query": ColwiseParallel(),
        "attention.self.key": ColwiseParallel(),
        "attention.self.value": ColwiseParallel(),
        "attention.output.dense": RowwiseParallel(),
        "intermediate.dense": ColwiseParallel(),
        "output.dense": RowwiseParallel(),
    }


def parallelize_bert(bert: nn.Module, mesh, shard_embeddings: bool = True) -> None:
    """Tensor-parallel BERT encoder on ``mesh[TP]`` (FSDP2 over ``mesh[DP]`` is
    ``fully_shard_data_parallel``'s). The word embeddings are split by vocabulary rows (each
    rank looks up the ids it holds, one all-reduce) unless ``shard_embeddings`` is false (an MLM
    head ties them); the position and type embeddings, LayerNorms and pooler stay replicated
    (a few K–M weights, where splitting would only add communication)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    tp_mesh = mesh[TP]
    check_heads(bert.encoder.layer[0].attention.self.heads, tp_mesh.size())
    if tp_mesh.size() > 1:
        if shard_embeddings:
            parallelize_module(
                bert.embeddings,
                tp_mesh,
                {"word_embeddings": RowwiseParallel(input_layouts=Replicate())},
            )
        for layer in bert.encoder.layer:
            parallelize_module(layer, tp_mesh, transformer_block_plan())


def fully_shard_data_parallel(modules: list[nn.Module], root: nn.Module, mesh) -> None:
    """FSDP2 over the data-parallel ranks: every block its own unit, then the root (which
    gathers the rest: embeddings, pooler, classifier, mask logits)."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh[DP]
    if dp_mesh.size() == 1:
        return
    for module in modules:
        fully_shard(module, mesh=dp_mesh)
    fully_shard(root, mesh=dp_mesh)


def is_parallel(model: nn.Module) -> bool:
    """Whether a model's weights are split across processes (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# --------------------------------------------------------------------------- checkpoints

META = "meta.pt"  # Lightning's file beside the shards: epoch, step, callbacks, the zoo's metadata


def load_distributed_checkpoint(
    path: str | Path, weights: bool = True, optimizer: bool = False
) -> dict[str, Any]:
    """A distributed checkpoint folder (``torch.distributed.checkpoint``, one shard file per
    rank) as one full checkpoint in this process: the weights gathered from every shard into
    whole tensors (unless ``weights=False``), plus its ``meta.pt``. No process group is needed.
    Loaded with ``weights_only=True``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ConfigError(f"ckpt_path={path}: a folder, but not a distributed checkpoint")
    if not weights:
        meta = path / META
        return torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="zoo-dcp-") as tmp:
        single = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, single)
        state = torch.load(single, map_location="cpu", weights_only=True)
    if not optimizer:
        state = {k: v for k, v in state.items() if not k.startswith("optimizer_")}
    if (path / META).is_file():
        state.update(torch.load(path / META, map_location="cpu", weights_only=True))
    return state


def consolidate(path: str | Path) -> Path:
    """The single-file twin of a distributed checkpoint folder, written beside it
    (``<name>.full.ckpt``: whole weights and metadata, no optimizer state): what the run logs to
    mlflow and ``evaluate.py run_id=`` loads into a one-process model."""
    path = Path(path)
    out = path.with_name(path.stem + ".full.ckpt")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(load_distributed_checkpoint(path), tmp)
    os.replace(tmp, out)
    return out
