"""Log-probs (and entropy) of target tokens from logits that already exist.

Equivalent to ``torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None])[..., 0]``
(see :func:`prefkern.reference.logprobs_from_logits_ref`) in one pass over the logits, with no
fp32 copy of them, and a backward that reads and writes them once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern import _checks
from prefkern._autocast import without_autocast
from prefkern.dispatch import resolve_backend
from prefkern.ops import torch_chunked
from prefkern.outputs import LogprobsEntropy
from prefkern.reference.logprobs import compute_dtype

# CUDA-device preference, fastest first. Not yet measured on a GPU: both are single-pass
# bandwidth-bound kernels; update from benchmarks/results/<gpu>/ once measured.
AUTO_ORDER = ("triton", "cuda")


def _impl(backend: str):
    """-> (fwd, bwd) of one backend; fwd gives (logp, entropy or None, lse), bwd the logits'
    gradient shaped like the logits. Only the Triton kernels read (B, T, V) rows in place."""
    if backend == "triton":
        from prefkern._kernels import logprobs_from_logits as kernels

        return kernels.logprobs_fwd, kernels.logprobs_bwd
    if backend == "cuda":
        from prefkern import _cuda as module

        fwd2d, bwd2d = module.logprobs_fwd, module.logprobs_bwd
    else:
        fwd2d, bwd2d = torch_chunked.logits_forward, torch_chunked.logits_backward

    def fwd(logits, targets, inv_temp, ignore_index, with_entropy):
        return fwd2d(_as_rows(logits), targets, inv_temp, ignore_index, with_entropy)

    def bwd(logits, targets, *args):
        return bwd2d(_as_rows(logits), targets, *args).view(logits.shape)

    return fwd, bwd


def _as_rows(logits: Tensor) -> Tensor:
    """(..., V) -> (N, V) with unit stride along V (a copy only when no view exists)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


# torch.library custom ops: opaque to torch.compile(fullgraph=True), with fake shapes.
@torch.library.custom_op("prefkern::logprobs_from_logits_fwd", mutates_args=())
def _fwd_op(logits: Tensor, targets: Tensor, backend: str, inv_temp: float, ignore_index: int,
            with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (logp, entropy, lse), each (N,); entropy is zeros unless with_entropy."""
    fwd, _ = _impl(backend)
    with without_autocast(logits):
        logp, entropy, lse = fwd(logits, targets, inv_temp, ignore_index, with_entropy)
    return logp, torch.zeros_like(logp) if entropy is None else entropy, lse


@_fwd_op.register_fake
def _(logits, targets, backend, inv_temp, ignore_index, with_entropy):
    dtype = compute_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[:-1].numel(), dtype=dtype) for _ in range(3))


@torch.library.custom_op("prefkern::logprobs_from_logits_bwd", mutates_args=())
def _bwd_op(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, g_logp: Tensor | None,
            g_ent: Tensor | None, backend: str, inv_temp: float, ignore_index: int) -> Tensor:
    _, bwd = _impl(backend)
    with without_autocast(logits):
        return bwd(logits, targets, lse, entropy, g_logp, g_ent, inv_temp, ignore_index)


@_bwd_op.register_fake
def _(logits, targets, lse, entropy, g_logp, g_ent, backend, inv_temp, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, *options = inputs
    *ctx.options, ctx.with_entropy = options  # backend, inv_temp, ignore_index
    ctx.save_for_backward(logits, targets, output[2], output[1])


def _backward(ctx, g_logp, g_ent, g_lse):
    # lse is internal (never returned to the user): its gradient is always None/zero
    logits, targets, lse, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        g_ent = None  # the caller never saw the entropy: any gradient for it is zeros
    if g_logp is None and g_ent is None:
        return None, None, None, None, None, None
    g_logp, g_ent = (None if g is None else g.to(lse.dtype).contiguous() for g in (g_logp, g_ent))
    grad = _bwd_op(logits, targets, lse, entropy, g_logp, g_ent, *ctx.options)
    return grad, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
    Autocast: nothing is cast (the softmax is computed in fp32 from any input dtype, as
    autocast does for log_softmax); the result is the same inside and outside autocast.
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
    targets, bad = _checks.screen_targets(targets, vocab, ignore_index, "logprobs_from_logits")
    implemented = ("torch",) if logits.dtype == torch.float64 else ("triton", "cuda", "torch")
    name = resolve_backend("logprobs_from_logits", backend, device, implemented,
                           AUTO_ORDER if logits.dtype != torch.float64 else ())

    lead = logits.shape[:-1]
    if name == "triton" and logits.dim() == 3 and (logits.stride(-1) == 1 or vocab == 1):
        rows = logits  # (B, T) rows indexed in place: logits[:, :-1] needs no copy
    else:
        rows = _as_rows(logits)
    logp, entropy, _ = _fwd_op(rows, targets.reshape(-1), name, 1.0 / float(temperature),
                               int(ignore_index), bool(return_entropy))
    logp = _checks.poison(logp.view(lead), bad)
    if return_entropy:
        return LogprobsEntropy(logp, _checks.poison(entropy.view(lead), bad))
    return logp
