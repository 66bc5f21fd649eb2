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
from prefkern.ops import head as head_mod
from prefkern.ops import multi_target, softmax_stats, torch_chunked
from prefkern.ops.linear_logprobs import STATS_COLUMNS
from prefkern.outputs import HeadOutput, LogprobsEntropy
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

    def fwd(logits, targets, inv_temp, ignore_index, with_entropy, with_stats):
        return fwd2d(_as_rows(logits), targets, inv_temp, ignore_index, with_entropy, with_stats)

    def bwd(logits, targets, *args, **kw):
        return bwd2d(_as_rows(logits), targets, *args, **kw).view(logits.shape)

    return fwd, bwd


def _as_rows(logits: Tensor) -> Tensor:
    """(..., V) -> (N, V) with unit stride along V (a copy only when no view exists)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _may_overlap(t: Tensor) -> bool:
    """Whether two indices of ``t`` may address one element (an expanded view): no gradient can
    be written in place there. Dims by increasing stride must each step past the reach of the
    smaller ones (a sufficient test for no overlap; anything else counts as overlapping)."""
    reach = 0
    dims = zip(t.stride(), t.shape, strict=True)
    for stride, size in sorted((st, sz) for st, sz in dims if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


# torch.library custom ops: opaque to torch.compile(fullgraph=True), with fake shapes.
@torch.library.custom_op("prefkern::logprobs_from_logits_fwd", mutates_args=())
def _fwd_op(logits: Tensor, targets: Tensor, row_inv_temp: Tensor | None, backend: str,
            inv_temp: float, ignore_index: int, with_entropy: bool, with_stats: bool,
            inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (logp shaped like targets, (N,) or (N, K); entropy (N,), zeros unless with_entropy;
    lse (N,); stats (N, 4) or (0, 4) without with_stats; target-is-argmax bool shaped like
    targets, or (0,))."""
    fwd, _ = _impl(backend)
    factor = inv_temp if row_inv_temp is None else row_inv_temp
    multi = targets.dim() == 2
    row_targets = multi_target.representative(targets, ignore_index) if multi else targets
    with without_autocast(logits):
        logp, entropy, lse, stats = fwd(logits, row_targets, factor, ignore_index, with_entropy,
                                        with_stats)
        hit = logits.new_empty(0, dtype=torch.bool)
        if multi:
            ids, valid = multi_target.safe_ids(targets, ignore_index)
            picked = multi_target.logits_picked(logits, ids, factor)
            logp = multi_target.picked_logprobs(picked, lse, valid)
        if with_stats:
            hit = softmax_stats.target_hits(stats, targets, ignore_index)
    if stats is None:
        stats = lse.new_empty((0, STATS_COLUMNS))
    return (logp, torch.zeros_like(lse) if entropy is None else entropy, lse,
            stats.to(lse.dtype), hit)


@_fwd_op.register_fake
def _(logits, targets, row_inv_temp, backend, inv_temp, ignore_index, with_entropy, with_stats,
      inplace_backward):
    dtype = compute_dtype(logits.dtype)
    n = logits.shape[:-1].numel()
    return (logits.new_empty(targets.shape, dtype=dtype),
            *(logits.new_empty(n, dtype=dtype) for _ in range(2)),
            logits.new_empty((n if with_stats else 0, STATS_COLUMNS), dtype=dtype),
            logits.new_empty(targets.shape if with_stats else (0,), dtype=torch.bool))


def _backward_into(grad_or_none, logits, targets, row_inv_temp, lse, entropy, g_logp, g_ent,
                   g_lse, g_extra, backend, inv_temp, ignore_index):
    """The backward of one backend into a new tensor (grad_or_none None, returned) or into the
    logits themselves."""
    _, bwd = _impl(backend)
    factor = inv_temp if row_inv_temp is None else row_inv_temp
    inplace = grad_or_none is not None
    if targets.dim() == 1:
        with without_autocast(logits):
            return bwd(logits, targets, lse, entropy, g_logp, g_ent, g_lse, factor, ignore_index,
                       inplace=inplace, g_extra=g_extra)
    ids, valid = multi_target.safe_ids(targets, ignore_index)
    row_targets = multi_target.representative(targets, ignore_index)
    g_lse_stats = g_lse
    if g_logp is not None:
        g_lse = multi_target.lse_gradient(g_lse, g_logp, valid)
    with without_autocast(logits):
        picked = None
        if g_logp is not None and inplace:  # read the target logits before they are overwritten
            picked = multi_target.logits_picked(logits, ids, factor)
        grad = bwd(logits, row_targets, lse, entropy, None, g_ent, g_lse, factor, ignore_index,
                   inplace=inplace, g_extra=g_extra)
        if g_logp is not None:
            multi_target.logits_picked_grad_(grad, logits, ids, valid, lse, entropy, g_logp,
                                             g_ent, factor, picked=picked, g_lse=g_lse_stats,
                                             g_extra=g_extra)
    return grad


@torch.library.custom_op("prefkern::logprobs_from_logits_bwd", mutates_args=())
def _bwd_op(logits: Tensor, targets: Tensor, row_inv_temp: Tensor | None, lse: Tensor,
            entropy: Tensor, g_logp: Tensor | None, g_ent: Tensor | None, g_lse: Tensor | None,
            g_extra: Tensor | None, backend: str, inv_temp: float, ignore_index: int) -> Tensor:
    return _backward_into(None, logits, targets, row_inv_temp, lse, entropy, g_logp, g_ent,
                          g_lse, g_extra, backend, inv_temp, ignore_index)


@_bwd_op.register_fake
def _(logits, targets, row_inv_temp, lse, entropy, g_logp, g_ent, g_lse, g_extra, backend,
      inv_temp, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("prefkern::logprobs_from_logits_bwd_inplace", mutates_args=("logits",))
def _bwd_inplace_op(logits: Tensor, targets: Tensor, row_inv_temp: Tensor | None, lse: Tensor,
                    entropy: Tensor, g_logp: Tensor | None, g_ent: Tensor | None,
                    g_lse: Tensor | None, g_extra: Tensor | None, backend: str,
                    inv_temp: float, ignore_index: int) -> None:
    """Overwrites logits with d loss / d logits (inplace_backward)."""
    _backward_into(logits, logits, targets, row_inv_temp, lse, entropy, g_logp, g_ent, g_lse,
                   g_extra, backend, inv_temp, ignore_index)


@_bwd_inplace_op.register_fake
def _(logits, targets, row_inv_temp, lse, entropy, g_logp, g_ent, g_lse, g_extra, backend,
      inv_temp, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, row_inv_temp, *options = inputs
    *ctx.options, ctx.with_entropy, ctx.with_stats, ctx.inplace = options  # backend,
    # inv_temp, ignore_index
    ctx.save_for_backward(logits, targets, row_inv_temp, output[2], output[1], output[3])


def _backward(ctx, g_logp, g_ent, _g_lse, g_stats, _g_hit):
    # lse is internal (never returned to the user): its gradient is always None/zero
    logits, targets, row_inv_temp, lse, entropy, stats = ctx.saved_tensors
    no_grads = (None,) * 8
    if not ctx.with_entropy:
        g_ent = None  # the caller never saw the entropy: any gradient for it is zeros
    if not ctx.with_stats:
        g_stats = None
    if g_logp is None and g_ent is None and g_stats is None:
        return (None, *no_grads)
    g_logp, g_ent, g_stats = (None if g is None else g.to(lse.dtype).contiguous()
                              for g in (g_logp, g_ent, g_stats))
    g_lse = g_extra = None
    if g_stats is not None:
        g_lse, g_extra = softmax_stats.extra_gradients(stats, g_stats, None, logits.shape[-1])
    args = (logits, targets, row_inv_temp, lse, entropy, g_logp, g_ent, g_lse, g_extra,
            *ctx.options)
    if ctx.inplace:
        _bwd_inplace_op(*args)
        return (logits, *no_grads)
    return (_bwd_op(*args), *no_grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor | None, *,
                         temperature: float | Tensor = 1.0, logit_scale: float | None = None,
                         ignore_index: int = -100, return_entropy: bool = False,
                         return_stats: bool = False, inplace_backward: bool = False,
                         backend: str | None = None):
    """Per-token log-prob of ``targets`` under ``softmax(logit_scale * logits / temperature)``.

    ``logp = (logits.float() * s / T).log_softmax(-1).gather(-1, targets[..., None])[..., 0]``
    and, with ``return_entropy``, ``entropy = -(p * p.log()).sum(-1)``.

    Args:
        logits: (..., V) bf16/fp16/fp32 (fp64 on the torch backend).
        targets: (...) integer ids in [0, V), or ``ignore_index`` (those give 0 and 0 gradient);
            (..., K) for K log-probs per row from one softmax; None for the entropy alone
            (:func:`entropy_from_logits`). Entropy is 0 on rows whose targets are all ignored.
        temperature: a float > 0 or one value per row (a tensor shaped like logits.shape[:-1]).
        logit_scale: None or s > 0 (a model's logit multiplier, see :func:`linear_logprobs`).
        return_stats: also ``HeadStats(sum_p2, mean_logit, target_is_argmax)`` from the same
            pass (see :func:`linear_logprobs`); the result is then a ``HeadOutput``.
        inplace_backward: the backward writes d loss / d logits into the logits' own storage
            and returns it as their gradient, saving an (N, V) buffer (2 GiB at 8192 x 128256
            bf16; what verl asks of flash-attn's cross entropy). The logits' values are gone
            after backward: only for logits nothing else reads in backward. (The torch and
            cuda backends copy logits that are not viewable as (N, V) rows, e.g.
            ``logits[:, :-1]``, in forward already; the gradient then lives in that copy.
            Expanded logits, whose elements repeat, get a new gradient buffer.)
        backend: "auto" | "triton" | "cuda" | "torch" (None: $PREFKERN_BACKEND).
    Autocast: nothing is cast (the softmax is computed in fp32 from any input dtype, as
    autocast does for log_softmax); the result is the same inside and outside autocast.
    Returns:
        fp32 log-probs shaped like targets, or ``LogprobsEntropy(logprobs, entropy)`` with
        ``return_entropy`` (logprobs None without targets). Both are differentiable for any
        upstream gradient; the logits' gradient has their dtype.
    """
    _checks.check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V > 0, got shape {tuple(logits.shape)}")
    device = logits.device
    lead = logits.shape[:-1]
    temperature = head_mod.as_rows(temperature, lead)
    head_mod.check_temperature(temperature, lead, device)
    head_mod.check_logit_scale(logit_scale)
    if targets is None and not (return_entropy or return_stats):
        raise ValueError("targets=None computes no log-prob: pass return_entropy=True "
                         "(or call entropy_from_logits) or return_stats=True")
    vocab = logits.shape[-1]
    flat, out_shape, bad, bad_rows, op_ignore = multi_target.prepare(
        targets, lead, vocab, ignore_index, "logprobs_from_logits", device)
    implemented = ("torch",) if logits.dtype == torch.float64 else ("triton", "cuda", "torch")
    name = resolve_backend("logprobs_from_logits", backend, device, implemented,
                           AUTO_ORDER if logits.dtype != torch.float64 else ())
    head = head_mod.fold(temperature, logit_scale, None, compute_dtype(logits.dtype))

    if name == "triton" and logits.dim() == 3 and (logits.stride(-1) == 1 or vocab == 1):
        rows = logits  # (B, T) rows indexed in place: logits[:, :-1] needs no copy
    else:
        rows = _as_rows(logits)
    logp, entropy, _, stats, hit = _fwd_op(rows, flat, head.row_inv_temp, name, head.inv_temp,
                                           int(op_ignore), bool(return_entropy),
                                           bool(return_stats),
                                           bool(inplace_backward) and not _may_overlap(rows))
    logp = None if out_shape is None else _checks.poison(logp.view(out_shape), bad)
    if return_stats:
        return HeadOutput(
            logp, _checks.poison(entropy.view(lead), bad_rows) if return_entropy else None,
            None, head_mod.head_stats(stats, hit, lead, out_shape, bad_rows))
    if return_entropy:
        return LogprobsEntropy(logp, _checks.poison(entropy.view(lead), bad_rows))
    return logp


def entropy_from_logits(logits: torch.Tensor, *, temperature: float | Tensor = 1.0,
                        logit_scale: float | None = None, backend: str | None = None):
    """``-(p * p.log()).sum(-1)`` with ``p = (logits.float() * s / T).softmax(-1)``: fp32 (...),
    differentiable, one pass over the logits and no fp32 copy (what the trainers'
    ``entropy_from_logits`` computes with a full softmax)."""
    return logprobs_from_logits(logits, None, temperature=temperature, logit_scale=logit_scale,
                                return_entropy=True, backend=backend).entropy
