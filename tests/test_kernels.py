"""The kernel package against its pure-PyTorch reference, on every implementation.

The ``impl`` fixture runs a test on each implementation: ``cpu`` (the C++ kernels through
``zoo.kernels``), ``triton`` (``zoo.kernels.triton`` on CPU tensors in Triton's interpreter; on a
GPU machine those cases are covered by ``cuda``) and ``cuda`` (``zoo.kernels`` on CUDA tensors,
served by the Triton kernels; skipped without a GPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import zoo.kernels as K
from zoo.kernels import _build
from zoo.kernels import reference as R
from zoo.kernels.ops import REGISTRY
from zoo.kernels.ops.gumbel import draw_seed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compiled_backend():
    """Every test here runs against the compiled library (a build failure fails the tests)."""
    K.set_backend("compiled")
    assert K.backend() == "compiled"
    yield
    K._state.requested = None


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Impl:
    """One implementation: ``impl.<op>`` is its public function, ``impl.put`` moves inputs."""

    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        if name == "triton":
            import zoo.kernels.triton as tk

            assert tk.interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported"
            self.module = tk
        else:
            self.module = K

    def __getattr__(self, op):
        return getattr(self.module, op)

    def put(self, *tensors):
        moved = tuple(None if t is None else t.to(self.device) for t in tensors)
        return moved if len(moved) != 1 else moved[0]

    @property
    def ops(self):
        return torch.ops.zoo_triton if self.name == "triton" else torch.ops.zoo


IMPLS = ["cpu", "triton", "cuda"]


def make_impl(name: str) -> Impl:
    if name == "triton" and torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton kernels run compiled in the cuda cases")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the same Triton kernels run interpreted in the triton cases")
    if name == "triton":
        K._triton_ops()
    return Impl(name)


@pytest.fixture(params=IMPLS)
def impl(request) -> Impl:
    return make_impl(request.param)


# --------------------------------------------------------------------------- GroupSoftmax CE


def gsce_inputs(n, c, g, seed=0, dtype=torch.float32, n_groups=3, scale=1.0):
    rng = gen(seed)
    logits = (torch.randn(n, c, generator=rng) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=rng)
    table = torch.randint(0, n_groups, (g, c), generator=rng)
    row_group = torch.randint(0, g, (n,), generator=rng)
    return logits, target, table, row_group


def both_gsce(logits, target, table, row_group, impl=None, **kw):
    """(ours, reference) losses and logits-gradients for the same inputs."""
    results = []
    impl = impl or Impl("cpu")
    for fn in (impl.group_softmax_cross_entropy, R.group_softmax_cross_entropy):
        if fn is not R.group_softmax_cross_entropy:
            logits, target, table, row_group = impl.put(logits, target, table, row_group)
        else:
            logits, target, table, row_group = (t.cpu() for t in (logits, target, table, row_group))
        z = logits.clone().requires_grad_()
        loss = fn(z, target, table, row_group, **kw)
        weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss).to(loss.dtype)
        (loss * weights.to(loss.device)).sum().backward()
        results.append((loss.detach().cpu(), z.grad.cpu()))
    return results


@pytest.mark.parametrize(
    "n,c,g", [(1, 1, 1), (7, 3, 2), (33, 17, 3), (130, 101, 2), (64, 1231, 2), (0, 5, 2)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_group_softmax_matches_reference(impl, n, c, g, reduction):
    logits, target, table, row_group = gsce_inputs(n, c, g, seed=n + c)
    if n > 2:
        target[::3] = -100  # some ignored rows
    (lc, gc), (lr, gr) = both_gsce(logits, target, table, row_group, impl, reduction=reduction)
    torch.testing.assert_close(lc, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, gr, atol=1e-6, rtol=1e-5)


def test_group_softmax_bfloat16_matches_reference(impl):
    logits, target, table, row_group = gsce_inputs(50, 37, 2, dtype=torch.bfloat16)
    (lc, gc), (lr, gr) = both_gsce(logits, target, table, row_group, impl, reduction="none")
    assert lc.dtype == gc.dtype == torch.bfloat16
    torch.testing.assert_close(lc, lr, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(gc, gr, atol=1e-2, rtol=1e-2)


def test_group_softmax_singleton_groups_equal_cross_entropy():
    logits, target, _, _ = gsce_inputs(40, 9, 1)
    target[5] = -100
    table = torch.arange(9)[None]  # every class its own group
    rows = torch.zeros(40, dtype=torch.long)
    for reduction in ("mean", "sum", "none"):
        z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = K.group_softmax_cross_entropy(z1, target, table, rows, reduction=reduction)
        ref = F.cross_entropy(z2, target, reduction=reduction)
        torch.testing.assert_close(ours, ref)
        ours.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(z1.grad, z2.grad)


def test_group_softmax_merged_group_is_not_penalised():
    """A source that does not label class 2 merges it with background (group 0): predicting
    class 2 for a background sample of that source costs nothing extra."""
    logits = torch.tensor([[0.0, -5.0, 8.0]])  # confident "class 2"
    table = torch.tensor([[0, 1, 2], [0, 1, 0]])  # source 1 does not label class 2
    target = torch.tensor([0])  # background
    full = K.group_softmax_cross_entropy(logits, target, table, torch.tensor([0]))
    merged = K.group_softmax_cross_entropy(logits, target, table, torch.tensor([1]))
    assert full.item() > 7.0
    expected = -math.log((math.exp(0) + math.exp(8)) / (math.exp(0) + math.exp(-5) + math.exp(8)))
    assert merged.item() == pytest.approx(expected, abs=1e-5)


def test_group_softmax_ignored_rows(impl):
    logits, target, table, row_group = impl.put(*gsce_inputs(6, 4, 2))
    target[:] = -100
    for reduction in ("mean", "sum"):
        z = logits.clone().requires_grad_()
        loss = impl.group_softmax_cross_entropy(z, target, table, row_group, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert torch.count_nonzero(z.grad) == 0
    target[2] = 1  # mean divides by the one non-ignored row
    none = impl.group_softmax_cross_entropy(logits, target, table, row_group, reduction="none")
    mean = impl.group_softmax_cross_entropy(logits, target, table, row_group)
    assert mean.item() == pytest.approx(none[2].item())
    assert torch.count_nonzero(none) == 1


def test_group_softmax_extreme_logits_are_finite(impl):
    c = 6
    logits = torch.tensor(
        [
            [1e4, -1e4, 0.0, 3.0, -1e4, 1e4],
            [-1e4, -1e4, -1e4, 1e4, -1e4, -1e4],
            [-math.inf, 2.0, -math.inf, 1.0, 0.0, -1.0],
            [-1e4, 1e4, 5.0, -3.0, 2.0, 1.0],
        ]
    )
    target = torch.tensor([1, 0, 1, 0])  # row 3: target far below the max
    table = torch.tensor([[0, 1, 1, 2, 3, 4]])
    rows = torch.zeros(4, dtype=torch.long)
    (lc, gc), (lr, gr) = both_gsce(logits, target, table, rows, impl, reduction="none")
    assert torch.isfinite(lc).all() and torch.isfinite(gc).all()
    torch.testing.assert_close(lc, lr)
    torch.testing.assert_close(gc, gr)
    assert lc[1].item() == pytest.approx(2e4, rel=1e-6)  # -log softmax of a -1e4 vs +1e4 logit
    del c


def test_group_softmax_rejects_bad_input(impl):
    logits, target, table, row_group = impl.put(*gsce_inputs(5, 4, 2))
    bad_target, bad_rows = impl.put(torch.tensor([0, 1, 7, 2, 3]), torch.tensor([0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match="target has value 7"):
        impl.group_softmax_cross_entropy(logits, bad_target, table, row_group)
    with pytest.raises(ValueError, match="row_group has value 2"):
        impl.group_softmax_cross_entropy(logits, target, table, bad_rows)
    with pytest.raises(ValueError, match="group_table"):
        impl.group_softmax_cross_entropy(logits, target, table[:, :3], row_group)
    with pytest.raises(ValueError, match="reduction"):
        impl.group_softmax_cross_entropy(logits, target, table, row_group, reduction="avg")
    with pytest.raises(ValueError, match="row_group is on meta"):
        impl.group_softmax_cross_entropy(logits, target, table, row_group.to("meta"))
    if impl.name != "cpu":
        return
    # the C++ kernel checks too (for callers of torch.ops.zoo directly)
    with pytest.raises(RuntimeError, match=r"target\[2\] = 7"):
        torch.ops.zoo.group_softmax_ce(
            logits, torch.tensor([0, 1, 7, 2, 3]), table, row_group, -100
        )


def test_group_softmax_gradcheck(impl):
    logits, target, table, row_group = impl.put(*gsce_inputs(9, 7, 2, dtype=torch.float64))
    target[4] = -100
    z = logits.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, r=reduction: impl.group_softmax_cross_entropy(
                x, target, table, row_group, reduction=r
            ),
            (z,),
            fast_mode=impl.name == "triton",
        )


# --------------------------------------------------------------------------- Gumbel


@pytest.mark.parametrize("shape,dim", [((64, 37), -1), ((3, 5, 16), 1), ((1000,), 0), ((4, 1), -1)])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_matches_reference(impl, shape, dim, hard):
    logits = torch.randn(*shape, generator=gen(1)) * 3
    ours = impl.gumbel_softmax(impl.put(logits), tau=0.7, hard=hard, dim=dim, generator=gen(5))
    ours = ours.cpu()
    seed = draw_seed(gen(5))  # the reference with the same noise
    ref = R.gumbel_softmax(logits, 0.7, hard, dim % logits.dim(), seed)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    if hard:
        assert set(ours.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(ours.sum(dim), torch.ones_like(ours.sum(dim)))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_sigmoid_matches_reference(impl, hard):
    logits = torch.randn(7, 33, generator=gen(2)) * 2
    ours = impl.gumbel_sigmoid(impl.put(logits), tau=0.5, hard=hard, generator=gen(9)).cpu()
    ref = R.gumbel_sigmoid(logits, 0.5, hard, draw_seed(gen(9)))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    if hard:
        assert set(ours.unique().tolist()) <= {0.0, 1.0}


def test_gumbel_softmax_bfloat16(impl):
    logits = torch.randn(16, 40, generator=gen(3)).bfloat16()
    ours = impl.gumbel_softmax(impl.put(logits), hard=True, generator=gen(1)).cpu()
    ref = R.gumbel_softmax(logits, 1.0, True, -1, draw_seed(gen(1)))
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref)


def test_gumbel_softmax_argmax_frequencies_follow_softmax(impl):
    """Sampling statistics: argmax frequencies of hard samples match softmax(logits)
    (chi-square)."""
    logits = torch.tensor([1.5, 0.2, -1.0, 0.7, 0.0])
    n = 20000
    x = impl.put(logits.expand(n, -1))
    samples = impl.gumbel_softmax(x, tau=0.5, hard=True, generator=gen(11)).cpu()
    counts = samples.sum(0).double()
    expected = torch.softmax(logits.double(), 0) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < stats.chi2.ppf(0.999, df=len(logits) - 1), (counts, expected)
    # and the same statistic is large for a wrong distribution (the test has power)
    wrong = torch.full_like(expected, n / len(logits))
    assert ((counts - wrong) ** 2 / wrong).sum().item() > 10 * stats.chi2.ppf(0.999, df=4)


def test_gumbel_sigmoid_frequencies_follow_sigmoid(impl):
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.8, 2.5])
    n = 20000
    x = impl.put(logits.expand(n, -1))
    samples = impl.gumbel_sigmoid(x, hard=True, generator=gen(4)).cpu()
    p = torch.sigmoid(logits.double())
    z = (samples.double().mean(0) - p) / torch.sqrt(p * (1 - p) / n)
    assert z.abs().max().item() < 4.0


@pytest.mark.parametrize("name", ["gumbel_softmax", "gumbel_sigmoid"])
def test_straight_through_gradient_equals_soft_gradient(impl, name):
    fn = getattr(impl, name)
    logits, w = impl.put(torch.randn(6, 9, generator=gen(7)), torch.randn(6, 9, generator=gen(8)))
    grads = []
    for hard in (False, True):
        z = logits.clone().requires_grad_()
        (fn(z, tau=0.8, hard=hard, generator=gen(3)) * w).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_gumbel_never_nan_and_reproducible(impl):
    logits = torch.tensor([[1e4, -1e4, 0.0, -math.inf], [-1e4, -1e4, -1e4, -1e4]]).repeat(100, 1)
    logits, zeros = impl.put(logits, torch.zeros(100, 10))
    for tau in (1e-3, 1.0, 100.0):
        for fn in (impl.gumbel_softmax, impl.gumbel_sigmoid):
            out = fn(logits, tau=tau)
            assert torch.isfinite(out).all()
    a = impl.gumbel_softmax(logits, generator=gen(1))
    b = impl.gumbel_softmax(logits, generator=gen(1))
    c = impl.gumbel_softmax(zeros, generator=gen(2))
    d = impl.gumbel_softmax(zeros, generator=gen(3))
    assert torch.equal(a, b) and not torch.equal(c, d)
    torch.manual_seed(0)
    e = impl.gumbel_sigmoid(zeros[0])
    torch.manual_seed(0)
    assert torch.equal(e, impl.gumbel_sigmoid(zeros[0]))


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf")])
def test_gumbel_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        K.gumbel_softmax(torch.zeros(3), tau=tau)
    with pytest.raises(ValueError, match="tau"):
        K.gumbel_sigmoid(torch.zeros(3), tau=tau)


def test_gumbel_gradcheck(impl):
    """Soft samples (fixed noise) against finite differences; the hard samples' gradient is the
    straight-through one (tested above), which finite differences of a one-hot cannot see."""
    x = impl.put(torch.randn(4, 6, dtype=torch.float64, generator=gen(0))).requires_grad_()
    fast = impl.name == "triton"  # the interpreter: random-projection gradcheck, fewer launches
    assert torch.autograd.gradcheck(
        lambda z: impl.gumbel_softmax(z, tau=0.9, dim=0, generator=gen(1)), (x,), fast_mode=fast
    )
    assert torch.autograd.gradcheck(
        lambda z: impl.gumbel_sigmoid(z, tau=0.9, generator=gen(1)), (x,), fast_mode=fast
    )


def test_gumbel_same_samples_on_every_backend(impl):
    """One seed, one counter-based generator: the compiled, Triton and reference kernels draw
    the same noise, so hard samples agree exactly and soft ones to rounding."""
    logits = torch.randn(64, 33, generator=gen(12))
    ref_seed = draw_seed(gen(6))
    for hard in (False, True):
        ours = impl.gumbel_softmax(impl.put(logits), tau=0.6, hard=hard, generator=gen(6)).cpu()
        ref = R.gumbel_softmax(logits, 0.6, hard, 1, ref_seed)
        assert torch.equal(ours, ref) if hard else torch.allclose(ours, ref, atol=1e-6)
        ours = impl.gumbel_sigmoid(impl.put(logits), tau=0.6, hard=hard, generator=gen(6)).cpu()
        ref = R.gumbel_sigmoid(logits, 0.6, hard, ref_seed)
        assert torch.equal(ours, ref) if hard else torch.allclose(ours, ref, atol=1e-6)


# --------------------------------------------------------------------------- attention


def qkv(b, h, lq, lk, d, dv=None, dtype=torch.float32, seed=0):
    rng = gen(seed)
    q = torch.randn(b, h, lq, d, generator=rng).to(dtype)
    k = torch.randn(b, h, lk, d, generator=rng).to(dtype)
    v = torch.randn(b, h, lk, dv or d, generator=rng).to(dtype)
    return q, k, v


def band(lq, lk, half_width):
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return (i - j).abs() <= half_width


def both_attention(q, k, v, mask, scale=None, impl=None):
    """(ours, reference) outputs and q, k, v gradients, on CPU."""
    results = []
    d = q.shape[-1]
    impl = impl or Impl("cpu")
    for compiled in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if compiled:
            qq, kk, vv = (t.detach().to(impl.device).requires_grad_() for t in (qq, kk, vv))
            out = impl.masked_attention(qq, kk, vv, impl.put(mask), scale)
        else:
            m = mask
            while m is not None and m.dim() < 4:
                m = m.unsqueeze(0)
            out = R.masked_attention(qq, kk, vv, m, scale or 1 / math.sqrt(d))
        grad = torch.randn(out.shape, generator=gen(99)).to(out.dtype)
        out.backward(grad.to(out.device))
        results.append(tuple(t.cpu() for t in (out.detach(), qq.grad, kk.grad, vv.grad)))
    return results


MASKS = {
    "dense": lambda b, h, lq, lk: None,
    "band": lambda b, h, lq, lk: band(lq, lk, 5),
    "toeplitz_per_head": lambda b, h, lq, lk: torch.stack([band(lq, lk, w) for w in range(h)])[
        None
    ],
    "random": lambda b, h, lq, lk: torch.rand(b, h, lq, lk, generator=gen(1)) > 0.6,
    "key_padding": lambda b, h, lq, lk: (torch.arange(lk) < max(1, lk - 7))[
        None, None, None, :
    ].expand(b, 1, 1, lk),
    "causal_empty_rows": lambda b, h, lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(-3),
    # kept blocks with gaps inside tiles and inside runs of tiles (the CPU kernels' slab spans)
    "blocks": lambda b, h, lq, lk: (
        (torch.arange(lq)[:, None] // 23 + torch.arange(lk)[None, :] // 17) % 3 == 0
    ),
}


def test_computed_fraction_counts_the_slab_spans():
    from zoo.kernels import _tiles

    assert _tiles.computed_fraction(torch.ones(100, 70, dtype=torch.bool)) == 1.0
    assert _tiles.computed_fraction(torch.zeros(64, 64, dtype=torch.bool)) == 0.0
    wide = band(1024, 1024, 50)
    tiles = (_tiles.compute_tile_map(wide, (1, 1, 1024, 1024)) != _tiles.EMPTY).float().mean()
    # every 16 query rows of the band span 9 blocks of 16 keys (144 keys), not 3 tiles of 64
    assert wide.float().mean() < _tiles.computed_fraction(wide) < tiles.item()
    assert _tiles.computed_fraction(wide) == pytest.approx(0.1357, abs=1e-3)


ATTENTION_SHAPES = [
    (1, 1, 1, 1, 4, 4),
    (2, 2, 65, 97, 24, 40),
    (2, 3, 37, 37, 16, 16),
    (1, 2, 130, 130, 64, 64),
    (1, 4, 200, 70, 8, 8),
]
# the interpreter runs every Triton program in Python: its cases take the first two shapes
ATTENTION_CASES = [
    (name, shape)
    for name in IMPLS
    for shape in (ATTENTION_SHAPES[:2] if name == "triton" else ATTENTION_SHAPES)
]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("impl_name,shape", ATTENTION_CASES)
def test_attention_matches_reference(mask_name, impl_name, shape):
    impl = make_impl(impl_name)
    b, h, lq, lk, d, dv = shape
    q, k, v = qkv(b, h, lq, lk, d, dv, seed=lq + lk)
    mask = MASKS[mask_name](b, h, lq, lk)
    compiled, ref = both_attention(q, k, v, mask, impl=impl)
    for ours, theirs in zip(compiled, ref):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_attention_fully_masked_rows_are_zero_with_zero_gradient(impl):
    q, k, v = qkv(1, 2, 70, 70, 8)
    mask = band(70, 70, 2)
    mask[5] = False
    mask[64:68] = False  # rows in the second query tile
    (out, dq, dk, dv), _ = both_attention(q, k, v, mask, impl=impl)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    for row in (5, 64, 65, 66, 67):
        assert torch.count_nonzero(out[:, :, row]) == 0
        assert torch.count_nonzero(dq[:, :, row]) == 0
    all_masked = impl.masked_attention(*impl.put(q, k, v, torch.zeros(70, 70, dtype=torch.bool)))
    assert torch.count_nonzero(all_masked) == 0


def test_attention_bfloat16_matches_reference(impl):
    q, k, v = qkv(1, 2, 90, 90, 32, dtype=torch.bfloat16)
    compiled, ref = both_attention(q, k, v, band(90, 90, 10), impl=impl)
    for ours, theirs in zip(compiled, ref):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), atol=3e-2, rtol=2e-2)


def test_attention_dense_equals_sdpa_and_all_true_mask(impl):
    q, k, v = impl.put(*qkv(2, 3, 50, 50, 16))
    dense = impl.masked_attention(q, k, v)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    all_true = impl.put(torch.ones(50, 50, dtype=torch.bool))
    torch.testing.assert_close(dense, impl.masked_attention(q, k, v, all_true))
    scaled = impl.masked_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(
        scaled, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5
    )


def test_attention_rejects_bad_input(impl):
    q, k, v = impl.put(*qkv(1, 2, 8, 8, 4))
    with pytest.raises(ValueError, match="bool"):
        impl.masked_attention(q, k, v, impl.put(torch.ones(8, 8)))
    with pytest.raises(ValueError, match="does not broadcast"):
        impl.masked_attention(q, k, v, impl.put(torch.ones(3, 8, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        impl.masked_attention(q[0], k, v)
    with pytest.raises(ValueError, match="shapes do not match"):
        impl.masked_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="one floating dtype"):
        impl.masked_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="one device"):
        impl.masked_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="keep_mask is on meta"):
        impl.masked_attention(q, k, v, torch.ones(8, 8, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="float tensor"):
        impl.soft_masked_attention(q, k, v, impl.put(torch.ones(8, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match=">= 0"):
        impl.soft_masked_attention(q, k, v, impl.put(-torch.ones(8, 8)))
    with pytest.raises(ValueError, match="mask of shape"):
        impl.soft_masked_attention(q, k, v, impl.put(torch.ones(2, 3, 8, 8)))


def test_triton_attention_rejects_head_dims_it_cannot_hold():
    """Head dims beyond one tile: zoo.kernels.triton says so; zoo.kernels on a GPU would fall back
    to the reference with one KernelFallbackWarning instead."""
    tk = make_impl("triton").module
    q, k, v = qkv(1, 1, 4, 4, tk.MAX_HEAD_DIM + 8)
    with pytest.raises(ValueError, match=f"head dim {tk.MAX_HEAD_DIM + 8} exceeds"):
        tk.masked_attention(q, k, v)


def test_attention_gradcheck(impl):
    q, k, v = (impl.put(t.double()).requires_grad_() for t in qkv(1, 2, 9, 11, 5, 3))
    mask = torch.rand(1, 2, 9, 11, generator=gen(4)) > 0.5
    mask[0, 0, 2] = False
    for m in (None, impl.put(mask)):
        assert torch.autograd.gradcheck(
            lambda a, b, c, m=m: impl.masked_attention(a, b, c, m),
            (q, k, v),
            fast_mode=impl.name == "triton",  # random projections: fewer interpreted launches
        )


# --------------------------------------------------------------------------- soft-masked attention


def both_soft(q, k, v, mask, keep=None, impl=None):
    """(ours, reference) output and gradients of q, k, v and the mask, on CPU."""
    results = []
    impl = impl or Impl("cpu")
    scale = 1 / math.sqrt(q.shape[-1])
    for ours in (True, False):
        device = impl.device if ours else torch.device("cpu")
        leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v, mask)]
        keep_d = None if keep is None else keep.to(device)
        if ours:
            out = impl.soft_masked_attention(*leaves, keep_mask=keep_d)
        else:
            keep4 = None if keep_d is None else keep_d.expand(q.shape[0], 1, 1, k.shape[2])
            out = R.soft_masked_attention(*leaves[:3], leaves[3], keep4, scale)
        grad = torch.randn(out.shape, generator=gen(98)).to(out.dtype).to(device)
        out.backward(grad)
        results.append([t.cpu() for t in (out.detach(), *(x.grad for x in leaves))])
    return results


SOFT_MASKS = {  # broadcast shapes of the float mask for B=2, H=3, Lq=70, Lk=90
    "per_head": (1, 3, 70, 90),  # DAM: one mask per head, shared by the batch
    "per_head_3d": (3, 70, 90),
    "full": (2, 3, 70, 90),
    "per_key": (2, 1, 1, 90),
    "per_query": (1, 1, 70, 1),
}


@pytest.mark.parametrize("mask_name", list(SOFT_MASKS))
def test_soft_attention_matches_reference(impl, mask_name):
    q, k, v = qkv(2, 3, 70, 90, 16, 8, seed=3)
    mask = (torch.rand(*SOFT_MASKS[mask_name], generator=gen(5)) > 0.3).float()
    mask = mask * torch.rand(mask.shape, generator=gen(6))  # general non-negative weights
    keep = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    keep[1, ..., 75:] = False  # padding of the second sequence
    ours, ref = both_soft(q, k, v, mask, keep, impl)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert ours[4].shape == mask.shape  # reduced over the broadcast dims inside the op


def test_soft_attention_with_a_binary_mask_equals_masked_attention(impl):
    q, k, v = impl.put(*qkv(2, 2, 70, 70, 16, seed=4))
    keep = impl.put(torch.rand(1, 2, 70, 70, generator=gen(2)) > 0.5)
    keep[0, 0, 3] = False  # a row with nothing kept
    soft = impl.soft_masked_attention(q, k, v, keep.float())
    torch.testing.assert_close(soft, impl.masked_attention(q, k, v, keep), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(soft[:, 0, 3]) == 0


def test_soft_attention_gradient_reaches_dropped_entries(impl):
    """The straight-through mask search needs dL/dM at entries the sample dropped (M = 0)."""
    q, k, v = qkv(1, 1, 20, 20, 8, seed=5)
    mask = (torch.rand(1, 1, 20, 20, generator=gen(7)) > 0.5).float()
    mask[0, 0, 4] = 0.0  # a row whose weights are all zero: zero output, zero gradient
    ours, ref = both_soft(q, k, v, mask, impl=impl)
    dmask = ours[4]
    dropped = (mask == 0) & (torch.arange(20) != 4)[None, None, :, None]
    assert torch.count_nonzero(dmask[dropped]) == int(dropped.sum())
    assert torch.count_nonzero(dmask[0, 0, 4]) == 0 and torch.count_nonzero(ours[0][0, 0, 4]) == 0
    torch.testing.assert_close(dmask, ref[4], atol=2e-5, rtol=1e-4)


def test_soft_attention_gradcheck(impl):
    q, k, v = (impl.put(t.double()).requires_grad_() for t in qkv(2, 2, 9, 11, 5, 3))
    mask = torch.rand(1, 2, 9, 11, generator=gen(8), dtype=torch.float64) + 0.1
    mask = impl.put(mask).requires_grad_()
    keep = impl.put(torch.rand(2, 1, 1, 11, generator=gen(9)) > 0.3)
    assert torch.autograd.gradcheck(
        lambda a, b, c, m: impl.soft_masked_attention(a, b, c, m, keep_mask=keep),
        (q, k, v, mask),
        fast_mode=impl.name == "triton",
    )


def test_tile_map_is_computed_once_per_mask_and_follows_in_place_edits(impl):
    from zoo.kernels import _tiles

    q, k, v = impl.put(*qkv(1, 2, 130, 130, 8, seed=6))
    mask = impl.put(band(130, 130, 3))
    first = impl.masked_attention(q, k, v, mask)
    misses = _tiles.stats["misses"]
    hits = _tiles.stats["hits"]
    again = impl.masked_attention(q, k, v, mask[None])  # a new view of the same mask: reused
    assert _tiles.stats["misses"] == misses and _tiles.stats["hits"] == hits + 1
    torch.testing.assert_close(first, again)
    mask[:, 100:] = True  # in place: tiles that were empty are now kept, the map is recomputed
    edited = impl.masked_attention(q, k, v, mask)
    assert _tiles.stats["misses"] == misses + 1
    m4 = mask.cpu()[None, None]
    ref = R.masked_attention(*(t.cpu() for t in (q, k, v)), m4, 1 / math.sqrt(8))
    torch.testing.assert_close(edited.cpu(), ref, atol=2e-5, rtol=1e-4)


def test_tile_map_marks_empty_partial_and_full_tiles():
    from zoo.kernels import _tiles

    mask = torch.zeros(130, 130, dtype=torch.bool)
    mask[:64, :64] = True  # full
    mask[70, 80] = True  # partial
    tiles = _tiles.compute_tile_map(mask, (2, 3, 130, 130))
    assert tiles.shape == (1, 1, 3, 3)
    expected = torch.zeros(3, 3, dtype=torch.int8)
    expected[0, 0], expected[1, 1] = _tiles.FULL, _tiles.PARTIAL
    assert torch.equal(tiles[0, 0], expected)


# --------------------------------------------------------------------------- op registration


@pytest.mark.parametrize("spec", list(REGISTRY), ids=REGISTRY.names())
def test_opcheck_every_op(impl, spec):
    """torch.library.opcheck (schema, fake kernel, autograd registration, compile) of every
    registered op and its backward, in the namespace serving this implementation."""
    from torch.library import opcheck

    checks = spec.opcheck(impl.ops, impl.put)
    assert {op._qualified_op_name.split("::")[-1] for op, _ in checks} == set(spec.ops)
    for op, args in checks:
        opcheck(op, args)


@pytest.mark.parametrize("spec", list(REGISTRY), ids=REGISTRY.names())
def test_every_op_matches_its_reference(impl, spec):
    """Every registered op on every implementation, on its spec's cases: the output and the
    gradient of every input that takes one equal the reference's (the sampling ops draw the
    same noise: each call gets a generator in the same state); an op with no gradient (integer
    outputs) equals it exactly."""
    reference = spec.bind(K.REFERENCE)
    for args, kwargs in spec.cases():
        state = kwargs["generator"].get_state() if "generator" in kwargs else None
        results = []
        for fn, device in ((getattr(impl, spec.name), impl.device), (reference, "cpu")):
            moved = [_leaf(a, device) for a in args]
            kw = {k: _leaf(v, device) for k, v in kwargs.items()}
            if state is not None:
                kw["generator"] = torch.Generator().set_state(state)
            leaves = [a for a in [*moved, *kw.values()] if _is_t(a) and a.requires_grad]
            out = fn(*moved, **kw)
            if not spec.differentiable:
                results.append(([t.cpu() for t in out], []))
                continue
            grads = torch.autograd.grad(out.float().pow(2).sum(), leaves) if leaves else ()
            results.append((out.detach().cpu(), [g.cpu() for g in grads]))
        (out, grads), (ref_out, ref_grads) = results
        if not spec.differentiable:
            assert len(out) == len(ref_out) and all(map(torch.equal, out, ref_out))
            continue
        assert len(grads) == len(ref_grads) > 0
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-3)


def _is_t(x) -> bool:
    return isinstance(x, torch.Tensor)


def _leaf(x, device):
    """A copy of a case's tensor on ``device`` (a fresh leaf when it takes a gradient)."""
    if not _is_t(x):
        return x
    return x.detach().to(device).requires_grad_(x.requires_grad)


def test_torch_compile_matches_eager(impl):
    q, k, v, logits = impl.put(*qkv(1, 2, 40, 40, 8), gsce_inputs(12, 6, 2)[0])
    q.requires_grad_()
    mask = impl.put(band(40, 40, 4))
    weight = impl.put(torch.rand(2, 40, 40, generator=gen(3)))
    _, target, table, rows = impl.put(*gsce_inputs(12, 6, 2))

    def fn(q, k, v, logits):
        attention = impl.masked_attention(q, k, v, mask) + impl.soft_masked_attention(
            q, k, v, weight
        )
        return attention.sum() + impl.group_softmax_cross_entropy(logits, target, table, rows)

    eager = fn(q, k, v, logits)
    (eager_grad,) = torch.autograd.grad(eager, q)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v, logits)
    (compiled_grad,) = torch.autograd.grad(compiled, q)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


# --------------------------------------------------------------------------- build and backend


def test_backend_selection(monkeypatch):
    monkeypatch.setattr(K._state, "requested", None)
    monkeypatch.setenv("ZOO_KERNELS_BACKEND", "reference")
    assert K.backend() == "reference"
    monkeypatch.setenv("ZOO_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="ZOO_KERNELS_BACKEND: unknown kernel backend 'fast'"):
        K.backend()
    with pytest.raises(ValueError, match="kernels.backend"):
        K.set_backend("gpu")
    K.set_backend("reference")
    x = torch.randn(3, 4)
    assert torch.equal(
        K.gumbel_softmax(x, generator=gen(0)),
        R.gumbel_softmax(x, 1.0, False, 1, draw_seed(gen(0))),
    )
    K.set_backend("compiled")
    assert K.backend() == "compiled"


def test_build_key_tracks_sources_flags_and_torch(tmp_path, monkeypatch):
    base = _build.build_key()
    assert _build.build_key() == base
    copy = tmp_path / "csrc"
    import shutil

    shutil.copytree(_build.CSRC, copy)
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build.build_key() == base
    (copy / "cpu" / "gumbel.cpp").write_text(
        (copy / "cpu" / "gumbel.cpp").read_text() + "\n// edit\n"
    )
    edited = _build.build_key()
    assert edited != base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _build.build_key() != edited
    monkeypatch.setenv("ZOO_KERNELS_EXTRA_CFLAGS", "-DSOMETHING")
    assert "-DSOMETHING" in _build.cflags()
    assert "-march=native" not in " ".join(_build.cflags())


FALLBACK_SCRIPT = """
import warnings, torch, zoo.kernels as K
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print("backend", K.backend())
    out = K.masked_attention(*(torch.randn(1, 1, 5, 4) for _ in range(3)))
    K.backend()
fallbacks = [w for w in caught if issubclass(w.category, K.KernelFallbackWarning)]
print("warnings", [str(w.message)[:60] for w in fallbacks])
K.set_backend("compiled")
try:
    K.backend()
except K.KernelBuildError as exc:
    print("error", "ZOO_FORCE_BUILD_ERROR" in str(exc))
"""


@pytest.mark.e2e
def test_forced_build_failure_falls_back_with_one_warning(tmp_path):
    env = {
        **os.environ,
        "ZOO_KERNELS_CACHE": str(tmp_path / "cache"),
        "ZOO_KERNELS_EXTRA_CFLAGS": "-DZOO_FORCE_BUILD_ERROR",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("ZOO_KERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "backend reference" in lines
    warnings_line = next(line for line in lines if line.startswith("warnings"))
    assert warnings_line.count("falling back") == 1
    assert "error True" in lines
