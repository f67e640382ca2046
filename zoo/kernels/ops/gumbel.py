"""Gumbel-Softmax and its binary case, sampled with a counter-based generator from one seed per
call (so every implementation draws the same noise). CPU: csrc/cpu/gumbel.cpp; Triton:
``gumbel_*`` launchers. Both ops output (out, soft): ``out`` is the hard sample (empty when not
hard); both take soft's gradient (straight-through for the hard sample)."""

from __future__ import annotations

import math

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import gen
from zoo.kernels.spec import OpSpec, register

SCHEMA = "(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = "(Tensor grad, Tensor soft, float tau) -> Tensor"


def check_tau(tau: float) -> float:
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a positive number, got {tau!r}") from None
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    return tau


def draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed per call from the generator (the default CPU generator if None, so
    torch.manual_seed makes runs reproducible); the kernels derive every element's noise from
    it with a counter-based generator."""
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def gumbel_softmax(
    dispatch,
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample from the Gumbel-Softmax distribution (as ``F.gumbel_softmax``): softmax((logits +
    g) / tau) with g ~ Gumbel(0, 1); ``hard=True`` returns exact one-hot vectors whose gradient is
    the soft sample's (straight-through). Uniform draws lie in [2^-24, 1 - 2^-24], so the result
    is never NaN or inf."""
    tau = check_tau(tau)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of {logits.dim()} dimensions")
    dim = dim % logits.dim()
    seed = draw_seed(generator)
    ops = dispatch.ops(logits)
    if ops is None:
        return reference.gumbel_softmax(logits, tau, bool(hard), dim, seed)
    out, soft = ops.gumbel_softmax(logits.movedim(dim, -1), tau, bool(hard), seed)
    return (out if hard else soft).movedim(-1, dim)


def gumbel_sigmoid(
    dispatch,
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Binary Gumbel-Softmax (the two-class case): sigmoid((logits + l) / tau) with
    l ~ Logistic(0, 1); ``hard=True`` returns exact 0/1 masks with the soft gradient."""
    tau = check_tau(tau)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    seed = draw_seed(generator)
    ops = dispatch.ops(logits)
    if ops is None:
        return reference.gumbel_sigmoid(logits, tau, bool(hard), seed)
    out, soft = ops.gumbel_sigmoid(logits, tau, bool(hard), seed)
    return out if hard else soft


def _fake(logits, tau, hard, seed):
    out = logits.new_empty(logits.shape) if hard else logits.new_empty((0,))
    return out, logits.new_empty(logits.shape)


def _backward_fake(grad, soft, tau):
    return soft.new_empty(soft.shape)


def _setup_context(ctx, inputs, output):
    _, tau, hard, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.tau, ctx.hard = tau, hard


def _backward(backward_op, ctx, grad_out, grad_soft):
    (soft,) = ctx.saved_tensors
    grad = grad_out + grad_soft if ctx.hard else grad_soft
    return backward_op(grad, soft, ctx.tau), None, None, None


def _cases(dims: bool):
    def cases():
        out = []
        for shape, hard in (((64, 10), False), ((8, 5, 7), True), ((300,), True)):
            logits = (torch.randn(*shape, generator=gen(len(shape))) * 2).requires_grad_()
            kwargs = {"tau": 0.7, "hard": hard, "generator": gen(11)}
            if dims and len(shape) == 3:
                kwargs["dim"] = 1
            out.append(((logits,), kwargs))
        return out

    return cases


def _opcheck(op: str):
    def opcheck(ops, put):
        x = put(torch.randn(4, 7)).requires_grad_()
        checks = [(getattr(ops, op), (x, 0.5, hard, 123)) for hard in (False, True)]
        soft = put(torch.softmax(torch.randn(4, 7), -1))
        back = (put(torch.randn(4, 7)), soft, 0.5)
        return [*checks, (getattr(ops, f"{op}_backward"), back)]

    return opcheck


for _name, _call in (("gumbel_softmax", gumbel_softmax), ("gumbel_sigmoid", gumbel_sigmoid)):
    register(
        OpSpec(
            name=_name,
            call=_call,
            op=_name,
            schema=SCHEMA,
            fake=_fake,
            backward_schema=BACKWARD_SCHEMA,
            backward_fake=_backward_fake,
            setup_context=_setup_context,
            backward=_backward,
            cpu_source="cpu/gumbel.cpp",
            triton=(f"{_name}_op", f"{_name}_backward"),
            cases=_cases(dims=_name == "gumbel_softmax"),
            opcheck=_opcheck(_name),
            bench=lambda quick: [
                (
                    f"{r}x{c} hard",
                    (torch.randn(r, c, generator=gen(0)).requires_grad_(),),
                    {"tau": 0.5, "hard": True},
                )
                for r, c in ([(512, 128)] if quick else [(4096, 512)])
            ],
        )
    )
