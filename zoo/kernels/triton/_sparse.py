"""Triton launchers and kernels of sparse 3-D convolution: the kernel map, the convolution and
max-pooling over it (``zoo.kernels.ops.sparse_*``; their references are at the bottom of
``zoo.kernels.reference``).

Nothing here uses atomics, so every result repeats bit for bit: each program owns the outputs it
writes and sums over the kernel taps (and input channels) in a fixed order. Where several
programs would add into the same value (the weight gradient), each writes a partial of its own
and the partials are summed in a fixed order. A transposed sum (the feature gradients) is a
gather over the inverse kernel map (``sparse_conv.invert``) instead of a scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels import reference
from zoo.kernels.ops.sparse_conv import invert
from zoo.kernels.triton import _acc, _acc_torch, _block, _check_device, _wrap, interpreted

# fp32 products must be exact fp32 (not TF32) for the results to match the reference to 1e-5
PRECISION = "ieee"
MAP_BLOCK = 256  # (output, tap) pairs per program of the kernel map
CONV_BLOCK_M = 64  # outputs per program of the convolution and the pooling
# most outputs one program of the weight gradient sums over: with only K x C_in x C_out tiles of
# parallelism, a large M is split across programs (their partials then summed in a fixed order)
WGRAD_ROWS = 2048


# --------------------------------------------------------------------------- kernel map


@triton.jit
def kernel_map_kernel(
    out_coords,
    in_keys,
    perm,
    nbr,
    P,
    N,
    iters,
    D,
    H,
    W,
    KY: tl.constexpr,
    KX: tl.constexpr,
    K: tl.constexpr,
    SZ: tl.constexpr,
    SY: tl.constexpr,
    SX: tl.constexpr,
    PZ: tl.constexpr,
    PY: tl.constexpr,
    PX: tl.constexpr,
    DZ: tl.constexpr,
    DY: tl.constexpr,
    DX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """nbr[o, k] for a block of flat (output o, tap k) pairs: the query site
    out[o] * stride - padding + tap_k * dilation, looked up by a lower-bound binary search of
    its key in the sorted input keys (``iters`` halvings cover N keys); -1 where it is outside
    the grid or not an input."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = p < P
    o = p // K
    k = p % K
    b = tl.load(out_coords + o * 4, mask=live, other=0).to(tl.int64)
    z = tl.load(out_coords + o * 4 + 1, mask=live, other=0).to(tl.int64)
    y = tl.load(out_coords + o * 4 + 2, mask=live, other=0).to(tl.int64)
    x = tl.load(out_coords + o * 4 + 3, mask=live, other=0).to(tl.int64)
    qz = z * SZ - PZ + (k // (KY * KX)) * DZ
    qy = y * SY - PY + ((k // KX) % KY) * DY
    qx = x * SX - PX + (k % KX) * DX
    inside = live & (qz >= 0) & (qz < D) & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    key = ((b * D + qz) * H + qy) * W + qx
    lo = tl.zeros((BLOCK,), tl.int64)
    hi = tl.full((BLOCK,), 0, tl.int64) + N
    for _ in range(iters):  # a fixed count: every lane runs the same loop, done lanes idle
        searching = lo < hi
        mid = (lo + hi) // 2
        mid_key = tl.load(in_keys + mid, mask=inside & searching, other=0)
        right = searching & (mid_key < key)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(searching & ~right, mid, hi)
    found_here = inside & (lo < N)
    hit = tl.load(in_keys + lo, mask=found_here, other=-1) == key
    found = found_here & hit
    row = tl.load(perm + lo, mask=found, other=-1)
    tl.store(nbr + p, tl.where(found, row, -1).to(tl.int32), mask=live)


def _strided_outputs(c, spatial_shape, kernel_size, stride, padding, dilation):
    """The output sites of a strided convolution, int32 [M, 4] sorted by key: every site of the
    output grid that some input reaches through some tap (reference.sparse_kernel_map's rule,
    in torch ops on the input's device; the sites are decoded from the unique sorted keys)."""
    device = c.device
    axes = [
        torch.arange(k, dtype=torch.int64, device=device) * d for k, d in zip(kernel_size, dilation)
    ]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    out_shape = reference.conv_output_shape(spatial_shape, kernel_size, stride, padding, dilation)
    stride_t = torch.tensor(stride, dtype=torch.int64, device=device)
    pad = torch.tensor(padding, dtype=torch.int64, device=device)
    cand = c[:, None, 1:] + pad - offsets[None]  # [N, K, 3] = out * stride
    ok = (cand % stride_t == 0).all(-1)
    o = torch.div(cand, stride_t, rounding_mode="floor")
    ok &= ((o >= 0) & (o < torch.tensor(out_shape, device=device))).all(-1)
    batch = c[:, None, :1].expand(-1, offsets.shape[0], 1)
    sites = torch.cat([batch, o], -1)[ok]
    keys = torch.unique(reference.coordinate_keys(sites, out_shape), sorted=True)
    od, oh, ow = out_shape
    rest = keys % (od * oh * ow)
    out = torch.stack([keys // (od * oh * ow), rest // (oh * ow), rest // ow % oh, rest % ow], 1)
    return out.to(torch.int32)


def sparse_kernel_map(coords, spatial_shape, kernel_size, stride, padding, dilation, subm: bool):
    """(out_coords int32 [M, 4], nbr int32 [M, K]); ``padding`` is the effective one (the public
    function sets it for submanifold convolutions)."""
    _check_device(coords)
    c = coords.to(torch.int64)
    k_total = kernel_size[0] * kernel_size[1] * kernel_size[2]
    if subm:
        out = coords.to(torch.int32, copy=True).contiguous()  # an op's output may not alias
    else:
        out = _strided_outputs(c, spatial_shape, kernel_size, stride, padding, dilation)
    m, n = out.shape[0], coords.shape[0]
    if n == 0 or m == 0:
        return out, torch.full((m, k_total), -1, dtype=torch.int32, device=coords.device)
    # the keys are unique, so the sort (and the position of every key) is fully determined
    in_keys, perm = torch.sort(reference.coordinate_keys(c, spatial_shape))
    nbr = torch.empty((m, k_total), dtype=torch.int32, device=coords.device)
    pairs = m * k_total
    d, h, w = spatial_shape
    _wrap(kernel_map_kernel)[(triton.cdiv(pairs, MAP_BLOCK),)](
        out,
        in_keys.contiguous(),
        perm.contiguous(),
        nbr,
        pairs,
        n,
        n.bit_length(),  # lower bound over n keys: ceil(log2(n + 1)) <= bit_length(n) steps
        d,
        h,
        w,
        KY=kernel_size[1],
        KX=kernel_size[2],
        K=k_total,
        SZ=stride[0],
        SY=stride[1],
        SX=stride[2],
        PZ=padding[0],
        PY=padding[1],
        PX=padding[2],
        DZ=dilation[0],
        DY=dilation[1],
        DX=dilation[2],
        BLOCK=MAP_BLOCK,
    )
    return out, nbr


# --------------------------------------------------------------------------- convolution


@triton.jit
def conv_gather_kernel(
    F,
    Wt,
    NBR,
    Out,
    M,
    Cin,
    Cout,
    s_wk,
    s_wi,
    s_wo,
    K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Out[o] = sum_k F[NBR[o, k]] @ Wt[k] for one tile of BLOCK_M outputs x BLOCK_N output
    channels: the input channels in blocks of BLOCK_K, the taps in order within each (Wt
    [K, Cin, Cout] is given by its strides, so the backward passes the transposed weight without
    a copy). The pointer tiles are formed once per channel block, outside the tap loop: in the
    interpreter every integer op is a checked numpy op, and they dominated the time."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < M
    in_cols = cols < Cout
    nbr_rows = NBR + rows * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for c0 in range(0, Cin, BLOCK_K):
        ch = c0 + tl.arange(0, BLOCK_K)
        in_ch = ch < Cin
        w_ptrs = Wt + ch[:, None] * s_wi + cols[None, :] * s_wo
        w_mask = in_ch[:, None] & in_cols[None, :]
        for k in range(K):
            idx = tl.load(nbr_rows + k, mask=in_rows, other=-1).to(tl.int64)
            # rows with no neighbour at this tap are masked: they fetch nothing and add 0
            a = tl.load(
                (F + idx * Cin)[:, None] + ch[None, :],
                mask=(idx >= 0)[:, None] & in_ch[None, :],
                other=0.0,
            )
            b = tl.load(w_ptrs + k * s_wk, mask=w_mask, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION).to(ACC)
    out_ptrs = Out + rows[:, None] * Cout + cols[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def conv_weight_grad_kernel(
    F,
    G,
    NBR,
    Partial,
    M,
    Cin,
    Cout,
    rows_per_split,
    K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Partial[s, k] = sum_o F[NBR[o, k]]^T G[o] over the outputs of split s, for one
    (tap, C_in block, C_out block) tile; the outputs in blocks of BLOCK_M, in order."""
    k = tl.program_id(0)
    pid_io = tl.program_id(1)
    split = tl.program_id(2)
    n_o = tl.cdiv(Cout, BLOCK_O)
    ci = (pid_io // n_o) * BLOCK_I + tl.arange(0, BLOCK_I)
    co = (pid_io % n_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_ci = ci < Cin
    in_co = co < Cout
    start = split.to(tl.int64) * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    nbr_k = NBR + k
    f_cols = F + ci[:, None]
    g_cols = G + co[None, :]
    acc = tl.zeros((BLOCK_I, BLOCK_O), ACC)
    for r0 in range(start, stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        idx = tl.load(nbr_k + rows * K, mask=rows < stop, other=-1).to(tl.int64)
        valid = idx >= 0
        ft = tl.load(  # F rows transposed: [BLOCK_I, BLOCK_M]
            f_cols + (idx * Cin)[None, :], mask=valid[None, :] & in_ci[:, None], other=0.0
        )
        g = tl.load(
            g_cols + (rows * Cout)[:, None], mask=valid[:, None] & in_co[None, :], other=0.0
        )
        if UPCAST:
            ft, g = ft.to(tl.float32), g.to(tl.float32)
        acc += tl.dot(ft, g, input_precision=PRECISION).to(ACC)
    base = Partial + (split.to(tl.int64) * K + k) * Cin * Cout
    tl.store(base + ci[:, None] * Cout + co[None, :], acc, mask=in_ci[:, None] & in_co[None, :])


def _meta(dtype: torch.dtype) -> dict:
    return dict(
        ACC=_acc(dtype),
        PRECISION=PRECISION,
        # Triton's interpreter multiplies bfloat16 wrongly (see _kernels._dot): upcast there.
        # (Inlined in the kernels rather than calling _dot: each call of a jit function from
        # another costs the interpreter a re-patch of triton.language, ~1.5 ms per tap.)
        UPCAST=dtype == torch.bfloat16 and interpreted(),
    )


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a result of ``dtype`` in. Triton's interpreter truncates
    float32 -> bfloat16 where a GPU rounds to nearest even (triton 3.x), an error of up to a
    whole bfloat16 ulp: there the kernel writes float32 and torch rounds."""
    return torch.float32 if dtype == torch.bfloat16 and interpreted() else dtype


def _gather_conv(features, weight_strides, weight, nbr, c_out):
    """[M, c_out] = sum_k features[nbr[:, k]] @ W[k], W given as ``weight`` with the strides
    ``weight_strides`` of a [K, C_in, c_out] view."""
    m, k = nbr.shape
    c_in = features.shape[1]
    out = features.new_empty((m, c_out), dtype=_store_dtype(features.dtype))
    if m == 0 or c_out == 0:
        return out.to(features.dtype)
    block_n = _block(c_out, 16, 64)
    grid = (triton.cdiv(m, CONV_BLOCK_M), triton.cdiv(c_out, block_n))
    _wrap(conv_gather_kernel)[grid](
        features,
        weight,
        nbr,
        out,
        m,
        c_in,
        c_out,
        *weight_strides,
        K=k,
        BLOCK_M=CONV_BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=_block(c_in, 16, 32),
        **_meta(features.dtype),
    )
    return out.to(features.dtype)


def sparse_conv(features, weight, nbr):
    _check_device(features, weight, nbr)
    features, weight, nbr = features.contiguous(), weight.contiguous(), nbr.contiguous()
    k, c_in, c_out = weight.shape
    return _gather_conv(features, (c_in * c_out, c_out, 1), weight, nbr, c_out)


def sparse_conv_backward(grad_out, features, weight, nbr):
    _check_device(grad_out, features, weight, nbr)
    features, weight, nbr = features.contiguous(), weight.contiguous(), nbr.contiguous()
    grad_out = grad_out.to(features.dtype).contiguous()
    n, c_in = features.shape
    k, _, c_out = weight.shape
    m = nbr.shape[0]
    # grad_features[i] = sum_k grad_out[inv[i, k]] @ weight[k]^T: the forward kernel over the
    # inverse map, the weight read transposed ([K, C_out, C_in]) through its strides
    inv = invert(nbr, n)
    grad_features = _gather_conv(grad_out, (c_in * c_out, 1, c_out), weight, inv, c_in)
    acc = _acc_torch(features.dtype)
    if m == 0 or c_in == 0 or c_out == 0:
        return grad_features, torch.zeros_like(weight)
    block_i, block_o = _block(c_in, 16, 32), _block(c_out, 16, 32)
    channel_tiles = triton.cdiv(c_in, block_i) * triton.cdiv(c_out, block_o)
    # the outputs in near-equal splits of at most WGRAD_ROWS (a multiple of BLOCK_M each): the
    # split count depends on M alone, so the order of every sum is fixed by the inputs
    splits = triton.cdiv(m, WGRAD_ROWS)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), CONV_BLOCK_M) * CONV_BLOCK_M
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty((splits, k, c_in, c_out), dtype=acc, device=features.device)
    _wrap(conv_weight_grad_kernel)[(k, channel_tiles, splits)](
        features,
        grad_out,
        nbr,
        partial,
        m,
        c_in,
        c_out,
        rows_per_split,
        K=k,
        BLOCK_M=CONV_BLOCK_M,
        BLOCK_I=block_i,
        BLOCK_O=block_o,
        **_meta(features.dtype),
    )
    # a sum over a fixed number of partials, in the accumulation dtype: the same every run
    grad_weight = partial[0] if splits == 1 else partial.sum(0)
    return grad_features, grad_weight.to(weight.dtype)


# --------------------------------------------------------------------------- max-pooling


@triton.jit
def max_pool_kernel(
    F,
    NBR,
    Out,
    Arg,
    M,
    C,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Out[o, c] = max_k F[NBR[o, k], c] and the tap it came from, the taps in order with a
    strict > (the first tap wins ties; the first neighbour is taken whatever its value, as in
    the reference); 0 and -1 for an output with no neighbour."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows = rows < M
    in_cols = cols < C
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), ACC)
    arg = tl.full((BLOCK_M, BLOCK_C), -1, tl.int32)
    for k in range(K):
        idx = tl.load(NBR + rows * K + k, mask=in_rows, other=-1).to(tl.int64)
        valid = idx >= 0
        v = tl.load(
            F + idx[:, None] * C + cols[None, :],
            mask=valid[:, None] & in_cols[None, :],
            other=float("-inf"),
        ).to(ACC)  # exact: ACC holds every value of the input dtype
        better = valid[:, None] & ((v > best) | (arg < 0))
        best = tl.where(better, v, best)
        arg = tl.where(better, k, arg)
    inside = in_rows[:, None] & in_cols[None, :]
    offs = rows[:, None] * C + cols[None, :]
    tl.store(Out + offs, tl.where(arg >= 0, best, 0.0).to(Out.dtype.element_ty), mask=inside)
    tl.store(Arg + offs, arg, mask=inside)


@triton.jit
def max_pool_bwd_kernel(
    G,
    ArgIn,
    INV,
    GradF,
    N,
    C,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """GradF[i, c] = sum over the taps k, in order, of G[o, c] for o = INV[i, k] whose max came
    from tap k (ArgIn[o, c] == k): a gather per input row instead of a scatter per output."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows = rows < N
    in_cols = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    for k in range(K):
        o = tl.load(INV + rows * K + k, mask=in_rows, other=-1).to(tl.int64)
        valid = (o >= 0)[:, None] & in_cols[None, :]
        offs = o[:, None] * C + cols[None, :]
        take = valid & (tl.load(ArgIn + offs, mask=valid, other=-1) == k)
        acc += tl.load(G + offs, mask=take, other=0.0).to(ACC)
    inside = in_rows[:, None] & in_cols[None, :]
    tl.store(GradF + rows[:, None] * C + cols[None, :], acc.to(GradF.dtype.element_ty), mask=inside)


def _pool_grid(rows: int, c: int) -> tuple[tuple[int, int], int]:
    block_c = _block(c, 16, 64)
    return (triton.cdiv(rows, CONV_BLOCK_M), triton.cdiv(c, block_c)), block_c


def sparse_max_pool(features, nbr):
    _check_device(features, nbr)
    features, nbr = features.contiguous(), nbr.contiguous()
    m, k = nbr.shape
    c = features.shape[1]
    out = features.new_empty((m, c))
    arg = torch.empty((m, c), dtype=torch.int32, device=features.device)
    if m and c:
        grid, block_c = _pool_grid(m, c)
        _wrap(max_pool_kernel)[grid](
            features,
            nbr,
            out,
            arg,
            m,
            c,
            K=k,
            ACC=_acc(features.dtype),
            BLOCK_M=CONV_BLOCK_M,
            BLOCK_C=block_c,
        )
    return out, arg


def sparse_max_pool_backward(grad_out, features, arg, nbr):
    _check_device(grad_out, features, arg, nbr)
    n, c = features.shape
    k = nbr.shape[1]
    grad = features.new_empty((n, c), dtype=_store_dtype(features.dtype))
    if n == 0 or c == 0:
        return grad.to(features.dtype)
    inv = invert(nbr.contiguous(), n)
    grid, block_c = _pool_grid(n, c)
    _wrap(max_pool_bwd_kernel)[grid](
        grad_out.to(features.dtype).contiguous(),
        arg.to(torch.int32).contiguous(),
        inv,
        grad,
        n,
        c,
        K=k,
        ACC=_acc(features.dtype),
        BLOCK_M=CONV_BLOCK_M,
        BLOCK_C=block_c,
    )
    return grad.to(features.dtype)
