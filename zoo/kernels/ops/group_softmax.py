"""GroupSoftmax cross-entropy: classes merged into one group (per label source) share
probability. CPU: csrc/cpu/group_softmax.cpp; Triton: ``group_softmax_ce`` launchers."""

from __future__ import annotations

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import acc_dtype, check_range, checking, gen
from zoo.kernels.spec import OpSpec, register


def group_softmax_cross_entropy(
    dispatch,
    logits: torch.Tensor,
    target: torch.Tensor,
    group_table: torch.Tensor,
    row_group: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy where classes merged into one group (per label source) share probability.

    logits [N, C]; target [N] class ids; group_table [G, C] integer group id of each class for
    each of G label sources; row_group [N] the source (row of group_table) of each sample.
    Loss of row n = -log sum_{c: T[r,c] = T[r,y]} softmax(z_n)_c with r = row_group[n],
    y = target[n]. Rows with target == ignore_index give zero loss and gradient; "mean" divides
    by the number of other rows (and returns 0, not NaN, when every row is ignored). With groups
    of size 1 this equals ``F.cross_entropy``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating [N, C] tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    n, c = logits.shape
    for name, t, shape in (("target", target, (n,)), ("row_group", row_group, (n,))):
        if t.shape != shape or t.is_floating_point():
            raise ValueError(
                f"{name} must be an integer tensor of shape {shape}, got {tuple(t.shape)} {t.dtype}"
            )
    if group_table.dim() != 2 or group_table.shape[1] != c or group_table.is_floating_point():
        raise ValueError(
            f"group_table must be an integer [G, C={c}] tensor, got {tuple(group_table.shape)} "
            f"{group_table.dtype}"
        )
    for name, t in (("target", target), ("group_table", group_table), ("row_group", row_group)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if checking() and n:
        check_range("target", target, 0, c, ignore_index)
        check_range("row_group", row_group, 0, group_table.shape[0])
    ops = dispatch.ops(logits)
    if ops is None:
        return reference.group_softmax_cross_entropy(
            logits, target, group_table, row_group, ignore_index, reduction
        )
    loss, _, _ = ops.group_softmax_ce(logits, target, group_table, row_group, ignore_index)
    return reference._reduce(loss, target != ignore_index, reduction).to(logits.dtype)


def _fake(logits, target, group_table, row_group, ignore_index):
    n, acc = logits.shape[0], acc_dtype(logits.dtype)
    return tuple(logits.new_empty((n,), dtype=acc) for _ in range(3))


def _backward_fake(grad_loss, logits, target, group_table, row_group, lse, lse_group, ignore):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    # outputs (loss, lse, lse_group); only the loss is differentiable
    logits, target, group_table, row_group, ignore_index = inputs
    _, lse, lse_group = output
    ctx.save_for_backward(logits, target, group_table, row_group, lse, lse_group)
    ctx.ignore_index = ignore_index


def _backward(backward_op, ctx, grad_loss, _grad_lse, _grad_lse_group):
    logits, target, group_table, row_group, lse, lse_group = ctx.saved_tensors
    grad = backward_op(
        grad_loss, logits, target, group_table, row_group, lse, lse_group, ctx.ignore_index
    )
    return grad, None, None, None, None


def inputs(n: int, c: int, groups: int, seed: int = 0):
    """logits [n, c], targets, a random group table of ``groups`` sources, row sources."""
    g = gen(seed)
    logits = torch.randn(n, c, generator=g) * 3
    target = torch.randint(0, c, (n,), generator=g)
    table = torch.randint(0, max(1, c // 2), (groups, c), generator=g)
    rows = torch.randint(0, groups, (n,), generator=g)
    return logits, target, table, rows


def _cases():
    cases = []
    for n, c, groups, reduction in ((64, 10, 3, "mean"), (33, 7, 1, "sum"), (5, 3, 2, "none")):
        logits, target, table, rows = inputs(n, c, groups)
        target[::4] = -100
        cases.append(((logits.requires_grad_(), target, table, rows), {"reduction": reduction}))
    return cases


def _opcheck(ops, put):
    logits, target, table, rows = put(*inputs(6, 5, 2))
    target[1] = -100
    checks = [(ops.group_softmax_ce, (logits.requires_grad_(), target, table, rows, -100))]
    _, lse, lse_g = ops.group_softmax_ce(logits, target, table, rows, -100)
    grad = put(torch.ones(6))
    back = (grad, logits.detach(), target, table, rows, lse, lse_g, -100)
    return [*checks, (ops.group_softmax_ce_backward, back)]


SPEC = register(
    OpSpec(
        name="group_softmax_cross_entropy",
        call=group_softmax_cross_entropy,
        op="group_softmax_ce",
        schema="(Tensor logits, Tensor target, Tensor group_table, Tensor row_group, "
        "int ignore_index) -> (Tensor, Tensor, Tensor)",
        fake=_fake,
        backward_schema="(Tensor grad_loss, Tensor logits, Tensor target, Tensor group_table, "
        "Tensor row_group, Tensor lse, Tensor lse_group, int ignore_index) -> Tensor",
        backward_fake=_backward_fake,
        setup_context=_setup_context,
        backward=_backward,
        cpu_source="cpu/group_softmax.cpp",
        triton=("group_softmax_ce", "group_softmax_ce_backward"),
        cases=_cases,
        opcheck=_opcheck,
        bench=lambda quick: [
            (f"N={n} C={c} G=2", (x.requires_grad_(), t, table, rows), {})
            for n, c in ([(1024, 300)] if quick else [(8192, 1231)])
            for x, t, table, rows in [inputs(n, c, 2)]
        ],
    )
)
