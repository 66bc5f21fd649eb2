"""Per-token log-probs, entropy and logsumexp straight from hidden states and the LM-head weight.

Replaces ``logits = hidden @ weight.T + bias; logp = (logits.float() / T).log_softmax(-1)
.gather(-1, targets[..., None])[..., 0]`` (see :func:`prefkern.reference.linear_logprobs_ref`)
without ever writing the (N, V) logits: memory is O(N*H + one chunk).

Modes (Triton backend):
  fast        cuBLAS GEMMs on vocab slices + Triton row kernels; a bounded logits-slice buffer,
              fp32 dhidden accumulation, one exact GEMM per vocab slice for dweight.
              FLOPs: fwd 2NHV; bwd 6NHV (recompute + dh + dW).
  min_memory  fused Triton kernels: logit tiles never leave on-chip memory; gradients accumulate
              in a bounded fp32 scratch. FLOPs: fwd 2NHV; bwd 8NHV (dh and dW passes each
              recompute their tiles).
Both are exact (no skipped softmax entries). The torch backend is chunked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from prefkern import _checks
from prefkern.dispatch import resolve_backend
from prefkern.ops import torch_chunked
from prefkern.outputs import LinearLogprobsOutput

AUTO_ORDER = ("triton",)
MODES = ("auto", "fast", "min_memory")


def _torch_impl(opts):
    return SimpleNamespace(fwd=torch_chunked.linear_forward, bwd=torch_chunked.linear_backward)


def _triton_impl(opts):
    if opts.mode == "min_memory":
        from prefkern._kernels import linear_logprobs_fused as fused

        def bwd(*args, **kw):
            return fused.linear_logprobs_bwd(*args, deterministic=opts.deterministic, **kw)

        return SimpleNamespace(fwd=fused.linear_logprobs_fwd, bwd=bwd)
    from prefkern.ops import linear_sliced

    return SimpleNamespace(fwd=linear_sliced.forward, bwd=linear_sliced.backward)


_IMPLS = {"torch": _torch_impl, "triton": _triton_impl}


@dataclass(frozen=True)
class _Options:
    backend: str
    mode: str
    inv_temp: float
    softcap: float | None
    ignore_index: int
    with_entropy: bool
    deterministic: bool


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: _Options):
        impl = _IMPLS[opts.backend](opts)
        logp, entropy, lse = impl.fwd(hidden, weight, bias, targets, opts.inv_temp, opts.softcap,
                                      opts.ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return (logp, lse, entropy) if opts.with_entropy else (logp, lse)

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_ent=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        opts: _Options = ctx.opts
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        if (g_logp is None and g_lse is None and g_ent is None) or not (need_dh or need_dw
                                                                        or need_db):
            return None, None, None, None, None
        g_logp, g_lse, g_ent = (None if g is None else g.to(lse.dtype).contiguous()
                                for g in (g_logp, g_lse, g_ent))
        impl = _IMPLS[opts.backend](opts)
        dh, dw, db = impl.bwd(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse,
                              opts.inv_temp, opts.softcap, opts.ignore_index,
                              need_dh=need_dh, need_dw=need_dw, need_db=need_db)
        return dh, dw, db, None, None


def _validate(hidden, weight, targets, bias, temperature, softcap, mode):
    _checks.check_float("hidden", hidden)
    _checks.check_float("weight", weight)
    _checks.check_index("targets", targets)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]} "
                         f"and V > 0, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        _checks.check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    _checks.check_positive("temperature", temperature)
    if softcap is not None:
        _checks.check_positive("softcap", softcap)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _checks.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                    ignore_index: int = -100, softcap: float | None = None,
                    return_entropy: bool = False, return_lse: bool = False, mode: str = "auto",
                    deterministic: bool = False, backend: str | None = "auto"):
    """Per-token log-prob of ``targets`` under ``softmax(softcap(hidden @ weight.T + bias) / T)``.

    ``z = softcap * tanh((hidden @ weight.T + bias).float() / softcap) / T;
    logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]``, entropy
    ``-(p * log p).sum(-1)``, lse ``z.logsumexp(-1)`` -- without materializing z.

    Args:
        hidden: (..., H) bf16/fp16/fp32 (fp64 on the torch backend). weight: (V, H), same dtype.
        targets: (...) ids in [0, V) or ``ignore_index`` (0 output, 0 gradient).
        bias: (V,) or None. softcap: None or c > 0 (Gemma-style ``c * tanh(x / c)``).
        mode: "fast" (bounded logits-slice buffer, cuBLAS GEMMs), "min_memory" (fused tiles,
            no logits buffer), or "auto" (= fast). The torch backend always runs chunked.
        deterministic: min_memory mode only: no atomics (lower parallelism in backward).
        backend: "auto" | "triton" | "torch" (None: $PREFKERN_BACKEND).
    Returns:
        fp32 (...) log-probs; with ``return_entropy``/``return_lse`` a
        ``LinearLogprobsOutput(logprobs, entropy, lse)`` with None for what was not asked.
        Gradients flow to hidden, weight and bias from any upstream gradient on each output,
        in the input dtype with fp32 accumulation.
    """
    device = _validate(hidden, weight, targets, bias, temperature, softcap, mode)
    vocab = weight.shape[0]
    _checks.check_targets_in_range(targets, vocab, ignore_index)
    fp64 = hidden.dtype == torch.float64
    name = resolve_backend("linear_logprobs", backend, device,
                           ("torch",) if fp64 else ("triton", "torch"), () if fp64 else AUTO_ORDER)
    opts = _Options(name, "fast" if mode == "auto" else mode, 1.0 / float(temperature),
                    None if softcap is None else float(softcap), int(ignore_index),
                    bool(return_entropy), bool(deterministic))

    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    out = _LinearLogprobs.apply(hidden2d, weight.contiguous(), bias, targets.reshape(-1), opts)
    logp = out[0].view(lead)
    if not (return_entropy or return_lse):
        return logp
    return LinearLogprobsOutput(logp, out[2].view(lead) if return_entropy else None,
                                out[1].view(lead) if return_lse else None)
