"""The op layer: schemas, fake (meta) kernels, autograd formulas, and which implementation
serves which device.

The schemas are defined here, in Python, so neither backend depends on the other:

- ``torch.ops.zoo.*``: CPU kernels from the C++ library (``csrc/cpu``, registered there with
  ``TORCH_LIBRARY_IMPL(zoo, CPU)``), CUDA kernels from Triton (``zoo.kernels.triton``,
  registered by ``register_triton``) where Triton and a GPU are present. No nvcc is needed.
- ``torch.ops.zoo_triton.*``: the same schemas with the Triton kernels on every device, so the
  Triton implementation can be run and ``opcheck``-ed on CPU tensors under TRITON_INTERPRET=1.

Every backward is itself an op with a fake kernel, so torch.compile traces through forward and
backward without graph breaks.
"""

from __future__ import annotations

import threading

import torch

SCHEMAS = {
    "group_softmax_ce": "(Tensor logits, Tensor target, Tensor group_table, Tensor row_group, "
    "int ignore_index) -> (Tensor, Tensor, Tensor)",
    "group_softmax_ce_backward": "(Tensor grad_loss, Tensor logits, Tensor target, "
    "Tensor group_table, Tensor row_group, Tensor lse, Tensor lse_group, int ignore_index) "
    "-> Tensor",
    "gumbel_softmax": "(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)",
    "gumbel_softmax_backward": "(Tensor grad, Tensor soft, float tau) -> Tensor",
    "gumbel_sigmoid": "(Tensor logits, float tau, bool hard, int seed) -> (Tensor, Tensor)",
    "gumbel_sigmoid_backward": "(Tensor grad, Tensor soft, float tau) -> Tensor",
    "masked_attention": "(Tensor q, Tensor k, Tensor v, Tensor? keep_mask, Tensor? tile_map, "
    "float scale) -> (Tensor, Tensor)",
    "masked_attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
    "Tensor? keep_mask, Tensor? tile_map, Tensor out, Tensor lse, float scale) "
    "-> (Tensor, Tensor, Tensor)",
    "soft_masked_attention": "(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor? keep_mask, "
    "Tensor? tile_map, float scale) -> (Tensor, Tensor)",
    "soft_masked_attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
    "Tensor mask, Tensor? keep_mask, Tensor? tile_map, Tensor out, Tensor lse, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
}

# the Triton launcher of each op (zoo.kernels.triton.<name>)
TRITON_IMPLS = {
    "group_softmax_ce": "group_softmax_ce",
    "group_softmax_ce_backward": "group_softmax_ce_backward",
    "gumbel_softmax": "gumbel_softmax_op",
    "gumbel_softmax_backward": "gumbel_softmax_backward",
    "gumbel_sigmoid": "gumbel_sigmoid_op",
    "gumbel_sigmoid_backward": "gumbel_sigmoid_backward",
    "masked_attention": "masked_attention_op",
    "masked_attention_backward": "masked_attention_backward",
    "soft_masked_attention": "soft_masked_attention_op",
    "soft_masked_attention_backward": "soft_masked_attention_backward",
}

_libraries: dict[str, torch.library.Library] = {}
_impl_libraries: list[torch.library.Library] = []
_lock = threading.Lock()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def define(ns: str) -> None:
    """Define the schemas, fake kernels and autograd of namespace ``ns`` (once per process)."""
    with _lock:
        if ns in _libraries:
            return
        lib = torch.library.Library(ns, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
        _libraries[ns] = lib
        _register_fakes(ns)
        _register_autograd(ns)


def register_triton(ns: str, dispatch_keys: tuple[str, ...]) -> None:
    """Serve ``ns``'s ops on ``dispatch_keys`` with the Triton launchers."""
    from zoo.kernels import triton as tk

    define(ns)
    with _lock:
        lib = torch.library.Library(ns, "IMPL")
        for name, launcher in TRITON_IMPLS.items():
            for key in dispatch_keys:
                lib.impl(name, getattr(tk, launcher), key)
        _impl_libraries.append(lib)


def _register_fakes(ns: str) -> None:
    def reg(name):
        return torch.library.register_fake(f"{ns}::{name}", lib=_libraries[ns])

    @reg("group_softmax_ce")
    def _gsce(logits, target, group_table, row_group, ignore_index):
        n, acc = logits.shape[0], _acc_dtype(logits.dtype)
        return tuple(logits.new_empty((n,), dtype=acc) for _ in range(3))

    @reg("group_softmax_ce_backward")
    def _gsce_bwd(grad_loss, logits, target, group_table, row_group, lse, lse_group, ignore_index):
        return logits.new_empty(logits.shape)

    def gumbel_fake(logits, tau, hard, seed):
        out = logits.new_empty(logits.shape) if hard else logits.new_empty((0,))
        return out, logits.new_empty(logits.shape)

    def gumbel_bwd_fake(grad, soft, tau):
        return soft.new_empty(soft.shape)

    reg("gumbel_softmax")(gumbel_fake)
    reg("gumbel_sigmoid")(gumbel_fake)
    reg("gumbel_softmax_backward")(gumbel_bwd_fake)
    reg("gumbel_sigmoid_backward")(gumbel_bwd_fake)

    def attn_fake(q, k, v, *_masks_and_scale):
        b, h, lq, _ = q.shape
        out = q.new_empty((b, h, lq, v.shape[-1]))
        return out, q.new_empty((b, h, lq), dtype=_acc_dtype(q.dtype))

    reg("masked_attention")(attn_fake)
    reg("soft_masked_attention")(attn_fake)

    @reg("masked_attention_backward")
    def _attn_bwd(grad_out, q, k, v, keep_mask, tile_map, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @reg("soft_masked_attention_backward")
    def _soft_bwd(grad_out, q, k, v, mask, keep_mask, tile_map, out, lse, scale):
        return (
            q.new_empty(q.shape),
            k.new_empty(k.shape),
            v.new_empty(v.shape),
            mask.new_empty(mask.shape),
        )


def _register_autograd(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    lib = _libraries[ns]

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
        f"{ns}::group_softmax_ce", gsce_backward, setup_context=gsce_setup, lib=lib
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

    for name in ("gumbel_softmax", "gumbel_sigmoid"):
        torch.library.register_autograd(
            f"{ns}::{name}",
            make_backward(getattr(ops, f"{name}_backward")),
            setup_context=gumbel_setup,
            lib=lib,
        )

    # attention: outputs (out, lse); lse is an implementation detail (no gradient)
    def attn_setup(ctx, inputs, output):
        q, k, v, keep_mask, tile_map, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, keep_mask, tile_map, out, lse)
        ctx.scale = scale

    def attn_backward(ctx, grad_out, _grad_lse):
        q, k, v, keep_mask, tile_map, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.masked_attention_backward(
            grad_out, q, k, v, keep_mask, tile_map, out, lse, ctx.scale
        )
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(
        f"{ns}::masked_attention", attn_backward, setup_context=attn_setup, lib=lib
    )

    def soft_setup(ctx, inputs, output):
        q, k, v, mask, keep_mask, tile_map, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, keep_mask, tile_map, out, lse)
        ctx.scale = scale

    def soft_backward(ctx, grad_out, _grad_lse):
        q, k, v, mask, keep_mask, tile_map, out, lse = ctx.saved_tensors
        dq, dk, dv, dmask = ops.soft_masked_attention_backward(
            grad_out, q, k, v, mask, keep_mask, tile_map, out, lse, ctx.scale
        )
        return dq, dk, dv, dmask, None, None, None

    torch.library.register_autograd(
        f"{ns}::soft_masked_attention", soft_backward, setup_context=soft_setup, lib=lib
    )
