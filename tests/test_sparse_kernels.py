"""The compiled (C++) sparse 3-D convolution ops against dense PyTorch and brute force.

With integer-valued features and weights every sum is exact in float32, so the sparse ops must
equal ``F.conv3d`` / ``F.conv_transpose3d`` / ``F.max_pool3d`` on the densified grid bit for bit,
forward and backward. The kernel maps are compared with a loops-and-dicts construction, and the
results must repeat bit for bit, run after run and with any number of threads."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import zoo.kernels as K
from zoo.kernels import reference as R
from zoo.kernels.ops.sparse_conv import invert
from zoo.kernels.ops.sparse_kernel_map import CONFIGS, random_coords

SHAPE = (7, 8, 9)
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def compiled_backend():
    """Every test here runs the compiled library (a build failure fails them)."""
    with K.backend_as("compiled"):
        assert K.backend() == "compiled"
        yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def triple(v) -> list[int]:
    return [v] * 3 if isinstance(v, int) else list(v)


def densify(coords: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """[BATCH, C, *shape], ``values`` at ``coords`` and zero elsewhere."""
    dense = values.new_zeros(BATCH, values.shape[1], *shape)
    b, z, y, x = coords.long().unbind(1)
    dense[b, :, z, y, x] = values
    return dense


def at_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    b, z, y, x = coords.long().unbind(1)
    return dense[b, :, z, y, x]


def integers(shape, lo, hi, seed) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen(seed)).float()


# ------------------------------------------------------------------ exact against dense


CONV_CONFIGS = {  # (kernel_size, stride, padding, subm)
    "subm k3": (3, 1, 1, True),
    "k3 s2 p1": (3, 2, 1, False),
    "k2 s2": (2, 2, 0, False),
}


@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
def test_conv_equals_dense_conv3d_bit_for_bit(config):
    ks, st, pad, subm = CONV_CONFIGS[config]
    coords = random_coords(60, SHAPE, batch=BATCH, seed=1)
    out_coords, nbr = K.sparse_kernel_map(coords, SHAPE, ks, st, pad, 1, subm)
    c_in, c_out, taps = 5, 6, ks**3
    features = integers((len(coords), c_in), -3, 3, seed=2).requires_grad_()
    weight = integers((taps, c_in, c_out), -2, 2, seed=3).requires_grad_()
    grad_out = integers((len(out_coords), c_out), -2, 2, seed=4)

    out = K.sparse_conv(features, weight, nbr)
    out.backward(grad_out)

    dense_in = densify(coords, features.detach(), SHAPE).requires_grad_()
    # nn.Conv3d's weight [C_out, C_in, kz, ky, kx]; the sparse taps run over its (kz, ky, kx)
    dense_w = weight.detach().permute(2, 1, 0).reshape(c_out, c_in, ks, ks, ks).requires_grad_()
    dense_out = F.conv3d(dense_in, dense_w, stride=st, padding=pad)
    dense_out.backward(densify(out_coords, grad_out, dense_out.shape[2:]))

    assert torch.equal(out.detach(), at_sites(dense_out.detach(), out_coords))
    assert torch.equal(features.grad, at_sites(dense_in.grad, coords))
    assert torch.equal(weight.grad, dense_w.grad.reshape(c_out, c_in, taps).permute(2, 1, 0))


@pytest.mark.parametrize("config", ["k3 s2 p1", "k2 s2"])
def test_transposed_conv_equals_dense_conv_transpose3d_bit_for_bit(config):
    ks, st, pad, _ = CONV_CONFIGS[config]
    coords = random_coords(60, SHAPE, batch=BATCH, seed=5)
    out_coords, nbr = K.sparse_kernel_map(coords, SHAPE, ks, st, pad, 1, False)
    inv = invert(nbr, len(coords))  # from the strided outputs back to the input sites
    c_in, c_out, taps = 4, 3, ks**3
    features = integers((len(out_coords), c_in), -3, 3, seed=6).requires_grad_()
    # nn.ConvTranspose3d's weight [C_in, C_out, kz, ky, kx] as [K, C_in, C_out]
    dense_w = integers((c_in, c_out, ks, ks, ks), -2, 2, seed=7).requires_grad_()
    weight = dense_w.detach().reshape(c_in, c_out, taps).permute(2, 0, 1).requires_grad_()
    grad_out = integers((len(coords), c_out), -2, 2, seed=8)

    out = K.sparse_conv(features, weight, inv)
    out.backward(grad_out)

    grid = R.conv_output_shape(SHAPE, [ks] * 3, [st] * 3, [pad] * 3, [1] * 3)
    dense_in = densify(out_coords, features.detach(), grid).requires_grad_()
    extra = [s - ((g - 1) * st - 2 * pad + ks) for s, g in zip(SHAPE, grid)]
    dense_out = F.conv_transpose3d(dense_in, dense_w, stride=st, padding=pad, output_padding=extra)
    assert tuple(dense_out.shape[2:]) == SHAPE
    dense_out.backward(densify(coords, grad_out, SHAPE))

    assert torch.equal(out.detach(), at_sites(dense_out.detach(), coords))
    assert torch.equal(features.grad, at_sites(dense_in.grad, out_coords))
    assert torch.equal(weight.grad, dense_w.grad.reshape(c_in, c_out, taps).permute(2, 0, 1))


@pytest.mark.parametrize("config", ["k3 s2 p1", "k2 s2"])
def test_max_pool_equals_dense_max_pool3d(config):
    ks, st, pad, _ = CONV_CONFIGS[config]
    coords = random_coords(60, SHAPE, batch=BATCH, seed=9)
    out_coords, nbr = K.sparse_kernel_map(coords, SHAPE, ks, st, pad, 1, False)
    c = 4
    # positive and all different: the dense grid's zeros never win, and no max is tied
    values = torch.randperm(len(coords) * c, generator=gen(10)).float() + 1
    features = values.reshape(len(coords), c).requires_grad_()
    grad_out = integers((len(out_coords), c), -3, 3, seed=11)

    out = K.sparse_max_pool(features, nbr)
    out.backward(grad_out)

    dense_in = densify(coords, features.detach(), SHAPE).requires_grad_()
    dense_out = F.max_pool3d(dense_in, ks, stride=st, padding=pad)
    dense_out.backward(densify(out_coords, grad_out, dense_out.shape[2:]))

    assert torch.equal(out.detach(), at_sites(dense_out.detach(), out_coords))
    assert torch.equal(features.grad, at_sites(dense_in.grad, coords))


# ------------------------------------------------------------------ kernel maps, brute force


def brute_force_map(coords, shape, ks, st, pad, dil, subm):
    """(output sites, {(output site, tap, input site)}) by loops over Python tuples."""
    sites = {tuple(r): i for i, r in enumerate(coords.tolist())}
    taps = list(itertools.product(*(range(k) for k in ks)))
    if subm:
        outputs = list(sites)
    else:
        grid = R.conv_output_shape(shape, ks, st, pad, dil)
        found = set()
        for b, *c in sites:
            for t in taps:
                q = [c[a] + pad[a] - t[a] * dil[a] for a in range(3)]
                if all(q[a] % st[a] == 0 and 0 <= q[a] // st[a] < grid[a] for a in range(3)):
                    found.add((b, *(q[a] // st[a] for a in range(3))))
        outputs = sorted(found)
    triples = set()
    for b, *o in outputs:
        for k, t in enumerate(taps):
            q = (b, *(o[a] * st[a] - pad[a] + t[a] * dil[a] for a in range(3)))
            if q in sites:
                triples.add(((b, *o), k, q))
    return outputs, triples


# the specs' configurations, and strided ones with dilation and mixed axes
MAP_CONFIGS = (*CONFIGS, (3, 2, 2, 2, False), ((3, 2, 3), (2, 3, 1), (0, 1, 2), (2, 1, 1), False))


@pytest.mark.parametrize("config", MAP_CONFIGS, ids=[str(c) for c in MAP_CONFIGS])
def test_kernel_map_equals_brute_force(config):
    ks, st, pad, dil, subm = (triple(v) if not isinstance(v, bool) else v for v in config)
    if subm:  # the submanifold padding keeps the outputs on the inputs
        pad = [(k - 1) // 2 * d for k, d in zip(ks, dil)]
    coords = random_coords(50, SHAPE, batch=BATCH, seed=12)
    out, nbr = K.sparse_kernel_map(coords, SHAPE, *config)
    want_out, want = brute_force_map(coords, SHAPE, ks, st, pad, dil, subm)
    assert out.dtype == nbr.dtype == torch.int32
    assert nbr.shape == (len(want_out), ks[0] * ks[1] * ks[2])
    assert [tuple(r) for r in out.tolist()] == want_out  # the inputs' order, or sorted
    rows, taps = (nbr >= 0).nonzero().unbind(1)
    got = {
        (tuple(out[o].tolist()), int(k), tuple(coords[nbr[o, k]].tolist()))
        for o, k in zip(rows.tolist(), taps.tolist())
    }
    assert got == want
    assert int(nbr.min()) >= -1


def test_empty_inputs():
    empty = torch.zeros(0, 4, dtype=torch.int32)
    for subm, st in ((True, 1), (False, 2)):
        out, nbr = K.sparse_kernel_map(empty, SHAPE, 3, st, 1, 1, subm)
        assert out.shape == (0, 4) and nbr.shape == (0, 27)
    features = torch.zeros(0, 3, requires_grad=True)
    weight = torch.randn(27, 3, 5, requires_grad=True)
    y = K.sparse_conv(features, weight, nbr)
    y.sum().backward()
    assert y.shape == (0, 5) and torch.equal(weight.grad, torch.zeros_like(weight))
    assert K.sparse_max_pool(features, nbr).shape == (0, 3)


# ------------------------------------------------------------------ determinism


def run_all(coords, seed=13):
    """Every op's outputs and gradients on a map big enough for many chunks per tap."""
    results = []
    for ks, st, pad, subm in ((3, 1, 1, True), (3, 2, 1, False)):
        out_coords, nbr = K.sparse_kernel_map(coords, (12, 14, 16), ks, st, pad, 1, subm)
        features = torch.randn(len(coords), 32, generator=gen(seed)).requires_grad_()
        weight = torch.randn(27, 32, 24, generator=gen(seed + 1)).requires_grad_()
        y = K.sparse_conv(features, weight, nbr)
        y.backward(torch.randn(y.shape, generator=gen(seed + 2)))
        results += [out_coords, nbr, y.detach(), features.grad, weight.grad]
        pool_in = features.detach().clone().requires_grad_()
        p = K.sparse_max_pool(pool_in, nbr)
        p.backward(torch.randn(p.shape, generator=gen(seed + 3)))
        results += [p.detach(), pool_in.grad]
    return results


def test_results_repeat_bit_for_bit_with_any_thread_count():
    coords = random_coords(1500, (12, 14, 16), batch=BATCH, seed=14)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run_all(coords), run_all(coords)
        torch.set_num_threads(1)
        single = run_all(coords)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------ other dtypes, odd maps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_conv_and_pool_in_other_dtypes_match_the_reference(dtype):
    coords = random_coords(80, SHAPE, batch=BATCH, seed=15)
    _, nbr = K.sparse_kernel_map(coords, SHAPE, 3, 2, 1, 1, False)
    features = torch.randn(len(coords), 9, generator=gen(16)).to(dtype)
    weight = (torch.randn(27, 9, 7, generator=gen(17)) / 10).to(dtype)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    results = []
    for backend in ("compiled", "reference"):
        with K.backend_as(backend):
            f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
            y = K.sparse_conv(f, w, nbr)
            y.float().pow(2).sum().backward()
            p = K.sparse_max_pool(features, nbr)
            results.append((y.detach(), f.grad, w.grad, p))
    for ours, ref in zip(*results):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref.float(), **tol)


def test_gradcheck_float64():
    coords = random_coords(8, (3, 4, 4), batch=BATCH, seed=18)
    _, nbr = K.sparse_kernel_map(coords, (3, 4, 4), 3, 2, 1, 1, False)
    features = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(27, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: K.sparse_conv(f, w, nbr), (features, weight))
    assert torch.autograd.gradcheck(lambda f: K.sparse_max_pool(f, nbr), (features,))


def test_a_map_that_sends_an_input_to_one_tap_twice_still_sums_correctly():
    """Not a kernel map (each tap then reads an input once), but a valid table: the backward
    takes its serial path."""
    nbr = torch.tensor([[0, 1, -1], [0, 1, 2], [2, -1, 0], [-1, 2, 0]], dtype=torch.int32)
    features = torch.randn(3, 4, generator=gen(19), dtype=torch.float64)
    weight = torch.randn(3, 4, 5, generator=gen(20), dtype=torch.float64)
    grads = []
    for backend in ("compiled", "reference"):
        with K.backend_as(backend):
            f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
            (K.sparse_conv(f, w, nbr).pow(2).sum() + K.sparse_max_pool(f, nbr).sum()).backward()
            grads.append((f.grad, w.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_value_errors_naming_the_value():
    coords = random_coords(10, SHAPE, batch=BATCH, seed=21)
    with pytest.raises(ValueError, match=r"odd kernel_size.*\[2, 2, 2\]"):
        K.sparse_kernel_map(coords, SHAPE, 2, 1, 0, 1, True)
    outside = coords.clone()
    outside[3, 2] = SHAPE[1]
    with pytest.raises(ValueError, match=rf"row 3 .* = \[.*, {SHAPE[1]}, .*\] is outside"):
        K.sparse_kernel_map(outside, SHAPE, 3, 1, 0, 1, True)
    _, nbr = K.sparse_kernel_map(coords, SHAPE, 3, 1, 0, 1, True)
    bad = nbr.clone()
    bad[1, 4] = len(coords)
    features = torch.randn(len(coords), 3)
    with pytest.raises(ValueError, match=rf"holds row {len(coords)}, outside"):
        K.sparse_conv(features, torch.randn(27, 3, 2), bad)
    bad[1, 4] = -2
    with pytest.raises(ValueError, match="holds row -2, outside"):
        K.sparse_max_pool(features, bad)


def test_repeated_sites_are_refused():
    coords = random_coords(10, SHAPE, batch=BATCH, seed=22)
    coords[5] = coords[2]
    with pytest.raises(RuntimeError, match="row 5 .* repeats an earlier row|row 2 .* repeats"):
        K.sparse_kernel_map(coords, SHAPE, 3, 1, 0, 1, True)
