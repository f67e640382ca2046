"""Sparse 3-D convolution over a kernel map (``sparse_kernel_map``): gather, GEMM, scatter.
CPU: csrc/cpu/sparse_conv.cpp (per kernel tap, chunks of (input, output) pairs gathered into a
GEMM with BLAS under ``at::parallel_for``); Triton: ``_sparse.sparse_conv`` (each program owns a
tile of outputs and loops over the taps: no atomics). Both are deterministic."""

from __future__ import annotations

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import checking, gen
from zoo.kernels.ops.sparse_kernel_map import CONFIGS, random_coords
from zoo.kernels.spec import OpSpec, register


def check_nbr(nbr: torch.Tensor, n_in: int, k: int | None = None) -> None:
    if nbr.dim() != 2 or nbr.dtype != torch.int32 or (k is not None and nbr.shape[1] != k):
        want = f"[M, {k}]" if k is not None else "[M, K]"
        raise ValueError(
            f"nbr (the kernel map) must be an int32 {want} tensor, got {tuple(nbr.shape)} "
            f"{nbr.dtype}"
        )
    if checking() and nbr.numel():
        lo, hi = int(nbr.min()), int(nbr.max())
        if lo < -1 or hi >= n_in:
            raise ValueError(
                f"nbr (the kernel map) holds row {lo if lo < -1 else hi}, outside [-1, {n_in}) "
                f"for {n_in} input rows"
            )


def sparse_conv(
    dispatch, features: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor
) -> torch.Tensor:
    """Sparse convolution: ``out[o] = sum_k features[nbr[o, k]] @ weight[k]`` over the taps
    with ``nbr[o, k] >= 0``.

    features [N, C_in] (float32/float64/float16/bfloat16; half types accumulate in float32);
    weight [K, C_in, C_out]; nbr int32 [M, K], a kernel map (``sparse_kernel_map``, or its
    inverse for a transposed convolution). Returns [M, C_out]. Differentiable in features and
    weight; every implementation sums in a fixed order, so results repeat bit for bit.
    """
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a floating [N, C] tensor, got {tuple(features.shape)} "
            f"{features.dtype}"
        )
    if weight.dim() != 3 or weight.shape[1] != features.shape[1] or weight.dtype != features.dtype:
        raise ValueError(
            f"weight must be a [K, C_in={features.shape[1]}, C_out] {features.dtype} tensor, got "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    check_nbr(nbr, features.shape[0], weight.shape[0])
    for name, t in (("weight", weight), ("nbr", nbr)):
        if t.device != features.device:
            raise ValueError(f"{name} is on {t.device}, features on {features.device}")
    ops = dispatch.ops(features, weight, nbr)
    if ops is None:
        return reference.sparse_conv(features, weight, nbr)
    return ops.sparse_conv(features.contiguous(), weight.contiguous(), nbr.contiguous())


def _fake(features, weight, nbr):
    return features.new_empty((nbr.shape[0], weight.shape[2]))


def _backward_fake(grad_out, features, weight, nbr):
    return features.new_empty(features.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    features, weight, nbr = inputs
    ctx.save_for_backward(features, weight, nbr)


def _backward(backward_op, ctx, grad_out):
    features, weight, nbr = ctx.saved_tensors
    grad_features, grad_weight = backward_op(grad_out.contiguous(), features, weight, nbr)
    return grad_features, grad_weight, None


def invert(nbr: torch.Tensor, n_in: int) -> torch.Tensor:
    """The kernel map of the transposed convolution: ``inv[i, k] = o`` where ``nbr[o, k] = i``
    (each input feeds each tap's output at most once, so this is a permutation, not a sum)."""
    m, k = nbr.shape
    inv = torch.full((n_in * k + 1,), -1, dtype=torch.int32, device=nbr.device)
    taps = torch.arange(k, device=nbr.device, dtype=torch.int64)
    flat = torch.where(nbr >= 0, nbr.to(torch.int64) * k + taps, n_in * k)  # misses: a spare slot
    outputs = torch.arange(m, device=nbr.device, dtype=torch.int32)[:, None].expand(m, k)
    inv.scatter_(0, flat.reshape(-1), outputs.reshape(-1))
    return inv[: n_in * k].reshape(n_in, k)


def inputs(n: int, c_in: int, c_out: int, config=CONFIGS[0], seed: int = 0, integer=False):
    """features [N, c_in], weight [K, c_in, c_out] and a kernel map of ``config``
    (``sparse_kernel_map.CONFIGS``) over random sites; integer-valued when ``integer``."""
    ks, st, pad, dil, subm = config
    coords = random_coords(n, (9, 10, 11), seed=seed)
    _, nbr = reference.sparse_kernel_map(
        coords, (9, 10, 11), *(_triple(v) for v in (ks, st, pad, dil)), subm
    )
    g = gen(seed + 1)
    if integer:
        features = torch.randint(-3, 4, (len(coords), c_in), generator=g).float()
        weight = torch.randint(-2, 3, (nbr.shape[1], c_in, c_out), generator=g).float()
    else:
        features = torch.randn(len(coords), c_in, generator=g)
        weight = torch.randn(nbr.shape[1], c_in, c_out, generator=g) / (nbr.shape[1] * c_in) ** 0.5
    return features, weight, nbr


def _triple(v):
    return [v] * 3 if isinstance(v, int) else list(v)


def _cases():
    cases = []
    for i, (config, c_in, c_out) in enumerate(zip(CONFIGS, (4, 16, 3, 5, 33), (8, 16, 7, 2, 17))):
        features, weight, nbr = inputs(70, c_in, c_out, config, seed=i)
        cases.append(((features.requires_grad_(), weight.requires_grad_(), nbr), {}))
        if i == 1:  # the transposed convolution of the same map
            t_weight = torch.randn(nbr.shape[1], c_out, c_in, generator=gen(9))
            t_in = torch.randn(nbr.shape[0], c_out, generator=gen(10))
            inv = invert(nbr, features.shape[0])
            cases.append(((t_in.requires_grad_(), t_weight.requires_grad_(), inv), {}))
    return cases


def _opcheck(ops, put):
    features, weight, nbr = put(*inputs(12, 3, 4, CONFIGS[1]))
    out = ops.sparse_conv(features, weight, nbr)
    grad = put(torch.randn(out.shape, generator=gen(4)))
    return [
        (ops.sparse_conv, (features.requires_grad_(), weight.requires_grad_(), nbr)),
        (ops.sparse_conv_backward, (grad, features.detach(), weight.detach(), nbr)),
    ]


SPEC = register(
    OpSpec(
        name="sparse_conv",
        call=sparse_conv,
        op="sparse_conv",
        schema="(Tensor features, Tensor weight, Tensor nbr) -> Tensor",
        fake=_fake,
        backward_schema="(Tensor grad_out, Tensor features, Tensor weight, Tensor nbr) "
        "-> (Tensor, Tensor)",
        backward_fake=_backward_fake,
        setup_context=_setup_context,
        backward=_backward,
        cpu_source="cpu/sparse_conv.cpp",
        triton=("_sparse.sparse_conv", "_sparse.sparse_conv_backward"),
        cases=_cases,
        opcheck=_opcheck,
        bench=lambda quick: [
            (f"N={2 * n} C={c} subm k3", (f.requires_grad_(), w.requires_grad_(), nbr), {})
            for n, c in ([(4000, 32)] if quick else [(50000, 64)])
            for f, w, nbr in [inputs(n, c, c)]
        ],
    )
)
