"""Token log-probabilities from hidden states: an LM head's linear layer, temperature, log-softmax
and gather fused, as RLHF computes the log-probs (and entropies) of sampled tokens. The [N, V]
logits are never held: the kernels go over chunks of rows and of the vocabulary with an online
logsumexp, and the backward recomputes each chunk's logits from the saved hidden states, weight
and per-row logsumexp (O(N) saved beyond the inputs). CPU: csrc/cpu/token_logprobs.cpp (BLAS
GEMMs on chunks under ``at::parallel_for``); Triton: ``_token_logprobs`` (a fused forward; the
backward's logit gradients a block of rows at a time, then two GEMMs)."""

from __future__ import annotations

import math

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import acc_dtype, check_range, checking, gen
from zoo.kernels.spec import OpSpec, register


def token_logprobs(
    dispatch,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    ignore_index: int = -100,
):
    """Log-probabilities of ``tokens`` under ``log_softmax(hidden @ weight.T / temperature)``,
    without the [N, V] logits.

    hidden [N, H] and weight [V, H] (an LM head's weight; one floating dtype); tokens [N]
    integer ids in [0, V), or ``ignore_index`` for rows to skip (padding): those rows return 0
    and take no gradient. Returns the log-probs [N] (float32 for float32/bfloat16/float16 inputs,
    float64 for float64; every value <= 0), or ``(logprobs, entropies)`` when ``entropy``, the
    entropies [N] being those of each row's whole distribution. Differentiable in hidden and
    weight, through both outputs; ``temperature`` (> 0) is a constant. Sums accumulate in float32
    (float64 for float64 inputs). A token id outside [0, V) raises ValueError.
    """
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating [N, H] tensor, got {tuple(hidden.shape)} {hidden.dtype}"
        )
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight must be a [V, H={h}] {hidden.dtype} tensor, got {tuple(weight.shape)} "
            f"{weight.dtype}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: the vocabulary is empty")
    if tokens.shape != (n,) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be an integer tensor of shape ({n},), got {tuple(tokens.shape)} "
            f"{tokens.dtype}"
        )
    for name, t in (("weight", weight), ("tokens", tokens)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if checking() and n:
        check_range("tokens", tokens, 0, weight.shape[0], ignore_index)
    ops = dispatch.ops(hidden, weight, tokens)
    if ops is None:
        return reference.token_logprobs(
            hidden, weight, tokens, temperature, bool(entropy), int(ignore_index)
        )
    logprobs, entropies, _ = ops.token_logprobs(
        hidden.contiguous(),
        weight.contiguous(),
        tokens.to(torch.int64).contiguous(),
        temperature,
        bool(entropy),
        int(ignore_index),
    )
    return (logprobs, entropies) if entropy else logprobs


# --------------------------------------------------------------------------- op registration


def _fake(hidden, weight, tokens, temperature, entropy, ignore_index):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    return (
        hidden.new_empty((n,), dtype=acc),
        hidden.new_empty((n if entropy else 0,), dtype=acc),
        hidden.new_empty((n,), dtype=acc),
    )


def _backward_fake(
    grad_logprobs, grad_entropy, hidden, weight, tokens, lse, entropy, temperature, ignore_index
):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    # outputs (logprobs, entropies or an empty tensor, lse); lse has no gradient
    hidden, weight, tokens, temperature, entropy, ignore_index = inputs
    _, entropies, lse = output
    ctx.save_for_backward(hidden, weight, tokens, lse, entropies)
    ctx.temperature, ctx.entropy, ctx.ignore_index = temperature, entropy, ignore_index


def _backward(backward_op, ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, tokens, lse, entropies = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if not ctx.entropy:
        grad_entropy, entropies = None, None
    grad_hidden, grad_weight = backward_op(
        grad_logprobs.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        hidden,
        weight,
        tokens,
        lse,
        entropies,
        ctx.temperature,
        ctx.ignore_index,
    )
    return grad_hidden, grad_weight, None, None, None, None


def inputs(n: int, v: int, h: int, seed: int = 0, dtype=torch.float32, scale: float = 1.0):
    """hidden [n, h], an LM head's weight [v, h] (logits of unit scale) and tokens in [0, v)."""
    g = gen(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, tokens


def _grad(hidden, weight, tokens):
    return hidden.requires_grad_(), weight.requires_grad_(), tokens


def _cases():
    cases = []
    for i, (n, v, h, kwargs) in enumerate(
        [
            (37, 1001, 24, {}),
            (37, 1001, 24, {"temperature": 0.7}),
            (70, 300, 16, {"temperature": 1.3, "ignore_index": -1}),
        ]
    ):
        hidden, weight, tokens = inputs(n, v, h, seed=i)
        tokens[::5] = kwargs.get("ignore_index", -100)
        cases.append((_grad(hidden, weight, tokens), kwargs))
    return cases


def _opcheck(ops, put):
    hidden, weight, tokens = put(*inputs(9, 40, 8, seed=3))
    tokens[2] = -100
    checks = []
    for entropy in (False, True):
        args = (hidden.requires_grad_(), weight.requires_grad_(), tokens, 0.7, entropy, -100)
        checks.append((ops.token_logprobs, args))
        with torch.no_grad():
            _, ent, lse = ops.token_logprobs(hidden, weight, tokens, 0.7, entropy, -100)
        grad = put(torch.randn(9, generator=gen(4)))
        back = (
            grad,
            grad.flip(0) if entropy else None,
            hidden.detach(),
            weight.detach(),
            tokens,
            lse,
            ent if entropy else None,
            0.7,
            -100,
        )
        checks.append((ops.token_logprobs_backward, back))
    return checks


SPEC = register(
    OpSpec(
        name="token_logprobs",
        call=token_logprobs,
        op="token_logprobs",
        schema="(Tensor hidden, Tensor weight, Tensor tokens, float temperature, bool entropy, "
        "int ignore_index) -> (Tensor, Tensor, Tensor)",
        fake=_fake,
        backward_schema="(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, "
        "Tensor weight, Tensor tokens, Tensor lse, Tensor? entropy, float temperature, "
        "int ignore_index) -> (Tensor, Tensor)",
        backward_fake=_backward_fake,
        setup_context=_setup_context,
        backward=_backward,
        cpu_source="cpu/token_logprobs.cpp",
        triton=("_token_logprobs.token_logprobs", "_token_logprobs.token_logprobs_backward"),
        cases=_cases,
        opcheck=_opcheck,
        bench=lambda quick: [
            (f"N={n} V={v} H={h}", _grad(*inputs(n, v, h)), {"temperature": 0.7})
            for n, v, h in ([(1024, 8192, 256)] if quick else [(8192, 49152, 576)])
        ],
    )
)
