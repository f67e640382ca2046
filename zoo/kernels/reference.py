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
