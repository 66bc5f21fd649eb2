"""Torch backend: chunked log-softmax statistics that never hold an fp32 (N, V) tensor.

This is the CPU path for users without a GPU and the baseline for the Triton interpreter tests.
Math (z the fp32 logits after softcap and temperature; statistics in softmax_stats.py):
  m = z.amax(-1); s = exp(z - m).sum(-1); u = (exp(z - m) * (z - m)).sum(-1)
  lse = m + log s; logp = z[y] - lse; entropy = log s - u / s
  dz  = g_logp * onehot(y) - p * (g_logp + g_ent * (log p + entropy) - g_lse)
"""

from __future__ import annotations

import torch

from prefkern.ops import gemm, softmax_stats
from prefkern.ops.softmax_stats import LOG_FLOOR
from prefkern.reference.logprobs import compute_dtype

# fp32 elements of one logits chunk, per device type. On CPU, 4 MiB chunks measured faster than
# 64 MiB ones (large allocations come back as fresh, page-faulted memory each time); on GPUs,
# large chunks amortize kernel launches.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def _rows_per_chunk(width: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(width, 1))


def rows_factor(inv_temp, rows: slice):
    """The temperature factor of ``rows``: the float, or the (n, 1) column of a per-row (N,)
    tensor, to broadcast over a chunk's vocabulary."""
    return inv_temp[rows, None] if isinstance(inv_temp, torch.Tensor) else inv_temp


def _is_unit(factor) -> bool:
    return not isinstance(factor, torch.Tensor) and factor == 1.0


def grad_logits(z, local_y, lse, entropy, g_logp, g_ent, g_lse, g_extra=None):
    """dL/dz for one chunk, computed in z's storage: z (n, C); local_y (n,) target column in
    this chunk (may be out of range); lse, entropy and upstream grads (n,) or None; g_extra
    (n, 2) [g_sq, g_const] or None (softmax_stats.extra_gradients):
    dz = g_logp onehot - p (g_logp + g_ent (log p + entropy) - g_lse) + g_sq p^2 + g_const.
    A row with lse = +inf and no g_extra has p = 0 and gets dz = g_logp onehot (how callers
    zero ignored rows in the same passes)."""
    per_row = torch.zeros_like(lse)
    if g_logp is not None:
        per_row = per_row + g_logp
    if g_lse is not None:
        per_row = per_row - g_lse
    log_p = z.sub_(lse[:, None])
    if g_ent is None and g_extra is None:
        dz = log_p.exp_().mul_(per_row.neg()[:, None])
    else:
        log_p.clamp_(min=LOG_FLOOR)
        p = log_p.exp()
        coef = per_row.neg()[:, None]
        if g_ent is not None:
            coef = log_p.add_(entropy[:, None]).mul_(g_ent.neg()[:, None]).add_(coef)
        if g_extra is not None:
            coef = p.mul(g_extra[:, :1]).add_(coef)
        dz = p.mul_(coef)
        if g_extra is not None:
            dz.add_(g_extra[:, 1:])
    if g_logp is not None:  # scatter-add at the target column; rows whose target lies
        hit = (local_y >= 0) & (local_y < z.shape[1])  # elsewhere add 0 at column 0
        cols = torch.where(hit, local_y, 0).long()[:, None]
        dz.scatter_add_(1, cols, torch.where(hit, g_logp, 0)[:, None].to(dz.dtype))
    return dz


def full_row_stats(z, y, valid, with_entropy: bool = True, with_stats: bool = False):
    """(logp, entropy or None, lse, (n, 4) extra statistics or None) of rows that hold the
    whole vocab."""
    m, s, u = softmax_stats.row_stats(z, with_entropy)
    _, z_target = softmax_stats.pick_target(z, torch.where(valid, y, 0))
    stats = None
    if with_stats:
        stats = softmax_stats.finish_extra(m, s, *softmax_stats.extra_stats(z, m), valid,
                                           z.shape[-1])
    return (*softmax_stats.finish(m, s, u, z_target, valid), stats)


# ---------------------------------------------------------------------------------------------
# From materialized logits
# ---------------------------------------------------------------------------------------------

def logits_forward(logits, targets, inv_temp, ignore_index: int, with_entropy: bool = True,
                   with_stats: bool = False):
    """logits (N, V), targets (N,) -> (logp, entropy or None, lse, (N, 4) extra statistics or
    None) in the compute dtype. inv_temp: a float or (N,) per-row factors."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    valid = targets != ignore_index
    wanted = (True, with_entropy, True, with_stats)
    outs = [torch.empty((n, 4)[:1 + (k == 3)], dtype=cdt, device=logits.device) if want
            else None for k, want in enumerate(wanted)]
    step = _rows_per_chunk(v, logits.device)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        z = logits[rows].to(cdt)  # full_row_stats reads z only: no copy for fp32 at T = 1
        factor = rows_factor(inv_temp, rows)
        if not _is_unit(factor):
            z = z * factor
        parts = full_row_stats(z, targets[rows], valid[rows], with_entropy, with_stats)
        for out, part in zip(outs, parts, strict=True):
            if out is not None:
                out[rows] = part
    return tuple(outs)


def logits_backward(logits, targets, lse, entropy, g_logp, g_ent, g_lse, inv_temp,
                    ignore_index, inplace: bool = False, g_extra=None):
    """-> dlogits (N, V) in the logits dtype: a new tensor, or (inplace) logits itself,
    overwritten chunk by chunk after each chunk is read. g_extra: see grad_logits."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    valid = targets != ignore_index
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    step = _rows_per_chunk(v, logits.device)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        factor = rows_factor(inv_temp, rows)
        z = logits[rows].to(cdt, copy=True).mul_(factor)
        ent = entropy[rows] if g_ent is not None else None
        gl, ge, gs = (None if g is None else torch.where(valid[rows], g[rows], 0)
                      for g in (g_logp, g_ent, g_lse))
        gx = None if g_extra is None else g_extra[rows].to(cdt)
        dz = grad_logits(z, targets[rows].long(), lse[rows], ent, gl, ge, gs, gx)
        dz = dz.mul_(factor).masked_fill_(~valid[rows, None], 0)  # ignored: p is meaningless
        grad[rows] = dz
    return grad


# ---------------------------------------------------------------------------------------------
# Fused linear: z = softcap(hidden @ weight.T + bias) / T, never more than one chunk of z
# ---------------------------------------------------------------------------------------------

VOCAB_CHUNK = 4096


def head_transform_(raw, inv_temp, softcap: float | None, with_grad: bool = False):
    """-> (z, dcap or None): z = softcap * tanh(raw / softcap) * inv_temp, computed in raw's
    storage when there is no softcap; inv_temp a float or per-row factors shaped to broadcast.
    With ``with_grad`` and a softcap, dcap = 1 - tanh^2 = 4q / (1 + q)^2, q = exp(-2|x|)
    (relatively accurate where tanh saturates, unlike 1 - t * t)."""
    if softcap is None:
        return (raw if _is_unit(inv_temp) else raw.mul_(inv_temp)), None
    x = raw.div_(softcap)
    dcap = None
    if with_grad:
        q = x.abs().mul_(-2.0).exp_()
        dcap = q.mul(4.0).div_((q + 1.0).square_())
    return x.tanh_().mul_(softcap * inv_temp), dcap


def capped_logits(h, w, b, inv_temp, softcap: float | None, with_grad: bool = False):
    """-> (z, dcap or None) for one chunk: z = softcap * tanh((h @ w.T + b) / softcap) / T;
    inv_temp a float or the chunk's (n, 1) per-row factors (see head_transform_)."""
    raw = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return head_transform_(raw, inv_temp, softcap, with_grad)


def _chunks(hidden, weight, bias):
    """Yields (cols, w32, b32, [(rows, h32_rows), ...]) over vocab chunks x token chunks."""
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    h32 = hidden.to(cdt)
    step_v = min(VOCAB_CHUNK, weight.shape[0])
    step_n = _rows_per_chunk(step_v, hidden.device)
    for v0 in range(0, weight.shape[0], step_v):
        cols = slice(v0, min(weight.shape[0], v0 + step_v))
        w32 = weight[cols].to(cdt)
        b32 = None if bias is None else bias[cols].to(cdt)
        row_slices = (slice(r0, min(n, r0 + step_n)) for r0 in range(0, n, step_n))
        yield cols, w32, b32, [(rows, h32[rows]) for rows in row_slices]


def linear_raw(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
               with_entropy: bool = True, with_stats: bool = False) -> softmax_stats.RawStats:
    """hidden (N, H), weight (V, H), bias (V,) or None -> the unfinished row statistics."""
    stats = softmax_stats.RunningStats(hidden.shape[0], compute_dtype(hidden.dtype),
                                       hidden.device, with_u=with_entropy, with_extra=with_stats)
    for cols, w32, b32, row_chunks in _chunks(hidden, weight, bias):
        for rows, h32 in row_chunks:
            z, _ = capped_logits(h32, w32, b32, rows_factor(inv_temp, rows), softcap)
            stats.update(rows, z, cols.start, targets[rows])
    return stats.raw()


def linear_forward(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
                   with_entropy: bool = True, with_stats: bool = False):
    """-> (logp, entropy or None, lse) (N,) and the (N, 4) extra statistics or None."""
    raw = linear_raw(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
                     with_entropy, with_stats)
    return softmax_stats.finish_raw(raw, targets != ignore_index, weight.shape[0])


def linear_backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse,
                    inv_temp, softcap, ignore_index, need_dh=True, need_dw=True, need_db=True,
                    g_extra=None, fp32_dh: bool = False):
    """-> (dhidden, dweight, dbias) in the input dtypes (None where not needed).

    The logits are recomputed in fp32 (fp64 for fp64 inputs); d loss / d logits is rounded to
    the input dtype, and nothing else is: the dh/dW GEMMs take the rounded values and their
    products accumulate in fp32 across chunks (dh over vocab chunks, dW and db over token
    chunks). On CUDA they are half-precision GEMMs with fp32 output; where a half GEMM would
    round each chunk's product to the input dtype (CPU), they run in fp32 on the rounded
    values (exact products)."""
    cdt = compute_dtype(hidden.dtype)
    valid = targets != ignore_index
    gl, ge, gs = (None if g is None else torch.where(valid, g.to(cdt), 0)
                  for g in (g_logp, g_ent, g_lse))
    gx = None if g_extra is None else torch.where(valid[:, None], g_extra.to(cdt), 0)
    lse = torch.where(valid, lse, float("inf"))  # p = 0 on ignored rows: their dz is 0
    half = hidden.dtype not in (torch.float32, torch.float64)
    half_gemm = half and gemm.has_fp32_output_gemm(hidden.device)
    need_db = need_db and bias is not None
    dh = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    for cols, w32, b32, row_chunks in _chunks(hidden, weight, bias):
        w_in = weight[cols] if half_gemm else w32
        dw_acc = torch.zeros_like(w32) if need_dw and len(row_chunks) != 1 else None
        db_acc = torch.zeros(w32.shape[0], dtype=cdt, device=w32.device) if need_db else None
        for rows, h32 in row_chunks:
            factor = rows_factor(inv_temp, rows)
            z, dcap = capped_logits(h32, w32, b32, factor, softcap, with_grad=True)
            local_y = targets[rows].long() - cols.start
            dz = grad_logits(z, local_y, lse[rows], entropy[rows] if ge is not None else None,
                             *(None if g is None else g[rows] for g in (gl, ge, gs, gx)))
            if dcap is not None:
                dz.mul_(dcap)
            if not _is_unit(factor):
                dz.mul_(factor)
            if db_acc is not None:
                db_acc += dz.sum(0)
            dz_in = dz.to(hidden.dtype) if half else dz  # the contract's one rounding
            # products summed across chunks: fp32-output GEMMs, or fp32 GEMMs on the rounded
            # values (exact products) where half GEMMs round their output
            dz_sum = dz_in if half_gemm or not half else dz_in.to(cdt)
            if need_dh:
                gemm.accumulate_mm(dh[rows], dz_sum, w_in)
            if dw_acc is not None:
                gemm.accumulate_mm(dw_acc, dz_sum.T, hidden[rows] if half_gemm else h32)
            elif need_dw:  # complete in one GEMM: rounded once, as the output
                torch.mm(dz_in.T, hidden[rows] if half else h32, out=dw[cols])
        if dw_acc is not None:
            dw[cols] = dw_acc
        if db is not None:
            db[cols] = db_acc
    if dh is not None and not fp32_dh:
        dh = dh.to(hidden.dtype)
    return dh, dw, db
