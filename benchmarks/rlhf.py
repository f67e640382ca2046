"""RLHF benchmark: the log-probs of sampled tokens from an LM head's hidden states, fused
(``zoo.kernels.token_logprobs``) against the materialised path, as ratios measured in this one
run.

    python benchmarks/rlhf.py            # V=49152, H=576, N=16 x 512 = 8192 tokens, float32, CPU
    python benchmarks/rlhf.py --quick    # N=1024: a smoke run
    python benchmarks/rlhf.py --ppo-step # a PPO step on SmolLM2-135M: zoo against trl 1.12.0

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

``--ppo-step``: one PPO step of SmolLM2-135M-Instruct (policy, reference, value model and a
reward model of the same size, fp32, CPU) on 8 prompts of the demo × 48 new tokens, 4 PPO
epochs, one minibatch, as trl 1.12.0's ``PPOTrainer.train()`` runs it and as zoo's
``PPOPolicy`` does, each after one warm-up step, broken down into rollout (generation),
scoring (log-probs of policy and reference, values, rewards, advantages) and update. TRL needs
a pad token other than EOS: it gets ``<|endoftext|>`` (SmolLM2's pad is its EOS). Target: zoo's
step <= 1.0x TRL's.
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

# the script's own folder leaves sys.path: its kernels.py would shadow the PyPI package
# ``kernels`` that transformers imports (the PPO step's models)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))  # run from a checkout


def _load_kernel_bench():
    """benchmarks/kernels.py under its own name: on sys.path as ``kernels`` it would shadow the
    PyPI package ``kernels`` that transformers imports (the PPO step's models)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "kernels.py"
    spec = importlib.util.spec_from_file_location("zoo_benchmarks_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kernel_bench = _load_kernel_bench()

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


PPO_PROMPTS, PPO_NEW_TOKENS = 8, 48


def _demo_prompts(tokenizer) -> tuple[list[list[int]], list[str]]:
    import tempfile

    from zoo.data.demo.rlhf import write_demo_rlhf
    from zoo.data.rlhf import prompt_of, prompt_text, read_jsonl

    folder = write_demo_rlhf(Path(tempfile.mkdtemp(prefix="zoo-bench-rlhf-")) / "demo", 64, 8, 8)
    rows = [prompt_of(o, "") for _, o in read_jsonl(folder / "prompts" / "train.jsonl")]
    texts = [prompt_text(tokenizer, p, True) for p in rows[:PPO_PROMPTS]]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], rows[:PPO_PROMPTS]


def trl_ppo_step(steps: int = 2) -> dict[str, float]:
    """Seconds of TRL's last PPO step (of ``steps``), by part."""
    import tempfile
    import time

    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from zoo.models.components.causal_lm import load_tokenizer, source_folder

    folder = str(source_folder("smollm2"))
    tokenizer = load_tokenizer("smollm2")
    tokenizer.pad_token = "<|endoftext|>"  # TRL: pad must differ from EOS
    prompts, _ = _demo_prompts(tokenizer)
    lm = functools.partial(AutoModelForCausalLM.from_pretrained, folder, dtype=torch.float32)
    head = functools.partial(
        AutoModelForSequenceClassification.from_pretrained,
        folder,
        num_labels=1,
        dtype=torch.float32,
    )
    marks: list[tuple[str, float]] = []

    def mark(name, fn):
        def wrapped(*args, **kwargs):
            marks.append((name, time.perf_counter()))
            out = fn(*args, **kwargs)
            marks.append((name + "_end", time.perf_counter()))
            return out

        return wrapped

    trl_ppo.batch_generation = mark("generate", trl_ppo.batch_generation)
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(
            output_dir=tmp,
            report_to=[],
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            save_strategy="no",
            num_sample_generations=0,
            seed=0,
            total_episodes=PPO_PROMPTS * steps,
            per_device_train_batch_size=PPO_PROMPTS,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=4,
            local_rollout_forward_batch_size=PPO_PROMPTS,
            response_length=PPO_NEW_TOKENS,
            stop_token="eos",
            missing_eos_penalty=1.0,
            learning_rate=3e-6,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=lm(),
            ref_model=lm(),
            reward_model=head(),
            train_dataset=Dataset.from_dict({"input_ids": prompts * steps}),
            value_model=head(),
        )
        wrapper = trainer.model
        wrapper.forward = mark("update_forward", wrapper.forward)
        trainer.optimizer.step = mark("step", trainer.optimizer.step)
        t0 = time.perf_counter()
        trainer.train()
        end = time.perf_counter()
    starts = [t for n, t in marks if n == "generate"]
    last = starts[-1]
    gen_end = next(t for n, t in marks if n == "generate_end" and t > last)
    first_update = next(t for n, t in marks if n == "update_forward" and t > gen_end)
    last_step = max(t for n, t in marks if n == "step_end")
    del t0, end
    return {
        "rollout": gen_end - last,
        "scoring": first_update - gen_end,
        "update": last_step - first_update,
    }


def zoo_ppo_step(steps: int = 2) -> dict[str, float]:
    """Seconds of zoo's last PPO step (of ``steps``), by part (the step's own timers)."""
    import tempfile

    import lightning as L
    from torch.utils.data import DataLoader

    from zoo.data.rlhf import left_pad
    from zoo.models.components.causal_lm import architecture, load_tokenizer, tokenizer_files
    from zoo.models.rlhf import PPOPolicy, RewardModel

    tokenizer = load_tokenizer("smollm2")
    prompts, raw = _demo_prompts(tokenizer)
    arch = architecture("smollm2")
    spec = {"tokenizer": tokenizer_files(tokenizer), "chat": True, "truncation": "left"}
    with tempfile.TemporaryDirectory() as tmp:
        reward = RewardModel("smollm2", arch, optimizer=None)
        reward.configure_model()
        reward.preprocessing = spec | {"max_length": 512}
        reward_file = Path(tmp) / "reward_model.pt"
        reward._write_reward_file(reward_file)
        del reward
        policy = PPOPolicy(
            "smollm2",
            arch,
            optimizer=lambda params: torch.optim.AdamW(params, lr=3e-6, eps=1e-5, fused=True),
            reward={"file": str(reward_file)},
            response_length=PPO_NEW_TOKENS,
            missing_eos_penalty=1.0,
            samples_every_n_steps=0,
        )
        policy.preprocessing = spec | {"max_prompt_length": 512}
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "prompts": raw,
            "index": torch.arange(len(prompts)),
        }
        loader = DataLoader([batch] * steps, batch_size=None)
        times: list[dict[str, float]] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                m = trainer.callback_metrics
                times.append({k: float(m[f"time/{k}"]) for k in ("rollout", "scoring", "update")})

        trainer = L.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            accelerator="cpu",
            callbacks=[Record()],
        )
        trainer.fit(policy, train_dataloaders=loader)
    return times[-1]


def bench_ppo_step() -> None:
    print(
        f"== a PPO step: SmolLM2-135M-Instruct, {PPO_PROMPTS} prompts x {PPO_NEW_TOKENS} new "
        "tokens, 4 PPO epochs, fp32, CPU (the last of 2 steps)"
    )
    ours, theirs = zoo_ppo_step(), trl_ppo_step()
    for part in ("rollout", "scoring", "update"):
        print(
            f"  {part:<8} zoo {ours[part]:7.2f} s   trl {theirs[part]:7.2f} s   "
            f"ratio {ours[part] / theirs[part]:.2f}x"
        )
    total = sum(ours.values()) / sum(theirs.values())
    print(
        f"  step     zoo {sum(ours.values()):7.2f} s   trl {sum(theirs.values()):7.2f} s   "
        f"ratio {total:.2f}x (target <= 1.0x: {'met' if total <= 1.0 else 'NOT met'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1024")
    parser.add_argument("--n", type=int, default=None, help="tokens (default 16 x 512)")
    parser.add_argument("--v", type=int, default=49152, help="vocabulary")
    parser.add_argument("--h", type=int, default=576, help="hidden size")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--ppo-step", action="store_true", help="a PPO step: zoo vs trl 1.12.0")
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
    if args.ppo_step:
        bench_ppo_step()
        return
    bench_token_logprobs(n, args.v, args.h, args.temperature)


if __name__ == "__main__":
    main()
