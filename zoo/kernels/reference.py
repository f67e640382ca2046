"""Pure-PyTorch reference implementation of every kernel op.

This is the fallback backend and the oracle the compiled kernels are tested against, so it is
written for clarity, not speed: it materialises whatever it needs ([N, C] group masks, the
[L, L] attention matrix). Argument checking lives in ``zoo.kernels`` (shared by both backends);
the functions here assume valid arguments.

Random sampling uses the same counter-based generator as the compiled kernels (SplitMix64 of
``seed`` and the element's index in the contiguous layout), so for one seed both backends draw
exactly the same noise and their outputs can be compared value for value.
"""

from __future__ import annotations

import math

import torch

# SplitMix64 constants as signed int64 (torch has no uint64 arithmetic; int64 multiply wraps).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(seed: int, index: torch.Tensor) -> torch.Tensor:
    """SplitMix64 output for counter ``index`` (int64 tensor) of stream ``seed``."""
    z = index.to(torch.int64).add(1).mul(_GOLDEN).add(_to_signed(seed))
    z = (z ^ _shr(z, 30)).mul(_MIX1)
    z = (z ^ _shr(z, 27)).mul(_MIX2)
    return z ^ _shr(z, 31)


def _to_signed(seed: int) -> int:
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def uniform(seed: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Float32 uniforms strictly inside (0, 1): the top 23 bits of SplitMix64 centred in their
    bucket, so every value (and 1 - u) is exact, the smallest is 2**-24 and the largest
    1 - 2**-24 (log(-log(u)) is always finite)."""
    n = math.prod(shape)
    bits = _shr(splitmix64(seed, torch.arange(n, device=device)), 41)
    return ((bits.to(torch.float32) + 0.5) * (2.0**-23)).view(shape)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The compute type of the kernels: float64 stays float64, everything else goes to float32."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------- GroupSoftmax CE


def group_softmax_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group_table: torch.Tensor,
    row_group: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Loss of row n = -log sum_{c: T[r,c] = T[r,y]} softmax(z_n)_c, r = row_group[n]."""
    z = _acc(logits)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    table = group_table.long()[row_group.long()]  # [N, C]: group id of each class for the row
    member = table == table.gather(1, safe_target[:, None])
    lse = torch.logsumexp(z, dim=1)
    lse_group = torch.logsumexp(z.masked_fill(~member, -math.inf), dim=1)
    loss = torch.where(valid, lse - lse_group, torch.zeros_like(lse))
    return _reduce(loss, valid, reduction).to(logits.dtype)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    # mean over non-ignored rows; 0 (not NaN) when every row is ignored
    return total / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- Gumbel


def gumbel_softmax(
    logits: torch.Tensor, tau: float, hard: bool, dim: int, seed: int
) -> torch.Tensor:
    x = logits.movedim(dim, -1).contiguous()
    u = uniform(seed, x.shape, x.device).to(_acc(x).dtype)
    gumbels = -torch.log(-torch.log(u))
    soft = torch.softmax((_acc(x) + gumbels) / tau, dim=-1)
    if hard:
        index = soft.argmax(dim=-1, keepdim=True)
        one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
        out = one_hot + (soft - soft.detach())  # forward: exactly one-hot; gradient: soft's
    else:
        out = soft
    return out.to(logits.dtype).movedim(-1, dim)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, hard: bool, seed: int) -> torch.Tensor:
    x = logits.contiguous()
    u = uniform(seed, x.shape, x.device).to(_acc(x).dtype)
    noise = torch.log(u) - torch.log1p(-u)  # Logistic(0, 1) = difference of two Gumbels
    soft = torch.sigmoid((_acc(x) + noise) / tau)
    if hard:
        out = (soft > 0.5).to(soft.dtype) + (soft - soft.detach())
    else:
        out = soft
    return out.to(logits.dtype)


# --------------------------------------------------------------------------- attention


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with zeros for rows that may attend to nothing."""
    scores = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale
    if keep_mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), _acc(v)).to(q.dtype)
    keep = keep_mask.expand_as(scores)
    any_key = keep.any(dim=-1, keepdim=True)
    # rows with no allowed key: give softmax finite input (then zero the row) so neither the
    # forward nor the backward produces NaN
    scores = scores.masked_fill(~keep, -math.inf).masked_fill(~any_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~any_key, 0.0)
    return torch.matmul(probs, _acc(v)).to(q.dtype)


def soft_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    keep_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """P_ij = M_ij exp(S_ij) / sum_k M_ik exp(S_ik) over the keys keep_mask allows; rows whose
    weights are all zero give zeros and no gradient."""
    scores = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale
    if keep_mask is not None:
        scores = scores.masked_fill(~keep_mask.expand_as(scores), -math.inf)
    top = scores.amax(dim=-1, keepdim=True).detach()  # for stability only: P does not depend on it
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(scores - top) * _acc(mask)
    total = weights.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    probs = torch.where(nonzero, weights / torch.where(nonzero, total, torch.ones_like(total)), 0.0)
    return torch.matmul(probs, _acc(v)).to(q.dtype)


# ------------------------------------------------------------------ sparse 3-D convolution


def kernel_offsets(kernel_size, dilation) -> torch.Tensor:
    """int64 [K, 3]: the (z, y, x) offset of each kernel tap times the dilation, in the order of
    ``nn.Conv3d``'s weight flattened over (kz, ky, kx)."""
    axes = [torch.arange(k, dtype=torch.int64) * d for k, d in zip(kernel_size, dilation)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def coordinate_keys(coords: torch.Tensor, spatial_shape) -> torch.Tensor:
    """int64 key of each (batch, z, y, x) row: row-major over (batch, D, H, W)."""
    c = coords.to(torch.int64)
    d, h, w = spatial_shape
    return ((c[:, 0] * d + c[:, 1]) * h + c[:, 2]) * w + c[:, 3]


def conv_output_shape(spatial_shape, kernel_size, stride, padding, dilation) -> list[int]:
    return [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation)
    ]


def sparse_kernel_map(coords, spatial_shape, kernel_size, stride, padding, dilation, subm):
    """(output coordinates int32 [M, 4], neighbour table int32 [M, K]): ``nbr[o, k]`` is the row
    of the input at ``out[o] * stride - padding + offset[k]`` (``kernel_offsets``), or -1.
    Submanifold: the outputs are the inputs, in their order. Otherwise: every site of the output
    grid that some input reaches, sorted by key (batch, z, y, x)."""
    offsets = kernel_offsets(kernel_size, dilation)
    stride_t = torch.tensor(stride, dtype=torch.int64)
    pad = torch.tensor(padding, dtype=torch.int64)
    c = coords.to(torch.int64)
    if subm:
        out = c
    else:
        out_shape = torch.tensor(
            conv_output_shape(spatial_shape, kernel_size, stride, padding, dilation)
        )
        cand = c[:, None, 1:] + pad - offsets[None]  # [N, K, 3] = out * stride
        ok = (cand % stride_t == 0).all(-1)
        o = torch.div(cand, stride_t, rounding_mode="floor")
        ok &= ((o >= 0) & (o < out_shape)).all(-1)
        batch = c[:, None, :1].expand(-1, offsets.shape[0], 1)
        sites = torch.cat([batch, o], -1)[ok]
        keys = coordinate_keys(sites, out_shape.tolist())
        keys, first = torch.unique(keys, sorted=True, return_inverse=True)
        out = torch.zeros(len(keys), 4, dtype=torch.int64)
        out[first] = sites
    in_keys, perm = torch.sort(coordinate_keys(c, spatial_shape))
    query = out[:, None, 1:] * stride_t - pad + offsets[None]  # [M, K, 3]
    inside = ((query >= 0) & (query < torch.tensor(list(spatial_shape)))).all(-1)
    batch = out[:, None, :1].expand(-1, offsets.shape[0], 1)
    qkeys = coordinate_keys(torch.cat([batch, query], -1).reshape(-1, 4), spatial_shape)
    pos = torch.searchsorted(in_keys, qkeys).clamp(max=max(len(in_keys) - 1, 0))
    if len(in_keys):
        found = inside.reshape(-1) & (in_keys[pos] == qkeys)
        nbr = torch.where(found, perm[pos], -1)
    else:
        nbr = torch.full_like(qkeys, -1)
    return out.to(torch.int32), nbr.reshape(len(out), len(offsets)).to(torch.int32)


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """out[o] = sum_k features[nbr[o, k]] @ weight[k] over the taps with nbr[o, k] >= 0
    (weight [K, C_in, C_out]); accumulated in float32 for half inputs."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    out = features.new_zeros(nbr.shape[0], weight.shape[2], dtype=acc)
    for k in range(nbr.shape[1]):
        rows = nbr[:, k].long()
        valid = (rows >= 0).nonzero().squeeze(1)
        out = out.index_add(0, valid, features[rows[valid]].to(acc) @ weight[k].to(acc))
    return out.to(features.dtype)


def sparse_max_pool(features: torch.Tensor, nbr: torch.Tensor):
    """(out [M, C], arg int32 [M, C]): the channel-wise max over each output's neighbours and
    the tap it came from (the first tap on ties); 0 and -1 for an output with none."""
    best = features.new_full((nbr.shape[0], features.shape[1]), float("-inf"))
    arg = torch.full(best.shape, -1, dtype=torch.int32)
    for k in range(nbr.shape[1]):
        rows = nbr[:, k].long()
        vals = features[rows.clamp(min=0)]
        better = (rows >= 0)[:, None] & ((vals > best) | ((arg < 0) & (rows >= 0)[:, None]))
        best = torch.where(better, vals, best)
        arg = torch.where(better, torch.full_like(arg, k), arg)
    return torch.where(arg >= 0, best, torch.zeros_like(best)), arg


# --------------------------------------------------------------------------- token log-probs


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    ignore_index: int = -100,
):
    """log_softmax(hidden @ weight.T / temperature) at ``tokens`` ([N], float32 for half inputs)
    and, when ``entropy``, the entropy of each row's distribution: the [N, V] logits are
    materialised (the oracle the fused kernels are compared with). Rows whose token is
    ``ignore_index`` give 0 with no gradient."""
    logits = _acc(hidden) @ _acc(weight).T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = tokens != ignore_index
    picked = logp.gather(1, torch.where(valid, tokens, 0).long()[:, None]).squeeze(1)
    zero = picked.new_zeros(())
    out = torch.where(valid, picked, zero)
    if not entropy:
        return out
    ent = -(logp.exp() * logp).sum(-1)
    return out, torch.where(valid, ent, zero)
