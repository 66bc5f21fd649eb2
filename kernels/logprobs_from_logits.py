"""Per-row log-softmax statistics of materialized logits: one pass forward, one pass backward.

Forward, per row (z = logits[n] / T in fp32):
    lse = z.logsumexp(-1); logp = z[y] - lse; entropy = lse - (z.softmax(-1) * z).sum(-1)
Backward, for upstream g_logp, g_ent and/or g_lse:
    dlogits = (g_logp * (onehot(y) - p) - g_ent * p * (log p + entropy) + g_lse * p) / T
T may be one value per row.

Bytes: forward reads N*V*elt once and writes 12 B/row; backward reads and writes N*V*elt once.
FLOPs are negligible; one exp per logit in each pass (the running max is per block, not per
lane, so the rescale is a scalar exp). Statistics helpers: softmax_stats.py. Ignored rows mask every load: they cost no bandwidth.
"""

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from ._launch_args import temperature_args
from .softmax_stats import (
    grad_z,
    load_extra_grad,
    load_upstream,
    row_inv_temp,
    row_stats,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    stats_ptr, V, inv_temp, inv_temp_ptr, ignore_index,
    WITH_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr, ROW_TEMP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = row_inv_temp(inv_temp, inv_temp_ptr, row, ROW_TEMP)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    # ignored rows read nothing (a zero-length row)
    m, s, u, s2, sz, idx = row_stats(row_ptr, tl.where(valid, V, 0), inv_temp, 1.0, SOFTCAP=False,
                                BLOCK=BLOCK_V, EXTRA=WITH_STATS)
    log_s = tl.log(s)
    lse = m + log_s
    # ignored rows read column 0 (a scalar mask is not portable to the interpreter)
    z_y = tl.load(row_ptr + tl.where(valid, y, 0)).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(valid, z_y - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - u / s, 0.0))
    if WITH_STATS:  # (N, 4): sum p^2, mean logit, max logit, first argmax column
        tl.store(stats_ptr + 4 * row, tl.where(valid, s2 / (s * s), 0.0))
        tl.store(stats_ptr + 4 * row + 1, tl.where(valid, sz / V, 0.0))
        tl.store(stats_ptr + 4 * row + 2, tl.where(valid, m, 0.0))
        tl.store(stats_ptr + 4 * row + 3, tl.where(valid, idx.to(tl.float32), -1.0))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, inner, targets_ptr, lse_ptr, entropy_ptr, g_logp_ptr,
    g_ent_ptr, g_lse_ptr, g_extra_ptr,
    grad_ptr, grad_stride_outer, grad_stride_inner, V, inv_temp, inv_temp_ptr, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr,
    HAS_G_EXTRA: tl.constexpr, ROW_TEMP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = row_inv_temp(inv_temp, inv_temp_ptr, row, ROW_TEMP)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    lse, entropy, g_logp, g_ent, g_lse = load_upstream(
        row, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, g_lse_ptr, HAS_G_LOGP, HAS_G_ENT,
        HAS_G_LSE)
    g_sq, g_const = load_extra_grad(row, g_extra_ptr, HAS_G_EXTRA)
    v_read = tl.where(valid, V, 0)
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    out_ptr = grad_ptr + (row // inner) * grad_stride_outer + (row % inner) * grad_stride_inner
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_temp
        dz = grad_z(z, z, cols == y, lse, entropy, g_logp, g_ent, g_lse, g_sq, g_const,
                    inv_temp, HAS_G_LOGP=HAS_G_LOGP, HAS_G_ENT=HAS_G_ENT, HAS_G_LSE=HAS_G_LSE,
                    HAS_G_EXTRA=HAS_G_EXTRA, SOFTCAP=False)
        dz = tl.where(valid, dz, 0.0)
        tl.store(out_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=cols < V)


def _rows_layout(logits: torch.Tensor, targets: torch.Tensor):
    """(N, V) or (B, T, V) logits with unit stride along V (e.g. ``logits[:, :-1]`` needs no
    copy) -> (N, V, stride_outer, stride_inner, inner): row r lives at
    (r // inner) * stride_outer + (r % inner) * stride_inner."""
    if logits.dim() not in (2, 3) or (logits.stride(-1) != 1 and logits.shape[-1] > 1):
        raise ValueError("logits must be (N, V) or (B, T, V) with unit stride along V")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} not supported by the Triton kernel")
    n = logits.shape[:-1].numel()
    if targets.shape != (n,) or targets.device != logits.device:
        raise ValueError("targets must be (N,) on the logits' device")
    if logits.dim() == 2:
        return n, logits.shape[1], 0, logits.stride(0), max(n, 1)
    return n, logits.shape[2], logits.stride(0), logits.stride(1), max(logits.shape[1], 1)


def _block_v(V: int, with_stats: bool = False) -> int:
    # the extra statistics keep two more per-lane accumulators: a smaller block keeps them in
    # registers (sm_80 fp32 spilled at 4096)
    return min(triton.next_power_of_2(V), 2048 if with_stats else 4096)


@on_tensor_device
def logprobs_fwd(logits, targets, inv_temp, ignore_index: int, with_entropy: bool = True,
                 with_stats: bool = False):
    """logits (N, V) or (B, T, V), targets (N = B*T,) -> (logp, entropy or None, lse), each
    (N,) fp32, and with_stats the (N, 4) fp32 [sum p^2, mean logit, max logit, target is
    argmax column] (else None). inv_temp: a float or (N,) fp32 per-row factors."""
    n, v, stride_outer, stride_inner, inner = _rows_layout(logits, targets)
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    stats = torch.empty((n, 4), dtype=torch.float32, device=logits.device) if with_stats \
        else None
    if n > 0:
        _logprobs_fwd_kernel[(n,)](
            logits, stride_outer, stride_inner, inner, targets, logp,
            entropy if with_entropy else logp, lse, stats if with_stats else logp, v,
            ignore_index=ignore_index, WITH_ENTROPY=with_entropy, WITH_STATS=with_stats,
            BLOCK_V=_block_v(v, with_stats), num_warps=8, **temperature_args(inv_temp, lse),
        )
    return logp, entropy, lse, stats


@on_tensor_device
def logprobs_bwd(logits, targets, lse, entropy, g_logp, g_ent, g_lse, inv_temp,
                 ignore_index: int, inplace: bool = False, g_extra=None):
    """-> dlogits shaped and typed like logits: a new contiguous tensor, or (inplace) logits
    itself, overwritten (each element is read before it is written, by the same program).
    g_logp / g_ent / g_lse (N,) fp32 or None; entropy is needed only with g_ent; g_extra (N, 2)
    fp32 [g_sq, g_const] or None (adds g_sq p^2 + g_const to d loss / d z)."""
    n, v, stride_outer, stride_inner, inner = _rows_layout(logits, targets)
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                              device=logits.device)
    _, _, grad_outer, grad_inner, _ = _rows_layout(grad, targets)
    if n > 0:
        _logprobs_bwd_kernel[(n,)](
            logits, stride_outer, stride_inner, inner, targets, lse,
            entropy if g_ent is not None else lse,
            *(lse if g is None else g for g in (g_logp, g_ent, g_lse, g_extra)),
            grad, grad_outer, grad_inner, v, ignore_index=ignore_index,
            HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None,
            HAS_G_LSE=g_lse is not None, HAS_G_EXTRA=g_extra is not None,
            BLOCK_V=_block_v(v), num_warps=8,
            **temperature_args(inv_temp, lse),
        )
    return grad
