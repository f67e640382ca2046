"""The Triton sparse 3-D convolution kernels (``zoo.kernels.triton._sparse``) beyond the parity
tests every op gets in test_kernels.py: they repeat bit for bit (no atomics: each program owns
what it writes and sums in a fixed order), and half-precision inputs accumulate in float32.

On a GPU they run compiled on CUDA tensors; without one, on CPU tensors in Triton's
interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import reference as R
from zoo.kernels.ops.sparse_kernel_map import random_coords

pytest.importorskip("triton", reason="Triton is not installed (torch's CUDA wheels ship it)")

SHAPE = (9, 10, 11)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tk():
    import zoo.kernels.triton as tk

    if not torch.cuda.is_available():
        assert tk.interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported"
    return tk


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _leaf(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device).requires_grad_()


def _sparse_net_step(tk, device, coords, features, weight, grad_conv, grad_pool):
    """Kernel maps, a strided convolution and a max-pool with their gradients: every tensor the
    sparse kernels produce, on ``device``."""
    coords = coords.to(device)
    out_coords, nbr = tk.sparse_kernel_map(coords, SHAPE, 3, stride=2, padding=1)
    _, sub_nbr = tk.sparse_kernel_map(coords, SHAPE, 3, subm=True)
    f, w = _leaf(features, device), _leaf(weight, device)
    y = tk.sparse_conv(f, w, nbr)
    grad_f, grad_w = torch.autograd.grad(y, (f, w), grad_conv.to(device))
    # rounded features: many ties, which the first tap must win every time
    pooled_in = _leaf(features.round(), device)
    pooled = tk.sparse_max_pool(pooled_in, sub_nbr)
    (grad_pooled,) = torch.autograd.grad(pooled, (pooled_in,), grad_pool.to(device))
    _, arg = torch.ops.zoo_triton.sparse_max_pool(pooled_in.detach(), sub_nbr)
    tensors = (out_coords, nbr, sub_nbr, y, grad_f, grad_w, pooled, arg, grad_pooled)
    return [t.detach().cpu() for t in tensors]


def test_sparse_kernels_repeat_bit_for_bit(tk, device):
    coords = random_coords(80, SHAPE, seed=3)
    n, c_in, c_out = len(coords), 40, 20  # 40 input channels: two channel blocks of 32
    features = torch.randn(n, c_in, generator=gen(1))
    weight = torch.randn(27, c_in, c_out, generator=gen(2)) / (27 * c_in) ** 0.5
    _, ref_nbr = R.sparse_kernel_map(coords, SHAPE, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    grad_conv = torch.randn(len(ref_nbr), c_out, generator=gen(4))
    grad_pool = torch.randn(n, c_in, generator=gen(5))

    first = _sparse_net_step(tk, device, coords, features, weight, grad_conv, grad_pool)
    second = _sparse_net_step(tk, device, coords, features, weight, grad_conv, grad_pool)

    names = "out_coords nbr sub_nbr conv grad_f grad_w pool arg grad_pool".split()
    for name, a, b in zip(names, first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    # and the repeated values are the right ones, not merely stable
    assert torch.equal(first[1], ref_nbr)
    torch.testing.assert_close(first[3], R.sparse_conv(features, weight, ref_nbr))
    assert (first[7] >= 0).any() and first[5].abs().sum() > 0


# machine epsilon (one ulp at 1) of each half type. Products of half values are exact in float32
# and the kernels sum in float32, so the results differ from the float32 reference by one
# rounding to the half type (at most half an ulp, EPS / 2 relative), plus the float32 error of
# summing the same terms in another order: that can tip a value over a rounding boundary, so
# the bound allows a whole ulp (measured: at most ~0.5 of this tolerance).
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ATOL = 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_conv_matches_float32_reference(tk, device, dtype):
    coords = random_coords(80, SHAPE, seed=6)
    _, nbr = R.sparse_kernel_map(coords, SHAPE, [3] * 3, [1] * 3, [1] * 3, [1] * 3, True)
    n, c_in, c_out = len(coords), 24, 16
    features = torch.randn(n, c_in, generator=gen(7)).to(dtype)
    weight = (torch.randn(27, c_in, c_out, generator=gen(8)) / (27 * c_in) ** 0.5).to(dtype)
    grad = torch.randn(n, c_out, generator=gen(9)).to(dtype)

    f, w = _leaf(features, device), _leaf(weight, device)
    out = tk.sparse_conv(f, w, nbr.to(device))
    grad_f, grad_w = torch.autograd.grad(out, (f, w), grad.to(device))
    assert out.dtype == grad_f.dtype == grad_w.dtype == dtype

    # the reference on the same (half-exact) values in float32
    f32, w32 = features.float().requires_grad_(), weight.float().requires_grad_()
    ref = R.sparse_conv(f32, w32, nbr)
    ref_f, ref_w = torch.autograd.grad(ref, (f32, w32), grad.float())
    tol = dict(rtol=EPS[dtype], atol=ATOL)
    torch.testing.assert_close(out.float().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(grad_f.float().cpu(), ref_f, **tol)
    torch.testing.assert_close(grad_w.float().cpu(), ref_w, **tol)
