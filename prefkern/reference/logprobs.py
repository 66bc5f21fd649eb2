"""Reference log-probs, entropy and logsumexp: what a trainer writes with materialized logits."""

from __future__ import annotations

import torch

from prefkern.outputs import HeadOutput, HeadStats, LinearLogprobsOutput, LogprobsEntropy


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/float inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _per_row_temperature(temperature, z: torch.Tensor):
    """A float, or one value per row (z.shape[:-1]) broadcast over the vocabulary."""
    if isinstance(temperature, torch.Tensor):
        return temperature.to(z.dtype).unsqueeze(-1)
    return temperature


class _RoundGradient(torch.autograd.Function):
    """Identity forward; the backward rounds the incoming gradient to ``rounding`` (a dtype,
    round to nearest, and back) or by ``rounding(grad)`` (a function: another platform's
    rounding)."""

    @staticmethod
    def forward(ctx, x, rounding):
        ctx.rounding = rounding
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        r = ctx.rounding
        return (grad.to(r) if isinstance(r, torch.dtype) else r(grad)).to(grad.dtype), None


def linear_logits(hidden, weight, bias=None, dlogits_dtype=None):
    """``hidden @ weight.T + bias`` accumulated in the compute dtype (fp32, fp64 for fp64),
    never rounded to the input dtype. ``dlogits_dtype``: the gradient reaching the logits is
    rounded to it (the numerics contract's one rounding of the d-logits fed to the dh/dW GEMMs,
    and here to the bias gradient's sum too), or by it when it is a function."""
    cdt = compute_dtype(hidden.dtype)
    z = hidden.to(cdt) @ weight.to(cdt).T
    z = z if bias is None else z + bias.to(cdt)
    return z if dlogits_dtype is None else _RoundGradient.apply(z, dlogits_dtype)


def _softcap(z, cap):
    """``cap * tanh(z / cap)`` written so that autograd's derivative stays accurate where tanh
    saturates: with q = exp(-2|x|), tanh|x| = (1 - q) / (1 + q) and its derivative is
    4q / (1 + q)^2 (``1 - tanh^2``, autograd's form, is 0 in fp64 beyond |x| ~ 19 while the true
    value is ~4e^(-2|x|))."""
    x = z / cap
    ax = torch.where(x < 0, -x, x)
    q = torch.exp(-2 * ax)
    t = (1 - q) / (1 + q)
    return cap * torch.where(x < 0, -t, t)


def head_logits(raw, temperature=1.0, logit_scale=None, softcap=None):
    """``softcap * tanh(logit_scale * raw / softcap) / T`` (T a float or one value per row)."""
    z = raw
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = _softcap(z, softcap)
    return z / _per_row_temperature(temperature, z)


def _per_token(z: torch.Tensor, targets: torch.Tensor | None, ignore_index: int):
    """z (..., V) in the compute dtype -> (logp, entropy, lse). targets (...) or (..., K) (logp
    shaped like them; an ignored entry gives 0) or None (logp None, every row counts); entropy
    and lse are 0 on rows whose targets are all ignored."""
    lse = torch.logsumexp(z, dim=-1)
    log_p = z - lse.unsqueeze(-1)
    # -inf logits have p = 0: zero their log p so that 0 * log 0 = 0 (values and gradients)
    finite_log_p = torch.where(torch.isfinite(log_p), log_p, torch.zeros_like(log_p))
    entropy = -(log_p.exp() * finite_log_p).sum(-1)
    if targets is None:
        return None, entropy, lse
    multi = targets.dim() == z.dim()
    y = targets if multi else targets.unsqueeze(-1)
    valid = y != ignore_index
    logp = log_p.gather(-1, torch.where(valid, y, 0).long())
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    row_valid = valid.any(-1)
    zero = torch.zeros_like(lse)
    return (logp if multi else logp.squeeze(-1), torch.where(row_valid, entropy, zero),
            torch.where(row_valid, lse, zero))


def head_stats_ref(z, targets, ignore_index=-100) -> HeadStats:
    """``sum_p2 = (z.softmax(-1) ** 2).sum(-1)``, ``mean_logit = z.mean(-1)``,
    ``target_is_argmax = z.argmax(-1) == y`` (bool shaped like targets, False where ignored;
    None without targets); the first two are 0 on rows whose targets are all ignored."""
    p = z.softmax(-1)
    sum_p2, mean = (p * p).sum(-1), z.mean(-1)
    if targets is None:
        return HeadStats(sum_p2, mean, None)
    multi = targets.dim() == z.dim()
    y = targets if multi else targets.unsqueeze(-1)
    valid = y != ignore_index
    hit = (z.argmax(-1, keepdim=True) == y) & valid
    row_valid = valid.any(-1)
    zero = torch.zeros_like(sum_p2)
    return HeadStats(torch.where(row_valid, sum_p2, zero), torch.where(row_valid, mean, zero),
                     hit if multi else hit.squeeze(-1))


def logprobs_from_logits_ref(logits, targets, *, temperature=1.0, ignore_index=-100,
                             logit_scale=None, return_entropy=False, return_stats=False):
    """``z = logits.float() * logit_scale / T; logp = z.log_softmax(-1).gather(-1, y[..., None])
    [..., 0]``, entropy ``-(p * log p).sum(-1)``; ignored tokens give 0. ``targets`` (...),
    (..., K) (K log-probs per row) or None (entropy only); T a float or one value per row.
    ``return_stats``: a HeadOutput with :func:`head_stats_ref`."""
    z = head_logits(logits.to(compute_dtype(logits.dtype)), temperature, logit_scale)
    logp, entropy, _ = _per_token(z, targets, ignore_index)
    if return_stats:
        return HeadOutput(logp, entropy if return_entropy else None, None,
                          head_stats_ref(z, targets, ignore_index))
    return LogprobsEntropy(logp, entropy) if return_entropy else logp


def linear_logprobs_ref(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100,
                        softcap=None, logit_scale=None, return_entropy=False, return_lse=False,
                        return_stats=False, dlogits_dtype=None):
    """``logits = hidden.float() @ weight.float().T + bias.float()``: accumulated in fp32 (fp64
    for fp64 inputs) and never rounded to the input dtype (prefkern's numerics contract; an
    eager bf16 LM head would round them), then ``z = softcap * tanh(logit_scale * logits /
    softcap) / T`` and the per-token outputs of :func:`logprobs_from_logits_ref`, plus
    ``lse = z.logsumexp(-1)``. Gradients flow back to the inputs in their dtype;
    ``dlogits_dtype`` rounds the d-logits as :func:`linear_logits` says (with fp32 inputs
    upcast from half ones: the contract's gradients, the comparison rule's base)."""
    z = head_logits(linear_logits(hidden, weight, bias, dlogits_dtype), temperature,
                    logit_scale, softcap)
    logp, entropy, lse = _per_token(z, targets, ignore_index)
    if return_stats:
        return HeadOutput(logp, entropy if return_entropy else None, lse if return_lse else None,
                          head_stats_ref(z, targets, ignore_index))
    if not (return_entropy or return_lse):
        return logp
    return LinearLogprobsOutput(logp, entropy if return_entropy else None,
                                lse if return_lse else None)
