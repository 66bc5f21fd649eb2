"""return_stats: sum p^2, mean logit and target-is-argmax from the log-prob pass, against the
float64 reference (values and every gradient), every backend and mode of both ops."""

from __future__ import annotations

import pytest
import torch
from cases import make_logits, make_targets
from compare import (
    assert_equal_to_rounding,
    assert_rule,
    contract_dlogits,
    leaf,
    noisiest,
    platform_round,
)
from test_linear_logprobs import IDS, VARIANTS, make_problem, row_temperatures

import prefkern
from prefkern.reference import linear_logprobs_ref, logprobs_from_logits_ref
from prefkern.reference.logprobs import head_logits, linear_logits

LOGITS_BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _targets_with_argmax_hits(z64, lead, vocab, k=None, device="cpu"):
    """Random targets, about half of them set to the row's float64 argmax, 20% ignored."""
    shape = lead if k is None else (*lead, k)
    targets = make_targets(shape, vocab, 0.2, device)
    top = z64.argmax(-1)
    top = top if k is None else top.unsqueeze(-1).expand(shape)
    pick = (torch.rand(shape, device=device) < 0.5) & (targets != -100)
    return torch.where(pick, top, targets)


def _clear_rows(z64, gap=1e-2):
    """Rows whose top logit leads the runner-up by more than ``gap`` (relative): there the
    argmax flag cannot depend on rounding."""
    top2 = z64.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > gap * top2[..., 0].abs().clamp(min=1.0)


def _check_flags(got, z64, targets):
    want = prefkern.reference.logprobs.head_stats_ref(z64, targets).target_is_argmax
    assert got.dtype == torch.bool and got.shape == targets.shape
    clear = _clear_rows(z64)
    clear = clear if targets.dim() == clear.dim() else clear.unsqueeze(-1).expand(targets.shape)
    assert torch.equal(got[clear], want[clear])
    assert want[clear].any(), "the case must contain argmax hits"
    assert not got[targets == -100].any()


def _stats_loss(out, g):
    stats = out.stats
    loss = (stats.sum_p2 * g[0]).sum() + (stats.mean_logit * g[1]).sum()
    if g[2] is not None:
        loss = loss + (out.logprobs * g[2]).sum()
    return loss


def _linear(fn, hidden, weight, bias, targets, g, **kw):
    out = fn(hidden, weight, targets, bias, return_stats=True, **kw)
    _stats_loss(out, g).backward()
    grads = [None if t is None else t.grad for t in (hidden, weight, bias)]
    return out, grads


def check_linear_stats(backend, mode, dtype, k, head, n=37, h=48, v=333, device="cpu"):
    hidden, weight, bias = make_problem(n, h, v, dtype, device, with_bias=head == "all")
    kw = dict(temperature=1.0, softcap=None, logit_scale=None)
    if head == "all":
        kw = dict(temperature=row_temperatures(n, device), softcap=7.0, logit_scale=1.3)
    z64 = head_logits(linear_logits(hidden.double(), weight.double(),
                                    None if bias is None else bias.double()),
                      kw["temperature"], kw["logit_scale"], kw["softcap"])
    targets = _targets_with_argmax_hits(z64, (n,), v, k, device)
    lead = targets.shape
    g = [torch.randn(n, device=device), torch.randn(n, device=device),
         torch.randn(lead, device=device)]

    def leaves(dt=None):
        return [None if t is None else leaf(t, dt) for t in (hidden, weight, bias)]

    ours, ours_g = _linear(lambda *a, **x: prefkern.linear_logprobs(
        *a, backend=backend, mode=mode, **x), *leaves(), targets, g, **kw)
    ref, ref_g = _linear(linear_logprobs_ref, *leaves(torch.float64), targets,
                         [x.double() for x in g], **kw)
    base, base_g = _linear(linear_logprobs_ref, *leaves(), targets, g, **kw)
    if dtype == torch.bfloat16:  # the contract's gradients, d-logits rounded as the platform
        _, contract_g = _linear(linear_logprobs_ref, *leaves(torch.float32), targets, g,
                                dlogits_dtype=lambda x: platform_round(x, dtype, backend), **kw)
        base_g = [None if r is None else noisiest(r, b, c.to(dtype))
                  for r, b, c in zip(ref_g, base_g, contract_g, strict=True)]
    for name in ("sum_p2", "mean_logit"):
        got = getattr(ours.stats, name)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert_rule(got, getattr(ref.stats, name), getattr(base.stats, name), name, reduction=v)
    rows_ignored = (targets == -100) if k is None else (targets == -100).all(-1)
    assert (ours.stats.sum_p2[rows_ignored] == 0).all()
    assert (ours.stats.mean_logit[rows_ignored] == 0).all()
    _check_flags(ours.stats.target_is_argmax, z64, targets)
    for name, o, r, b in zip(("dhidden", "dweight", "dbias"), ours_g, ref_g, base_g,
                             strict=True):
        if r is None:
            assert o is None
            continue
        assert_rule(o, r, b, name, reduction=n if name != "dhidden" else v)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("head", ["plain", "all"])
def test_linear_stats_and_gradients(backend, mode, dtype, k, head):
    check_linear_stats(backend, mode, dtype, k, head)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 8])
def test_gpu_linear_stats(backend, mode, dtype, k):
    check_linear_stats(backend, mode, dtype, k, "all", n=300, h=256, v=32_003, device="cuda")


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_linear_stats_without_targets(backend, mode):
    """targets=None: every row counts; the flag is None."""
    hidden, weight, _ = make_problem(9, 16, 70, torch.float32)
    out = prefkern.linear_logprobs(hidden, weight, None, return_stats=True, backend=backend,
                                   mode=mode)
    ref = linear_logprobs_ref(hidden.double(), weight.double(), None, return_stats=True)
    assert out.logprobs is None and out.stats.target_is_argmax is None
    torch.testing.assert_close(out.stats.sum_p2.double(), ref.stats.sum_p2, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.stats.mean_logit.double(), ref.stats.mean_logit, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("kind", ["extreme", "negative"])
def test_linear_stats_extreme_logits(backend, mode, kind):
    """Logits of magnitude 1e3 to 1e4: sum p^2 stays in [1/V, 1] and matches the reference."""
    hidden, weight, _ = make_problem(16, 32, 200, torch.float32, kind=kind)
    targets = make_targets((16,), 200, 0.2)
    out = prefkern.linear_logprobs(hidden, weight, targets, return_stats=True, backend=backend,
                                   mode=mode)
    ref = linear_logprobs_ref(hidden.double(), weight.double(), targets, return_stats=True)
    valid = targets != -100
    got = out.stats.sum_p2[valid]
    assert ((got >= 1 / 200 - 1e-6) & (got <= 1 + 1e-6)).all()
    torch.testing.assert_close(got.double(), ref.stats.sum_p2[valid], rtol=1e-4, atol=1e-6)
    want_mean = ref.stats.mean_logit[valid]
    torch.testing.assert_close(out.stats.mean_logit[valid].double(), want_mean, rtol=1e-5,
                               atol=1e-5 * want_mean.abs().max().item())


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_linear_stats_do_not_change_the_other_outputs(backend, mode):
    """Asking for the stats leaves log-probs, entropy, lse and their gradients bit-identical."""
    hidden, weight, bias = make_problem(20, 32, 150, torch.bfloat16, with_bias=True)
    targets = make_targets((20,), 150, 0.3)
    results = []
    for stats in (False, True):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        out = prefkern.linear_logprobs(h, w, targets, b, return_entropy=True, return_lse=True,
                                       return_stats=stats, softcap=9.0, backend=backend,
                                       mode=mode, deterministic=True)
        (out.logprobs.sum() + out.entropy.sum() + out.lse.square().sum()).backward()
        results.append((out.logprobs, out.entropy, out.lse, h.grad, w.grad, b.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_linear_stats_skipping_ignored_rows(backend, mode):
    """skip_ignored gathers valid rows: the stats and their gradients are unchanged (bit for
    bit, except min_memory whose splits follow the row count: equal to rounding)."""
    hidden, weight, _ = make_problem(30, 16, 120, torch.float32)
    targets = make_targets((30,), 120, 0.5)
    results = []
    for skip in (False, True):
        h, w = leaf(hidden), leaf(weight)
        out = prefkern.linear_logprobs(h, w, targets, return_stats=True, skip_ignored=skip,
                                       backend=backend, mode=mode)
        (out.stats.sum_p2.sum() + out.stats.mean_logit.sum()).backward()
        results.append((out.stats.sum_p2, out.stats.mean_logit, out.stats.target_is_argmax,
                        h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        if mode == "min_memory" and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        else:
            assert_equal_to_rounding(a, b)


def test_linear_stats_gradcheck_float64():
    torch.manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 3, 10, 0])
    temperature = torch.rand(5, dtype=torch.float64) + 0.5

    def fn(h, w, b):
        out = prefkern.linear_logprobs(h, w, targets, b, temperature=temperature, softcap=3.0,
                                       logit_scale=0.8, return_stats=True, backend="torch")
        return out.stats.sum_p2, out.stats.mean_logit

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_sum_p2_is_trl_wpo_form():
    """TRL's WPO weights use exp(logsumexp(2 z) - 2 logsumexp(z)) = sum p^2."""
    hidden, weight, _ = make_problem(12, 16, 90, torch.float32)
    out = prefkern.linear_logprobs(hidden, weight, None, return_stats=True, backend="torch")
    z = linear_logits(hidden.double(), weight.double())
    wpo = torch.exp(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
    torch.testing.assert_close(out.stats.sum_p2.double(), wpo, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ from materialized logits

@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("kind", ["normal", "peaked", "extreme"])
def test_logits_stats_and_gradients(backend, dtype, k, kind):
    device = "cuda" if backend == "cuda" else "cpu"
    logits = make_logits((3, 11), 257, kind, device).to(dtype)
    temperature = 0.7 if kind != "peaked" else row_temperatures(33, device).view(3, 11)
    z64 = head_logits(logits.double(), temperature)
    targets = _targets_with_argmax_hits(z64, (3, 11), 257, k, device)
    g = [torch.randn(3, 11, device=device), torch.randn(3, 11, device=device),
         torch.randn(targets.shape, device=device)]

    def run(fn, x, grads, **kw):
        out = fn(x, targets, temperature=temperature, return_stats=True, **kw)
        _stats_loss(out, grads).backward()
        return out, x.grad

    ours, ours_g = run(prefkern.logprobs_from_logits, leaf(logits), g, backend=backend)
    ref, ref_g = run(logprobs_from_logits_ref, leaf(logits, torch.float64),
                     [x.double() for x in g])
    base, base_g = run(logprobs_from_logits_ref, leaf(logits), g)
    if dtype == torch.float32 and kind == "extreme":  # or the contract's (lse rounds at 1e4)
        x = leaf(logits)
        z = head_logits(x, temperature)
        z.backward(contract_dlogits(z, targets, g[2], g_stats=g[:2]))
        base_g = noisiest(ref_g, base_g, x.grad)
    for name in ("sum_p2", "mean_logit"):
        assert_rule(getattr(ours.stats, name), getattr(ref.stats, name),
                    getattr(base.stats, name), name, reduction=257)
    assert_rule(ours.logprobs, ref.logprobs, base.logprobs, "logprobs", reduction=257)
    _check_flags(ours.stats.target_is_argmax, z64, targets)
    assert ours_g.dtype == dtype
    assert_rule(ours_g, ref_g, base_g, "dlogits", reduction=1)


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_logits_stats_strided_rows_and_inplace_backward(backend):
    """(B, T, V) logits sliced ``[:, :-1]`` and the in-place backward give the same stats and
    gradients as a contiguous copy."""
    device = "cuda" if backend == "cuda" else "cpu"
    full = make_logits((2, 9), 130, "normal", device)
    targets = make_targets((2, 8), 130, 0.25, device)
    results = []
    for inplace in (False, True):
        x = leaf(full)
        view = x.clone()[:, :-1] if inplace else x[:, :-1]
        out = prefkern.logprobs_from_logits(view, targets, return_stats=True,
                                            inplace_backward=inplace, backend=backend)
        (out.stats.sum_p2.sum() * 3 + out.stats.mean_logit.sum()).backward()
        results.append((out.stats.sum_p2, out.stats.mean_logit, out.stats.target_is_argmax,
                        x.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_logits_stats_entropy_only():
    """targets=None with return_stats: stats of every row, no flag, entropy when asked."""
    logits = make_logits((7,), 50)
    out = prefkern.logprobs_from_logits(logits, None, return_stats=True, return_entropy=True,
                                        backend="torch")
    ref = logprobs_from_logits_ref(logits.double(), None, return_stats=True,
                                   return_entropy=True)
    assert out.logprobs is None and out.lse is None and out.stats.target_is_argmax is None
    torch.testing.assert_close(out.entropy.double(), ref.entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats.sum_p2.double(), ref.stats.sum_p2, rtol=1e-5, atol=0)


def test_logits_stats_gradcheck_float64():
    torch.manual_seed(1)
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[2, 5], [-100, -100], [8, -100], [0, 0]])

    def fn(x):
        out = prefkern.logprobs_from_logits(x, targets, temperature=0.6, logit_scale=1.5,
                                            return_stats=True, backend="torch")
        return out.stats.sum_p2, out.stats.mean_logit, out.logprobs

    assert torch.autograd.gradcheck(fn, (logits,))
