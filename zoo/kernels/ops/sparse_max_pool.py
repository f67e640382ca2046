"""Sparse 3-D max-pooling over a kernel map (``sparse_kernel_map``). CPU:
csrc/cpu/sparse_max_pool.cpp; Triton: ``_sparse.sparse_max_pool``. The backward sends each
output's gradient to the input its max came from, as a gather over the inverse map (no atomics)."""

from __future__ import annotations

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import gen
from zoo.kernels.ops.sparse_conv import check_nbr
from zoo.kernels.ops.sparse_kernel_map import CONFIGS, random_coords
from zoo.kernels.spec import OpSpec, register


def sparse_max_pool(dispatch, features: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """Sparse max-pooling: ``out[o, c] = max_k features[nbr[o, k], c]`` over the taps with
    ``nbr[o, k] >= 0`` (0 for an output with none).

    features [N, C] floating; nbr int32 [M, K], a kernel map (``sparse_kernel_map``). Returns
    [M, C]. The gradient goes to the tap the max came from (the first one on ties).
    """
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a floating [N, C] tensor, got {tuple(features.shape)} "
            f"{features.dtype}"
        )
    check_nbr(nbr, features.shape[0])
    if nbr.device != features.device:
        raise ValueError(f"nbr is on {nbr.device}, features on {features.device}")
    ops = dispatch.ops(features, nbr)
    if ops is None:
        return reference.sparse_max_pool(features, nbr)[0]
    return ops.sparse_max_pool(features.contiguous(), nbr.contiguous())[0]


def _fake(features, nbr):
    shape = (nbr.shape[0], features.shape[1])
    return features.new_empty(shape), nbr.new_empty(shape)


def _backward_fake(grad_out, features, arg, nbr):
    return features.new_empty(features.shape)


def _setup_context(ctx, inputs, output):
    features, nbr = inputs
    ctx.save_for_backward(features, output[1], nbr)


def _backward(backward_op, ctx, grad_out, _grad_arg):
    features, arg, nbr = ctx.saved_tensors
    return backward_op(grad_out.contiguous(), features, arg, nbr), None


def inputs(n: int, c: int, config=CONFIGS[1], seed: int = 0):
    ks, st, pad, dil, subm = config
    coords = random_coords(n, (9, 10, 11), seed=seed)
    triples = ([v] * 3 if isinstance(v, int) else list(v) for v in (ks, st, pad, dil))
    _, nbr = reference.sparse_kernel_map(coords, (9, 10, 11), *triples, subm)
    features = torch.randn(len(coords), c, generator=gen(seed + 1))
    return features, nbr


def _cases():
    cases = []
    for i, (config, c) in enumerate(zip(CONFIGS, (4, 16, 3, 5, 33))):
        features, nbr = inputs(70, c, config, seed=i)
        if i == 2:  # ties: the first tap takes the gradient
            features = features.round()
        cases.append(((features.requires_grad_(), nbr), {}))
    return cases


def _opcheck(ops, put):
    features, nbr = put(*inputs(12, 3))
    out, arg = ops.sparse_max_pool(features, nbr)
    grad = put(torch.randn(out.shape, generator=gen(4)))
    return [
        (ops.sparse_max_pool, (features.requires_grad_(), nbr)),
        (ops.sparse_max_pool_backward, (grad, features.detach(), arg, nbr)),
    ]


SPEC = register(
    OpSpec(
        name="sparse_max_pool",
        call=sparse_max_pool,
        op="sparse_max_pool",
        schema="(Tensor features, Tensor nbr) -> (Tensor, Tensor)",
        fake=_fake,
        backward_schema="(Tensor grad_out, Tensor features, Tensor arg, Tensor nbr) -> Tensor",
        backward_fake=_backward_fake,
        setup_context=_setup_context,
        backward=_backward,
        cpu_source="cpu/sparse_max_pool.cpp",
        triton=("_sparse.sparse_max_pool", "_sparse.sparse_max_pool_backward"),
        cases=_cases,
        opcheck=_opcheck,
        bench=lambda quick: [
            (f"N={2 * n} C={c} k3 s2", (f.requires_grad_(), nbr), {})
            for n, c in ([(4000, 32)] if quick else [(50000, 64)])
            for f, nbr in [inputs(n, c)]
        ],
    )
)
