"""Checks of linear_divergence and logits_divergence against their float64 references (the
comparison rule on the divergence, the target log-probs and every gradient), shared by the
example tests and the properties."""

from __future__ import annotations

import torch
from cases import make_targets
from compare import assert_rule, leaf, noisiest, platform_round

import prefkern
from prefkern.reference import linear_divergence_ref, logits_divergence_ref
from prefkern.reference.divergence import divergence_from_logprobs_ref, resolve_kind
from prefkern.reference.logprobs import head_logits, linear_logits

KINDS = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tv", {}),
         ("alpha", {"alpha": 0.4}), ("alpha", {"alpha": -0.5})]
KIND_IDS = ["fkl", "rkl", "jsd", "tv", "alpha0.4", "alpha-0.5"]


def heads(n, h, v, dtype, scale=3.0, shift=0.0):
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * (scale / h**0.5)
    weight[:, 0] += shift
    return hidden.to(dtype), weight.to(dtype)


def _backward_all(out, logp, g_div, g_logp, tensors):
    loss = (out * g_div).sum() + (0 if logp is None else (logp * g_logp).sum())
    loss.backward()
    return [t.grad for t in tensors]


def term_magnitudes(z_p, z_q, targets, div, g_div, g_logp):
    """fp64 (n, V) magnitudes of the two terms of each side's softmax gradient,
    dD/dz = f - p * sum(f) with f = dD/d(log p) (log p taken as free): |f| + p |sum f|,
    upstream gradients included. The gradients are small differences of these where a token
    dominates, so their rounding scales with them (the rule's ``scale``)."""
    a = z_p.log_softmax(-1).detach().requires_grad_(True)
    b = z_q.log_softmax(-1).detach().requires_grad_(True)
    valid = targets != -100
    logp = a.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
    loss = (torch.where(valid, divergence_from_logprobs_ref(a, b, div), 0) * g_div).sum() \
        + (torch.where(valid, logp, 0) * g_logp).sum()
    f_a, f_b = torch.autograd.grad(loss, (a, b))
    return [f.abs() + x.exp() * f.sum(-1, keepdim=True).abs() for f, x in ((f_a, a), (f_b, b))]


def value_magnitude(z_p, z_q, div) -> float:
    """The size of the first-order change of D when each log-prob moves by one part in 1 of
    its magnitude: max over rows of sum_v |dD/da_v| (|a_v| + 1) + |dD/db_v| (|b_v| + 1).
    fp32 log-probs carry errors of eps * |log p|, so where the terms of D are large and cancel
    (a KL between two sharp, distant heads), D's rounding scales with this, not with D."""
    a = z_p.log_softmax(-1).detach().requires_grad_(True)
    b = z_q.log_softmax(-1).detach().requires_grad_(True)
    f_a, f_b = torch.autograd.grad(divergence_from_logprobs_ref(a, b, div).sum(), (a, b))
    size = lambda f, x: torch.where(f == 0, 0, f.abs() * (x.abs() + 1))  # noqa: E731
    return (size(f_a, a) + size(f_b, b)).sum(-1).max().item() if a.numel() else 0.0


def _row_factor(temperature, logit_scale, n):
    """An upper bound of |dz / draw| per row: logit_scale / T (the softcap's slope is <= 1)."""
    t = temperature.double().cpu() if isinstance(temperature, torch.Tensor) else \
        torch.full((n,), float(temperature), dtype=torch.float64)
    return (1.0 if logit_scale is None else logit_scale) / t.reshape(-1, 1)


def _linear_scales(dz_mag, hidden, weight, with_bias):
    """Magnitudes of dh, dW (and db) built from d-logit terms of magnitude dz_mag."""
    h, w, dz_mag = hidden.double().abs().cpu(), weight.double().abs().cpu(), dz_mag.cpu()
    out = [(dz_mag @ w).max().item(), (dz_mag.T @ h).max().item()]
    return out + ([dz_mag.sum(0).max().item()] if with_bias else [])


def check_linear(backend, n, h, v, dtype, kind="forward_kl", *, ignore_frac=0.25,
                 temperature=1.0, ref_grad=False, with_bias=False, softcap=None, mixture=False,
                 logit_scale=None, extreme=False, device="cpu", mode="auto",
                 deterministic=False, **kind_kw):
    hidden, weight = heads(n, h, v, dtype, 300.0 if extreme else 3.0)
    ref_hidden, ref_weight = heads(n, h + 3, v, dtype, 300.0 if extreme else 3.0)
    bias = torch.randn(v).to(dtype) if with_bias else None
    targets = make_targets((n,), v, ignore_frac)
    g_div, g_logp = torch.randn(n), torch.randn(n)
    coeff = torch.rand(n) + 0.25
    hidden, weight, ref_hidden, ref_weight, targets, g_div, g_logp, coeff = (
        t.to(device) for t in (hidden, weight, ref_hidden, ref_weight, targets, g_div, g_logp,
                               coeff))
    bias = None if bias is None else bias.to(device)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(device)

    def run(fn, dt, g_scale):
        pol = [leaf(t, dt) for t in (hidden, weight)] + ([leaf(bias, dt)] if with_bias else [])
        ref = [leaf(t, dt).requires_grad_(ref_grad) for t in (ref_hidden, ref_weight)]
        if mixture:  # z_q = coeff * ref head + 0.5 * the policy's head (detached copies)
            second = [leaf(t, dt).requires_grad_(ref_grad) for t in (hidden, weight)]
            ref_arg, ref_w = [(*ref, coeff.to(dt)), (*second, 0.5)], None
            ref_tensors = ref + second
        else:
            ref_arg, ref_w, ref_tensors = ref[0], ref[1], ref
        out, logp = fn(pol[0], pol[1], ref_arg, ref_w, targets, kind=kind,
                       temperature=temperature, bias=pol[2] if with_bias else None,
                       softcap=softcap, logit_scale=logit_scale, return_logprobs=True, **kind_kw)
        grads = _backward_all(out, logp, g_div.to(g_scale), g_logp.to(g_scale),
                              pol + (ref_tensors if ref_grad else []))
        return [out, logp, *grads]

    ours = run(lambda *a, **k: prefkern.linear_divergence(
        *a, backend=backend, mode=mode, deterministic=deterministic, **k), dtype, torch.float32)
    ref = run(linear_divergence_ref, torch.float64, torch.float64)
    base = run(linear_divergence_ref, dtype, torch.float32)
    names = ["divergence", "logprobs", "dhidden", "dweight"] + (["dbias"] if with_bias else [])
    names += [f"ref_grad{k}" for k in range(len(ours) - len(names))]
    h64, w64, rh64, rw64 = (t.double() for t in (hidden, weight, ref_hidden, ref_weight))
    b64 = None if bias is None else bias.double()
    raw_q = linear_logits(rh64, rw64)
    if mixture:
        raw_q = raw_q * coeff.double()[:, None] + 0.5 * linear_logits(h64, w64)
    factor = _row_factor(temperature, logit_scale, n)
    z_p = head_logits(linear_logits(h64, w64, b64), temperature, logit_scale, softcap)
    z_q = head_logits(raw_q, temperature)
    div = resolve_kind(kind, **kind_kw)
    mag_p, mag_q = (m.cpu() for m in term_magnitudes(z_p, z_q, targets, div, g_div.double(),
                                                      g_logp.double()))
    scales = [value_magnitude(z_p, z_q, div), None,
              *_linear_scales(mag_p * factor, hidden, weight, with_bias)]
    if ref_grad:
        dz_q = mag_q * _row_factor(temperature, None, n)
        scales += _linear_scales(dz_q * (coeff.double().cpu()[:, None] if mixture else 1),
                                 ref_hidden, ref_weight, False)
        if mixture:
            scales += _linear_scales(dz_q * 0.5, hidden, weight, False)
    for name, o, r, b, scale in zip(names, ours, ref, base, scales, strict=True):
        # dweight, dbias (and the reference weights' grads) sum over tokens, the rest over V
        over_tokens = name in ("dweight", "dbias") or (name.startswith("ref_grad") and
                                                       int(name[-1]) % 2 == 1)
        assert_rule(o, r, b, name, reduction=n if over_tokens else v, scale=scale)
    ignored = targets == -100
    assert (ours[0][ignored] == 0).all() and (ours[1][ignored] == 0).all()
    assert (ours[2][ignored] == 0).all()
    return ours


def check_logits(backend, shape, v, dtype, ref_dtype, kind, *, temperature=1.0, ref_grad=True,
                 ignore_frac=0.25, device="cpu", **kind_kw):
    logits = (torch.randn(*shape, v) * 3).to(dtype)
    ref_logits = (torch.randn(*shape, v) * 3).to(ref_dtype)
    targets = make_targets(shape, v, ignore_frac)
    g_div, g_logp = torch.randn(shape), torch.randn(shape)
    logits, ref_logits, targets, g_div, g_logp = (
        t.to(device) for t in (logits, ref_logits, targets, g_div, g_logp))
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(device)

    def run(fn, dts, g_dt):
        z, zr = leaf(logits, dts[0]), leaf(ref_logits, dts[1]).requires_grad_(ref_grad)
        out, logp = fn(z, zr, targets, kind=kind, temperature=temperature, return_logprobs=True,
                       **kind_kw)
        return [out, logp, *_backward_all(out, logp, g_div.to(g_dt), g_logp.to(g_dt),
                                          [z, zr] if ref_grad else [z])]

    ours = run(lambda *a, **k: prefkern.logits_divergence(*a, backend=backend, **k),
               (dtype, ref_dtype), torch.float32)
    ref = run(logits_divergence_ref, (torch.float64, torch.float64), torch.float64)
    base = run(logits_divergence_ref, (dtype, ref_dtype), torch.float32)
    # half gradients: the fp32 spec's rounded as the platform rounds (the interpreter truncates)
    spec32 = run(logits_divergence_ref, (torch.float32, torch.float32), torch.float32)
    for i, dt in ((2, dtype), (3, ref_dtype))[:len(ours) - 2]:
        base[i] = noisiest(ref[i], base[i], platform_round(spec32[i], dt, backend))
    names = ["divergence", "logprobs", "dlogits", "dref"][:len(ours)]
    factor = _row_factor(temperature, None, logits[..., 0].numel()).view(*shape, 1).to(device)
    z_p, z_q = logits.double() * factor, ref_logits.double() * factor
    div = resolve_kind(kind, **kind_kw)
    mags = term_magnitudes(z_p, z_q, targets, div, g_div.double(), g_logp.double())
    scales = [value_magnitude(z_p, z_q, div), None] + [(m * factor).max().item() for m in mags]
    for name, o, r, b, scale in zip(names, ours, ref, base, scales[:len(ours)], strict=True):
        assert_rule(o, r, b, name, reduction=v, scale=scale)
    assert ours[2].dtype == dtype
