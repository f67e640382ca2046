"""Tensor parallelism for SparseBERT: memory per rank and step time.

    python benchmarks/model_parallel.py            # both
    python benchmarks/model_parallel.py --memory   # the table only (no processes)

1. **Memory per rank** for a BERT-base classifier (vocab 30,522, hidden 768, 12 layers, 12
   heads, 110 M parameters) trained with AdamW in fp32: parameters + gradients + the two Adam
   moments = 16 bytes per parameter a rank holds. Computed from the real module and the real
   plan (``zoo.parallel``): a parameter the plan splits is 1/tp per rank; FSDP2 splits every
   parameter again by dp; DDP keeps everything on every rank. Activations are left out (they
   depend on batch and length; TP splits the attention and MLP ones by tp, FSDP2 does not).
2. **Step time**, TP=2 (two gloo processes, one thread each) against one process (one thread,
   and two threads: the same two cores), same global batch, a MiniLM-sized encoder (hidden
   384, 6 layers, 12 heads, batch 32, 64 tokens), forward + backward + AdamW step. Ratios are
   measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo import parallel  # noqa: E402
from zoo.models.sparsebert import SparseBert  # noqa: E402

BERT_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
MINILM = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.0,
}
BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, gradient, Adam's two moments


def split_by_plan(name: str) -> bool:
    """Whether ``zoo.parallel``'s plan splits this parameter across the TP ranks."""
    if name.startswith("net.bert.embeddings.word_embeddings."):
        return True
    if ".encoder.layer." not in name:
        return False
    from torch.distributed.tensor.parallel import RowwiseParallel

    module, kind = name.split(".encoder.layer.", 1)[1].split(".", 1)[1].rsplit(".", 1)
    style = parallel.transformer_block_plan().get(module)
    # a row-wise layer's bias is added after the all-reduce: replicated
    return style is not None and not (isinstance(style, RowwiseParallel) and kind == "bias")


def memory_table() -> str:
    with torch.device("meta"):
        model = SparseBert(["neg", "pos"], bert=BERT_BASE)
    params = [(n, p.numel()) for n, p in model.named_parameters()]
    total = sum(n for _, n in params)
    split = sum(n for name, n in params if split_by_plan(name))
    settings = [
        ("one device", 1, 1, False),
        ("DDP, 8 ranks", 8, 1, False),
        ("FSDP2, 8 ranks", 8, 1, True),
        ("TP=2", 1, 2, False),
        ("TP=4", 1, 4, False),
        ("TP=2 × FSDP2 dp=4 (8 ranks)", 4, 2, True),
        ("TP=4 × FSDP2 dp=2 (8 ranks)", 2, 4, True),
    ]
    lines = [
        f"BERT-base classifier: {total / 1e6:.1f} M parameters, {split / total:.1%} of them split "
        "by the TP plan (Q/K/V, attention output, MLP, word embeddings)",
        "",
        "| setting | parameters per rank | params + grads + AdamW per rank |",
        "|---|---|---|",
    ]
    for label, dp, tp, fsdp in settings:
        per_rank = split / tp + (total - split)
        if fsdp:
            per_rank /= dp
        mib = per_rank * BYTES_PER_PARAM / 2**20
        lines.append(f"| {label} | {per_rank / 1e6:.1f} M | {mib:,.0f} MiB |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- step time


def batch(n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, MINILM["vocab_size"], (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "token_type_ids": torch.zeros(n, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def worker(out: str, tp: int, steps: int, warmup: int) -> None:
    torch.manual_seed(0)
    model = SparseBert(["a", "b"], bert=MINILM).train()
    if tp > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        model.parallelize(
            init_device_mesh("cpu", (1, tp), mesh_dim_names=(parallel.DP, parallel.TP))
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batch(32, 64)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss, _, _ = model._step(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if tp == 1 or torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps({"median_s": statistics.median(times)}))
    if tp > 1:
        torch.distributed.destroy_process_group()


def step_times(steps: int, warmup: int) -> dict[str, float]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        me = [__file__, "--worker"]
        variants = {
            "1 process, 1 thread": ([sys.executable, *me], "1"),
            "1 process, 2 threads": ([sys.executable, *me], "2"),
            "TP=2 (2 processes, 1 thread each)": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node=2",
                    *me,
                    "--tp",
                    "2",
                ],
                "1",
            ),
        }
        for label, (cmd, threads) in variants.items():
            out = Path(tmp) / "t.json"
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            args = ["--out", str(out), "--steps", str(steps), "--warmup", str(warmup)]
            subprocess.run([*cmd, *args], env=env, check=True, capture_output=True)
            results[label] = json.loads(out.read_text())["median_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", action="store_true", help="only the memory table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args.out, args.tp, args.steps, args.warmup)
        return
    print(memory_table())
    if args.memory:
        return
    print(
        "\nstep time, MiniLM-sized encoder (hidden 384, 6 layers, 12 heads), batch 32 x 64 "
        f"tokens, forward + backward + AdamW, median of {args.steps} steps:"
    )
    times = step_times(args.steps, args.warmup)
    base = times["1 process, 1 thread"]
    for label, t in times.items():
        print(f"  {label:38s} {t * 1000:8.1f} ms   {t / base:5.2f}x the 1-thread step")


if __name__ == "__main__":
    main()
