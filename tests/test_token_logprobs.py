"""``zoo.kernels.token_logprobs`` (the fused LM-head log-probs of given tokens, and entropies)
against its materialising reference on every implementation, beyond the derived opcheck and
parity tests of test_kernels.py: entropies, temperatures, ragged shapes, half precision,
gradcheck, ignored rows, large logits (log-probs never > 0), errors, determinism, and that no
[N, V] tensor is held.

The ``impl`` fixture runs a test on ``cpu`` (C++), ``triton`` (Triton's interpreter on CPU
tensors; conftest sets TRITON_INTERPRET=1) and ``cuda`` (skipped without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zoo.kernels as K
from zoo.kernels import reference as R
from zoo.kernels.ops.token_logprobs import inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compiled_backend():
    """Every test here runs the compiled library (a build failure fails them)."""
    with K.backend_as("compiled"):
        assert K.backend() == "compiled"
        yield


class Impl:
    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        if name == "triton":
            import zoo.kernels.triton as tk

            assert tk.interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported"
            K._triton_ops()
            self.fn = tk.token_logprobs
            self.ops = torch.ops.zoo_triton
        else:
            self.fn = K.token_logprobs
            self.ops = torch.ops.zoo

    def put(self, *tensors):
        return tuple(t.to(self.device) for t in tensors)


@pytest.fixture(params=["cpu", "triton", "cuda"])
def impl(request) -> Impl:
    if request.param == "triton":
        pytest.importorskip("triton", reason="Triton is not installed")
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: the Triton kernels run compiled in the cuda cases")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the same Triton kernels run interpreted in the triton cases")
    return Impl(request.param)


def run(fn, hidden, weight, tokens, device, **kwargs):
    """(logprobs, entropies or None, grad_hidden, grad_weight) on ``device``, for the loss
    sum(w1 * logprobs) + sum(w2 * entropies) with fixed weights."""
    h = hidden.detach().to(device).requires_grad_()
    w = weight.detach().to(device).requires_grad_()
    out = fn(h, w, tokens.to(device), **kwargs)
    lp, ent = out if kwargs.get("entropy") else (out, None)
    n = lp.shape[0]
    loss = (lp * torch.linspace(0.5, 1.5, n, dtype=lp.dtype, device=device)).sum()
    if ent is not None:
        loss = loss + (ent * torch.linspace(1.0, -1.0, n, dtype=ent.dtype, device=device)).sum()
    loss.backward()
    return [None if t is None else t.detach().cpu() for t in (lp, ent, h.grad, w.grad)]


def compare(ours, ref, atol, rtol, grad_atol=None, grad_rtol=None):
    names = ("logprobs", "entropies", "grad_hidden", "grad_weight")
    for i, (name, a, b) in enumerate(zip(names, ours, ref, strict=True)):
        if b is None:
            assert a is None, name
            continue
        grads = i >= 2
        torch.testing.assert_close(
            a,
            b,
            atol=grad_atol if grads and grad_atol is not None else atol,
            rtol=grad_rtol if grads and grad_rtol is not None else rtol,
            msg=lambda m, name=name: f"{name}: {m}",
        )


SHAPES = [(37, 1001, 24), (1, 7, 3), (64, 128, 16)]
# several row chunks, backward stripes and vocabulary groups of the C++ kernel, with remainders
CPU_SHAPES = [(601, 20000, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("entropy", [False, True], ids=["lp", "lp+entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", SHAPES + CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(impl, dtype, entropy, temperature, shape):
    if shape in CPU_SHAPES and impl.name == "triton":
        pytest.skip("the interpreter is slow on large shapes; the C++ chunking is what they test")
    hidden, weight, tokens = inputs(*shape, seed=sum(shape), dtype=dtype)
    kw = dict(temperature=temperature, entropy=entropy)
    ours = run(impl.fn, hidden, weight, tokens, impl.device, **kw)
    ref = run(R.token_logprobs, hidden, weight, tokens, "cpu", **kw)
    assert ours[0].dtype == dtype and ours[2].dtype == ours[3].dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    compare(ours, ref, atol=tol, rtol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_accumulates_in_float32(impl, dtype):
    hidden, weight, tokens = inputs(37, 1001, 24, seed=5, dtype=dtype)
    kw = dict(temperature=0.7, entropy=True)
    ours = run(impl.fn, hidden, weight, tokens, impl.device, **kw)
    ref = run(R.token_logprobs, hidden, weight, tokens, "cpu", **kw)
    assert ours[0].dtype == ours[1].dtype == torch.float32  # the outputs: float32
    assert ours[2].dtype == ours[3].dtype == dtype  # the gradients: the inputs' dtype
    # the same float32 sums over the same half inputs: only the gradients' rounding differs
    compare(ours, ref, atol=1e-4, rtol=1e-4, grad_atol=2e-3, grad_rtol=1e-2)


def test_gradcheck(impl):
    hidden, weight, tokens = impl.put(*inputs(6, 11, 5, seed=2, dtype=torch.float64))
    tokens[3] = -100
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    for entropy in (False, True):
        assert torch.autograd.gradcheck(
            lambda h, w, e=entropy: impl.fn(h, w, tokens, temperature=0.7, entropy=e),
            (h, w),
            fast_mode=impl.name == "triton",
        )


def test_entropy_alone_takes_a_gradient(impl):
    """Only the entropies used: the log-probs' gradient is absent, not an error."""
    hidden, weight, tokens = inputs(20, 50, 8, seed=7, dtype=torch.float64)
    grads = []
    for fn, device in ((impl.fn, impl.device), (R.token_logprobs, "cpu")):
        h = hidden.to(device).requires_grad_()
        _, ent = fn(h, weight.to(device), tokens.to(device), entropy=True)
        (ent**2).sum().backward()
        grads.append(h.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)


def test_ignored_rows_give_zero_and_no_gradient(impl):
    hidden, weight, tokens = inputs(30, 200, 12, seed=3)
    tokens[::3] = -100
    lp, ent, grad_h, grad_w = run(
        impl.fn, hidden, weight, tokens, impl.device, temperature=0.9, entropy=True
    )
    ignored = tokens == -100
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(grad_h[ignored] == 0)
    assert torch.all(lp[~ignored] < 0) and torch.all(ent[~ignored] > 0)
    # the others are those of the kept rows alone (grad_weight: only they contribute)
    keep = ~ignored
    grads_w = []
    for h, t in ((hidden, tokens), (hidden[keep], tokens[keep])):
        w = weight.detach().to(impl.device).requires_grad_()
        lp_, ent_ = impl.fn(*impl.put(h), w, *impl.put(t), temperature=0.9, entropy=True)
        (lp_.sum() + ent_.sum()).backward()
        grads_w.append(w.grad.cpu())
    torch.testing.assert_close(lp_.cpu(), lp[keep], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads_w[0], grads_w[1], atol=1e-6, rtol=1e-5)
    # another ignore_index
    tokens = torch.where(ignored, -1, tokens)
    other = impl.fn(*impl.put(hidden, weight, tokens), temperature=0.9, ignore_index=-1).cpu()
    torch.testing.assert_close(other, lp)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_logits_log_probs_never_exceed_zero(impl, temperature):
    """verl#2656: a fused kernel returned +123.7 for large hidden states and training collapsed.
    hidden * 50 (logits in the hundreds), including tokens that take nearly all the mass."""
    hidden, weight, tokens = inputs(64, 1500, 32, seed=11)
    hidden = hidden * 50
    logits = hidden.double() @ weight.double().T
    tokens[::2] = logits.argmax(1)[::2]  # log p ~ 0: the rounding's sign matters
    lp, ent = impl.fn(*impl.put(hidden, weight, tokens), temperature=temperature, entropy=True)
    lp, ent = lp.cpu(), ent.cpu()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert lp.max().item() <= 1e-6 and ent.min().item() >= 0
    # the float64 reference of the same float32 inputs
    ref_lp, ref_ent = R.token_logprobs(
        hidden.double(), weight.double(), tokens, temperature, entropy=True
    )
    assert ref_lp.max().item() <= 0
    # float32 logits of size ~300 carry ~3e-5 rounding: the tolerance is relative to that
    torch.testing.assert_close(lp.double(), ref_lp, atol=5e-3, rtol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, atol=5e-3, rtol=1e-3)
    assert (ref_lp[::2] > -1e-4).sum() >= 10  # many argmax tokens take nearly all the mass
    # and the gradients are finite
    _, _, grad_h, grad_w = run(impl.fn, hidden, weight, tokens, impl.device, entropy=True)
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()


def test_rejects_bad_input(impl):
    hidden, weight, tokens = impl.put(*inputs(5, 1001, 8))
    for bad in (1001, -3, 5000):
        wrong = tokens.clone()
        wrong[2] = bad
        with pytest.raises(ValueError, match=rf"tokens has value {bad} outside \[0, 1001\)"):
            impl.fn(hidden, weight, wrong)
    with pytest.raises(ValueError, match="weight must be a"):
        impl.fn(hidden, weight[:, :4], tokens)
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        impl.fn(hidden, weight, tokens.float())
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        impl.fn(hidden, weight, tokens[:3])
    with pytest.raises(ValueError, match="temperature"):
        impl.fn(hidden, weight, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="tokens is on meta"):
        impl.fn(hidden, weight, tokens.to("meta"))
    if impl.name == "cpu":  # the C++ kernel checks too (for callers of torch.ops.zoo)
        wrong = tokens.clone()
        wrong[4] = 1001
        with pytest.raises(RuntimeError, match=r"tokens\[4\] = 1001 is outside"):
            torch.ops.zoo.token_logprobs(hidden, weight, wrong, 1.0, False, -100)


def test_empty_batch(impl):
    hidden, weight, tokens = impl.put(*inputs(0, 10, 4))
    lp, ent, grad_h, grad_w = run(impl.fn, hidden, weight, tokens, impl.device, entropy=True)
    assert lp.shape == ent.shape == (0,) and grad_h.shape == (0, 4)
    assert torch.equal(grad_w, torch.zeros(10, 4))


def test_triton_backward_in_row_chunks(monkeypatch):
    """The Triton backward's logit-gradient buffer holds a chunk of rows, not [N, V]: with a
    small budget the rows go in several chunks, with the same results."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("runs interpreted on CPU tensors; on a GPU the cuda cases cover it")
    import zoo.kernels.triton as tk
    from zoo.kernels.triton import _token_logprobs as tl_mod

    assert tk.interpreted()
    K._triton_ops()
    hidden, weight, tokens = inputs(150, 300, 16, seed=9)
    tokens[7] = -100
    whole = run(tk.token_logprobs, hidden, weight, tokens, "cpu", entropy=True)
    shapes = []
    real_wrap = tl_mod._wrap

    def spy_wrap(kernel):
        launcher = real_wrap(kernel)
        if kernel is not tl_mod.token_logprobs_dlogits_kernel:
            return launcher

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    shapes.append(tuple(args[7].shape))  # Out: the logit-gradient buffer
                    return launcher[grid](*args, **kwargs)

                return launch

        return Spy()

    monkeypatch.setattr(tl_mod, "BACKWARD_ELEMENTS", 64 * 300)  # 64 rows (a row block) a chunk
    monkeypatch.setattr(tl_mod, "_wrap", spy_wrap)
    chunked = run(tk.token_logprobs, hidden, weight, tokens, "cpu", entropy=True)
    monkeypatch.undo()
    assert shapes == [(64, 300), (64, 300), (22, 300)]  # views of one [64, V] buffer
    compare(chunked, whole, atol=1e-6, rtol=1e-5)


def test_cpu_results_repeat_bit_for_bit_with_any_thread_count():
    hidden, weight, tokens = inputs(601, 20000, 40, seed=1)
    kw = dict(temperature=0.7, entropy=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(K.token_logprobs, hidden, weight, tokens, "cpu", **kw)
        torch.set_num_threads(max(2, threads))
        many = run(K.token_logprobs, hidden, weight, tokens, "cpu", **kw)
        again = run(K.token_logprobs, hidden, weight, tokens, "cpu", **kw)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, many, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_saves_no_n_by_v_tensor_for_backward(impl):
    """What autograd keeps between forward and backward is O(N) beyond the inputs: no tensor
    the size of the logits."""
    n, v, h = 40, 500, 8
    hidden, weight, tokens = impl.put(*inputs(n, v, h))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = impl.fn(hidden.requires_grad_(), weight.requires_grad_(), tokens, entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert saved and max(torch.Size(s).numel() for s in saved) == v * h  # the weight itself
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        R.token_logprobs(hidden, weight, tokens, entropy=True)  # the reference does hold one
    assert max(torch.Size(s).numel() for s in saved) >= n * v


def test_cpu_peak_memory_stays_far_below_the_logits():
    """In a fresh process, the peak RSS growth of a forward + backward at N=2048, V=65536 (the
    logits would be 512 MiB in float32) against that size."""
    code = textwrap.dedent(
        """
        import json, resource, torch
        import zoo.kernels as K
        from zoo.kernels.ops.token_logprobs import inputs
        K.set_backend("compiled")
        torch.manual_seed(0)
        hidden, weight, tokens = inputs(2048, 65536, 32)
        small = inputs(64, 1000, 32)
        K.token_logprobs(*small[:2], small[2], entropy=True)  # library and threads warm-up
        hidden.requires_grad_(), weight.requires_grad_()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lp, ent = K.token_logprobs(hidden, weight, tokens, temperature=0.7, entropy=True)
        (lp.sum() + ent.sum()).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"grown_kib": after - before}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    grown = json.loads(out.stdout.strip().splitlines()[-1])["grown_kib"] * 1024
    logits = 2048 * 65536 * 4
    gradients = (2048 + 65536) * 32 * 4  # grad_hidden and grad_weight: 8.3 MiB
    assert grown < gradients + logits / 16, f"peak RSS grew {grown / 2**20:.0f} MiB"
