"""Log-probs (and entropy) of target tokens from logits that already exist.

Equivalent to ``torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None])[..., 0]``
(see :func:`prefkern.reference.logprobs_from_logits_ref`) in one pass over the logits, with no
fp32 copy of them, and a backward that reads and writes them once.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from prefkern import _checks
from prefkern.dispatch import resolve_backend
from prefkern.ops import torch_chunked
from prefkern.outputs import LogprobsEntropy

# CUDA-device preference, fastest first. Not yet measured on a GPU: both are single-pass
# bandwidth-bound kernels; update from benchmarks/results/<gpu>/ once measured.
AUTO_ORDER = ("triton", "cuda")


def _triton_impl():
    from prefkern._kernels import logprobs_from_logits as k

    return SimpleNamespace(fwd=k.logprobs_fwd, bwd=k.logprobs_bwd)


def _cuda_impl():
    from prefkern import _cuda

    return SimpleNamespace(fwd=_cuda.logprobs_fwd, bwd=_cuda.logprobs_bwd)


def _torch_impl():
    def fwd(logits, targets, inv_temp, ignore_index, with_entropy):
        logp, entropy, lse = torch_chunked.logits_forward(logits, targets, inv_temp, ignore_index)
        return logp, (entropy if with_entropy else None), lse

    return SimpleNamespace(fwd=fwd, bwd=torch_chunked.logits_backward)


_IMPLS = {"triton": _triton_impl, "cuda": _cuda_impl, "torch": _torch_impl}


@dataclass(frozen=True)
class _Options:
    backend: str
    inv_temp: float
    ignore_index: int
    with_entropy: bool


class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, opts: _Options):
        impl = _IMPLS[opts.backend]()
        logp, entropy, lse = impl.fwd(logits, targets, opts.inv_temp, opts.ignore_index,
                                      opts.with_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return (logp, entropy) if opts.with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        opts: _Options = ctx.opts
        if g_logp is None and g_ent is None:
            return None, None, None
        g_logp = None if g_logp is None else g_logp.to(lse.dtype).contiguous()
        g_ent = None if g_ent is None else g_ent.to(lse.dtype).contiguous()
        impl = _IMPLS[opts.backend]()
        grad = impl.bwd(logits, targets, lse, entropy, g_logp, g_ent, opts.inv_temp,
                        opts.ignore_index)
        return grad, None, None


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                         ignore_index: int = -100, return_entropy: bool = False,
                         backend: str | None = "auto"):
    """Per-token log-prob of ``targets`` under ``softmax(logits / temperature)``.

    ``logp = (logits.float() / temperature).log_softmax(-1).gather(-1, targets[..., None])[..., 0]``
    and, with ``return_entropy``, ``entropy = -(p * p.log()).sum(-1)``.

    Args:
        logits: (..., V) bf16/fp16/fp32 (fp64 on the torch backend).
        targets: (...) integer ids in [0, V), or ``ignore_index`` (those give 0 and 0 gradient).
        backend: "auto" | "triton" | "cuda" | "torch" (None: $PREFKERN_BACKEND).
    Returns:
        fp32 (...) log-probs, or ``LogprobsEntropy(logprobs, entropy)`` with ``return_entropy``.
        Both are differentiable for any upstream gradient; the logits' gradient has their dtype.
    """
    _checks.check_float("logits", logits)
    _checks.check_index("targets", targets)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V > 0, got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    device = _checks.check_same_device(logits=logits, targets=targets)
    _checks.check_positive("temperature", temperature)
    vocab = logits.shape[-1]
    _checks.check_targets_in_range(targets, vocab, ignore_index)
    implemented = ("torch",) if logits.dtype == torch.float64 else ("triton", "cuda", "torch")
    name = resolve_backend("logprobs_from_logits", backend, device, implemented,
                           AUTO_ORDER if logits.dtype != torch.float64 else ())

    lead = logits.shape[:-1]
    logits2d = logits.reshape(-1, vocab)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    opts = _Options(name, 1.0 / float(temperature), int(ignore_index), bool(return_entropy))
    out = _LogprobsFromLogits.apply(logits2d, targets.reshape(-1), opts)
    if return_entropy:
        return LogprobsEntropy(out[0].view(lead), out[1].view(lead))
    return out.view(lead)
