"""SparseBERT training-step time at L=512: a learned sparse mask vs dense attention.

    python benchmarks/sparsebert_step.py [--length 512] [--density 0.15] [--search-only]

Both run the same BERT (hidden 256, 4 layers, 4 heads, batch 4) through
``zoo.kernels.masked_attention``; the masked model uses a fixed Toeplitz mask of the given
density (the shape ``dam_s`` learns: a band of kept diagonal offsets), as in stage 2. Also
timed: a stage-1 search step (hard Gumbel samples, differentiable mask path). Prints times
and ratios measured in this run.

Then the mask search against dense SDPA at BERT-base width (hidden 768, 12 heads, 4 layers,
batch 8, L=512), each variant in its own process so its peak memory (RSS high-water mark above
the RSS before the first step) is its own:

- dense SDPA: the same encoder, attention by ``F.scaled_dot_product_attention``;
- search dam_u / dam_s: stage 1 through the fused ``zoo.kernels.soft_masked_attention``;
- search dam_u, unfused: stage 1 through the materialising reference (how the search ran
  before the fused op: [B, H, L, L] scores, weights and probabilities per layer).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
from zoo import kernels  # noqa: E402
from zoo.models.sparsebert import SparseBert  # noqa: E402


def conf_mask(**options) -> dict:
    """model.mask of conf/model/sparsebert.yaml (where its defaults live), with options."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "conf" / "model" / "sparsebert.yaml")
    # max_len follows data.max_length, which this benchmark has not: the model's positions
    return {**OmegaConf.to_container(conf.mask), "max_len": None, **options}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_time(model: SparseBert, batch: dict, reps: int, warmup: int = 2) -> float:
    """Median seconds of a training step (AdamW) after ``warmup`` untimed steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(reps + warmup):
        _sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _, _ = model._step(batch)
        loss.backward()
        opt.step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _times(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


SEARCH_VARIANTS = {
    "dense_sdpa": "dense SDPA",
    "dam_u": "search dam_u (fused)",
    "dam_s": "search dam_s (fused)",
    "dam_u_unfused": "search dam_u (unfused, before)",
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def search_worker(variant: str, length: int, batch_size: int, reps: int) -> dict:
    """One variant's step time and peak memory (run in a fresh process)."""
    import torch.nn.functional as F

    from zoo.kernels import reference

    warnings.filterwarnings("ignore")
    kernels.backend()
    if variant == "dense_sdpa":
        kernels.masked_attention = lambda q, k, v, keep, scale: F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, scale=scale
        )
    if variant.endswith("_unfused"):

        def unfused(q, k, v, weight, scale, keep):
            keep4 = None if keep is None else keep.expand(q.shape[0], 1, 1, k.shape[2])
            return reference.soft_masked_attention(q, k, v, weight, keep4, scale)

        kernels.soft_masked_attention = unfused
    bert = {
        "vocab_size": 4000,
        "hidden_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": length,
    }
    mode = "dense" if variant == "dense_sdpa" else variant.split("_unfused")[0]
    mask = conf_mask(mode=mode)
    torch.manual_seed(0)
    model = SparseBert(["a", "b"], bert=bert, mask=mask)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(5, 4000, (batch_size, length), generator=g),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    batch["attention_mask"][0, length - 37 :] = 0  # one padded sequence
    before = _rss_bytes()
    step = step_time(model, batch, reps, warmup=1)  # the first step allocates the optimizer state
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"time": step, "peak": peak - before}


def search_comparison(length: int, batch_size: int, reps: int) -> None:
    print(
        f"\nmask search vs dense SDPA: hidden 768, 12 heads, 4 layers, batch {batch_size}, "
        f"L={length} "
        f"(each variant in its own process; memory = peak RSS above the RSS before the first step)"
    )
    results = {}
    for variant, label in SEARCH_VARIANTS.items():
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                variant,
                "--length",
                str(length),
                "--batch",
                str(batch_size),
                "--reps",
                str(reps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r, base = results[variant], results["dense_sdpa"]
        print(
            f"  {label:32s} {r['time'] * 1e3:8.0f} ms  peak +{r['peak'] / 2**20:7.0f} MiB  "
            f"-> {r['time'] / base['time']:.2f}x time, {r['peak'] / base['peak']:.2f}x memory of "
            "dense SDPA"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the search comparison")
    parser.add_argument("--search-only", action="store_true", help="only the search comparison")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", choices=list(SEARCH_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(search_worker(args.worker, args.length, args.batch, max(2, args.reps // 2)))
        )
        return
    warnings.filterwarnings("ignore")
    kernels.backend()
    if args.search_only:
        search_comparison(args.length, args.batch, max(2, args.reps // 2))
        return
    length = args.length
    bert = {
        "vocab_size": 4000,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "max_position_embeddings": length,
    }
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(5, 4000, (4, length), generator=g),
        "attention_mask": torch.ones(4, length, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    i = torch.arange(length)
    half = int(args.density * length / 2)
    mask = ((i[:, None] - i[None, :]).abs() <= half).expand(1, 4, length, length).contiguous()
    path = Path("/tmp/zoo_bench_mask.pt")
    torch.save({"mask": mask}, path)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels backend "
        f"{kernels.backend()}, "
        f"L={length}, batch 4, mask density {mask.float().mean():.1%}"
    )
    torch.manual_seed(0)
    dense = SparseBert(["a", "b"], bert=bert).to(device)
    fixed = SparseBert(["a", "b"], bert=bert, mask=conf_mask(mode="fixed", file=str(path)))
    fixed.resolve()  # the mask file is read here (a trainer's configure_model does it)
    fixed = fixed.to(device)
    mask = mask.to(device)
    t_dense, t_fixed = step_time(dense, batch, args.reps), step_time(fixed, batch, args.reps)
    print(f"dense attention:         {t_dense * 1e3:8.1f} ms per training step")
    print(
        f"learned mask (stage 2):  {t_fixed * 1e3:8.1f} ms per training step  -> "
        f"{t_dense / t_fixed:.2f}x faster"
    )
    # the attention alone (one layer's shapes, forward + backward) shows what the mask buys there
    q, k, v = (
        torch.randn(4, 4, length, 64, generator=g).to(device).requires_grad_() for _ in range(3)
    )

    def attn(m):
        out = kernels.masked_attention(q, k, v, m)
        out.sum().backward()

    t_ad = statistics.median(_times(lambda: attn(None), args.reps))
    t_am = statistics.median(_times(lambda: attn(mask), args.reps))
    share = 4 * t_ad / t_dense
    print(
        f"  attention alone (x4 layers): dense {4 * t_ad * 1e3:.1f} ms, masked "
        f"{4 * t_am * 1e3:.1f} ms "
        f"({t_ad / t_am:.2f}x); attention is {share:.0%} of the dense step, the rest (linear "
        "layers, "
        "layer norms, optimizer) does not shrink with the mask"
    )
    search = SparseBert(["a", "b"], bert=bert, mask=conf_mask(mode="dam_s")).to(device)
    t_search = step_time(search, batch, max(2, args.reps // 2))
    print(
        f"mask search (stage 1):   {t_search * 1e3:8.1f} ms per training step "
        f"({t_search / t_dense:.2f}x dense; "
        "dense-cost differentiable mask path)"
    )
    if args.device != "cpu":
        print("(the search memory comparison measures process RSS: it runs on the CPU only)")
        return
    search_comparison(args.length, args.batch, max(2, args.reps // 2))


if __name__ == "__main__":
    main()
