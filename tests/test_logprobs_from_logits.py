"""logprobs_from_logits against its reference, every backend, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import make_logits, make_targets
from compare import assert_rule, contract_dlogits, leaf, noisiest, platform_round

import prefkern
from prefkern.reference import logprobs_from_logits_ref
from prefkern.reference.logprobs import head_logits

CPU_BACKENDS = ["torch", "triton"]


def _run(fn, logits, targets, g_logp, g_ent, **kw):
    out = fn(logits, targets, **kw)
    if kw.get("return_entropy"):
        logp, ent = out
        loss = (ent * g_ent).sum() + (0 if logp is None else (logp * g_logp).sum())
        loss.backward()
        return logp, ent, logits.grad
    (out * g_logp).sum().backward()
    return out, None, logits.grad


def check_case(backend, lead, vocab, dtype, *, device="cpu", kind="normal", ignore_frac=0.0,
               temperature=1.0, return_entropy=True, logit_scale=None, k=None,
               no_targets=False):
    """k: (..., k) targets; no_targets: targets=None; temperature may be a tensor (lead)."""
    logits = make_logits(lead, vocab, kind, device).to(dtype)
    target_lead = lead if k is None else (*lead, k)
    targets = None if no_targets else make_targets(target_lead, vocab, ignore_frac, device)
    g_logp = torch.randn(target_lead, device=device)
    g_ent = torch.randn(lead, device=device)
    kw = dict(temperature=temperature, return_entropy=return_entropy, logit_scale=logit_scale)

    ours = _run(lambda *a, **k: prefkern.logprobs_from_logits(*a, backend=backend, **k),
                leaf(logits), targets, g_logp, g_ent, **kw)
    ref = _run(logprobs_from_logits_ref, leaf(logits, torch.float64), targets, g_logp.double(),
               g_ent.double(), **kw)
    base = _run(logprobs_from_logits_ref, leaf(logits), targets, g_logp, g_ent, **kw)
    if dtype == torch.bfloat16:  # the fp32 spec's dlogits rounded as the platform does
        spec32 = _run(logprobs_from_logits_ref, leaf(logits, torch.float32), targets, g_logp,
                      g_ent, **kw)
        base = (*base[:2], noisiest(ref[2], base[2],
                                    platform_round(spec32[2], dtype, backend)))
    if dtype == torch.float32:  # or the contract's, from its stored fp32 lse and entropy
        x = leaf(logits)
        z = head_logits(x, temperature, logit_scale)
        z.backward(contract_dlogits(z, targets, g_logp, g_ent if return_entropy else None))
        base = (*base[:2], noisiest(ref[2], base[2], x.grad))

    assert ours[2].dtype == dtype
    if not no_targets:
        assert ours[0].dtype == torch.float32 and ours[0].shape == target_lead
        assert_rule(ours[0], ref[0], base[0], "logprobs", reduction=vocab)
    if return_entropy:
        assert ours[1].dtype == torch.float32
        assert_rule(ours[1], ref[1], base[1], "entropy", reduction=vocab)
    assert_rule(ours[2], ref[2], base[2], "dlogits", reduction=vocab)
    if targets is not None:
        ignored = targets == -100
        rows_ignored = ignored if k is None else ignored.all(-1)
        assert (ours[0][ignored] == 0).all() and (ours[2][rows_ignored] == 0).all()


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
def test_logit_scale_and_per_row_temperature(backend):
    check_case(backend, (23,), 500, torch.bfloat16, logit_scale=2.5, ignore_frac=0.25)
    temperature = torch.rand(4, 6) * 1.5 + 0.3
    check_case(backend, (4, 6), 300, torch.float32, temperature=temperature, logit_scale=0.5,
               ignore_frac=0.25)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_row_temperature_equal_to_the_scalar(backend):
    logits = make_logits((3, 7), 200).bfloat16()
    targets = make_targets((3, 7), 200, 0.2)
    outs = []
    for temperature in (0.75, torch.full((3, 7), 0.75)):
        x = leaf(logits)
        out = prefkern.logprobs_from_logits(x, targets, temperature=temperature,
                                            return_entropy=True, backend=backend)
        (out.logprobs.sum() + out.entropy.square().sum()).backward()
        outs.append((out.logprobs, out.entropy, x.grad))
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_targets(backend, dtype):
    """(..., K) targets with duplicates and ignored entries; the gradient at each target column
    is computed in fp32 and rounded once, even where p is close to 1 ('peaked')."""
    check_case(backend, (3, 9), 120, dtype, k=5, ignore_frac=0.3,
               temperature=torch.rand(3, 9) + 0.5)
    check_case(backend, (13,), 7, dtype, k=6, ignore_frac=0.2)  # many duplicate ids
    check_case(backend, (17,), 300, dtype, k=2, kind="peaked")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k_equal_to_one_is_the_plain_form(backend):
    logits = make_logits((12,), 70)
    targets = make_targets((12,), 70, 0.25)
    one = prefkern.logprobs_from_logits(logits, targets[:, None], backend=backend)
    plain = prefkern.logprobs_from_logits(logits, targets, backend=backend)
    assert one.shape == (12, 1) and torch.equal(one[:, 0], plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_without_targets(backend):
    check_case(backend, (5, 7), 300, torch.bfloat16, no_targets=True)
    logits = make_logits((6,), 50)
    torch.testing.assert_close(
        prefkern.entropy_from_logits(logits, temperature=0.9, backend=backend),
        prefkern.logprobs_from_logits(logits, torch.zeros(6, dtype=torch.long), temperature=0.9,
                                      return_entropy=True, backend=backend).entropy)


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
        with pytest.raises(ValueError, match="targets must have shape"):
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
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_head_options(backend):
    """Per-row temperature, logit scale, (..., K) targets and targets=None on each backend."""
    temperature = torch.rand(4, 33, device="cuda") + 0.5
    check_case(backend, (4, 33), 32_000, torch.bfloat16, device="cuda", ignore_frac=0.25,
               temperature=temperature, logit_scale=0.25, k=8)
    check_case(backend, (64,), 4099, torch.float16, device="cuda", no_targets=True,
               temperature=1.3)


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


def check_inplace_backward(backend, k, sliced, device="cpu", vocab=150):
    """inplace_backward returns the same gradient as the out-of-place backward, written into the
    logits' own storage (no second (N, V) buffer), also through a logits[:, :-1] view."""
    full = make_logits((3, 9), vocab, device=device).bfloat16()
    targets = make_targets((3, 8) if k is None else (3, 8, k), vocab, 0.25, device)
    g_logp, g_ent = torch.randn(targets.shape, device=device), torch.randn(3, 8, device=device)
    grads = []
    for inplace in (False, True):
        base = full.clone().requires_grad_(True)
        logits = base * 1  # a non-leaf, as a model's output is
        view = logits[:, :-1] if sliced else logits[:, 1:].contiguous()
        out = prefkern.logprobs_from_logits(view, targets, temperature=0.8, return_entropy=True,
                                            inplace_backward=inplace, backend=backend)
        storage = view.untyped_storage().data_ptr()
        captured = {}
        view.register_hook(lambda g, c=captured: c.update(ptr=g.untyped_storage().data_ptr()))
        ((out.logprobs * g_logp).sum() + (out.entropy * g_ent).sum()).backward()
        # the torch and cuda backends copy a view that is not (N, V) rows (then so does the
        # forward): the gradient lives in that copy
        assert (captured["ptr"] == storage) == (inplace and (backend == "triton" or not sliced))
        grads.append(base.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
def test_inplace_backward(backend, k, sliced):
    check_inplace_backward(backend, k, sliced)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
def test_gpu_inplace_backward(backend, k, sliced):
    check_inplace_backward(backend, k, sliced, "cuda", vocab=32_000)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_whatever_the_ignore_index(backend):
    logits = make_logits((5,), 30)
    outs = [prefkern.logprobs_from_logits(logits, None, ignore_index=ignore, return_entropy=True,
                                          backend=backend).entropy for ignore in (-100, 0)]
    assert torch.equal(outs[0], outs[1]) and (outs[1] != 0).all()


def test_zero_dim_temperature_tensor():
    logits = make_logits((2, 3), 30)
    targets = make_targets((2, 3), 30, 0.0)
    got = prefkern.logprobs_from_logits(logits, targets, temperature=torch.tensor(1.25),
                                        backend="torch")
    want = prefkern.logprobs_from_logits(logits, targets, temperature=1.25, backend="torch")
    assert torch.equal(got, want)
