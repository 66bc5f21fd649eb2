"""logprobs_from_logits against its reference, every backend, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import make_logits, make_targets
from compare import assert_rule, leaf

import prefkern
from prefkern.reference import logprobs_from_logits_ref

CPU_BACKENDS = ["torch", "triton"]


def _run(fn, logits, targets, g_logp, g_ent, **kw):
    out = fn(logits, targets, **kw)
    if kw.get("return_entropy"):
        logp, ent = out
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp, ent, logits.grad
    (out * g_logp).sum().backward()
    return out, None, logits.grad


def check_case(backend, lead, vocab, dtype, *, device="cpu", kind="normal", ignore_frac=0.0,
               temperature=1.0, return_entropy=True):
    logits = make_logits(lead, vocab, kind, device).to(dtype)
    targets = make_targets(lead, vocab, ignore_frac, device)
    g_logp = torch.randn(lead, device=device)
    g_ent = torch.randn(lead, device=device)
    kw = dict(temperature=temperature, return_entropy=return_entropy)

    ours = _run(lambda *a, **k: prefkern.logprobs_from_logits(*a, backend=backend, **k),
                leaf(logits), targets, g_logp, g_ent, **kw)
    ref = _run(logprobs_from_logits_ref, leaf(logits, torch.float64), targets, g_logp.double(),
               g_ent.double(), **kw)
    base = _run(logprobs_from_logits_ref, leaf(logits), targets, g_logp, g_ent, **kw)

    assert ours[0].dtype == torch.float32
    assert ours[2].dtype == dtype
    assert_rule(ours[0], ref[0], base[0], "logprobs", reduction=vocab)
    if return_entropy:
        assert ours[1].dtype == torch.float32
        assert_rule(ours[1], ref[1], base[1], "entropy", reduction=vocab)
    assert_rule(ours[2], ref[2], base[2], "dlogits", reduction=vocab)
    ignored = targets == -100
    assert (ours[0][ignored] == 0).all() and (ours[2][ignored] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,vocab", [((37,), 1000), ((4, 16), 1024), ((3, 5), 129)])
def test_shapes_and_dtypes(backend, dtype, lead, vocab):
    check_case(backend, lead, vocab, dtype, ignore_frac=0.25)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["extreme", "negative", "peaked"])
def test_extreme_logits(backend, kind):
    check_case(backend, (19,), 777, torch.float32, kind=kind)
    check_case(backend, (19,), 777, torch.bfloat16, kind=kind, ignore_frac=0.25)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature(backend, temperature):
    check_case(backend, (23,), 500, torch.bfloat16, temperature=temperature, ignore_frac=0.25)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_entropy_and_no_ignored(backend):
    check_case(backend, (2, 9), 300, torch.float32, return_entropy=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_ignored(backend):
    check_case(backend, (11,), 64, torch.bfloat16, ignore_frac=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_vocab(backend):
    check_case(backend, (3,), 70_000, torch.bfloat16, ignore_frac=0.25)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_entropy_gradient(backend):
    logits = leaf(make_logits((13,), 200).bfloat16())
    targets = make_targets((13,), 200, 0.0)
    prefkern.logprobs_from_logits(logits, targets, return_entropy=True,
                                  backend=backend).entropy.sum().backward()
    ref = leaf(logits, torch.float64)
    logprobs_from_logits_ref(ref, targets, return_entropy=True).entropy.sum().backward()
    base = leaf(logits)
    logprobs_from_logits_ref(base, targets, return_entropy=True).entropy.sum().backward()
    assert_rule(logits.grad, ref.grad, base.grad, "dlogits from entropy only", reduction=200)


def test_gradcheck_torch_float64():
    logits = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    targets = make_targets((3, 4), 11, 0.25)

    def fn(x):
        out = prefkern.logprobs_from_logits(x, targets, temperature=0.8, return_entropy=True,
                                            backend="torch")
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(fn, (logits,))
    # first-order only: the backward is a kernel, so double backward must refuse, not be wrong
    out = fn(logits)
    (g,) = torch.autograd.grad(out[0].sum() + out[1].sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), logits)


def test_no_grad_saves_nothing_and_returns_plain_tensors():
    logits = make_logits((5,), 50).requires_grad_(True)
    with torch.no_grad():
        out = prefkern.logprobs_from_logits(logits, make_targets((5,), 50, 0.0), backend="torch")
    assert out.grad_fn is None and out.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sliced_logits_without_copy(backend):
    full = make_logits((4, 8), 64).bfloat16()
    x = leaf(full)
    sliced = x[:, :-1]  # what a trainer does to drop the last position
    targets = make_targets((4, 7), 64, 0.25)
    g = torch.randn(4, 7)
    out = prefkern.logprobs_from_logits(sliced, targets, return_entropy=True, backend=backend)
    (out.logprobs * g + out.entropy).sum().backward()
    grad = x.grad
    refs = []
    for dtype in (torch.float64, torch.bfloat16):
        x = leaf(full, dtype)
        r = logprobs_from_logits_ref(x[:, :-1], targets, return_entropy=True)
        (r.logprobs * g.to(dtype) + r.entropy).sum().backward()
        refs.append((r, x.grad))
    (ref, ref_grad), (base, base_grad) = refs
    assert_rule(out.logprobs, ref.logprobs, base.logprobs, "logprobs", reduction=64)
    assert_rule(out.entropy, ref.entropy, base.entropy, "entropy", reduction=64)
    assert_rule(grad, ref_grad, base_grad, "dlogits", reduction=64)


class TestBadInput:
    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="targets shape"):
            prefkern.logprobs_from_logits(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))

    def test_float_targets(self):
        with pytest.raises(TypeError, match="integer"):
            prefkern.logprobs_from_logits(torch.randn(4, 10), torch.zeros(4))

    def test_int_logits(self):
        with pytest.raises(TypeError, match="logits"):
            prefkern.logprobs_from_logits(torch.zeros(4, 10, dtype=torch.long),
                                          torch.zeros(4, dtype=torch.long))

    @pytest.mark.parametrize("bad", [10, -1, 1000])
    def test_targets_out_of_range(self, bad):
        targets = torch.tensor([0, bad, 3, -100])
        with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
            prefkern.logprobs_from_logits(torch.randn(4, 10), targets)

    def test_bad_temperature(self):
        with pytest.raises(ValueError, match="temperature"):
            prefkern.logprobs_from_logits(torch.randn(4, 10), torch.zeros(4, dtype=torch.long),
                                          temperature=0.0)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            prefkern.logprobs_from_logits(torch.randn(4, 10), torch.zeros(4, dtype=torch.long),
                                          backend="numpy")

    def test_explicit_cuda_on_cpu_is_not_downgraded(self):
        with pytest.raises(prefkern.BackendUnavailable, match="needs CUDA tensors"):
            prefkern.logprobs_from_logits(torch.randn(4, 10), torch.zeros(4, dtype=torch.long),
                                          backend="cuda")

    def test_fp64_on_triton_is_refused(self):
        with pytest.raises(prefkern.BackendUnavailable, match="no 'triton' backend"):
            prefkern.logprobs_from_logits(torch.randn(4, 10, dtype=torch.float64),
                                          torch.zeros(4, dtype=torch.long), backend="triton")


# ------------------------------------------------------------------------------------ GPU
GPU_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,vocab", [((37,), 1000), ((2, 256), 32_000), ((64,), 128_256)])
def test_gpu_backends(backend, dtype, lead, vocab):
    check_case(backend, lead, vocab, dtype, device="cuda", ignore_frac=0.25, temperature=0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["extreme", "negative", "peaked"])
def test_gpu_extreme(backend, kind):
    check_case(backend, (128,), 4099, torch.bfloat16, device="cuda", kind=kind, ignore_frac=0.25)


@pytest.mark.gpu
def test_gpu_auto_picks_a_kernel_backend():
    logits = torch.randn(8, 100, device="cuda")
    targets = torch.randint(0, 100, (8,), device="cuda")
    from prefkern.dispatch import resolve_backend

    chosen = resolve_backend("logprobs_from_logits", "auto", logits.device,
                             ("triton", "cuda", "torch"), ("triton", "cuda"))
    assert chosen in ("triton", "cuda")
    torch.testing.assert_close(prefkern.logprobs_from_logits(logits, targets),
                               logprobs_from_logits_ref(logits, targets), rtol=1e-5, atol=1e-5)
