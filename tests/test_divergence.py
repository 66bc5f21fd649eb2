"""linear_divergence and logits_divergence against their float64 references: the divergence,
the target log-probs and every gradient (policy side, and reference side when it takes one)."""

from __future__ import annotations

import pytest
import torch
from divergence_checks import KIND_IDS, KINDS, check_linear, check_logits, heads

import prefkern

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kinds(backend, kind, kw, dtype):
    check_linear(backend, 37, 129, 1000, dtype, kind, temperature=0.8, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_linear_reference_side_gradient(backend, kind, kw):
    check_linear(backend, 24, 40, 300, torch.float32, kind, ref_grad=True, with_bias=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", [KINDS[0], KINDS[2]], ids=["fkl", "jsd"])
def test_linear_teacher_mixture(backend, kind, kw):
    """z_q = sum_k c_k z_k with per-row c_k (AlignDistil-style); gradients to every member."""
    check_linear(backend, 29, 48, 257, torch.bfloat16, kind, mixture=True, ref_grad=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_head_options(backend):
    """Per-row temperature, softcap, logit_scale, bias, fp16, aligned shapes, vocab > 65536."""
    check_linear(backend, 33, 48, 260, torch.float32, "jsd", beta=0.7,
                 temperature=torch.rand(33) + 0.4, softcap=6.0, logit_scale=1.5, with_bias=True)
    check_linear(backend, 64, 64, 512, torch.float16, "reverse_kl", temperature=1.3)
    check_linear(backend, 8, 16, 70000, torch.float32, "forward_kl", ignore_frac=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", KINDS[:-1], ids=KIND_IDS[:-1])
def test_linear_extreme_logits_and_all_ignored(backend, kind, kw):
    """(alpha outside [0, 1] is left out: sum p^alpha q^(1-alpha) exceeds fp32 there.)"""
    check_linear(backend, 19, 32, 257, torch.float32, kind, ignore_frac=0.0, extreme=True, **kw)
    out = check_linear(backend, 9, 16, 100, torch.float32, kind, ignore_frac=1.0, **kw)
    assert all((t == 0).all() for t in out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_points_are_the_kls(backend):
    """jsd at beta 0 / 1 and alpha at 0 / 1 are forward / reverse KL (TRL GKD's convention for
    beta), bit for bit; alpha next to 1 is close to reverse KL (its limit)."""
    hidden, weight = heads(16, 32, 200, torch.float32)
    ref_hidden, ref_weight = heads(16, 32, 200, torch.float32)
    run = lambda **kw: prefkern.linear_divergence(hidden, weight, ref_hidden, ref_weight,  # noqa: E731
                                                  backend=backend, **kw)
    fkl, rkl = run(kind="forward_kl"), run(kind="reverse_kl")
    assert torch.equal(run(kind="jsd", beta=0.0), fkl) and torch.equal(run(kind="alpha",
                                                                           alpha=0.0), fkl)
    assert torch.equal(run(kind="jsd", beta=1.0), rkl) and torch.equal(run(kind="alpha",
                                                                           alpha=1.0), rkl)
    h64, w64, rh64, rw64 = (t.double() for t in (hidden, weight, ref_hidden, ref_weight))
    near = prefkern.linear_divergence(h64, w64, rh64, rw64, kind="alpha", alpha=1 - 1e-6)
    assert torch.allclose(near.float(), rkl, rtol=1e-4)
    assert not torch.allclose(fkl, rkl, rtol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_properties(backend, kind, kw):
    """Every kind is >= 0, 0 between a model and itself, and tv <= 1."""
    hidden, weight = heads(20, 32, 300, torch.float32)
    ref_hidden, ref_weight = heads(20, 32, 300, torch.float32)
    d = prefkern.linear_divergence(hidden, weight, ref_hidden, ref_weight, kind=kind,
                                   backend=backend, **kw)
    assert (d >= -1e-6).all() and (d > 1e-3).any()
    same = prefkern.linear_divergence(hidden, weight, hidden, weight, kind=kind,
                                      backend=backend, **kw)
    assert same.abs().max() < 1e-5
    if kind == "tv":
        assert (d <= 1 + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_logits_kinds(backend, kind, kw):
    check_logits(backend, (3, 13), 1000, torch.bfloat16, torch.float32, kind, temperature=0.9,
                 **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_per_row_temperature(backend):
    check_logits(backend, (37,), 300, torch.float32, torch.float32, "jsd", beta=0.5,
                 temperature=torch.rand(37) + 0.5, ignore_frac=0.0)
    check_logits(backend, (5,), 64, torch.float16, torch.float16, "tv", ref_grad=False)


def test_logits_divergence_makes_no_fp32_copy(monkeypatch):
    """bf16 logits: the torch path converts row chunks (peak far below one fp32 copy of one
    side, measured by the profiler's allocation timeline); the Triton kernels read the
    caller's bf16 storage itself, forward and backward."""
    from prefkern._kernels import divergence as kernels

    from prefkern.bench.timing import peak_extra_gib

    n, v = 256, 32000
    logits, ref_logits = (torch.randn(n, v) * 3).bfloat16(), (torch.randn(n, v) * 3).bfloat16()

    def forward():
        with torch.no_grad():
            prefkern.logits_divergence(logits, ref_logits, kind="jsd", backend="torch")

    peak = peak_extra_gib(forward, torch.device("cpu")) * 2**30
    assert peak < 0.5 * n * v * 4, f"{peak / 2**20:.1f} MiB"
    seen = []

    def spy(fn):
        def reads(z_p, z_q, *args, **kwargs):
            seen.append((z_p.dtype, z_p.data_ptr(), z_q.data_ptr()))
            return fn(z_p, z_q, *args, **kwargs)
        return reads

    monkeypatch.setattr(kernels, "divergence_fwd", spy(kernels.divergence_fwd))
    monkeypatch.setattr(kernels, "divergence_bwd", spy(kernels.divergence_bwd))
    small, small_ref = logits[:8, :300].contiguous(), ref_logits[:8, :300].contiguous()
    leaf_logits = small.clone().requires_grad_(True)
    prefkern.logits_divergence(leaf_logits, small_ref, kind="tv", backend="triton").sum().backward()
    want = (torch.bfloat16, leaf_logits.data_ptr(), small_ref.data_ptr())
    assert seen == [want, want], seen


def test_errors():
    h, w = heads(4, 8, 20, torch.float32)
    hr, wr = heads(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="kind must be one of"):
        prefkern.linear_divergence(h, w, hr, wr, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        prefkern.linear_divergence(h, w, hr, wr, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        prefkern.linear_divergence(h, w, hr, wr[:10])
    with pytest.raises(ValueError, match="rows of hidden"):
        prefkern.linear_divergence(h, w, hr[:3], wr)
    with pytest.raises(ValueError, match="ref_weight is required"):
        prefkern.linear_divergence(h, w, hr, None)
    with pytest.raises(ValueError, match="no gradient"):
        prefkern.linear_divergence(h, w, [(hr, wr, torch.ones(4, requires_grad=True))], None)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 20\)"):
        prefkern.linear_divergence(h, w, hr, wr, torch.tensor([0, 1, 25, 2]))
    with pytest.raises(ValueError, match="shape of logits"):
        prefkern.logits_divergence(torch.zeros(4, 20), torch.zeros(4, 21))
    with pytest.raises(ValueError, match="rows' shape"):
        prefkern.logits_divergence(torch.zeros(4, 20), torch.zeros(4, 20),
                                       torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kind,kw", [KINDS[1], KINDS[3]], ids=["rkl", "tv"])
def test_the_checks_fail_a_slightly_wrong_gradient(monkeypatch, kind, kw):
    """A divergence gradient 1e-3 off (relative) fails the checks, scaled tolerances included."""
    from prefkern.ops import divergence_math

    right = divergence_math.grads

    def wrong(*args):
        d_p, d_q = right(*args)
        return d_p * (1 + 1e-3), d_q

    check_linear("torch", 24, 40, 300, torch.float32, kind, **kw)
    check_logits("torch", (24,), 300, torch.float32, torch.float32, kind, **kw)
    monkeypatch.setattr(divergence_math, "grads", wrong)
    with pytest.raises(AssertionError, match="dhidden"):
        check_linear("torch", 24, 40, 300, torch.float32, kind, **kw)
    with pytest.raises(AssertionError, match="dlogits"):
        check_logits("torch", (24,), 300, torch.float32, torch.float32, kind, **kw)


def test_the_checks_fail_a_slightly_wrong_value(monkeypatch):
    from prefkern.ops import divergence_math

    right = divergence_math.row_values
    monkeypatch.setattr(divergence_math, "row_values",
                        lambda *a: (right(*a)[0] * (1 + 1e-3), *right(*a)[1:]))
    for kind, kw in KINDS:
        with pytest.raises(AssertionError, match="divergence"):
            check_linear("torch", 24, 40, 300, torch.float32, kind, **kw)
        with pytest.raises(AssertionError, match="divergence"):
            check_logits("torch", (24,), 300, torch.float32, torch.float32, kind, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", [("triton", "fast"), ("triton", "min_memory"),
                                          ("torch", "auto")])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_gpu_divergences(backend, mode, kind, kw):
    """Both ops on a GPU: aligned and ragged shapes, a vocabulary > 65536, bf16 and fp32, the
    head options, mixtures (fast mode) and reference-side gradients."""
    for dtype in (torch.bfloat16, torch.float32):
        check_linear(backend, 256, 512, 1024, dtype, kind, temperature=0.7, device="cuda",
                     mode=mode, **kw)
    check_linear(backend, 37, 129, 70000, torch.bfloat16, kind, device="cuda", mode=mode, **kw)
    check_linear(backend, 33, 48, 260, torch.bfloat16, kind, temperature=torch.rand(33) + 0.4,
                 softcap=6.0, logit_scale=1.5, with_bias=True, mixture=mode != "min_memory",
                 ref_grad=True, device="cuda", mode=mode, **kw)
    if mode == "min_memory":
        return
    check_logits(backend, (4, 33), 50000, torch.bfloat16, torch.bfloat16, kind, device="cuda",
                 **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_from_review(backend):
    """A logprobs-only backward stays finite where D is infinite; alpha outside [0, 1] with a
    column that is -inf on both sides equals the divergence without that column; no targets
    gives no log-probs; a tiny jsd beta agrees across backends."""
    torch.manual_seed(0)
    x, xq = torch.randn(4, 9) * 3, torch.randn(4, 9) * 3
    xq[:, 3] = float("-inf")  # q = 0 where p > 0: KL(p || q) = inf
    leaf_x = x.clone().requires_grad_(True)
    out = prefkern.logits_divergence(leaf_x, xq, torch.tensor([0, 1, 2, 4]), kind="reverse_kl",
                                     return_logprobs=True, backend=backend)
    assert torch.isinf(out.divergence).all()
    out.logprobs.sum().backward()
    p = x.softmax(-1)
    want = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 4]), 9) - p
    torch.testing.assert_close(leaf_x.grad, want)
    padded_p, padded_q = x.clone(), torch.randn(4, 9) * 3
    padded_p[:, 5] = padded_q[:, 5] = float("-inf")
    keep = [i for i in range(9) if i != 5]
    for alpha in (-0.5, 2.0):
        got = prefkern.logits_divergence(padded_p, padded_q, kind="alpha", alpha=alpha,
                                         backend=backend)
        want = prefkern.logits_divergence(padded_p[:, keep], padded_q[:, keep], kind="alpha",
                                          alpha=alpha, backend="torch")
        torch.testing.assert_close(got, want)
    assert prefkern.logits_divergence(x, xq.clamp(min=-50), return_logprobs=True,
                                      backend=backend).logprobs is None
    small = [prefkern.logits_divergence(x, padded_q[:, :9].nan_to_num(neginf=-5.0), kind="jsd",
                                        beta=1e-4, backend=b) for b in (backend, "torch")]
    ref = prefkern.reference.logits_divergence_ref(x.double(), padded_q.nan_to_num(
        neginf=-5.0).double(), kind="jsd", beta=1e-4)
    for got in small:
        assert ((got.double() - ref).abs() / ref.abs()).max() < 2e-5
