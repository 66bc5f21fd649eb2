"""Two things the other op tests leave unexercised at their default sizes:

- work split into many chunks (token chunks x vocab chunks on the torch backend, vocab slices
  and row chunks of the fused losses on Triton): budgets shrunk so that a 23-row, 301-column
  problem runs in several of each, with per-row temperatures (the factor must follow the
  chunk's rows) and bf16 inputs (dh must accumulate in fp32 across vocab chunks);
- an ``ignore_index`` other than -100 with real targets: ids equal to it are ignored and every
  other id, -100's neighbour 0 included, counts.
"""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule, leaf
from test_distill import check as check_distill
from test_linear_logprobs import NAMES, make_problem, row_temperatures

import prefkern
from prefkern.losses import (
    distill_loss,
    linear_distill_loss,
    linear_policy_loss,
    linear_preference_loss,
)
from prefkern.reference import linear_logprobs_ref, logprobs_from_logits_ref, policy_loss_ref

N, H, V = 23, 40, 301
LINEAR = [("torch", "auto"), ("triton", "fast"), ("triton", "min_memory")]
LINEAR_IDS = ["torch", "triton-fast", "triton-minmem"]


def _shrink_budgets(monkeypatch, vocab_chunk: int = 64):
    """Budgets for ~8-row token chunks, ``vocab_chunk``-column vocab chunks and slices, 2-3-row
    fused chunks."""
    from prefkern._kernels import linear_logprobs_fused

    from prefkern.ops import (
        distill_fused,
        divergence_triton,
        linear_sliced,
        policy_fused,
        torch_chunked,
    )

    monkeypatch.setitem(torch_chunked.CHUNK_ELEMENTS, "cpu", 8 * vocab_chunk)
    monkeypatch.setattr(torch_chunked, "VOCAB_CHUNK", vocab_chunk)
    monkeypatch.setitem(policy_fused.FUSED_CHUNK_ELEMENTS, "cpu", 8 * 3 * V)
    slice_bytes = N * 4 * vocab_chunk
    for module in (linear_sliced, policy_fused, distill_fused, divergence_triton):
        monkeypatch.setattr(module, "SLICE_BYTES", slice_bytes)
    monkeypatch.setattr(linear_logprobs_fused, "SCRATCH_BYTES", 8 * H * 4)


@pytest.fixture
def small_chunks(monkeypatch):
    _shrink_budgets(monkeypatch)


def _targets(lead, ignore_index, gen):
    """Ids in [0, V) with about a third set to ``ignore_index`` (0 is a real id unless it is
    the ignore_index)."""
    low = 1 if ignore_index == 0 else 0
    targets = torch.randint(low, V, lead, generator=gen)
    targets[torch.rand(lead, generator=gen) < 0.35] = ignore_index
    return targets


def _linear_outputs(fn, tensors, targets, grads, dtype=None, **kw):
    hidden, weight, bias = (leaf(t, dtype) for t in tensors)
    out = fn(hidden, weight, targets, bias, return_entropy=True, return_lse=True, **kw)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(out, grads, strict=True))
    loss.backward()
    return (*out, hidden.grad, weight.grad, bias.grad)


@pytest.mark.parametrize("backend,mode", LINEAR, ids=LINEAR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_index,skip", [(-100, False), (0, False), (0, True)],
                         ids=["minus100", "zero", "zero-skip"])
def test_linear_logprobs_many_chunks(small_chunks, backend, mode, dtype, ignore_index, skip):
    """Every output and gradient against the fp64 reference, per-row T, bias and softcap, over
    many chunks; ignored entries give 0 values and 0 rows of dh."""
    gen = torch.Generator().manual_seed(11)
    tensors = make_problem(N, H, V, dtype, with_bias=True)
    targets = _targets((N,), ignore_index, gen)
    grads = [torch.randn(N, generator=gen) for _ in range(3)]
    kw = dict(temperature=row_temperatures(N), softcap=9.0, ignore_index=ignore_index)
    ours = _linear_outputs(prefkern.linear_logprobs, tensors, targets, grads, backend=backend,
                           mode=mode, skip_ignored=skip, **kw)
    ref = _linear_outputs(linear_logprobs_ref, tensors, targets, grads, torch.float64, **kw)
    base = _linear_outputs(linear_logprobs_ref, tensors, targets, grads, **kw)
    for name, o, r, b in zip(NAMES, ours, ref, base, strict=True):
        assert_rule(o, r, b, name, reduction=N if name in ("dweight", "dbias") else V)
    ignored = targets == ignore_index
    assert ignored.any() and (~ignored).any()
    assert (ours[0][ignored] == 0).all() and (ours[3][ignored] == 0).all()


@pytest.mark.parametrize("backend,mode", LINEAR, ids=LINEAR_IDS)
def test_chunk_count_changes_only_rounding(backend, mode):
    """bf16 inputs: splitting into ~38 vocab chunks and 3 token chunks moves the fp32 outputs
    by fp32 rounding and the bf16 gradients by at most one bf16 step (plus fp32 rounding):
    dh and dW accumulate in fp32 across chunks (a bf16 accumulator is off by many steps)."""
    gen = torch.Generator().manual_seed(14)
    tensors = make_problem(N, H, V, torch.bfloat16, with_bias=True)
    targets = _targets((N,), -100, gen)
    grads = [torch.randn(N, generator=gen) for _ in range(3)]
    kw = dict(temperature=row_temperatures(N), backend=backend, mode=mode)
    whole = _linear_outputs(prefkern.linear_logprobs, tensors, targets, grads, **kw)
    with pytest.MonkeyPatch.context() as patch:
        _shrink_budgets(patch, vocab_chunk=8)
        split = _linear_outputs(prefkern.linear_logprobs, tensors, targets, grads, **kw)
    for name, a, b in zip(NAMES, split, whole, strict=True):
        fp32_rounding = 1e-5 * b.abs().max().item()
        one_step = torch.finfo(b.dtype).eps * b.float().abs() if b.dtype != torch.float32 else 0
        excess = (a.float() - b.float()).abs() - one_step - fp32_rounding
        assert excess.max() <= 0, f"{name}: {excess.max():.3e} beyond one step"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_from_logits_many_chunks(small_chunks, backend, inplace):
    """Row chunks of the torch backend with per-row T; ignore_index=0 with real targets."""
    gen = torch.Generator().manual_seed(12)
    logits = (torch.randn(N, V, generator=gen) * 4).bfloat16()
    targets = _targets((N,), 0, gen)
    g_logp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    kw = dict(temperature=row_temperatures(N), ignore_index=0, return_entropy=True)

    def run(fn, dtype=None, **extra):
        z = leaf(logits, dtype)
        logp, ent = fn(z.clone() if inplace else z, targets, **kw, **extra)
        ((logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
        return logp, ent, z.grad

    ours = run(prefkern.logprobs_from_logits, backend=backend, inplace_backward=inplace)
    ref = run(logprobs_from_logits_ref, torch.float64)
    base = run(logprobs_from_logits_ref)
    for name, o, r, b in zip(("logprobs", "entropy", "dlogits"), ours, ref, base, strict=True):
        assert_rule(o, r, b, name, reduction=V)
    ignored = targets == 0
    assert (ours[0][ignored] == 0).all() and (ours[2][ignored] == 0).all()


def _policy_rollout(dtype, ignore_index):
    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    targets = _targets((2, N), ignore_index, gen)
    with torch.no_grad():
        old = linear_logprobs_ref(hidden, weight, targets, ignore_index=ignore_index)
        old = old + 0.2 * torch.randn(2, N, generator=gen)
    return hidden, weight, targets, old, torch.randn(2, N, generator=gen)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_policy_loss_many_chunks(small_chunks, backend, fused, dtype):
    """The policy loss from hidden states over many row chunks with per-row T and
    ignore_index=0: loss, dhidden and dweight against the fp64 two-pass spec."""
    hidden, weight, targets, old, adv = _policy_rollout(dtype, 0)
    temperature = torch.rand(2, N) + 0.5
    kw = dict(loss_type="grpo", entropy_coef=0.02, kl_coef=0.05, ref_logprobs=old - 0.1)
    runs = []
    for fn, dt in (("ours", None), ("spec", torch.float64), ("spec", None)):
        hh, ww = leaf(hidden, dt), leaf(weight, dt)
        if fn == "ours":
            loss, _ = linear_policy_loss(hh, ww, targets, old, adv, temperature=temperature,
                                         softcap=8.0, ignore_index=0, fused=fused,
                                         backend=backend, **kw)
        else:
            out = linear_logprobs_ref(hh, ww, targets, temperature=temperature, softcap=8.0,
                                      ignore_index=0, return_entropy=True)
            loss = policy_loss_ref(out.logprobs, old, adv, targets != 0, entropy=out.entropy,
                                   **kw)
        loss.backward()
        runs.append((loss, hh.grad, ww.grad))
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=2 * N * V)
    assert (runs[0][1][targets == 0] == 0).all()


@pytest.mark.parametrize("fn,backend", [(distill_loss, "torch"), (distill_loss, "triton"),
                                        (linear_distill_loss, "torch"),
                                        (linear_distill_loss, "triton")],
                         ids=["distill-torch", "distill-triton", "fused-torch", "fused-triton"])
def test_distill_many_chunks(small_chunks, fn, backend):
    check_distill(fn, backend, N, H, V, torch.bfloat16, kind="jsd", beta=0.3, temperature=0.7,
                  weight_hard_loss=0.5)


@pytest.mark.parametrize("backend,mode", LINEAR, ids=LINEAR_IDS)
def test_linear_divergence_many_chunks(small_chunks, backend, mode):
    from divergence_checks import check_linear

    check_linear(backend, N, H, V, torch.bfloat16, "jsd", beta=0.3, mode=mode,
                 temperature=row_temperatures(N), with_bias=True, softcap=9.0)


# --- ignore_index other than -100: the same results as -100 marking the same entries ---------

def _flat_results(out, leaves):
    """Every tensor of an op's output (nested tuples, dicts of metrics) and the leaves' grads
    after backpropagating the sum of its floating outputs times fixed weights."""
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            for key in sorted(x):
                walk(x[key])
        elif isinstance(x, (tuple, list)):
            for item in x:
                walk(item)

    walk(out)
    gen = torch.Generator().manual_seed(5)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in tensors
               if t.requires_grad)
    loss.backward()
    return [t.detach() for t in tensors] + [leaf_.grad for leaf_ in leaves]


def _same_as_minus_100(call, leaves_of, ignore_index=0, k=None):
    """call(leaves, targets, ignore_index) run with ignored entries marked ``ignore_index``
    equals the run with them marked -100; an ignored entry's id is a valid vocab id."""
    gen = torch.Generator().manual_seed(21)
    lead = (4, 12) if k is None else (4, 12, k)
    targets = _targets(lead, ignore_index, gen)
    runs = []
    for marked, index in ((targets, ignore_index),
                          (targets.masked_fill(targets == ignore_index, -100), -100)):
        leaves = leaves_of()
        runs.append(_flat_results(call(leaves, marked, index), leaves))
    assert len(runs[0]) == len(runs[1]) > 1
    for a, b in zip(*runs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _head(dtype=torch.float32):
    gen = torch.Generator().manual_seed(22)
    hidden = torch.randn(4, 12, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.4
    return [leaf(hidden, dtype), leaf(weight, dtype)]


@pytest.mark.parametrize("backend,mode", LINEAR, ids=LINEAR_IDS)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("k", [None, 2])
def test_ignore_index_linear_logprobs(backend, mode, skip, k):
    _same_as_minus_100(
        lambda leaves, y, index: prefkern.linear_logprobs(
            *leaves, y, ignore_index=index, return_entropy=True, return_lse=True,
            return_stats=k is None, skip_ignored=skip, backend=backend, mode=mode),
        _head, ignore_index=7, k=k)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_ignore_index_logprobs_from_logits(backend, inplace):
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(4, 12, V, generator=gen) * 3
    _same_as_minus_100(
        lambda leaves, y, index: prefkern.logprobs_from_logits(
            leaves[0] * 1.0, y, ignore_index=index, return_entropy=True, return_stats=True,
            inplace_backward=inplace, backend=backend),
        lambda: [leaf(logits)])


@pytest.mark.parametrize("backend,mode", LINEAR, ids=LINEAR_IDS)
def test_ignore_index_linear_divergence(backend, mode):
    gen = torch.Generator().manual_seed(24)
    teacher = (torch.randn(4, 12, H + 3, generator=gen), torch.randn(V, H + 3, generator=gen))
    _same_as_minus_100(
        lambda leaves, y, index: prefkern.linear_divergence(
            *leaves, *teacher, y, kind="jsd", ignore_index=index, return_logprobs=True,
            backend=backend, mode=mode),
        _head)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignore_index_logits_divergence(backend):
    gen = torch.Generator().manual_seed(25)
    logits, teacher = (torch.randn(4, 12, V, generator=gen) * 3 for _ in range(2))
    _same_as_minus_100(
        lambda leaves, y, index: prefkern.logits_divergence(
            *leaves, y, kind="reverse_kl", ignore_index=index, return_logprobs=True,
            backend=backend),
        lambda: [leaf(logits), leaf(teacher)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [True, False])
def test_ignore_index_linear_policy_loss(backend, fused):
    gen = torch.Generator().manual_seed(26)
    old, adv = torch.randn(4, 12, generator=gen) - 6, torch.randn(4, 12, generator=gen)
    _same_as_minus_100(
        lambda leaves, y, index: linear_policy_loss(
            *leaves, y, old, adv, ignore_index=index, loss_type="grpo", entropy_coef=0.01,
            return_per_token=True, fused=fused, backend=backend),
        _head)


@pytest.mark.parametrize("fn", [distill_loss, linear_distill_loss], ids=["two-pass", "fused"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignore_index_distill(fn, backend):
    gen = torch.Generator().manual_seed(27)
    teacher = (torch.randn(48, H + 3, generator=gen), torch.randn(V, H + 3, generator=gen))

    def call(leaves, y, index):
        hidden, weight = leaves
        return fn(hidden.reshape(48, H), weight, *teacher, y.reshape(48), kind="jsd",
                  weight_hard_loss=0.5, ignore_index=index, backend=backend)

    _same_as_minus_100(call, _head)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [True, False])
def test_ignore_index_linear_preference_loss(backend, fused):
    gen = torch.Generator().manual_seed(28)
    ref_hidden = torch.randn(4, 12, H, generator=gen)
    _same_as_minus_100(
        lambda leaves, y, index: linear_preference_loss(
            *leaves, y, family="dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
            ref_hidden=ref_hidden, ref_weight=leaves[1].detach(), ignore_index=index,
            fused=fused, backend=backend),
        _head)
