"""Tile maps of attention keep masks, computed once per mask and reused.

A tile map says, for every TILE x TILE block of a keep mask, whether it keeps nothing (the
kernels skip it), some entries (they load the mask) or everything (no mask loads). The map
depends only on the mask, so it is cached: while the same mask tensor (or a view of it) is
passed and has not been modified in place, later calls reuse the map instead of reading the
whole mask again. The cache holds weak references, so it never keeps a mask alive.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

TILE = 64
EMPTY, PARTIAL, FULL = 0, 1, 2

_MAX_ENTRIES = 64
_cache: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}
_lock = threading.Lock()
stats = {"hits": 0, "misses": 0}  # read by the tests


def _owned(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The mask expanded to [B, H, Lq, Lk], then narrowed to 1 along the batch and head
    dimensions it broadcasts over."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(shape)
    for d in range(2):
        if mask.shape[d] > 1 and mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    return mask


def compute_tile_map(
    mask: torch.Tensor, shape: tuple[int, int, int, int], tile: int = TILE
) -> torch.Tensor:
    """int8 [Bm, Hm, ceil(Lq / tile), ceil(Lk / tile)] of EMPTY / PARTIAL / FULL for a bool mask
    broadcast to ``shape`` = [B, H, Lq, Lk] (Bm, Hm are 1 where the mask broadcasts)."""
    owned = _owned(mask, shape)
    bm, hm, lq, lk = owned.shape
    nq, nk = -(-lq // tile), -(-lk // tile)
    pad = (0, nk * tile - lk, 0, nq * tile - lq)
    m8 = owned.to(torch.uint8)
    # padding counts as "not kept" for any() and as "kept" for all()
    anyk = F.pad(m8, pad, value=0).view(bm, hm, nq, tile, nk, tile).amax(dim=(3, 5))
    allk = F.pad(m8, pad, value=1).view(bm, hm, nq, tile, nk, tile).amin(dim=(3, 5))
    return (anyk + allk).to(torch.int8).contiguous()


def tile_map(
    mask: torch.Tensor, shape: tuple[int, int, int, int], tile: int = TILE
) -> torch.Tensor:
    """``compute_tile_map`` with a cache keyed by the mask's storage, view and version."""
    # torch's tensor attributes ``_base`` (a view's owner) and ``_version`` (its in-place edit
    # counter) have no public spelling; autograd's own checks read the same two
    owner = mask._base if mask._base is not None else mask
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if tracing or owner.is_inference() or mask.is_inference():
        # traced: shapes may be symbolic (int() would fix them); inference tensors have no
        # version counter, so in-place edits could not be detected
        return compute_tile_map(mask, shape, tile)
    shape = tuple(int(n) for n in shape)
    key = (
        id(owner),
        mask.data_ptr(),
        tuple(mask.shape),
        tuple(mask.stride()),
        mask.device,
        shape,
        tile,
    )
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is owner and hit[1] == owner._version:
            stats["hits"] += 1
            return hit[2]
    tiles = compute_tile_map(mask, shape, tile)
    with _lock:
        stats["misses"] += 1
        if len(_cache) >= _MAX_ENTRIES:
            for k in [k for k, v in _cache.items() if v[0]() is None] or list(_cache)[:1]:
                del _cache[k]
        _cache[key] = (weakref.ref(owner), owner._version, tiles)
    return tiles


def computed_fraction(
    mask: torch.Tensor, tile: int = TILE, slab: int = 16, block: int = 16, max_run: int = 4
) -> float:
    """Share of a [Lq, Lk] bool mask's score matrix the CPU forward kernel computes: per query
    tile, runs of up to ``max_run`` non-empty key tiles; per ``slab`` query rows of a run, the
    span from the first to the last ``block`` of keys that keeps an entry (csrc/cpu/attention.cpp,
    kSlab / kBlock / kMaxChunk). Benchmarks count their FLOPs on this area."""
    lq, lk = mask.shape[-2:]
    mask = mask.reshape(-1, lq, lk)[0]
    tiles = compute_tile_map(mask, (1, 1, lq, lk), tile)[0, 0].tolist()
    nsl, nkb = -(-lq // slab), -(-lk // block)
    m8 = F.pad(mask.to(torch.uint8), (0, nkb * block - lk, 0, nsl * slab - lq))
    kept = m8.view(nsl, slab, nkb, block).amax(dim=(1, 3)).bool()
    per_tile = tile // block
    area = 0
    for qb, row in enumerate(tiles):
        kb = 0
        while kb < len(row):
            if row[kb] == EMPTY:
                kb += 1
                continue
            kb1 = kb + 1
            while kb1 < len(row) and kb1 - kb < max_run and row[kb1] != EMPTY:
                kb1 += 1
            for s in range(qb * tile // slab, min(nsl, (qb + 1) * tile // slab)):
                hits = kept[s, kb * per_tile : kb1 * per_tile].nonzero().flatten().tolist()
                if hits:
                    lo = kb * tile + hits[0] * block
                    hi = min(kb * tile + (hits[-1] + 1) * block, lk)
                    area += min(slab, lq - s * slab) * (hi - lo)
            kb = kb1
    return area / (lq * lk)
