"""Python-side registrations for the compiled ops: fake (meta) kernels, so torch.compile and
FakeTensor tracing work, and autograd formulas whose backward passes call the compiled backward
ops. Called once, after the op library is loaded."""

from __future__ import annotations

import torch

_registered = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def register() -> None:
    global _registered
    if _registered:
        return
    _register_fakes()
    _register_autograd()
    _registered = True


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("zoo::group_softmax_ce")
    def _gsce(logits, target, group_table, row_group, ignore_index):
        n, acc = logits.shape[0], _acc_dtype(logits.dtype)
        return tuple(logits.new_empty((n,), dtype=acc) for _ in range(3))

    @reg("zoo::group_softmax_ce_backward")
    def _gsce_bwd(grad_loss, logits, target, group_table, row_group, lse, lse_group, ignore_index):
        return logits.new_empty(logits.shape)

    @reg("zoo::gumbel_softmax")
    def _gs(logits, tau, hard, seed):
        out = logits.new_empty(logits.shape) if hard else logits.new_empty((0,))
        return out, logits.new_empty(logits.shape)

    @reg("zoo::gumbel_softmax_backward")
    def _gs_bwd(grad, soft, tau):
        return soft.new_empty(soft.shape)

    @reg("zoo::gumbel_sigmoid")
    def _gsig(logits, tau, hard, seed):
        out = logits.new_empty(logits.shape) if hard else logits.new_empty((0,))
        return out, logits.new_empty(logits.shape)

    @reg("zoo::gumbel_sigmoid_backward")
    def _gsig_bwd(grad, soft, tau):
        return soft.new_empty(soft.shape)

    @reg("zoo::masked_attention")
    def _attn(q, k, v, keep_mask, scale):
        b, h, lq, _ = q.shape
        out = q.new_empty((b, h, lq, v.shape[-1]))
        return out, q.new_empty((b, h, lq), dtype=_acc_dtype(q.dtype))

    @reg("zoo::masked_attention_backward")
    def _attn_bwd(grad_out, q, k, v, keep_mask, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _register_autograd() -> None:
    ops = torch.ops.zoo

    # GroupSoftmax CE: outputs (loss, lse, lse_group); only the loss is differentiable
    def gsce_setup(ctx, inputs, output):
        logits, target, group_table, row_group, ignore_index = inputs
        _, lse, lse_group = output
        ctx.save_for_backward(logits, target, group_table, row_group, lse, lse_group)
        ctx.ignore_index = ignore_index

    def gsce_backward(ctx, grad_loss, _grad_lse, _grad_lse_group):
        logits, target, group_table, row_group, lse, lse_group = ctx.saved_tensors
        grad = ops.group_softmax_ce_backward(
            grad_loss, logits, target, group_table, row_group, lse, lse_group, ctx.ignore_index
        )
        return grad, None, None, None, None

    torch.library.register_autograd(
        "zoo::group_softmax_ce", gsce_backward, setup_context=gsce_setup
    )

    # Gumbel ops: outputs (out, soft); `out` is the hard sample (empty when not hard). Both
    # take soft's gradient (straight-through for the hard sample).
    def gumbel_setup(ctx, inputs, output):
        _, tau, hard, _ = inputs
        ctx.save_for_backward(output[1])
        ctx.tau, ctx.hard = tau, hard

    def make_backward(backward_op):
        def backward(ctx, grad_out, grad_soft):
            (soft,) = ctx.saved_tensors
            grad = grad_out + grad_soft if ctx.hard else grad_soft
            return backward_op(grad, soft, ctx.tau), None, None, None

        return backward

    torch.library.register_autograd(
        "zoo::gumbel_softmax",
        make_backward(ops.gumbel_softmax_backward),
        setup_context=gumbel_setup,
    )
    torch.library.register_autograd(
        "zoo::gumbel_sigmoid",
        make_backward(ops.gumbel_sigmoid_backward),
        setup_context=gumbel_setup,
    )

    # masked attention: outputs (out, lse); lse is an implementation detail (no gradient)
    def attn_setup(ctx, inputs, output):
        q, k, v, keep_mask, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, keep_mask, out, lse)
        ctx.scale = scale

    def attn_backward(ctx, grad_out, _grad_lse):
        q, k, v, keep_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.masked_attention_backward(
            grad_out, q, k, v, keep_mask, out, lse, ctx.scale
        )
        return dq, dk, dv, None, None

    torch.library.register_autograd(
        "zoo::masked_attention", attn_backward, setup_context=attn_setup
    )
