"""Triton launchers and kernels of ``token_logprobs`` (``zoo.kernels.ops.token_logprobs``): the
log-probs of given tokens under log_softmax(h W^T / T), and the rows' entropies.

Forward: one program per block of rows loops over the vocabulary in blocks, computing each
[BLOCK_N, BLOCK_V] tile of logits with ``tl.dot`` over blocks of H and folding it into an online
logsumexp (and the entropy's sum); nothing of size [N, V] is written.

Backward: the rows in chunks of at most ``BACKWARD_ELEMENTS / V`` rows; for each chunk one kernel
recomputes the chunk's logits and writes their gradient dL/dl (a [rows, V] buffer, reused), then
two GEMMs (torch's: cuBLAS on a GPU) give that chunk's grad_hidden rows and add its share of
grad_weight, in chunk order. No atomics: the results repeat bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton import _acc, _acc_torch, _block, _check_device, _wrap, interpreted

# fp32 products must be exact fp32 (not TF32) for the results to match the reference to 1e-5
PRECISION = "ieee"
BACKWARD_ELEMENTS = 1 << 24  # most elements of the backward's logit-gradient buffer (64 MiB)


@triton.jit
def _logits(
    Hid,
    W,
    rows,
    cols,
    N,
    V,
    D,
    inv_t,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The [BLOCK_N, BLOCK_V] tile of h W^T / T at (rows, cols); rows past N give 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    in_rows = rows < N
    in_cols = cols < V
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        in_d = ds < D
        h_mask = in_rows[:, None] & in_d[None, :]
        h = tl.load(Hid + rows[:, None] * D + ds[None, :], mask=h_mask, other=0.0)
        w_mask = in_cols[None, :] & in_d[:, None]
        wt = tl.load(W + cols[None, :] * D + ds[:, None], mask=w_mask, other=0.0)
        if UPCAST:
            h, wt = h.to(tl.float32), wt.to(tl.float32)
        acc += tl.dot(h, wt, input_precision=PRECISION).to(ACC)
    return acc * inv_t


@triton.jit
def token_logprobs_fwd_kernel(
    Hid,
    W,
    Tok,
    LogP,
    Ent,
    Lse,
    N,
    V,
    D,
    inv_t,
    ignore,
    ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row: the running max m, s = sum exp(l - m) and a = sum exp(l - m) (l - m) over the
    vocabulary blocks; lse = m + log s, logp = l_token - lse (<= 0), H = log s - a / s."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    tok = tl.load(Tok + rows, mask=in_rows, other=ignore)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_N,), ACC)
    a = tl.zeros((BLOCK_N,), ACC)
    target = tl.zeros((BLOCK_N,), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = _logits(
            Hid, W, rows, cols, N, V, D, inv_t, ACC, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
        )
        valid = (cols < V)[None, :]
        x = tl.where(valid, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(s > 0, m - m_new, 0.0)  # 0 before the first block (m = -inf, s = 0)
        scale = tl.exp(shift)
        d = x - m_new[:, None]  # -inf past V: e = 0 there
        e = tl.exp(d)
        if ENTROPY:
            a = scale * (a + shift * s) + tl.sum(e * tl.where(valid, d, 0.0), 1)
        s = s * scale + tl.sum(e, 1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == tok[:, None], x, 0.0), 1)
    log_s = tl.log(s)
    ignored = tok == ignore
    tl.store(Lse + rows, m + log_s, mask=in_rows)
    logp = tl.minimum((target - m) - log_s, 0.0)
    tl.store(LogP + rows, tl.where(ignored, 0.0, logp), mask=in_rows)
    if ENTROPY:
        ent = tl.maximum(log_s - a / s, 0.0)
        tl.store(Ent + rows, tl.where(ignored, 0.0, ent), mask=in_rows)


@triton.jit
def token_logprobs_dlogits_kernel(
    Hid,
    W,
    Tok,
    Lse,
    GLogP,
    GEnt,
    Ent,
    Out,
    N,
    V,
    D,
    inv_t,
    ignore,
    ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Out[r, j] = (g_lp (onehot_j - p_j) - g_ent p_j (log p_j + H)) / T for one tile of the
    N rows given (Hid, Tok, ... point at the chunk's first row)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = rows < N
    tok = tl.load(Tok + rows, mask=in_rows, other=ignore)
    live = in_rows & (tok != ignore)
    lse = tl.load(Lse + rows, mask=in_rows, other=0.0).to(ACC)
    g_lp = tl.load(GLogP + rows, mask=live, other=0.0).to(ACC)
    x = _logits(
        Hid, W, rows, cols, N, V, D, inv_t, ACC, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D
    )
    logp = x - lse[:, None]
    coef = g_lp[:, None] + tl.zeros((BLOCK_N, BLOCK_V), ACC)
    if ENTROPY:
        g_ent = tl.load(GEnt + rows, mask=live, other=0.0).to(ACC)
        ent = tl.load(Ent + rows, mask=in_rows, other=0.0).to(ACC)
        coef += g_ent[:, None] * (logp + ent[:, None])
    grad = -tl.exp(logp) * coef
    grad += tl.where(cols[None, :] == tok[:, None], g_lp[:, None], 0.0)
    inside = in_rows[:, None] & (cols < V)[None, :]
    tl.store(Out + rows[:, None] * V + cols[None, :], grad * inv_t, mask=inside)


def _meta(dtype: torch.dtype, d: int) -> dict:
    return dict(
        ACC=_acc(dtype),
        PRECISION=PRECISION,
        # Triton's interpreter multiplies bfloat16 wrongly (see _kernels._dot): upcast there
        UPCAST=dtype == torch.bfloat16 and interpreted(),
        BLOCK_D=_block(d, 16, 64),
    )


def _blocks(n: int, v: int) -> tuple[int, int]:
    return _block(n, 16, 64), _block(v, 16, 128)


def token_logprobs(hidden, weight, tokens, temperature: float, entropy: bool, ignore_index: int):
    """(logprobs [N], entropies [N] or [0], lse [N]) in the accumulation dtype."""
    _check_device(hidden, weight, tokens)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    tokens = tokens.to(torch.int64).contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    acc = _acc_torch(hidden.dtype)
    logprobs = hidden.new_empty((n,), dtype=acc)
    lse = hidden.new_empty((n,), dtype=acc)
    entropies = hidden.new_empty((n if entropy else 0,), dtype=acc)
    if n == 0:
        return logprobs, entropies, lse
    block_n, block_v = _blocks(n, v)
    _wrap(token_logprobs_fwd_kernel)[(triton.cdiv(n, block_n),)](
        hidden,
        weight,
        tokens,
        logprobs,
        entropies if entropy else logprobs,
        lse,
        n,
        v,
        d,
        1.0 / float(temperature),
        int(ignore_index),
        ENTROPY=bool(entropy),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        **_meta(hidden.dtype, d),
    )
    return logprobs, entropies, lse


def token_logprobs_backward(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    tokens,
    lse,
    entropy,
    temperature: float,
    ignore_index: int,
):
    """(grad_hidden, grad_weight): per chunk of rows, the logits' gradient from the kernel, then
    grad_hidden[chunk] = G W and grad_weight += G^T h[chunk] in the accumulation dtype."""
    _check_device(hidden, weight, tokens)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    tokens = tokens.to(torch.int64).contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    acc = _acc_torch(hidden.dtype)
    with_entropy = grad_entropy is not None
    grad_lp = grad_logprobs.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    grad_ent = grad_entropy.to(acc).contiguous() if with_entropy else grad_lp
    ent = entropy.to(acc).contiguous() if with_entropy else lse
    grad_hidden = hidden.new_empty((n, d), dtype=acc)
    grad_weight = torch.zeros((v, d), dtype=acc, device=hidden.device)
    if n == 0:
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype)
    weight_acc, hidden_acc = weight.to(acc), hidden.to(acc)
    block_n, block_v = _blocks(n, v)
    # rows per chunk: a multiple of BLOCK_N, a function of the shapes alone
    rows = max(block_n, (min(n, max(1, BACKWARD_ELEMENTS // v)) // block_n) * block_n)
    buf = hidden.new_empty((min(rows, n), v), dtype=acc)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        g = buf[:m]
        _wrap(token_logprobs_dlogits_kernel)[(triton.cdiv(m, block_n), triton.cdiv(v, block_v))](
            hidden[r0:],
            weight,
            tokens[r0:],
            lse[r0:],
            grad_lp[r0:],
            grad_ent[r0:],
            ent[r0:],
            g,
            m,
            v,
            d,
            1.0 / float(temperature),
            int(ignore_index),
            ENTROPY=with_entropy,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            **_meta(hidden.dtype, d),
        )
        torch.mm(g, weight_acc, out=grad_hidden[r0 : r0 + m])
        grad_weight.addmm_(g.T, hidden_acc[r0 : r0 + m])
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype)
