"""Distillation losses: distill_loss and linear_distill_loss (gradient in the forward pass)
against their float64 reference, parity with TRL GKD's and Liger's formulas, and verl's top-k
forward KL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import make_targets
from compare import assert_rule, leaf
from torch.utils._python_dispatch import TorchDispatchMode

import prefkern
from prefkern.losses import distill_loss, linear_distill_loss, topk_forward_kl
from prefkern.reference import distill_loss_ref, topk_forward_kl_ref

VARIANTS = [(distill_loss, "torch"), (distill_loss, "triton"), (linear_distill_loss, "torch"),
            (linear_distill_loss, "triton")]
IDS = ["distill-torch", "distill-triton", "fused-torch", "fused-triton"]


def _problem(n, h, v, dtype, ignore_frac=0.25, with_bias=True):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) * (3 / h**0.5)).to(dtype)
    bias = torch.randn(v).to(dtype) if with_bias else None
    teacher_hidden = torch.randn(n, h + 8).to(dtype)
    teacher_weight = (torch.randn(v, h + 8) * (3 / (h + 8) ** 0.5)).to(dtype)
    return hidden, weight, bias, teacher_hidden, teacher_weight, make_targets((n,), v,
                                                                              ignore_frac)


def _run(fn, problem, dtype, **kw):
    hidden, weight, bias, t_hidden, t_weight, labels = problem
    h, w = leaf(hidden, dtype), leaf(weight, dtype)
    b = None if bias is None else leaf(bias, dtype)
    loss, metrics = fn(h, w, t_hidden.to(dtype or hidden.dtype),
                       t_weight.to(dtype or hidden.dtype), labels, bias=b, **kw)
    (3.0 * loss).sum().backward()
    return [loss, metrics["soft_loss"], metrics["hard_loss"], h.grad, w.grad,
            None if b is None else b.grad]


def check(fn, backend, n, h, v, dtype, mode=None, **kw):
    problem = _problem(n, h, v, dtype)
    run_kw = dict(kw, backend=backend, **({} if mode is None else {"mode": mode}))
    ours = _run(fn, problem, None, **run_kw)
    ref = _run(distill_loss_ref, problem, torch.float64, **kw)
    base = _run(distill_loss_ref, problem, None, **kw)
    names = ["loss", "soft_loss", "hard_loss", "dhidden", "dweight", "dbias"]
    for name, o, r, b in zip(names, ours, ref, base, strict=True):
        # the losses sum over tokens and vocabulary; dweight and dbias over tokens
        reduction = n * v if name.endswith("loss") else (n if name in ("dweight", "dbias")
                                                          else v)
        assert_rule(o, r, b, name, reduction=reduction)
    return ours


@pytest.mark.parametrize("fn,backend", VARIANTS, ids=IDS)
@pytest.mark.parametrize("kind,kw", [("jsd", {"beta": 0.5}), ("forward_kl", {}),
                                     ("reverse_kl", {}), ("tv", {}), ("alpha", {"alpha": 0.3})],
                         ids=["jsd", "fkl", "rkl", "tv", "alpha"])
def test_kinds(fn, backend, kind, kw):
    check(fn, backend, 37, 40, 300, torch.float32, kind=kind, weight_hard_loss=0.5,
          weight_soft_loss=0.5, **kw)


@pytest.mark.parametrize("fn,backend", VARIANTS, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("reduction,items", [("batchmean", None), ("sum", None),
                                             ("batchmean", 23.0)],
                         ids=["batchmean", "sum", "num_items"])
def test_reductions_temperature_bf16(fn, backend, temperature, reduction, items):
    """The hard term is on the untempered student (Liger), the soft one at T."""
    check(fn, backend, 29, 48, 257, torch.bfloat16, kind="jsd", beta=0.3,
          temperature=temperature, weight_hard_loss=0.4, weight_soft_loss=0.6,
          reduction=reduction, num_items_in_batch=items, softcap=6.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distill_loss_min_memory(temperature, monkeypatch):
    """mode="min_memory" reaches the fused passes: the divergence's and, at T != 1, the hard
    term's log-probs."""
    from prefkern._kernels import divergence_fused, linear_logprobs_fused

    calls = []

    def spy(fn):
        def called(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return called

    monkeypatch.setattr(divergence_fused, "divergence_partials",
                        spy(divergence_fused.divergence_partials))
    monkeypatch.setattr(linear_logprobs_fused, "linear_logprobs_fwd",
                        spy(linear_logprobs_fused.linear_logprobs_fwd))
    check(distill_loss, "triton", 19, 24, 130, torch.bfloat16, kind="jsd", beta=0.3,
          temperature=temperature, weight_hard_loss=0.4, weight_soft_loss=0.6,
          mode="min_memory")
    want = ["divergence_partials"] + (["linear_logprobs_fwd"] if temperature != 1.0 else [])
    assert calls == want


def test_per_token_losses():
    problem = _problem(16, 24, 100, torch.float32)
    ours = _run(distill_loss, problem, None, reduction="none")
    ref = _run(distill_loss_ref, problem, torch.float64, reduction="none")
    base = _run(distill_loss_ref, problem, None, reduction="none")
    assert ours[0].shape == (16,)
    for o, r, b in zip(ours, ref, base, strict=True):
        if r is not None:
            assert_rule(o, r, b, reduction=100)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature,
                         num_items_in_batch=None):
    """TRL's GKD loss (huggingface/trl f2cd577, trl/experimental/gkd/gkd_trainer.py
    generalized_jsd_loss), written here from its formula with reduction="batchmean"."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - beta_t), t + torch.log(beta_t)]), 0)
        jsd = beta_t * F.kl_div(m, t, reduction="none", log_target=True) + \
            (1 - beta_t) * F.kl_div(m, s, reduction="none", log_target=True)
    jsd = jsd[labels != -100]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    return jsd.sum() / max(int((labels != -100).sum()), 1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("items", [None, 40.0])
def test_parity_with_trl_gkd(beta, items):
    torch.manual_seed(0)
    hidden, weight, _, t_hidden, t_weight, labels = _problem(24, 32, 150, torch.float64)
    ours, _ = distill_loss(hidden, weight, t_hidden, t_weight, labels, kind="jsd", beta=beta,
                           temperature=0.9, num_items_in_batch=items)
    trl = _trl_generalized_jsd(hidden @ weight.T, t_hidden @ t_weight.T, labels, beta, 0.9,
                               items)
    torch.testing.assert_close(ours, trl, rtol=1e-12, atol=1e-12)


def test_parity_with_liger_jsd_loss():
    """Liger's LigerFusedLinearJSDLoss (linkedin/Liger-Kernel ead96b6, chunked_loss): hard =
    NLL of the untempered student over valid tokens / their count, soft = per-token JSD at T
    over the same count, loss = w_hard * hard + w_soft * soft."""
    torch.manual_seed(1)
    hidden, weight, _, t_hidden, t_weight, labels = _problem(24, 32, 150, torch.float64)
    temperature, beta = 2.0, 0.25
    s_logits, t_logits = hidden @ weight.T, t_hidden @ t_weight.T
    valid = labels != -100
    hard = F.cross_entropy(s_logits, labels, ignore_index=-100, reduction="sum") / valid.sum()
    soft = _trl_generalized_jsd(s_logits, t_logits, labels, beta, temperature)
    for fn in (distill_loss, linear_distill_loss):
        ours, metrics = fn(hidden, weight, t_hidden, t_weight, labels, kind="jsd", beta=beta,
                           temperature=temperature, weight_hard_loss=0.3, weight_soft_loss=0.7)
        torch.testing.assert_close(metrics["hard_loss"], hard, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, 0.3 * hard + 0.7 * soft, rtol=1e-12, atol=1e-12)


def test_fused_backward_only_scales(monkeypatch):
    """linear_distill_loss computes every gradient in its forward: the backward runs no GEMM."""
    from prefkern.ops import gemm

    hidden, weight, bias, t_hidden, t_weight, labels = _problem(20, 16, 90, torch.float32)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    loss, _ = linear_distill_loss(h, w, t_hidden, t_weight, labels, bias=b, backend="torch")

    def no_gemm(*args, **kwargs):
        raise AssertionError("a GEMM ran in the backward")

    monkeypatch.setattr(gemm, "fp32_mm", no_gemm)
    monkeypatch.setattr(gemm, "accumulate_mm", no_gemm)
    monkeypatch.setattr(torch, "mm", no_gemm)
    (2 * loss).backward()
    monkeypatch.undo()
    h2, w2, b2 = leaf(hidden), leaf(weight), leaf(bias)
    loss2, _ = distill_loss(h2, w2, t_hidden, t_weight, labels, bias=b2, backend="torch")
    (2 * loss2).backward()
    for ours, want in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-7)


class _GemmFlops(TorchDispatchMode):
    """FLOPs of the matrix products dispatched (mm, addmm and in-place addmm_)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[:2] if packet is torch.ops.aten.mm else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_distill_runs_four_gemms_forward_and_none_backward(backend):
    """The student's logits, the teacher's, dh and dW: 2NV (3 H_student + H_teacher)."""
    n, h, v, h_t = 40, 24, 300, 32
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.2).requires_grad_(True)
    labels = make_targets((n,), v, 0.0)
    with _GemmFlops() as forward:
        loss, _ = linear_distill_loss(hidden, weight, torch.randn(n, h_t),
                                      torch.randn(v, h_t) * 0.2, labels, backend=backend)
    with _GemmFlops() as backward:
        loss.backward()
    assert forward.flops == 2 * n * v * (3 * h + h_t), forward.flops
    assert backward.flops == 0


def test_module_and_errors():
    hidden, weight, bias, t_hidden, t_weight, labels = _problem(12, 16, 50, torch.float32)
    module = prefkern.nn.LinearDistillLoss(kind="forward_kl", weight_hard_loss=0.2)
    loss, _ = module(hidden, weight, t_hidden, t_weight, labels, bias=bias)
    want, _ = distill_loss(hidden, weight, t_hidden, t_weight, labels, bias=bias,
                           kind="forward_kl", weight_hard_loss=0.2)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="reduced loss"):
        linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, reduction="none")
    with pytest.raises(ValueError, match="no teacher gradient"):
        linear_distill_loss(hidden, weight, t_hidden.requires_grad_(True), t_weight, labels)
    with pytest.raises(ValueError, match="reduction must be one of"):
        distill_loss(hidden, weight, t_hidden.detach(), t_weight, labels, reduction="avg")


@pytest.mark.parametrize("clamps", [(None, None), (-10.0, 10.0), (-3.0, 0.05)],
                         ids=["none", "verl-dataclass", "tight"])
def test_topk_forward_kl(clamps):
    """verl's forward_kl_topk on the student's log-probs of the teacher's top-k ids, through
    linear_logprobs' (N, K) targets: value and gradients against the reference."""
    torch.manual_seed(2)
    n, h, v, k = 20, 32, 200, 8
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.5
    teacher_logits = torch.randn(n, v) * 3
    t_logp, ids = teacher_logits.log_softmax(-1).topk(k, dim=-1)
    ids[3] = -100  # an ignored row: every id ignored
    mask = ids != -100
    g = torch.randn(n)
    runs = []
    for fn, dtype in ((topk_forward_kl, None), (topk_forward_kl_ref, torch.float64),
                      (topk_forward_kl_ref, None)):
        hh, ww = leaf(hidden, dtype), leaf(weight, dtype)
        student = prefkern.linear_logprobs(hh, ww, ids) if fn is topk_forward_kl else \
            prefkern.reference.linear_logprobs_ref(hh, ww, ids)
        out = fn(student, t_logp.to(student.dtype), mask, log_prob_min_clamp=clamps[0],
                 loss_max_clamp=clamps[1])
        (out * g.to(out.dtype)).sum().backward()
        runs.append((out, hh.grad, ww.grad))
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=v)
    assert runs[0][0][3] == 0 and (runs[0][0] >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_hard_head_and_ignored_rows_from_review(backend):
    """The untempered hard term folds softcap and logit_scale like every head; ignored rows
    with huge logits give finite gradients; the hard metric is 0 when the term is off."""
    hidden, weight, bias, t_hidden, t_weight, labels = _problem(6, 8, 129, torch.float32)
    hidden[1] *= 60.0
    labels[1] = -100
    kw = dict(temperature=2.0, weight_hard_loss=0.5, softcap=3.0, logit_scale=0.5,
              backend=backend)
    runs = []
    for fn in (linear_distill_loss, distill_loss):
        h, w = leaf(hidden), leaf(weight)
        loss, metrics = fn(h, w, t_hidden, t_weight, labels, **kw)
        loss.backward()
        runs.append((loss, metrics["hard_loss"], h.grad, w.grad))
    for ours, want in zip(*runs, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    _, metrics = linear_distill_loss(hidden, weight, t_hidden, t_weight, labels,
                                     backend=backend)
    assert metrics["hard_loss"] == 0
    with pytest.raises(ValueError, match="reduced loss"):
        linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, reduction="bogus")
