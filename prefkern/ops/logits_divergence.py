"""Per-token full-vocabulary divergence when both logits already exist (e.g. a teacher's logits
streamed from another process), with no fp32 copy of either: rows are read chunk by chunk.

Replaces ``a = (logits.float() / T).log_softmax(-1); b = (ref_logits.float() / T)
.log_softmax(-1); (b.exp() * (b - a)).sum(-1)`` and the other kinds of
:mod:`prefkern.reference.divergence` (see :func:`prefkern.reference.logits_divergence_ref`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern import _checks
from prefkern._autocast import without_autocast
from prefkern.dispatch import resolve_backend
from prefkern.ops import divergence_passes as passes
from prefkern.ops import head as head_mod
from prefkern.ops import multi_target
from prefkern.ops.torch_chunked import _is_unit, _rows_per_chunk, rows_factor
from prefkern.outputs import DivergenceOutput
from prefkern.reference.divergence import resolve_kind

AUTO_ORDER = ("triton",)


def _compute_dtype(logits: Tensor, ref_logits: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(logits.dtype, ref_logits.dtype),
                               torch.float32)


def _row_chunks(n: int, v: int, device):
    step = _rows_per_chunk(4 * v, device)  # ~4 live (r, V) buffers
    return [slice(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _scaled(logits: Tensor, rows: slice, factor, cdt) -> Tensor:
    """logits[rows] * factor as a fresh compute-dtype tensor (the passes consume it)."""
    z = logits[rows].to(cdt, copy=True)
    return z if _is_unit(factor) else z.mul_(factor)


@torch.library.custom_op("prefkern::logits_divergence_fwd", mutates_args=())
def _fwd_op(logits: Tensor, ref_logits: Tensor, targets: Tensor, row_inv_temp: Tensor | None,
            backend: str, kind: str, beta: float, alpha: float, inv_temp: float,
            ignore_index: int, need_q: bool) -> list[Tensor]:
    """-> [divergence, logp] + the row statistics of divergence_passes.forward_rows, each (N,)
    in the compute dtype."""
    n, v = logits.shape
    cdt = _compute_dtype(logits, ref_logits)
    factor = inv_temp if row_inv_temp is None else row_inv_temp

    def logits_of(rows):
        f = rows_factor(factor, rows)
        return _scaled(logits, rows, f, cdt), _scaled(ref_logits, rows, f, cdt)

    if backend == "triton":
        from prefkern._kernels import divergence as kernels

        head = (factor, None)
        return kernels.divergence_fwd(logits, ref_logits, targets, head, head, kind, beta,
                                      alpha, ignore_index, need_q)
    with without_autocast(logits):
        return passes.forward_rows(n, _row_chunks(n, v, logits.device), logits_of, targets,
                                   resolve_kind(kind, beta, alpha), ignore_index, need_q, cdt,
                                   logits.device)


@_fwd_op.register_fake
def _(logits, ref_logits, targets, row_inv_temp, *options):
    cdt = _compute_dtype(logits, ref_logits)
    return [logits.new_empty(logits.shape[0], dtype=cdt) for _ in range(8)]


@torch.library.custom_op("prefkern::logits_divergence_bwd", mutates_args=())
def _bwd_op(logits: Tensor, ref_logits: Tensor, targets: Tensor, row_inv_temp: Tensor | None,
            stats: list[Tensor], g_div: Tensor | None, g_logp: Tensor | None, backend: str,
            kind: str, beta: float, alpha: float, inv_temp: float, ignore_index: int,
            need_ref: bool) -> list[Tensor]:
    """-> [dlogits] (+ [dref_logits] when need_ref), in the inputs' dtypes."""
    n, v = logits.shape
    cdt = _compute_dtype(logits, ref_logits)
    factor = inv_temp if row_inv_temp is None else row_inv_temp
    div = resolve_kind(kind, beta, alpha)
    valid = targets != ignore_index
    gd, gl = (None if g is None else torch.where(valid, g.to(cdt), 0) for g in (g_div, g_logp))
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    ref_grad = torch.empty(ref_logits.shape, dtype=ref_logits.dtype,
                           device=ref_logits.device) if need_ref else None
    if backend == "triton":
        from prefkern._kernels import divergence as kernels

        head = (factor, None)
        kernels.divergence_bwd(logits, ref_logits, 0, targets, stats, g_div, g_logp, head, head,
                               kind, beta, alpha, ignore_index, grad, ref_grad)
        return [grad] if ref_grad is None else [grad, ref_grad]
    with without_autocast(logits):
        for rows in _row_chunks(n, v, logits.device):
            f = rows_factor(factor, rows)
            dz_p, dz_q = passes.grads_of_logits(
                _scaled(logits, rows, f, cdt), _scaled(ref_logits, rows, f, cdt), 0, stats,
                rows, targets, valid, gd, gl, div, need_ref)
            for out, dz in ((grad, dz_p), (ref_grad, dz_q)):
                if out is not None:
                    dz = dz if _is_unit(f) else dz.mul_(f)
                    out[rows] = dz.masked_fill_(~valid[rows, None], 0)
    return [grad] if ref_grad is None else [grad, ref_grad]


@_bwd_op.register_fake
def _(logits, ref_logits, targets, row_inv_temp, stats, g_div, g_logp, backend, kind, beta,
      alpha, inv_temp, ignore_index, need_ref):
    out = [torch.empty_like(logits, memory_format=torch.contiguous_format)]
    if need_ref:
        out.append(torch.empty_like(ref_logits, memory_format=torch.contiguous_format))
    return out


def _setup_context(ctx, inputs, output):
    logits, ref_logits, targets, row_inv_temp, *options = inputs
    ctx.options = options[:-1]  # backend, kind, beta, alpha, inv_temp, ignore_index
    ctx.save_for_backward(logits, ref_logits, targets, row_inv_temp, *output[2:])


def _backward(ctx, grad_outputs):
    g_div, g_logp = grad_outputs[0], grad_outputs[1]
    logits, ref_logits, targets, row_inv_temp, *stats = ctx.saved_tensors
    need_p, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    no_grads = (None,) * 9  # targets, row_inv_temp and the 7 options
    if not (need_p or need_ref) or (g_div is None and g_logp is None):
        return (None, None, *no_grads)
    g_div, g_logp = (None if g is None else g.to(stats[0].dtype).contiguous()
                     for g in (g_div, g_logp))
    grads = _bwd_op(logits, ref_logits, targets, row_inv_temp, stats, g_div, g_logp,
                    *ctx.options, need_ref)
    return (grads[0] if need_p else None, grads[1] if need_ref else None, *no_grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def logits_divergence(logits: Tensor, ref_logits: Tensor, targets: Tensor | None = None, *,
                      kind: str = "forward_kl", beta: float = 0.5, alpha: float = 0.5,
                      temperature: float | Tensor = 1.0, ignore_index: int = -100,
                      return_logprobs: bool = False, backend: str | None = None):
    """Per-token divergence between p = softmax(logits / T) (the policy / student, which takes
    the gradient) and q = softmax(ref_logits / T) (reference / teacher); the kinds, formulas
    and outputs of :func:`prefkern.linear_divergence` (forward_kl = KL(q || p), reverse_kl =
    KL(p || q), jsd(beta), tv, alpha).

    Args:
        logits, ref_logits: (..., V), any float dtypes (fp32 math inside; never copied whole).
        targets: (...) ids or None; ``ignore_index`` rows give 0 and take no gradient.
        temperature: a float > 0 or one value per row, dividing both sides.
        backend: "auto" | "triton" | "torch" (None: $PREFKERN_BACKEND). The Triton kernels
            read each row twice forward and once backward, in the logits' own dtype.
    Returns:
        the divergence (...) fp32, or ``DivergenceOutput(divergence, logprobs)``. Gradients to
        ``logits`` (and to ``ref_logits`` when it requires grad) in their dtypes.
    """
    _checks.check_float("logits", logits)
    _checks.check_float("ref_logits", ref_logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError("logits must be (..., V) with V > 0")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, got "
                         f"{tuple(ref_logits.shape)}")
    device = _checks.check_same_device(logits=logits, ref_logits=ref_logits)
    div = resolve_kind(kind, beta, alpha)
    lead = logits.shape[:-1]
    temperature = head_mod.as_rows(temperature, lead)
    head_mod.check_temperature(temperature, lead, device)
    if targets is not None:
        _checks.check_index("targets", targets)
    if targets is not None and targets.shape != lead:
        raise ValueError(f"targets must have the rows' shape {tuple(lead)}, got "
                         f"{tuple(targets.shape)}")
    v = logits.shape[-1]
    flat, _, bad, _, op_ignore = multi_target.prepare(targets, lead, v, ignore_index,
                                                      "logits_divergence", device)
    fp64 = torch.float64 in (logits.dtype, ref_logits.dtype)
    name = resolve_backend("logits_divergence", backend, device,
                           ("torch",) if fp64 else ("triton", "torch"), () if fp64 else AUTO_ORDER)
    head = head_mod.fold(temperature, None, None, _compute_dtype(logits, ref_logits))
    need_q = torch.is_grad_enabled() and ref_logits.requires_grad
    rows2d = lambda t: t.reshape(-1, v) if t.stride(-1) == 1 else t.contiguous().view(-1, v)  # noqa: E731
    out = _fwd_op(rows2d(logits), rows2d(ref_logits), flat, head.row_inv_temp,
                  name, div.kind, div.beta, div.alpha, head.inv_temp, int(op_ignore), need_q)
    divergence = _checks.poison(out[0].view(lead), bad)
    if not return_logprobs:
        return divergence
    logprobs = None if targets is None else _checks.poison(out[1].view(lead), bad)
    return DivergenceOutput(divergence, logprobs)
