"""Triton kernels of the zoo ops (the CUDA implementation; CPU tensors under TRITON_INTERPRET=1).

Each kernel mirrors the C++ CPU kernel of the same op (``zoo/kernels/csrc/cpu``) and computes
in float32 (float64 for float64 inputs). Attention is flash-style: one program per block of
queries (forward, dQ) or keys (dK/dV), an online softmax, no [Lq, Lk] matrix in memory, and a
tile map (empty / partial / full per 64 x 64 tile) that skips empty tiles and the mask loads of
full ones.
"""

from __future__ import annotations

import triton
import triton.language as tl

TILE = 64  # queries and keys per attention tile: the tile map's granularity on every backend

TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2


# --------------------------------------------------------------------------- random numbers


@triton.jit
def _uniform(seed, index):
    """SplitMix64 output ``index`` of stream ``seed`` -> float32 in [2^-24, 1 - 2^-24]; the
    same generator as common.h and reference.py, so every backend draws the same noise."""
    z = seed.to(tl.uint64) + (index.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return ((z >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07


# --------------------------------------------------------------------------- GroupSoftmax CE
# One program handles BLOCK_R rows and streams over the classes in chunks of BLOCK_C.


@triton.jit
def group_softmax_ce_fwd_kernel(
    logits,
    target,
    table,
    row_group,
    loss,
    lse_out,
    lse_group_out,
    N,
    C,
    stride_n,
    stride_g,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < N
    y = tl.load(target + rows, mask=in_rows, other=ignore_index)
    r = tl.load(row_group + rows, mask=in_rows, other=0)
    valid = y != ignore_index
    gy = tl.load(table + r * stride_g + tl.where(valid, y, 0), mask=in_rows, other=0)
    m_all = tl.full((BLOCK_R,), float("-inf"), ACC)
    s_all = tl.zeros((BLOCK_R,), ACC)
    m_grp = tl.full((BLOCK_R,), float("-inf"), ACC)
    s_grp = tl.zeros((BLOCK_R,), ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        inside = in_rows[:, None] & (cols[None, :] < C)
        z = tl.load(
            logits + rows[:, None] * stride_n + cols[None, :], mask=inside, other=float("-inf")
        )
        z = z.to(ACC)
        grp = tl.load(table + r[:, None] * stride_g + cols[None, :], mask=inside, other=0)
        member = inside & (grp == gy[:, None])
        m_new = tl.maximum(m_all, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        s_all = s_all * tl.exp(m_all - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
        m_all = m_new
        zg = tl.where(member, z, float("-inf"))
        mg_new = tl.maximum(m_grp, tl.max(zg, 1))
        mg_safe = tl.where(mg_new == float("-inf"), 0.0, mg_new).to(ACC)
        s_grp = s_grp * tl.exp(m_grp - mg_safe) + tl.sum(tl.exp(zg - mg_safe[:, None]), 1)
        m_grp = mg_new
    lse = m_all + tl.log(s_all)
    lse_g = m_grp + tl.log(s_grp)
    tl.store(loss + rows, tl.where(valid, lse - lse_g, 0.0).to(ACC), mask=in_rows)
    tl.store(lse_out + rows, lse, mask=in_rows)
    tl.store(lse_group_out + rows, lse_g, mask=in_rows)


@triton.jit
def group_softmax_ce_bwd_kernel(
    grad_loss,
    logits,
    target,
    table,
    row_group,
    lse_in,
    lse_group_in,
    grad,
    N,
    C,
    stride_n,
    stride_g,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < N
    y = tl.load(target + rows, mask=in_rows, other=ignore_index)
    r = tl.load(row_group + rows, mask=in_rows, other=0)
    valid = y != ignore_index
    gy = tl.load(table + r * stride_g + tl.where(valid, y, 0), mask=in_rows, other=0)
    g = tl.where(valid, tl.load(grad_loss + rows, mask=in_rows, other=0.0).to(ACC), 0.0)
    lse = tl.load(lse_in + rows, mask=in_rows, other=0.0).to(ACC)
    lse_g = tl.load(lse_group_in + rows, mask=in_rows, other=0.0).to(ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        inside = in_rows[:, None] & (cols[None, :] < C)
        offs = rows[:, None] * stride_n + cols[None, :]
        z = tl.load(logits + offs, mask=inside, other=0.0).to(ACC)
        grp = tl.load(table + r[:, None] * stride_g + cols[None, :], mask=inside, other=0)
        member = grp == gy[:, None]
        d = tl.exp(z - lse[:, None]) - tl.where(member, tl.exp(z - lse_g[:, None]), 0.0)
        tl.store(grad + offs, (g[:, None] * d).to(grad.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------- Gumbel
# Softmax over the last (contiguous) dim, BLOCK_R rows per program; the noise of element e is
# recomputed from (seed, e) in each pass instead of being stored.


@triton.jit
def _tempered(logits, seed, rows, cols, inside, K, inv_tau, ACC: tl.constexpr):
    """(z + g) / tau with g = -log(-log(u)), -inf outside the tensor."""
    index = rows[:, None] * K + cols[None, :]
    z = tl.load(logits + index, mask=inside, other=0.0).to(ACC)
    u = _uniform(seed, index).to(ACC)
    return tl.where(inside, (z - tl.log(-tl.log(u))) * inv_tau, float("-inf"))


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must not become a constant
def gumbel_softmax_fwd_kernel(
    logits,
    out,
    soft,
    R,
    K,
    seed,
    inv_tau,
    HARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    best = tl.full((BLOCK_R,), float("-inf"), ACC)
    best_i = tl.zeros((BLOCK_R,), tl.int64)
    for c0 in range(0, K, BLOCK_K):  # pass 1: max (and first argmax) of (z + g) / tau
        cols = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
        inside = in_rows[:, None] & (cols[None, :] < K)
        y = _tempered(logits, seed, rows, cols, inside, K, inv_tau, ACC)
        chunk = tl.max(y, 1)
        first = tl.min(tl.where(y == chunk[:, None], cols[None, :], K), 1)
        take = chunk > best
        best_i = tl.where(take, first, best_i)
        best = tl.where(take, chunk, best)
    total = tl.zeros((BLOCK_R,), ACC)
    for c0 in range(0, K, BLOCK_K):  # pass 2: normaliser
        cols = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
        inside = in_rows[:, None] & (cols[None, :] < K)
        y = _tempered(logits, seed, rows, cols, inside, K, inv_tau, ACC)
        total += tl.sum(tl.exp(y - best[:, None]), 1)
    for c0 in range(0, K, BLOCK_K):  # pass 3: write
        cols = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
        inside = in_rows[:, None] & (cols[None, :] < K)
        y = _tempered(logits, seed, rows, cols, inside, K, inv_tau, ACC)
        index = rows[:, None] * K + cols[None, :]
        p = tl.exp(y - best[:, None]) / total[:, None]
        tl.store(soft + index, p.to(soft.dtype.element_ty), mask=inside)
        if HARD:
            one_hot = tl.where(cols[None, :] == best_i[:, None], 1.0, 0.0)
            tl.store(out + index, one_hot.to(out.dtype.element_ty), mask=inside)


@triton.jit
def gumbel_softmax_bwd_kernel(
    grad,
    soft,
    dz,
    R,
    K,
    inv_tau,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    dot = tl.zeros((BLOCK_R,), ACC)
    for c0 in range(0, K, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        inside = in_rows[:, None] & (cols[None, :] < K)
        index = rows[:, None] * K + cols[None, :]
        g = tl.load(grad + index, mask=inside, other=0.0).to(ACC)
        s = tl.load(soft + index, mask=inside, other=0.0).to(ACC)
        dot += tl.sum(g * s, 1)
    for c0 in range(0, K, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        inside = in_rows[:, None] & (cols[None, :] < K)
        index = rows[:, None] * K + cols[None, :]
        g = tl.load(grad + index, mask=inside, other=0.0).to(ACC)
        s = tl.load(soft + index, mask=inside, other=0.0).to(ACC)
        d = s * (g - dot[:, None]) * inv_tau
        tl.store(dz + index, d.to(dz.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must not become a constant
def gumbel_sigmoid_fwd_kernel(
    logits,
    out,
    soft,
    numel,
    seed,
    inv_tau,
    HARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    z = tl.load(logits + offs, mask=inside, other=0.0).to(ACC)
    u = _uniform(seed, offs).to(ACC)
    noise = tl.log(u) - tl.log(1.0 - u)  # Logistic(0, 1); 1 - u is exact for these u
    s = 1.0 / (1.0 + tl.exp(-(z + noise) * inv_tau))
    tl.store(soft + offs, s.to(soft.dtype.element_ty), mask=inside)
    if HARD:
        tl.store(out + offs, tl.where(s > 0.5, 1.0, 0.0).to(out.dtype.element_ty), mask=inside)


@triton.jit
def gumbel_sigmoid_bwd_kernel(
    grad, soft, dz, numel, inv_tau, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    g = tl.load(grad + offs, mask=inside, other=0.0).to(ACC)
    s = tl.load(soft + offs, mask=inside, other=0.0).to(ACC)
    tl.store(dz + offs, (g * s * (1.0 - s) * inv_tau).to(dz.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------- attention
#
# Layout: q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv], out [B, H, Lq, Dv] contiguous;
# lse / delta [B, H, Lq] float (ACC). keep: bool keep mask as uint8 with 4 strides (0 where
# broadcast); weight: float soft mask with 4 strides (soft_masked_attention: P ~ w exp(S));
# tiles: int8 tile map [Bt, Ht, nq, nk] with strides (0 where broadcast).


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32 (float64 for float64). UPCAST: multiply in float32, for
    bfloat16 in Triton's interpreter, whose bfloat16 dot gives wrong results (triton 3.x)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(tiles, st_b, st_h, st_m, st_n, b, h, mb, nb, HAS_TILES: tl.constexpr):
    if HAS_TILES:
        return tl.load(tiles + b * st_b + h * st_h + mb * st_m + nb * st_n).to(tl.int32)
    else:
        return 2


@triton.jit
def _load(base, rows, cols, n_rows, n_cols, s_row, s_col, other):
    """The [rows x cols] block of a strided [n_rows, n_cols] matrix, ``other`` outside it."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=inside, other=other)


@triton.jit
def _store(base, value, rows, cols, n_rows, n_cols, s_row):
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    ptrs = base + rows[:, None] * s_row + cols[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=inside)


@triton.jit
def _tile_scores(
    q,
    kt,
    offs_m,
    offs_n,
    Lq,
    Lk,
    scale,
    occ,
    keep_bh,
    sk_m,
    sk_n,
    HAS_KEEP: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """S = q k^T * scale for one tile (kt: the keys transposed, [D, N]); -inf where the keep
    mask forbids (read for partial tiles only) or out of range."""
    s = _dot(q, kt, PRECISION, UPCAST).to(ACC) * scale
    allowed = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if HAS_KEEP:
        if occ == 1:
            allowed = allowed & (_load(keep_bh, offs_m, offs_n, Lq, Lk, sk_m, sk_n, 0) != 0)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    keep,
    weight,
    tiles,
    H,
    Lq,
    Lk,
    D,
    Dv,
    scale,
    sk_b,
    sk_h,
    sk_m,
    sk_n,
    sw_b,
    sw_h,
    sw_m,
    sw_n,
    st_b,
    st_h,
    st_m,
    st_n,
    HAS_KEEP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_TILES: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Output rows and log-sum-exp of one block of queries: online softmax over key tiles,
    P ~ w exp(S) when a soft mask w is given (HAS_WEIGHT)."""
    bh = tl.program_id(0).to(tl.int64)  # batch x heads on axis 0 (axis 1 is capped at 65535)
    mb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load(Q + bh * Lq * D, offs_m, offs_d, Lq, D, D, 1, 0.0)
    keep_bh = keep + b * sk_b + h * sk_h
    weight_bh = weight + b * sw_b + h * sw_h
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    for nb in range(0, tl.cdiv(Lk, BLOCK_N)):
        occ = _tile(tiles, st_b, st_h, st_m, st_n, b, h, mb, nb, HAS_TILES)
        if occ != 0:
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            kt = _load(K + bh * Lk * D, offs_d, offs_n, D, Lk, 1, D, 0.0)  # [D, N]
            s = _tile_scores(
                q,
                kt,
                offs_m,
                offs_n,
                Lq,
                Lk,
                scale,
                occ,
                keep_bh,
                sk_m,
                sk_n,
                HAS_KEEP,
                ACC,
                PRECISION,
                UPCAST,
            )
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
            p = tl.exp(s - m_safe[:, None])
            if HAS_WEIGHT:
                p = p * _load(weight_bh, offs_m, offs_n, Lq, Lk, sw_m, sw_n, 0.0).to(ACC)
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load(V + bh * Lk * Dv, offs_n, offs_dv, Lk, Dv, Dv, 1, 0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST).to(ACC)
            m_i = m_new
    nonzero = l_i > 0
    out = acc / tl.where(nonzero, l_i, 1.0)[:, None]
    lse = tl.where(nonzero, m_i + tl.log(tl.where(nonzero, l_i, 1.0)), float("-inf"))
    _store(Out + bh * Lq * Dv, out, offs_m, offs_dv, Lq, Dv, Dv)
    tl.store(Lse + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _row_stats(Lse, Delta, bh, offs_m, Lq):
    """The saved log-sum-exp (+inf for rows that kept nothing, so their P is 0) and Delta."""
    lse = tl.load(Lse + bh * Lq + offs_m, mask=offs_m < Lq, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse, tl.load(Delta + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    dO,
    Lse,
    Delta,
    dK,
    dV,
    keep,
    weight,
    tiles,
    H,
    Lq,
    Lk,
    D,
    Dv,
    scale,
    sk_b,
    sk_h,
    sk_m,
    sk_n,
    sw_b,
    sw_h,
    sw_m,
    sw_n,
    st_b,
    st_h,
    st_m,
    st_n,
    HAS_KEEP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_TILES: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dV = sum_i P_ij dO_i, dK = scale sum_i dS_ij q_i for one block of keys (FA2 style: P is
    recomputed from the saved log-sum-exp, dS = P (dP - Delta), dP = dO v^T)."""
    bh = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = _load(K + bh * Lk * D, offs_d, offs_n, D, Lk, 1, D, 0.0)  # [D, N]
    vt = _load(V + bh * Lk * Dv, offs_dv, offs_n, Dv, Lk, 1, Dv, 0.0)  # [Dv, N]
    keep_bh = keep + b * sk_b + h * sk_h
    weight_bh = weight + b * sw_b + h * sw_h
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    for mb in range(0, tl.cdiv(Lq, BLOCK_M)):
        occ = _tile(tiles, st_b, st_h, st_m, st_n, b, h, mb, nb, HAS_TILES)
        if occ != 0:
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            q = _load(Q + bh * Lq * D, offs_m, offs_d, Lq, D, D, 1, 0.0)
            s = _tile_scores(
                q,
                kt,
                offs_m,
                offs_n,
                Lq,
                Lk,
                scale,
                occ,
                keep_bh,
                sk_m,
                sk_n,
                HAS_KEEP,
                ACC,
                PRECISION,
                UPCAST,
            )
            lse, delta = _row_stats(Lse, Delta, bh, offs_m, Lq)
            p = tl.exp(s - lse[:, None])  # 0 where s = -inf (lse of empty rows is +inf)
            if HAS_WEIGHT:
                p = p * _load(weight_bh, offs_m, offs_n, Lq, Lk, sw_m, sw_n, 0.0).to(ACC)
            do = _load(dO + bh * Lq * Dv, offs_m, offs_dv, Lq, Dv, Dv, 1, 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST).to(ACC)
            dp = _dot(do, vt, PRECISION, UPCAST).to(ACC)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST).to(ACC)
    _store(dK + bh * Lk * D, dk * scale, offs_n, offs_d, Lk, D, D)
    _store(dV + bh * Lk * Dv, dv, offs_n, offs_dv, Lk, Dv, Dv)


@triton.jit
def attention_bwd_dq_kernel(
    Q,
    K,
    V,
    dO,
    Lse,
    Delta,
    dQ,
    dW,
    keep,
    weight,
    tiles,
    H,
    Lq,
    Lk,
    D,
    Dv,
    scale,
    sk_b,
    sk_h,
    sk_m,
    sk_n,
    sw_b,
    sw_h,
    sw_m,
    sw_n,
    sd_b,
    sd_h,
    sd_m,
    sd_n,
    st_b,
    st_h,
    st_m,
    st_n,
    HAS_KEEP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_TILES: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dQ = scale sum_j dS_ij k_j for one block of queries; with a soft mask w also
    dW_ij = exp(S_ij - lse_i) (dP_ij - Delta_i), added atomically into dW (whose strides sd_*
    are 0 along the dimensions w is broadcast over, so the reduction happens here)."""
    bh = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load(Q + bh * Lq * D, offs_m, offs_d, Lq, D, D, 1, 0.0)
    do = _load(dO + bh * Lq * Dv, offs_m, offs_dv, Lq, Dv, Dv, 1, 0.0)
    lse, delta = _row_stats(Lse, Delta, bh, offs_m, Lq)
    keep_bh = keep + b * sk_b + h * sk_h
    weight_bh = weight + b * sw_b + h * sw_h
    dw_bh = dW + b * sd_b + h * sd_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for nb in range(0, tl.cdiv(Lk, BLOCK_N)):
        occ = _tile(tiles, st_b, st_h, st_m, st_n, b, h, mb, nb, HAS_TILES)
        if occ != 0:
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            kt = _load(K + bh * Lk * D, offs_d, offs_n, D, Lk, 1, D, 0.0)  # [D, N]
            s = _tile_scores(
                q,
                kt,
                offs_m,
                offs_n,
                Lq,
                Lk,
                scale,
                occ,
                keep_bh,
                sk_m,
                sk_n,
                HAS_KEEP,
                ACC,
                PRECISION,
                UPCAST,
            )
            e = tl.exp(s - lse[:, None])
            vt = _load(V + bh * Lk * Dv, offs_dv, offs_n, Dv, Lk, 1, Dv, 0.0)  # [Dv, N]
            dp_centred = _dot(do, vt, PRECISION, UPCAST).to(ACC) - delta[:, None]
            if HAS_WEIGHT:
                w = _load(weight_bh, offs_m, offs_n, Lq, Lk, sw_m, sw_n, 0.0).to(ACC)
                dw = e * dp_centred
                inside = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
                dw_ptrs = dw_bh + offs_m[:, None] * sd_m + offs_n[None, :] * sd_n
                tl.atomic_add(dw_ptrs, dw.to(dW.dtype.element_ty), mask=inside)
                ds = w * dw
            else:
                ds = e * dp_centred
            kn = _load(K + bh * Lk * D, offs_n, offs_d, Lk, D, D, 1, 0.0)
            dq += _dot(ds.to(kn.dtype), kn, PRECISION, UPCAST).to(ACC)
    _store(dQ + bh * Lq * D, dq * scale, offs_m, offs_d, Lq, D, D)
