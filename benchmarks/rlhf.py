"""RLHF benchmark: the log-probs of sampled tokens from an LM head's hidden states, fused
(``zoo.kernels.token_logprobs``) against the materialised path, as ratios measured in this one
run.

    python benchmarks/rlhf.py            # V=49152, H=576, N=16 x 512 = 8192 tokens, float32, CPU
    python benchmarks/rlhf.py --quick    # N=1024: a smoke run

The materialised path is what a training loop writes by hand::

    logits = hidden @ weight.T
    logprobs = log_softmax(logits / T).gather(1, tokens)

which holds the [N, V] logits (1.5 GiB here) and the tensors derived from them. Measured for both,
forward + backward of ``logprobs.sum()`` (gradients to hidden and weight):

1. time: both in this process, called in alternation after two warm-up calls each
   (``benchmarks/kernels.py``'s ``timeit_interleaved``): the median time of each, and the median
   over rounds of the per-round ratio, so that a shared machine's load hits both alike;
2. peak memory: each path in a fresh process, the growth of its peak resident set (VmHWM, reset
   after the inputs are allocated and a small warm-up has run) over one step;
3. that both give the same log-probs and gradients.

Targets: time <= 1.2x and peak memory <= 0.35x the materialised path's.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kernel_bench  # noqa: E402  (benchmarks/kernels.py)

import zoo.kernels as K  # noqa: E402
from zoo.kernels.ops.token_logprobs import inputs  # noqa: E402

TIME_TARGET, MEMORY_TARGET = 1.2, 0.35

# the kernel benchmark's alternating timer; a step takes seconds here: 3 timed rounds
timeit_interleaved = functools.partial(kernel_bench.timeit_interleaved, min_time=0.0, min_reps=3)


def materialised(hidden, weight, tokens, temperature: float) -> torch.Tensor:
    logits = hidden @ weight.T
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, tokens[:, None]).squeeze(1)


def fused(hidden, weight, tokens, temperature: float) -> torch.Tensor:
    return K.token_logprobs(hidden, weight, tokens, temperature)


PATHS = {"materialised": materialised, "fused": fused}


def step(fn, hidden, weight, tokens, temperature: float) -> torch.Tensor:
    """One forward + backward; the gradients land in hidden.grad and weight.grad."""
    hidden.grad = weight.grad = None
    logprobs = fn(hidden, weight, tokens, temperature)
    logprobs.sum().backward()
    return logprobs.detach()


def leaves(n: int, v: int, h: int):
    hidden, weight, tokens = inputs(n, v, h)
    return hidden.requires_grad_(), weight.requires_grad_(), tokens


def _peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set


def worker(path: str, n: int, v: int, h: int, temperature: float) -> None:
    """In a fresh process: the peak resident set's growth over one step of ``path``."""
    K.set_backend("compiled")
    fn = PATHS[path]
    step(fn, *leaves(64, 1024, h), temperature)  # library, allocator and threads warm-up
    hidden, weight, tokens = leaves(n, v, h)
    _reset_peak()
    before = _peak_kib()
    step(fn, hidden, weight, tokens, temperature)
    print(json.dumps({"grown_kib": _peak_kib() - before}))


def peak_memory(path: str, n: int, v: int, h: int, temperature: float) -> int:
    """Bytes the peak resident set grew by over one step of ``path``, in a fresh process."""
    args = ["--worker", path, "--n", str(n), "--v", str(v), "--h", str(h)]
    out = subprocess.run(
        [sys.executable, __file__, *args, "--temperature", str(temperature)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["grown_kib"] * 1024


def bench_token_logprobs(n: int, v: int, h: int, temperature: float) -> None:
    logits_mib = n * v * 4 / 2**20
    print(
        f"\n== token log-probs, forward + backward: N={n} V={v} H={h} float32, T={temperature} "
        f"(the logits: {logits_mib:.0f} MiB)"
    )
    hidden, weight, tokens = leaves(n, v, h)
    runs = {
        name: functools.partial(step, fn, hidden, weight, tokens, temperature)
        for name, fn in PATHS.items()
    }
    times, ratios = timeit_interleaved(runs, "cpu")  # ratios: to the materialised path
    results = {}
    for name, run in runs.items():
        logprobs = run()
        results[name] = (logprobs, hidden.grad.clone(), weight.grad.clone())
    diffs = [(a - b).abs().max().item() for a, b in zip(*results.values(), strict=True)]
    del results
    peaks = {name: peak_memory(name, n, v, h, temperature) for name in PATHS}
    for name in PATHS:
        print(f"  {name:<13} {times[name]:7.2f} s   peak memory +{peaks[name] / 2**20:7.0f} MiB")
    time_ratio = ratios["fused"]
    memory_ratio = peaks["fused"] / peaks["materialised"]
    print(
        f"  fused / materialised: time {time_ratio:.2f}x (median of the rounds' ratios; target "
        f"<= {TIME_TARGET}x: "
        f"{'met' if time_ratio <= TIME_TARGET else 'NOT met'}), peak memory {memory_ratio:.3f}x "
        f"(target <= {MEMORY_TARGET}x: {'met' if memory_ratio <= MEMORY_TARGET else 'NOT met'})"
    )
    print(
        f"  largest differences: log-probs {diffs[0]:.2e}, grad hidden {diffs[1]:.2e}, "
        f"grad weight {diffs[2]:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1024")
    parser.add_argument("--n", type=int, default=None, help="tokens (default 16 x 512)")
    parser.add_argument("--v", type=int, default=49152, help="vocabulary")
    parser.add_argument("--h", type=int, default=576, help="hidden size")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--worker", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.n or (1024 if args.quick else 16 * 512)
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(True)
    if args.worker:
        worker(args.worker, n, args.v, args.h, args.temperature)
        return
    K.set_backend("compiled")
    K.backend()  # build first, outside any timing
    print(
        f"torch {torch.__version__}, {kernel_bench.cpu_model()}, threads "
        f"{torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    bench_token_logprobs(n, args.v, args.h, args.temperature)


if __name__ == "__main__":
    main()
