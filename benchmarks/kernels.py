"""Kernel benchmark: forward + backward time of each zoo kernel against its alternatives, as
ratios measured in this one run (no absolute targets are asserted anywhere).

    python benchmarks/kernels.py                 # all ops, the sizes of the targets
    python benchmarks/kernels.py --quick         # smaller sizes, a smoke run
    python benchmarks/kernels.py --only masked_attention --device cuda

Compared: compiled (zoo.kernels, backend=compiled: the C++ kernels on CPU, the Triton kernels
on CUDA), the eager reference
(zoo.kernels.reference), torch.compile of the reference, and for attention PyTorch's
F.scaled_dot_product_attention with the same boolean mask (the targets: the same mask as an
additive float mask, timed in alternation with ours) (and F.gumbel_softmax for Gumbel).
Each op also reports the compiled kernel's achieved bandwidth (the least bytes it must move)
against a measured copy bandwidth, i.e. how far it is from the memory-bound time.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import zoo.kernels as K  # noqa: E402
from zoo.kernels import reference as R  # noqa: E402
from zoo.kernels.ops import REGISTRY  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, min_time: float = 0.5, max_reps: int = 50) -> float:
    """Median seconds per call after a warm-up."""
    fn()
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (read + write)."""
    src = torch.empty(256 * 2**20 // 4, device=device).uniform_()  # 256 MB: beyond any cache
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / t


def fwd_bwd(fn, *inputs):
    def run():
        for x in inputs:
            x.grad = None
        out = fn()
        out.backward(torch.ones_like(out) if out.dim() else None)

    return run


_COPY_BW: dict[str, float] = {}


def row(
    name: str, times: dict[str, float], device: str, bytes_moved: int, base: str = "compiled"
) -> None:
    """Times, ratios to `base`, and the achieved bandwidth of `base` (minimum bytes it must move)
    against the measured copy bandwidth."""
    cells = [f"{k} {v * 1e3:8.2f} ms" for k, v in times.items()]
    ratios = [f"{k}/{base} {v / times[base]:5.2f}x" for k, v in times.items() if k != base]
    print(f"{name:<44} " + " | ".join(cells))
    if ratios:
        print(f"{'':<44} " + " | ".join(ratios))
    if device not in _COPY_BW:
        _COPY_BW[device] = copy_bandwidth(device)
    bw = _COPY_BW[device]
    print(
        f"{'':<44} {base}: {bytes_moved / times[base] / 1e9:.1f} GB/s of {bw / 1e9:.1f} GB/s copy "
        f"bandwidth ({times[base] * bw / bytes_moved:.2f}x the bandwidth-bound time)"
    )


def compiled_or_none(fn):
    try:
        return torch.compile(fn)
    except Exception as exc:  # pragma: no cover - torch.compile unavailable
        print(f"  torch.compile unavailable: {exc}")
        return None


def bench_group_softmax(device: str, quick: bool) -> None:
    n, c = (2048, 1231) if quick else (8192, 1231)
    print(f"\n== group_softmax_cross_entropy  N={n} C={c} 2 sources, fwd+bwd, float32")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g).to(device).requires_grad_()
    target = torch.randint(0, c, (n,), generator=g).to(device)
    # source 0 labels classes 1..1199, source 1 labels 1200..1230; unlabelled classes share
    # background's group 0
    table = torch.zeros(2, c, dtype=torch.long)
    table[0, 1:1200] = torch.arange(1, 1200)
    table[1, 1200:] = torch.arange(1200, c)
    table = table.to(device)
    row_group = torch.randint(0, 2, (n,), generator=g).to(device)

    def zoo_fn():
        return K.group_softmax_cross_entropy(logits, target, table, row_group)

    def ref_fn(fn=R.group_softmax_cross_entropy):
        return fn(logits, target, table, row_group)

    compiled_ref = compiled_or_none(R.group_softmax_cross_entropy)
    times = {"compiled": timeit(fwd_bwd(zoo_fn, logits), device)}
    times["eager"] = timeit(fwd_bwd(ref_fn, logits), device)
    if compiled_ref is not None:
        times["torch.compile"] = timeit(fwd_bwd(lambda: ref_fn(compiled_ref), logits), device)
    # forward reads the logits; backward reads them again and writes the gradient
    bytes_moved = 3 * n * c * 4
    row("fwd+bwd", times, device, bytes_moved)
    # the gradient is a fresh [N, C] tensor: on CPU its first touch (page faults) costs more than
    # the copy itself, for any implementation; this floor includes that allocation
    alloc_floor = timeit(lambda: torch.empty_like(logits).copy_(logits), device) + 2 * timeit(
        lambda: logits.detach().sum(), device
    )
    print(
        f"{'':<44} {times['compiled'] / alloc_floor:.2f}x the floor that includes allocating the "
        f"gradient ({alloc_floor * 1e3:.2f} ms)"
    )
    if device == "cpu":
        print(
            f"{'':<44} (fresh large tensors page-fault on first touch; MALLOC_MMAP_THRESHOLD_="
            "1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 makes glibc reuse them)"
        )


def band_mask(length: int, sparsity: float, device: str) -> torch.Tensor:
    half = max(0, int((1 - sparsity) * length / 2 - 0.5))
    i = torch.arange(length, device=device)
    return (i[:, None] - i[None, :]).abs() <= half


def bench_attention(device: str, quick: bool) -> None:
    b, h, d = (1, 4, 64) if quick else (4, 12, 64)
    lengths = [256, 512] if quick else [512, 1024, 2048]
    print(f"\n== masked_attention  B={b} H={h} D={d}, fwd+bwd, float32")
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        q, k, v = (
            torch.randn(b, h, length, d, generator=g).to(device).requires_grad_() for _ in range(3)
        )
        band = band_mask(length, 0.85, device)
        sparsity = 1 - band.float().mean().item()
        for label, mask in ((f"band {sparsity:.1%} sparse", band), ("dense", None)):
            # q, k, v, out, then dout and out again, then dq, dk, dv
            bytes_moved = 10 * b * h * length * d * 4
            times = attention_times(q, k, v, mask, device, eager=length <= 1024)
            row(f"L={length} {label}", times, device, bytes_moved)


def computed_tile_fraction(mask: torch.Tensor) -> float:
    """Share of 64 x 64 tiles the kernels compute (tiles with at least one kept entry)."""
    from zoo.kernels import _tiles

    length = mask.shape[-1]
    tiles = _tiles.compute_tile_map(mask, (1, 1, length, length))
    return (tiles != _tiles.EMPTY).float().mean().item()


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def timeit_interleaved(
    fns: dict[str, object], device: str, min_time: float = 1.0, min_reps: int = 10
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each fn, timed in alternation (one call of each per round,
    after two warm-ups each), and the median over rounds of each fn's time divided by the first
    fn's. On a machine shared with other work the alternatives see the same load, so their
    ratio is steadier than that of medians taken minutes apart."""
    for fn in fns.values():
        fn()
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < min_reps or time.perf_counter() - start < min_time:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    base = times[next(iter(fns))]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {
        name: statistics.median(t / b for t, b in zip(ts, base, strict=True))
        for name, ts in times.items()
    }
    return medians, ratios


def bench_attention_targets(device: str, quick: bool) -> None:
    """The issue's targets at L=1024, 90 % sparsity: fwd+bwd against SDPA with the same mask as
    an additive float mask, forward against a compiled FlexAttention with the same block mask,
    and the arithmetic rate on the tiles the kernel computes against dense SDPA's. Ours and
    SDPA are timed in alternation (timeit_interleaved), so a shared machine's load hits both."""
    b, h, d, length = (1, 4, 64, 512) if quick else (4, 12, 64, 1024)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(b, h, length, d, generator=g).to(device).requires_grad_() for _ in range(3)
    )
    band = band_mask(length, 0.90, device)
    additive = torch.zeros(band.shape, device=device).masked_fill_(~band, float("-inf"))
    sparsity = 1 - band.float().mean().item()
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{cpu_model()}, ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"\n== masked_attention targets  B={b} H={h} D={d} L={length}, band {sparsity:.1%} sparse"
        f"  [{where}]"
    )
    fb, fb_ratio = timeit_interleaved(
        {
            "ours": fwd_bwd(lambda: K.masked_attention(q, k, v, band), q, k, v),
            "sdpa": fwd_bwd(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive), q, k, v
            ),
        },
        device,
    )
    print(
        f"  fwd+bwd: ours {fb['ours'] * 1e3:.1f} ms, SDPA with the additive mask "
        f"{fb['sdpa'] * 1e3:.1f} ms -> {fb_ratio['sdpa']:.2f}x (target >= 5.5x)  [{where}]"
    )
    with torch.no_grad():
        fw, fw_ratio = timeit_interleaved(
            {
                "ours": lambda: K.masked_attention(q, k, v, band),
                "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
                "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
            },
            device,
        )
        flex_f = flex_forward_time(q, k, v, band, device)
    print(
        f"  forward: ours {fw['ours'] * 1e3:.1f} ms, SDPA with the additive mask "
        f"{fw['sdpa_mask'] * 1e3:.1f} ms ({fw_ratio['sdpa_mask']:.2f}x), dense SDPA "
        f"{fw['sdpa_dense'] * 1e3:.1f} ms"
    )
    if flex_f is not None:
        print(
            f"  forward: compiled FlexAttention with the block mask {flex_f * 1e3:.1f} ms "
            f"-> {flex_f / fw['ours']:.2f}x (target >= 3x)"
        )
    flops_dense = 4 * b * h * length * length * d  # QK^T and PV
    tiles = computed_tile_fraction(band)
    # the area the kernel computes: 64 x 64 tiles it does not skip, and inside them per 16 query
    # rows only the span of 16-key blocks that keep an entry (zoo.kernels._tiles)
    from zoo.kernels import _tiles

    computed = _tiles.computed_fraction(band) if device == "cpu" else tiles
    ours_rate = flops_dense * computed / fw["ours"] / 1e9
    sdpa_rate = flops_dense / fw["sdpa_dense"] / 1e9
    # the share from the per-round ratio: both rates come from the same rounds
    share = computed * fw_ratio["sdpa_dense"]
    print(
        f"  forward GFLOP/s on the computed area ({computed:.1%} of the scores; "
        f"{tiles:.1%} of the 64 x 64 tiles): ours {ours_rate:.1f}, dense SDPA {sdpa_rate:.1f} "
        f"-> {share:.0%} of SDPA's rate (target >= 90%)  [{where}]"
    )
    print(
        f"  (counted on all of the non-empty 64 x 64 tiles instead: "
        f"{tiles * fw_ratio['sdpa_dense']:.0%} of SDPA's rate)"
    )


def flex_forward_time(q, k, v, band: torch.Tensor, device: str) -> float | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("  FlexAttention: not in this torch")
        return None
    half = int(band[0].sum().item()) - 1  # band rows keep |i - j| <= half

    def band_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= half

    length = q.shape[2]
    block = create_block_mask(band_mod, None, None, length, length, device=device)
    flex = torch.compile(flex_attention)
    q, k, v = (t.detach() for t in (q, k, v))  # FlexAttention has no CPU backward
    return try_timeit("FlexAttention", lambda: flex(q, k, v, block_mask=block), device)


def bench_soft_attention(device: str, quick: bool) -> None:
    """The mask search's op: a float per-head mask shared by the batch, gradients to q, k, v and
    the mask, against the materialising reference and dense SDPA (no mask, no mask gradient)."""
    b, h, d, length = (2, 4, 64, 256) if quick else (8, 12, 64, 512)
    print(f"\n== soft_masked_attention  B={b} H={h} D={d} L={length}, mask [1, H, L, L], fwd+bwd")
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(b, h, length, d, generator=g).to(device).requires_grad_() for _ in range(3)
    )
    mask = (torch.rand(1, h, length, length, generator=g) > 0.5).float().to(device)
    mask.requires_grad_()
    scale = 1 / math.sqrt(d)
    times = {
        "compiled": timeit(
            fwd_bwd(lambda: K.soft_masked_attention(q, k, v, mask), q, k, v, mask), device
        ),
        "eager": timeit(
            fwd_bwd(lambda: R.soft_masked_attention(q, k, v, mask, None, scale), q, k, v, mask),
            device,
            min_time=0.2,
        ),
        "sdpa dense": timeit(
            fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), q, k, v), device
        ),
    }
    row(f"L={length} soft mask", times, device, 10 * b * h * length * d * 4 + 8 * h * length**2)


def attention_times(q, k, v, mask, device: str, eager: bool) -> dict[str, float]:
    scale = 1 / math.sqrt(q.shape[-1])
    times = {
        "compiled": timeit(fwd_bwd(lambda: K.masked_attention(q, k, v, mask), q, k, v), device),
        "sdpa": timeit(
            fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v),
            device,
        ),
    }
    if eager:  # the reference materialises [B, H, L, L]: slow and memory-hungry beyond 1024
        times["eager"] = timeit(
            fwd_bwd(lambda: R.masked_attention(q, k, v, mask, scale), q, k, v), device, min_time=0.2
        )
        compiled_ref = compiled_or_none(R.masked_attention)
        if compiled_ref is not None:
            times["torch.compile"] = timeit(
                fwd_bwd(lambda: compiled_ref(q, k, v, mask, scale), q, k, v), device, min_time=0.2
            )
    return times


def try_timeit(label: str, fn, device: str) -> float | None:
    """timeit, or None (with the reason printed) when the variant fails, e.g. does not compile."""
    try:
        return timeit(fn, device)
    except Exception as exc:
        print(f"  {label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return None


def bench_gumbel(device: str, quick: bool) -> None:
    shape = (1024, 1024) if quick else (4096, 1024)
    print(f"\n== Gumbel sampling, hard, {list(shape)}, fwd+bwd, float32")
    logits = torch.randn(*shape, device=device).requires_grad_()
    # forward reads logits, writes sample + soft; backward reads grad + soft, writes the gradient
    bytes_moved = 6 * logits.numel() * 4
    compiled_f = compiled_or_none(F.gumbel_softmax)
    variants = {
        "compiled": lambda: K.gumbel_softmax(logits, 0.5, hard=True),
        "F.gumbel_softmax": lambda: F.gumbel_softmax(logits, 0.5, hard=True),
        "eager": lambda: R.gumbel_softmax(logits, 0.5, True, -1, 1),
        # inductor cannot compile the reference's 64-bit counter RNG (it overflows folding the
        # constants), so torch.compile is measured on F.gumbel_softmax
        "torch.compile": lambda: compiled_f(logits, 0.5, hard=True),
    }
    times = {k: try_timeit(k, fwd_bwd(fn, logits), device) for k, fn in variants.items()}
    row("gumbel_softmax", {k: v for k, v in times.items() if v is not None}, device, bytes_moved)
    variants = {
        "compiled": lambda: K.gumbel_sigmoid(logits, 0.5, hard=True),
        "eager": lambda: R.gumbel_sigmoid(logits, 0.5, True, 1),
    }
    times = {k: try_timeit(k, fwd_bwd(fn, logits), device) for k, fn in variants.items()}
    row("gumbel_sigmoid", {k: v for k, v in times.items() if v is not None}, device, bytes_moved)


def bench_spec(spec, device: str, quick: bool) -> None:
    """Any registered op: the compiled kernel against the eager reference, forward + backward
    (forward only for an op with no gradient), on its spec's benchmark inputs (the dedicated
    benchmarks above add torch's alternatives)."""

    variants = {"compiled": getattr(K, spec.name), "eager": spec.bind(K.REFERENCE)}
    runs = spec.bench(quick) if spec.bench else [("case", *c) for c in spec.cases()]
    for label, args, kwargs in runs:
        args = [
            a.detach().to(device).requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
            for a in args
        ]
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        tensors = [*args, *kwargs.values()]
        moved = sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
        times = {
            name: try_timeit(
                name,
                fwd_bwd(functools.partial(fn, *args, **kwargs), *leaves)
                if spec.differentiable
                else functools.partial(fn, *args, **kwargs),
                device,
            )
            for name, fn in variants.items()
        }
        ran = {k: v for k, v in times.items() if v is not None}
        row(f"{spec.name} {label}", ran, device, moved)  # bytes: its inputs, read once


# the ops with a dedicated benchmark (torch's alternatives and the targets on docs/benchmarks.md)
DEDICATED = {
    "group_softmax_cross_entropy": [bench_group_softmax],
    "masked_attention": [bench_attention_targets, bench_attention],
    "soft_masked_attention": [bench_soft_attention],
    "gumbel_softmax": [bench_gumbel],  # times gumbel_softmax and gumbel_sigmoid
    "gumbel_sigmoid": [bench_gumbel],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", choices=REGISTRY.names(), help="one registered op")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    K.set_backend("compiled")
    K.backend()  # build first, outside any timing
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    torch.set_grad_enabled(True)
    done = set()
    for spec in REGISTRY:
        if args.only not in (None, spec.name):
            continue
        dedicated = DEDICATED.get(spec.name)
        if dedicated is None:  # a new op: compiled against the reference on its spec's inputs
            bench_spec(spec, args.device, args.quick)
        for bench in dedicated or []:
            if bench not in done:
                done.add(bench)
                bench(args.device, args.quick)


if __name__ == "__main__":
    main()
