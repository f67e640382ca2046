"""torchrun worker for tests/test_model_parallel.py: SparseBERT split over a (dp, tp) mesh of gloo
processes against the same model in one process, on a fixed batch.

    torchrun --nproc-per-node 2 tests/tp_parity.py <out.json> <dp> <tp>

Every rank builds the same model (same seed) twice: the reference, whole, and a copy it
parallelizes with ``SparseBert.parallelize``. Each data-parallel rank takes its share of the
batch; the reference takes the whole batch. Loss and every parameter's gradient (gathered from
its shards) are compared; rank 0 writes the largest differences per mask mode to out.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo import parallel  # noqa: E402
from zoo.models.sparsebert import SparseBert  # noqa: E402

BERT = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 24,
    "hidden_dropout_prob": 0.0,
}
MASK = {
    "max_len": 24,
    "share_layers": True,
    "symmetric": False,
    "sampler": "sigmoid",
    "init_keep_logit": 0.3,  # near the boundary: samples differ from step to step
    "lambda_sparsity": 0.5,
    "lr": 0.05,
    "tau_start": 1.0,
    "tau_end": 0.5,
    "density": 0.4,
    "seed": 3,
}
MODES = ("dense", "dam_s", "dam_u", "random")


def batch(n: int = 8, length: int = 19) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, BERT["vocab_size"], (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 13:] = 0
    mask[6, 9:] = 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    labels = torch.arange(n) % 3
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name.replace("_fsdp_wrapped_module.", "")] = parallel.full(p.grad).detach()
    return out


def rows(model: torch.nn.Module, name: str) -> int:
    """Rows of a weight this rank holds (split by TP along dim 0, and by FSDP2 along dim 0
    again when there are data-parallel ranks)."""
    return parallel.local(dict(model.named_parameters())[name]).shape[0]


def main() -> None:
    out_path, dp, tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=(parallel.DP, parallel.TP))
    dp_rank = mesh[parallel.DP].get_local_rank()
    whole = batch()
    share = len(whole["labels"]) // dp
    mine = {k: v[dp_rank * share : (dp_rank + 1) * share] for k, v in whole.items()}
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        ref = SparseBert(["a", "b", "c"], bert=BERT, mask={**MASK, "mode": mode}).train()
        split = copy.deepcopy(ref)
        split.parallelize(mesh)
        torch.manual_seed(7)  # the same Gumbel noise for both
        ref_loss, _, _ = ref._step(whole)
        ref_loss.backward()
        torch.manual_seed(7)
        loss, _, _ = split._step(mine)
        loss.backward()
        # the data-parallel ranks' losses average to the whole batch's
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= dist.get_world_size()
        want, got = grads(ref), grads(split)
        assert want.keys() == got.keys(), (sorted(want), sorted(got))
        diffs = {n: float((want[n] - got[n]).abs().max()) for n in want}
        results[mode] = {
            "loss": float(ref_loss),
            "loss_diff": abs(float(ref_loss) - float(mean_loss)),
            "max_grad_diff": max(diffs.values()),
            "worst": max(diffs, key=diffs.get),
            "grads": len(diffs),
            "grad_norm": float(sum(g.norm() ** 2 for g in want.values()) ** 0.5),
            "local_query_rows": rows(split, "net.bert.encoder.layer.0.attention.self.query.weight"),
            "local_vocab_rows": rows(split, "net.bert.embeddings.word_embeddings.weight"),
        }
        if split.dam is not None:
            alpha = split.dam.alpha
            results[mode]["local_alpha_heads"] = parallel.local(alpha).shape[1]
            results[mode]["alpha_grad_norm"] = float(want["dam.alpha"].norm())
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
