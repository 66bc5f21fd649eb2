"""Row kernels over one vocab slice of materialized logits (the fast linear log-prob mode: cuBLAS
computes the slice raw = hidden @ weight[c0:c1].T + bias[c0:c1], these kernels do the rest).

slice_stats: fold the slice's capped logits z = softcap(raw) / T into running per-row
    statistics (m, s, u; and s2, sz for the extra statistics) and pick z[y] when the target
    falls in the slice.
slice_grad:  write d loss / d raw of the slice (into it, or a buffer of the input dtype), given
    lse, entropy and upstream grads:
    dz = g_logp (onehot - p) - g_ent p (log p + entropy) + g_lse p + g_sq p^2 + g_const,
    times 1/T and d softcap.
The slice is fp32 (the logits are never rounded to the input dtype). Bytes per slice: stats
reads 4*N*C; grad reads 4*N*C and writes N*C*elt.
"""

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from ._launch_args import softcap_args, temperature_args
from .softmax_stats import (
    capped_logits,
    grad_z,
    load_extra_grad,
    load_upstream,
    merge_extra,
    merge_stats,
    row_inv_temp,
    row_stats,
)


@triton.jit
def _slice_stats_kernel(
    raw_ptr, stride_row, targets_ptr, m_ptr, s_ptr, u_ptr, zy_ptr, s2_ptr, sz_ptr, idx_ptr,
    C, col0, inv_temp, inv_temp_ptr, softcap, ignore_index,
    SOFTCAP: tl.constexpr, ROW_TEMP: tl.constexpr, EXTRA: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = row_inv_temp(inv_temp, inv_temp_ptr, row, ROW_TEMP)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    row_ptr = raw_ptr + row * stride_row
    m_b, s_b, u_b, s2_b, sz_b, idx_b = row_stats(row_ptr, tl.where(valid, C, 0), inv_temp,
                                                 softcap, SOFTCAP=SOFTCAP, BLOCK=BLOCK,
                                                 EXTRA=EXTRA)
    m_a = tl.load(m_ptr + row)
    if EXTRA:  # idx is kept as fp32 (exact below 2^24 columns)
        s2, sz, idx = merge_extra(m_a, tl.load(s2_ptr + row), tl.load(sz_ptr + row),
                                  tl.load(idx_ptr + row), m_b, s2_b, sz_b,
                                  (col0 + idx_b).to(tl.float32))
        tl.store(s2_ptr + row, s2)
        tl.store(sz_ptr + row, sz)
        tl.store(idx_ptr + row, idx)
    m, s, u = merge_stats(m_a, tl.load(s_ptr + row), tl.load(u_ptr + row), m_b, s_b, u_b)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(u_ptr + row, u)
    local = y - col0
    hit = valid & (local >= 0) & (local < C)
    raw_y = tl.load(row_ptr + tl.where(hit, local, 0)).to(tl.float32)
    z_y, _ = capped_logits(raw_y, inv_temp, softcap, SOFTCAP)
    tl.store(zy_ptr + row, tl.where(hit, z_y, tl.load(zy_ptr + row)))


@triton.jit
def _slice_grad_kernel(
    raw_ptr, stride_row, dz_ptr, stride_dz_row, targets_ptr, lse_ptr, entropy_ptr, g_logp_ptr,
    g_ent_ptr, g_lse_ptr, g_extra_ptr, C, col0, inv_temp, inv_temp_ptr, softcap, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr,
    HAS_G_EXTRA: tl.constexpr, SOFTCAP: tl.constexpr, ROW_TEMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = row_inv_temp(inv_temp, inv_temp_ptr, row, ROW_TEMP)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    lse, entropy, g_logp, g_ent, g_lse = load_upstream(
        row, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, g_lse_ptr, HAS_G_LOGP, HAS_G_ENT,
        HAS_G_LSE)
    g_sq, g_const = load_extra_grad(row, g_extra_ptr, HAS_G_EXTRA)
    row_ptr = raw_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        raw = tl.load(row_ptr + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        z, dcap = capped_logits(raw, inv_temp, softcap, SOFTCAP)
        dz = grad_z(z, dcap, cols + col0 == y, lse, entropy, g_logp, g_ent, g_lse, g_sq,
                    g_const, inv_temp, HAS_G_LOGP=HAS_G_LOGP, HAS_G_ENT=HAS_G_ENT,
                    HAS_G_LSE=HAS_G_LSE, HAS_G_EXTRA=HAS_G_EXTRA, SOFTCAP=SOFTCAP)
        dz = tl.where(valid, dz, 0.0)
        tl.store(dz_ptr + row * stride_dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=cols < C)


def _block(c: int) -> int:
    return min(triton.next_power_of_2(max(c, 16)), 4096)


@on_tensor_device
def slice_stats_(raw, targets, col0: int, stats, inv_temp, softcap, ignore_index: int):
    """Fold raw (N, C) logits of columns col0.. into stats = (m, s, u, zy[, s2, sz, idx]),
    each (N,) fp32, in place. inv_temp: a float or (N,) fp32 per-row factors."""
    n, c = raw.shape
    if raw.stride(1) != 1 or targets.shape != (n,):
        raise ValueError("raw must be (N, C) with unit column stride and targets (N,)")
    cap, has_cap = softcap_args(softcap)
    if n:
        extra = len(stats) == 7
        _slice_stats_kernel[(n,)](raw, raw.stride(0), targets, *stats[:4],
                                  *(stats[4:] if extra else stats[:3]), c, col0,
                                  softcap=cap, ignore_index=ignore_index, SOFTCAP=has_cap,
                                  EXTRA=extra, BLOCK=_block(c), num_warps=8,
                                  **temperature_args(inv_temp, stats[0]))


@on_tensor_device
def slice_grad_(raw, dz, targets, col0: int, lse, entropy, g_logp, g_ent, g_lse,
                inv_temp, softcap, ignore_index: int, g_extra=None):
    """Write d loss / d raw for columns col0..col0+C of raw (N, C) into dz (N, C) (raw itself
    or a buffer of another dtype; each element is read before it is written)."""
    n, c = raw.shape
    if raw.stride(1) != 1 or targets.shape != (n,):
        raise ValueError("raw must be (N, C) with unit column stride and targets (N,)")
    if dz.shape != raw.shape or dz.stride(1) != 1:
        raise ValueError("dz must be shaped like raw, with unit column stride")
    cap, has_cap = softcap_args(softcap)
    dummy = lse
    if n:
        _slice_grad_kernel[(n,)](
            raw, raw.stride(0), dz, dz.stride(0), targets, lse,
            entropy if entropy is not None else dummy,
            *(dummy if g is None else g for g in (g_logp, g_ent, g_lse, g_extra)),
            c, col0, softcap=cap, ignore_index=ignore_index,
            HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None,
            HAS_G_LSE=g_lse is not None, HAS_G_EXTRA=g_extra is not None, SOFTCAP=has_cap,
            BLOCK=_block(c), num_warps=8,
            **temperature_args(inv_temp, lse))


def new_stats(n: int, device, extra: bool = False) -> tuple[torch.Tensor, ...]:
    """Empty running statistics (m, s, u, zy), plus (s2, sz, idx) with ``extra``."""
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    zeros = [torch.zeros(n, dtype=torch.float32, device=device) for _ in range(6 if extra else 3)]
    return (m, *zeros)
