"""SparseBERT training-step time at L=512: a learned sparse mask vs dense attention.

    python benchmarks/sparsebert_step.py [--length 512] [--density 0.15]

Both run the same BERT (hidden 256, 4 layers, 4 heads, batch 4) through
``zoo.kernels.masked_attention``; the masked model uses a fixed Toeplitz mask of the given
density (the shape ``dam_s`` learns: a band of kept diagonal offsets), as in stage 2. Also
timed: a stage-1 search step (hard Gumbel samples, differentiable mask path). Prints times
and ratios measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from zoo import kernels  # noqa: E402
from zoo.models.sparsebert import SparseBert  # noqa: E402


def step_time(model: SparseBert, batch: dict, reps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _, _ = model._step(batch)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _times(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    kernels.backend()
    length = args.length
    bert = {"vocab_size": 4000, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 1024, "max_position_embeddings": length}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 4000, (4, length), generator=g),
             "attention_mask": torch.ones(4, length, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])}  # fmt: skip
    i = torch.arange(length)
    half = int(args.density * length / 2)
    mask = ((i[:, None] - i[None, :]).abs() <= half).expand(1, 4, length, length).contiguous()
    path = Path("/tmp/zoo_bench_mask.pt")
    torch.save({"mask": mask}, path)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels backend {kernels.backend()}, "
          f"L={length}, batch 4, mask density {mask.float().mean():.1%}")  # fmt: skip
    torch.manual_seed(0)
    dense = SparseBert(["a", "b"], bert=bert)
    fixed = SparseBert(["a", "b"], bert=bert, mask={"mode": "fixed", "file": str(path)})
    t_dense, t_fixed = step_time(dense, batch, args.reps), step_time(fixed, batch, args.reps)
    print(f"dense attention:         {t_dense * 1e3:8.1f} ms per training step")
    print(
        f"learned mask (stage 2):  {t_fixed * 1e3:8.1f} ms per training step  -> {t_dense / t_fixed:.2f}x faster"
    )
    # the attention alone (one layer's shapes, forward + backward) shows what the mask buys there
    q, k, v = (torch.randn(4, 4, length, 64, generator=g).requires_grad_() for _ in range(3))

    def attn(m):
        out = kernels.masked_attention(q, k, v, m)
        out.sum().backward()

    t_ad = statistics.median(_times(lambda: attn(None), args.reps))
    t_am = statistics.median(_times(lambda: attn(mask), args.reps))
    share = 4 * t_ad / t_dense
    print(f"  attention alone (x4 layers): dense {4 * t_ad * 1e3:.1f} ms, masked {4 * t_am * 1e3:.1f} ms "
          f"({t_ad / t_am:.2f}x); attention is {share:.0%} of the dense step, the rest (linear layers, "
          "layer norms, optimizer) does not shrink with the mask")  # fmt: skip
    search = SparseBert(["a", "b"], bert=bert, mask={"mode": "dam_s"})
    t_search = step_time(search, batch, max(2, args.reps // 2))
    print(f"mask search (stage 1):   {t_search * 1e3:8.1f} ms per training step ({t_search / t_dense:.2f}x dense; "
          "dense-cost differentiable mask path)")  # fmt: skip


if __name__ == "__main__":
    main()
