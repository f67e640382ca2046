"""The compiled kernel package against its pure-PyTorch reference."""

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


# --------------------------------------------------------------------------- GroupSoftmax CE


def gsce_inputs(n, c, g, seed=0, dtype=torch.float32, n_groups=3, scale=1.0):
    rng = gen(seed)
    logits = (torch.randn(n, c, generator=rng) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=rng)
    table = torch.randint(0, n_groups, (g, c), generator=rng)
    row_group = torch.randint(0, g, (n,), generator=rng)
    return logits, target, table, row_group


def both_gsce(logits, target, table, row_group, **kw):
    """(compiled, reference) losses and logits-gradients for the same inputs."""
    results = []
    for fn in (K.group_softmax_cross_entropy, R.group_softmax_cross_entropy):
        z = logits.clone().requires_grad_()
        loss = fn(z, target, table, row_group, **kw)
        weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss).to(loss.dtype)
        (loss * weights).sum().backward()
        results.append((loss.detach(), z.grad))
    return results


@pytest.mark.parametrize(
    "n,c,g", [(1, 1, 1), (7, 3, 2), (33, 17, 3), (130, 101, 2), (64, 1231, 2), (0, 5, 2)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_group_softmax_matches_reference(n, c, g, reduction):
    logits, target, table, row_group = gsce_inputs(n, c, g, seed=n + c)
    if n > 2:
        target[::3] = -100  # some ignored rows
    (lc, gc), (lr, gr) = both_gsce(logits, target, table, row_group, reduction=reduction)
    torch.testing.assert_close(lc, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, gr, atol=1e-6, rtol=1e-5)


def test_group_softmax_bfloat16_matches_reference():
    logits, target, table, row_group = gsce_inputs(50, 37, 2, dtype=torch.bfloat16)
    (lc, gc), (lr, gr) = both_gsce(logits, target, table, row_group, reduction="none")
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


def test_group_softmax_ignored_rows():
    logits, target, table, row_group = gsce_inputs(6, 4, 2)
    target[:] = -100
    for reduction in ("mean", "sum"):
        z = logits.clone().requires_grad_()
        loss = K.group_softmax_cross_entropy(z, target, table, row_group, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert torch.count_nonzero(z.grad) == 0
    target[2] = 1  # mean divides by the one non-ignored row
    none = K.group_softmax_cross_entropy(logits, target, table, row_group, reduction="none")
    mean = K.group_softmax_cross_entropy(logits, target, table, row_group)
    assert mean.item() == pytest.approx(none[2].item())
    assert torch.count_nonzero(none) == 1


def test_group_softmax_extreme_logits_are_finite():
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
    (lc, gc), (lr, gr) = both_gsce(logits, target, table, rows, reduction="none")
    assert torch.isfinite(lc).all() and torch.isfinite(gc).all()
    torch.testing.assert_close(lc, lr)
    torch.testing.assert_close(gc, gr)
    assert lc[1].item() == pytest.approx(2e4, rel=1e-6)  # -log softmax of a -1e4 vs +1e4 logit
    del c


def test_group_softmax_rejects_bad_input():
    logits, target, table, row_group = gsce_inputs(5, 4, 2)
    with pytest.raises(ValueError, match="target has value 7"):
        K.group_softmax_cross_entropy(logits, torch.tensor([0, 1, 7, 2, 3]), table, row_group)
    with pytest.raises(ValueError, match="row_group has value 2"):
        K.group_softmax_cross_entropy(logits, target, table, torch.tensor([0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match="group_table"):
        K.group_softmax_cross_entropy(logits, target, table[:, :3], row_group)
    with pytest.raises(ValueError, match="reduction"):
        K.group_softmax_cross_entropy(logits, target, table, row_group, reduction="avg")
    # the C++ kernel checks too (for callers of torch.ops.zoo directly)
    with pytest.raises(RuntimeError, match=r"target\[2\] = 7"):
        torch.ops.zoo.group_softmax_ce(
            logits, torch.tensor([0, 1, 7, 2, 3]), table, row_group, -100
        )


def test_group_softmax_gradcheck():
    logits, target, table, row_group = gsce_inputs(9, 7, 2, dtype=torch.float64)
    target[4] = -100
    z = logits.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, r=reduction: K.group_softmax_cross_entropy(
                x, target, table, row_group, reduction=r
            ),
            (z,),
        )


# --------------------------------------------------------------------------- Gumbel


@pytest.mark.parametrize("shape,dim", [((64, 37), -1), ((3, 5, 16), 1), ((1000,), 0), ((4, 1), -1)])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_matches_reference(shape, dim, hard):
    logits = torch.randn(*shape, generator=gen(1)) * 3
    ours = K.gumbel_softmax(logits, tau=0.7, hard=hard, dim=dim, generator=gen(5))
    seed = K._draw_seed(gen(5))  # the reference with the same noise
    ref = R.gumbel_softmax(logits, 0.7, hard, dim % logits.dim(), seed)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    if hard:
        assert set(ours.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(ours.sum(dim), torch.ones_like(ours.sum(dim)))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_sigmoid_matches_reference(hard):
    logits = torch.randn(7, 33, generator=gen(2)) * 2
    ours = K.gumbel_sigmoid(logits, tau=0.5, hard=hard, generator=gen(9))
    ref = R.gumbel_sigmoid(logits, 0.5, hard, K._draw_seed(gen(9)))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    if hard:
        assert set(ours.unique().tolist()) <= {0.0, 1.0}


def test_gumbel_softmax_bfloat16():
    logits = torch.randn(16, 40, generator=gen(3)).bfloat16()
    ours = K.gumbel_softmax(logits, hard=True, generator=gen(1))
    ref = R.gumbel_softmax(logits, 1.0, True, -1, K._draw_seed(gen(1)))
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref)


def test_gumbel_softmax_argmax_frequencies_follow_softmax():
    """Sampling statistics: argmax frequencies of hard samples match softmax(logits) (chi-square)."""
    logits = torch.tensor([1.5, 0.2, -1.0, 0.7, 0.0])
    n = 20000
    samples = K.gumbel_softmax(logits.expand(n, -1), tau=0.5, hard=True, generator=gen(11))
    counts = samples.sum(0).double()
    expected = torch.softmax(logits.double(), 0) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < stats.chi2.ppf(0.999, df=len(logits) - 1), (counts, expected)
    # and the same statistic is large for a wrong distribution (the test has power)
    wrong = torch.full_like(expected, n / len(logits))
    assert ((counts - wrong) ** 2 / wrong).sum().item() > 10 * stats.chi2.ppf(0.999, df=4)


def test_gumbel_sigmoid_frequencies_follow_sigmoid():
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.8, 2.5])
    n = 20000
    samples = K.gumbel_sigmoid(logits.expand(n, -1), hard=True, generator=gen(4))
    p = torch.sigmoid(logits.double())
    z = (samples.double().mean(0) - p) / torch.sqrt(p * (1 - p) / n)
    assert z.abs().max().item() < 4.0


@pytest.mark.parametrize("fn", [K.gumbel_softmax, K.gumbel_sigmoid])
def test_straight_through_gradient_equals_soft_gradient(fn):
    logits = torch.randn(6, 9, generator=gen(7))
    w = torch.randn(6, 9, generator=gen(8))
    grads = []
    for hard in (False, True):
        z = logits.clone().requires_grad_()
        (fn(z, tau=0.8, hard=hard, generator=gen(3)) * w).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_gumbel_never_nan_and_reproducible():
    logits = torch.tensor([[1e4, -1e4, 0.0, -math.inf], [-1e4, -1e4, -1e4, -1e4]]).repeat(500, 1)
    for tau in (1e-3, 1.0, 100.0):
        for fn in (K.gumbel_softmax, K.gumbel_sigmoid):
            out = fn(logits, tau=tau)
            assert torch.isfinite(out).all()
    a = K.gumbel_softmax(logits, generator=gen(1))
    b = K.gumbel_softmax(logits, generator=gen(1))
    c = K.gumbel_softmax(torch.zeros(100, 10), generator=gen(2))
    d = K.gumbel_softmax(torch.zeros(100, 10), generator=gen(3))
    assert torch.equal(a, b) and not torch.equal(c, d)
    torch.manual_seed(0)
    e = K.gumbel_sigmoid(torch.zeros(50))
    torch.manual_seed(0)
    assert torch.equal(e, K.gumbel_sigmoid(torch.zeros(50)))


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf")])
def test_gumbel_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        K.gumbel_softmax(torch.zeros(3), tau=tau)
    with pytest.raises(ValueError, match="tau"):
        K.gumbel_sigmoid(torch.zeros(3), tau=tau)


def test_gumbel_gradcheck():
    """Soft samples (fixed noise) against finite differences; the hard samples' gradient is the
    straight-through one (tested above), which finite differences of a one-hot cannot see."""
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen(0)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: K.gumbel_softmax(z, tau=0.9, dim=0, generator=gen(1)), (x,)
    )
    assert torch.autograd.gradcheck(lambda z: K.gumbel_sigmoid(z, tau=0.9, generator=gen(1)), (x,))


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


def both_attention(q, k, v, mask, scale=None):
    results = []
    d = q.shape[-1]
    for compiled in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if compiled:
            out = K.masked_attention(qq, kk, vv, mask, scale)
        else:
            m = mask
            while m is not None and m.dim() < 4:
                m = m.unsqueeze(0)
            out = R.masked_attention(qq, kk, vv, m, scale or 1 / math.sqrt(d))
        grad = torch.randn(out.shape, generator=gen(99)).to(out.dtype)
        out.backward(grad)
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
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
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize(
    "b,h,lq,lk,d,dv",
    [
        (1, 1, 1, 1, 4, 4),
        (2, 3, 37, 37, 16, 16),
        (1, 2, 130, 130, 64, 64),
        (2, 2, 65, 97, 24, 40),
        (1, 4, 200, 70, 8, 8),
    ],
)
def test_attention_matches_reference(mask_name, b, h, lq, lk, d, dv):
    q, k, v = qkv(b, h, lq, lk, d, dv, seed=lq + lk)
    mask = MASKS[mask_name](b, h, lq, lk)
    compiled, ref = both_attention(q, k, v, mask)
    for ours, theirs in zip(compiled, ref):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_attention_fully_masked_rows_are_zero_with_zero_gradient():
    q, k, v = qkv(1, 2, 70, 70, 8)
    mask = band(70, 70, 2)
    mask[5] = False
    mask[64:68] = False  # rows in the second query tile
    (out, dq, dk, dv), _ = both_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    for row in (5, 64, 65, 66, 67):
        assert torch.count_nonzero(out[:, :, row]) == 0
        assert torch.count_nonzero(dq[:, :, row]) == 0
    all_masked = K.masked_attention(q, k, v, torch.zeros(70, 70, dtype=torch.bool))
    assert torch.count_nonzero(all_masked) == 0


def test_attention_bfloat16_matches_reference():
    q, k, v = qkv(1, 2, 90, 90, 32, dtype=torch.bfloat16)
    compiled, ref = both_attention(q, k, v, band(90, 90, 10))
    for ours, theirs in zip(compiled, ref):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), atol=3e-2, rtol=2e-2)


def test_attention_dense_equals_sdpa_and_all_true_mask():
    q, k, v = qkv(2, 3, 50, 50, 16)
    dense = K.masked_attention(q, k, v)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        dense, K.masked_attention(q, k, v, torch.ones(50, 50, dtype=torch.bool))
    )
    scaled = K.masked_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(
        scaled, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5
    )


def test_attention_rejects_bad_input():
    q, k, v = qkv(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="bool"):
        K.masked_attention(q, k, v, torch.ones(8, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        K.masked_attention(q, k, v, torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        K.masked_attention(q[0], k, v)
    with pytest.raises(ValueError, match="shapes do not match"):
        K.masked_attention(q, k[..., :3], v)


def test_attention_gradcheck():
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, 9, 11, 5, 3))
    mask = torch.rand(1, 2, 9, 11, generator=gen(4)) > 0.5
    mask[0, 0, 2] = False
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b, c, m=m: K.masked_attention(a, b, c, m), (q, k, v)
        )


# --------------------------------------------------------------------------- op registration


def test_opcheck_every_op():
    from torch.library import opcheck

    ops = torch.ops.zoo
    logits, target, table, rows = gsce_inputs(6, 5, 2)
    target[1] = -100
    opcheck(ops.group_softmax_ce, (logits.requires_grad_(), target, table, rows, -100))
    loss, lse, lse_g = ops.group_softmax_ce(logits, target, table, rows, -100)
    opcheck(
        ops.group_softmax_ce_backward,
        (torch.ones(6), logits.detach(), target, table, rows, lse, lse_g, -100),
    )
    x = torch.randn(4, 7, requires_grad=True)
    for hard in (False, True):
        opcheck(ops.gumbel_softmax, (x, 0.5, hard, 123))
        opcheck(ops.gumbel_sigmoid, (x, 0.5, hard, 123))
    soft = torch.softmax(torch.randn(4, 7), -1)
    opcheck(ops.gumbel_softmax_backward, (torch.randn(4, 7), soft, 0.5))
    opcheck(ops.gumbel_sigmoid_backward, (torch.randn(4, 7), soft, 0.5))
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20, 20, 8))
    for mask in (None, band(20, 20, 3)[None, None]):
        opcheck(ops.masked_attention, (q, k, v, mask, 0.35))
        out, lse = ops.masked_attention(q, k, v, mask, 0.35)
        opcheck(
            ops.masked_attention_backward,
            (
                torch.randn(1, 2, 20, 8),
                q.detach(),
                k.detach(),
                v.detach(),
                mask,
                out.detach(),
                lse,
                0.35,
            ),
        )


def test_torch_compile_matches_eager():
    q, k, v = qkv(1, 2, 40, 40, 8)
    mask = band(40, 40, 4)
    logits, target, table, rows = gsce_inputs(12, 6, 2)

    def fn(q, k, v, logits):
        return K.masked_attention(q, k, v, mask).sum() + K.group_softmax_cross_entropy(
            logits, target, table, rows
        )

    eager = fn(q, k, v, logits)
    compiled = torch.compile(fn)(q, k, v, logits)
    torch.testing.assert_close(compiled, eager)


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
        R.gumbel_softmax(x, 1.0, False, 1, K._draw_seed(gen(0))),
    )
    K.set_backend("compiled")
    assert K.backend() == "compiled"


def test_build_key_tracks_sources_flags_and_torch(tmp_path, monkeypatch):
    base = _build.build_key(False)
    assert _build.build_key(False) == base
    assert _build.build_key(True) != base
    copy = tmp_path / "csrc"
    import shutil

    shutil.copytree(_build.CSRC, copy)
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build.build_key(False) == base
    (copy / "cpu" / "gumbel.cpp").write_text(
        (copy / "cpu" / "gumbel.cpp").read_text() + "\n// edit\n"
    )
    edited = _build.build_key(False)
    assert edited != base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _build.build_key(False) != edited
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
print("warnings", [str(w.message)[:60] for w in caught if issubclass(w.category, K.KernelFallbackWarning)])
K.set_backend("compiled")
try:
    K.backend()
except K.KernelBuildError as exc:
    print("error", "ZOO_FORCE_BUILD_ERROR" in str(exc))
"""


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


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    """nvcc compiles every CUDA source (compile only: no GPU is needed or used)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not torch.version.cuda:
        pytest.skip("needs nvcc and a CUDA build of torch")
    objects = _build.compile_cuda_only(tmp_path)
    assert [o.name for o in objects] == ["group_softmax.o", "gumbel.o", "attention.o"]
    assert all(o.stat().st_size > 10_000 for o in objects)
