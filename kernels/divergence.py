"""Full-vocabulary divergences between two rows of logits, one program per row.

Row r of z_p and z_q (raw logits of any float dtype, e.g. fp32 GEMM outputs or materialized
logits) goes through each side's head, z = softcap * tanh(raw / softcap) * inv_temp, then with
a = log_softmax(z_p), b = log_softmax(z_q), p = exp(a), q = exp(b):

forward   pass 1: (m, s) of both sides online (a = z - m - log s, never z - lse: lse rounds to
          the spacing of |z|); pass 2: D = sum term, c_p = sum f_p, c_q = sum f_q, and the
          target log-prob. Reads each row twice: 2 * 2 * V * elt bytes per row.
backward  on columns [col0, col0 + C) of the rows (a vocabulary slice or whole rows):
          dz_p = g_D (f_p - p c_p) + g_logp (onehot(y) - p), dz_q = g_D (f_q - q c_q), each times
          the head's derivative (dcap * inv_temp); reads and writes each element once.
The kinds (KIND: 0 forward_kl, 1 reverse_kl, 2 jsd, 3 tv, 4 alpha) and their term / f_p / f_q are
tabled in prefkern/ops/divergence_math.py, whose torch code these kernels mirror; the gradient
is written p (g - c) with g bounded where possible (see divergence_math.grads).
"""

import math

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from ._launch_args import softcap_args
from .softmax_stats import capped_logits, row_inv_temp, row_stats

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tv": 3, "alpha": 4}
# the forward keeps three running sums per lane: 1024 columns per step (4 per thread at 8
# warps) keeps every kind within the registers on sm_80/sm_90 (2048 spilled jsd on triton 3.6)
FWD_BLOCK = 1024


@triton.jit
def _weighted(w, x):
    return tl.where(w > 0.0, w * x, 0.0)


@triton.jit
def _log_mixture(a, b, log1m_beta, log_beta):
    """log((1 - beta) e^a + beta e^b) = hi + log1p(e^(lo - hi)) without overflow, accurate when
    one side is much smaller (a short series for log1p); -inf where both are -inf."""
    x = a + log1m_beta
    y = b + log_beta
    hi = tl.maximum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    e = tl.exp(tl.minimum(x, y) - hi_safe)
    log1p_e = tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
    return tl.where(hi == float("-inf"), float("-inf"), hi_safe + log1p_e)


@triton.jit
def _alpha_weight(a, b, alpha):
    """p^alpha q^(1 - alpha), 0 where both are 0 (the exponent would be inf - inf)."""
    both_zero = (a == float("-inf")) & (b == float("-inf"))
    return tl.where(both_zero, 0.0, tl.exp(tl.where(both_zero, 0.0, alpha * a + (1.0 - alpha) * b)))


@triton.jit
def elementwise_terms(a, b, beta, log1m_beta, log_beta, alpha, KIND: tl.constexpr):
    """-> (term, f_p, f_q) elementwise."""
    p = tl.exp(a)
    q = tl.exp(b)
    if KIND == 0:
        term = _weighted(q, b - a)
        f_p = p - q
        f_q = term
    elif KIND == 1:
        term = _weighted(p, a - b)
        f_p = term
        f_q = q - p
    elif KIND == 2:
        log_m = _log_mixture(a, b, log1m_beta, log_beta)
        f_p = (1.0 - beta) * _weighted(p, a - log_m)
        f_q = beta * _weighted(q, b - log_m)
        term = f_p + f_q
    elif KIND == 3:
        half_sign = tl.where(p > q, 0.5, tl.where(p < q, -0.5, 0.0))
        term = tl.abs(p - q) * 0.5
        f_p = p * half_sign
        f_q = -q * half_sign
    else:
        w = _alpha_weight(a, b, alpha)
        term = (p - w) / (alpha * (1.0 - alpha))
        f_p = w / (alpha - 1.0)
        f_q = -w / alpha
    return term, f_p, f_q


@triton.jit
def elementwise_grads(a, b, c_p, c_q, beta, log1m_beta, log_beta, alpha, KIND: tl.constexpr):
    """-> (dD/dz_p, dD/dz_q) per unit upstream gradient (divergence_math.grads)."""
    p = tl.exp(a)
    q = tl.exp(b)
    if KIND == 0:
        d_p = p - q
        d_q = _weighted(q, (b - a) - c_q)
    elif KIND == 1:
        d_p = _weighted(p, (a - b) - c_p)
        d_q = q - p
    elif KIND == 2:
        log_m = _log_mixture(a, b, log1m_beta, log_beta)
        d_p = _weighted(p, (1.0 - beta) * (a - log_m) - c_p)
        d_q = _weighted(q, beta * (b - log_m) - c_q)
    elif KIND == 3:
        half_sign = tl.where(p > q, 0.5, tl.where(p < q, -0.5, 0.0))
        d_p = p * (half_sign - c_p)
        d_q = q * (-half_sign - c_q)
    else:
        w = _alpha_weight(a, b, alpha)
        d_p = w / (alpha - 1.0) - p * c_p
        d_q = -w / alpha - q * c_q
    return d_p, d_q


@triton.jit
def _divergence_fwd_kernel(
    zp_ptr, zp_stride, zq_ptr, zq_stride, targets_ptr,
    div_ptr, logp_ptr, m_p_ptr, ls_p_ptr, m_q_ptr, ls_q_ptr, c_p_ptr, c_q_ptr,
    V, inv_temp_p, inv_temp_p_ptr, softcap_p, inv_temp_q, inv_temp_q_ptr, softcap_q,
    beta, log1m_beta, log_beta, alpha, ignore_index,
    KIND: tl.constexpr, NEED_Q: tl.constexpr, ROW_TEMP_P: tl.constexpr,
    ROW_TEMP_Q: tl.constexpr, SOFTCAP_P: tl.constexpr, SOFTCAP_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    it_p = row_inv_temp(inv_temp_p, inv_temp_p_ptr, row, ROW_TEMP_P)
    it_q = row_inv_temp(inv_temp_q, inv_temp_q_ptr, row, ROW_TEMP_Q)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    v_read = tl.where(valid, V, 0)  # ignored rows read nothing
    p_row = zp_ptr + row * zp_stride
    q_row = zq_ptr + row * zq_stride
    m_p, s_p, u_p, _, _, _ = row_stats(p_row, v_read, it_p, softcap_p, SOFTCAP_P, BLOCK_V, False)
    m_q, s_q, u_q, _, _, _ = row_stats(q_row, v_read, it_q, softcap_q, SOFTCAP_Q, BLOCK_V, False)
    ls_p = tl.log(s_p)
    ls_q = tl.log(s_q)
    offs = tl.arange(0, BLOCK_V)
    d = tl.zeros([BLOCK_V], dtype=tl.float32)
    c_p = tl.zeros([BLOCK_V], dtype=tl.float32)
    c_q = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, v_read, BLOCK_V):
        cols = start + offs
        inside = cols < v_read
        raw_p = tl.load(p_row + cols, mask=inside, other=0.0).to(tl.float32)
        raw_q = tl.load(q_row + cols, mask=inside, other=0.0).to(tl.float32)
        z_p, dcap_p = capped_logits(raw_p, it_p, softcap_p, SOFTCAP_P)
        z_q, dcap_q = capped_logits(raw_q, it_q, softcap_q, SOFTCAP_Q)
        a = tl.where(inside, (z_p - m_p) - ls_p, float("-inf"))
        b = tl.where(inside, (z_q - m_q) - ls_q, float("-inf"))
        term, f_p, f_q = elementwise_terms(a, b, beta, log1m_beta, log_beta, alpha, KIND)
        d += tl.where(inside, term, 0.0)
        c_p += tl.where(inside, f_p, 0.0)
        if NEED_Q:
            c_q += tl.where(inside, f_q, 0.0)
    # ignored rows read column 0 (a scalar mask is not portable to the interpreter)
    raw_y = tl.load(p_row + tl.where(valid, y, 0)).to(tl.float32)
    z_y, dcap_y = capped_logits(raw_y, it_p, softcap_p, SOFTCAP_P)
    zero = 0.0
    tl.store(div_ptr + row, tl.where(valid, tl.sum(d, axis=0), zero))
    tl.store(logp_ptr + row, tl.where(valid, (z_y - m_p) - ls_p, zero))
    tl.store(m_p_ptr + row, tl.where(valid, m_p, zero))
    tl.store(ls_p_ptr + row, tl.where(valid, ls_p, zero))
    tl.store(m_q_ptr + row, tl.where(valid, m_q, zero))
    tl.store(ls_q_ptr + row, tl.where(valid, ls_q, zero))
    tl.store(c_p_ptr + row, tl.where(valid, tl.sum(c_p, axis=0), zero))
    tl.store(c_q_ptr + row, tl.where(valid, tl.sum(c_q, axis=0), zero))


@triton.jit
def _divergence_bwd_kernel(
    zp_ptr, zp_stride, zq_ptr, zq_stride, targets_ptr,
    m_p_ptr, ls_p_ptr, m_q_ptr, ls_q_ptr, c_p_ptr, c_q_ptr, g_div_ptr, g_logp_ptr,
    dp_ptr, dp_stride, dq_ptr, dq_stride,
    C, col0, inv_temp_p, inv_temp_p_ptr, softcap_p, inv_temp_q, inv_temp_q_ptr, softcap_q,
    beta, log1m_beta, log_beta, alpha, ignore_index,
    KIND: tl.constexpr, NEED_Q: tl.constexpr, HAS_G_DIV: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, ROW_TEMP_P: tl.constexpr, ROW_TEMP_Q: tl.constexpr,
    SOFTCAP_P: tl.constexpr, SOFTCAP_Q: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    it_p = row_inv_temp(inv_temp_p, inv_temp_p_ptr, row, ROW_TEMP_P)
    it_q = row_inv_temp(inv_temp_q, inv_temp_q_ptr, row, ROW_TEMP_Q)
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = y != ignore_index
    m_p = tl.load(m_p_ptr + row)
    ls_p = tl.load(ls_p_ptr + row)
    m_q = tl.load(m_q_ptr + row)
    ls_q = tl.load(ls_q_ptr + row)
    c_p = tl.load(c_p_ptr + row)
    c_q = tl.load(c_q_ptr + row)
    g_div = tl.zeros_like(c_p)
    g_logp = tl.zeros_like(c_p)
    if HAS_G_DIV:
        g_div = tl.load(g_div_ptr + row)
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row)
    c_read = tl.where(valid, C, 0)  # ignored rows read nothing and write zeros
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, C, BLOCK_V):
        cols = start + offs
        inside = cols < c_read
        raw_p = tl.load(zp_ptr + row * zp_stride + cols, mask=inside, other=0.0).to(tl.float32)
        raw_q = tl.load(zq_ptr + row * zq_stride + cols, mask=inside, other=0.0).to(tl.float32)
        z_p, dcap_p = capped_logits(raw_p, it_p, softcap_p, SOFTCAP_P)
        z_q, dcap_q = capped_logits(raw_q, it_q, softcap_q, SOFTCAP_Q)
        a = tl.where(inside, (z_p - m_p) - ls_p, float("-inf"))
        b = tl.where(inside, (z_q - m_q) - ls_q, float("-inf"))
        d_p, d_q = elementwise_grads(a, b, c_p, c_q, beta, log1m_beta, log_beta, alpha, KIND)
        # a zero upstream gradient adds nothing, even where D is infinite
        dz_p = tl.where(g_div == 0.0, 0.0, g_div * d_p)
        if HAS_G_LOGP:
            dz_p += tl.where(cols + col0 == y, g_logp, 0.0) - g_logp * tl.exp(a)
        dz_p = tl.where(inside, dz_p * dcap_p * it_p, 0.0)
        tl.store(dp_ptr + row * dp_stride + cols, dz_p.to(dp_ptr.dtype.element_ty),
                 mask=cols < C)
        if NEED_Q:
            dz_q = tl.where(g_div == 0.0, 0.0, g_div * d_q * dcap_q * it_q)
            dz_q = tl.where(inside, dz_q, 0.0)
            tl.store(dq_ptr + row * dq_stride + cols, dz_q.to(dq_ptr.dtype.element_ty),
                     mask=cols < C)


def _beta_args(beta: float) -> dict:
    """beta and its logs, taken in fp64 on the host (log(1 - beta) loses digits in fp32 for a
    small beta); placeholders where the kind has no beta (jsd's beta is in (0, 1))."""
    inside = 0.0 < beta < 1.0
    return dict(beta=float(beta), log1m_beta=math.log1p(-beta) if inside else 0.0,
                log_beta=math.log(beta) if inside else 0.0)


def _block_v(V: int, cap: int = 2048) -> int:
    return min(triton.next_power_of_2(max(V, 1)), cap)


def _head_args(inv_temp, softcap, like, suffix: str) -> dict:
    cap, has_cap = softcap_args(softcap)
    per_row = isinstance(inv_temp, torch.Tensor)
    return {f"inv_temp_{suffix}": 1.0 if per_row else float(inv_temp),
            f"inv_temp_{suffix}_ptr": inv_temp if per_row else like,
            f"softcap_{suffix}": cap, f"ROW_TEMP_{suffix.upper()}": per_row,
            f"SOFTCAP_{suffix.upper()}": has_cap}


def _check_rows(z_p, z_q, targets):
    unit = all(z.stride(1) == 1 or z.shape[1] == 1 for z in (z_p, z_q))  # V = 1: no V stride
    if z_p.dim() != 2 or z_q.shape != z_p.shape or not unit:
        raise ValueError("z_p and z_q must be (N, V) of one shape with unit stride along V")
    if targets.shape != z_p.shape[:1]:
        raise ValueError("targets must be (N,)")


@on_tensor_device
def divergence_fwd(z_p, z_q, targets, head_p, head_q, kind: str, beta: float, alpha: float,
                   ignore_index: int, need_q: bool):
    """z_p, z_q (N, V) raw logits; head_* = (inv_temp float or (N,) fp32, softcap or None) ->
    [D, logp, m_p, log_s_p, m_q, log_s_q, c_p, c_q], each (N,) fp32."""
    _check_rows(z_p, z_q, targets)
    n, v = z_p.shape
    outs = [torch.empty(n, dtype=torch.float32, device=z_p.device) for _ in range(8)]
    if n > 0:
        _divergence_fwd_kernel[(n,)](
            z_p, z_p.stride(0), z_q, z_q.stride(0), targets, *outs, v,
            **_head_args(*head_p, outs[0], "p"), **_head_args(*head_q, outs[0], "q"),
            **_beta_args(beta), alpha=float(alpha), ignore_index=ignore_index,
            KIND=KIND_IDS[kind], NEED_Q=need_q, BLOCK_V=_block_v(v, FWD_BLOCK), num_warps=8)
    return outs


@on_tensor_device
def divergence_bwd(z_p, z_q, col0: int, targets, stats, g_div, g_logp, head_p, head_q,
                   kind: str, beta: float, alpha: float, ignore_index: int, out_p, out_q=None):
    """z_p, z_q (N, C): columns [col0, col0 + C) of the rows' raw logits; stats the forward's
    [m_p, log_s_p, m_q, log_s_q, c_p, c_q]; g_div, g_logp (N,) fp32 or None -> writes
    d loss / d raw logits into out_p (and out_q), (N, C) of any float dtype (may be z_p / z_q
    themselves: each element is read before it is written, by the same program)."""
    _check_rows(z_p, z_q, targets)
    n, c = z_p.shape
    need_q = out_q is not None
    if n > 0 and c > 0:
        _divergence_bwd_kernel[(n,)](
            z_p, z_p.stride(0), z_q, z_q.stride(0), targets, *stats,
            stats[0] if g_div is None else g_div, stats[0] if g_logp is None else g_logp,
            out_p, out_p.stride(0), out_p if out_q is None else out_q,
            out_p.stride(0) if out_q is None else out_q.stride(0), c, col0,
            **_head_args(*head_p, stats[0], "p"), **_head_args(*head_q, stats[0], "q"),
            **_beta_args(beta), alpha=float(alpha), ignore_index=ignore_index,
            KIND=KIND_IDS[kind], NEED_Q=need_q, HAS_G_DIV=g_div is not None,
            HAS_G_LOGP=g_logp is not None, BLOCK_V=_block_v(c), num_warps=8)
    return out_p, out_q
