"""Minimal-memory linear divergence: the logit tiles of both heads, z_p = head_p(h_p @ W_p.T + b_p)
and z_q = head_q(h_q @ W_q.T + b_q), are computed by tl.dot and consumed on chip; no (N, V) or
(N, C) buffer of either side ever exists.

forward   grid (row blocks, vocab splits): each program folds its vocabulary range into per-row
          partials that the caller merges (prefkern.ops.divergence_min_memory): (m, s) of each
          side (s = sum exp(z - m)), z_p[y], and for the kinds that need no log-softmax inside
          the sum a third running sum t, relative to the running maxima (a sum of raw logits
          would round with |z|), so one pass suffices:
            forward_kl  t = sum e_q ((z_q - m_q) - (z_p - m_p)):  D = t / s_q + log s_p - log s_q
            reverse_kl  t = sum e_p ((z_p - m_p) - (z_q - m_q)):  D = t / s_p + log s_q - log s_p
            alpha       x = alpha (z_p - m_p) + (1 - alpha) (z_q - m_q), m_t = max x,
                        t = sum exp(x - m_t):
                        log sum p^alpha q^(1 - alpha) = m_t + log t - alpha log s_p
                                                        - (1 - alpha) log s_q
          (e = exp(z - m)); when the maxima move by (d_p, d_q), the KLs' terms move by
          d_p - d_q (or d_q - d_p) and alpha's exponents by -(alpha d_p + (1 - alpha) d_q).
          jsd and tv take log p and log q inside the sum: a second pass (``sums``) recomputes
          the tiles with the rows' (m, log s) and sums D, c_p, c_q.
          FLOPs 2NHV per side (twice that for jsd and tv).
backward  two passes like prefkern._kernels.linear_logprobs_fused's, each recomputing both
          sides' tiles (FLOPs 4NHV per side each):
          dh pass, per wave of rows:    scratch_p[rows] += dz_p @ W_p (and dz_q @ W_q)
          dW pass, per wave of columns: scratch_p[cols] += dz_p.T @ h_p (and the reference's),
                                        db += column sums
          dz from the elementwise gradients of prefkern._kernels.divergence with the forward's
          c_p, c_q; the only rounding: dz to the input dtype for the tl.dot.
Row terms travel as one (8, N) fp32 tensor: m_p, log s_p, m_q, log s_q, c_p, c_q, g_D, g_logp.
"""

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from .divergence import KIND_IDS, _beta_args, _head_args, elementwise_grads, elementwise_terms
from .linear_logprobs_fused import (
    _add_tile,
    _config,
    _raw_tile,
    _split,
    _waves,
    add_product,
    dot_operand,
)
from .softmax_stats import capped_logits, rows_inv_temp

ROW_TERMS = 8
PARTIALS = 7  # m_p, s_p, m_q, s_q, m_t, t, z_p[y]
SUMS = 3  # D, c_p, c_q


@triton.jit
def _tile_pair(hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, rows, cols, n_rows, n_cols,
               H_p, H_q, stride_hp, stride_wp, stride_hq, stride_wq, it_p, softcap_p, it_q,
               softcap_q, HAS_BIAS_P: tl.constexpr, HAS_BIAS_Q: tl.constexpr,
               SOFTCAP_P: tl.constexpr, SOFTCAP_Q: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
               PRECISION: tl.constexpr):
    """-> (z_p, dz_p/draw_p, z_q, dz_q/draw_q), (BLOCK_N, BLOCK_V) fp32 tiles."""
    raw_p = _raw_tile(hp_ptr, wp_ptr, bp_ptr, rows, cols, n_rows, n_cols, H_p, stride_hp,
                      stride_wp, HAS_BIAS_P, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
    z_p, dcap_p = capped_logits(raw_p, it_p, softcap_p, SOFTCAP_P)
    raw_q = _raw_tile(hq_ptr, wq_ptr, bq_ptr, rows, cols, n_rows, n_cols, H_q, stride_hq,
                      stride_wq, HAS_BIAS_Q, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
    z_q, dcap_q = capped_logits(raw_q, it_q, softcap_q, SOFTCAP_Q)
    return z_p, dcap_p, z_q, dcap_q


@triton.jit
def _fold_plain(m, s, z):
    """Fold a tile z (ROWS, COLS) into per-row m = max z and s = sum exp(z - m)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)


@triton.jit
def _new_max(m, z):
    """-> (the running max after tile z, how far it moved: 0 from -inf, so that a sum still
    empty is not shifted by inf)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    return m_new, tl.where(m == float("-inf"), 0.0, m_new - m)


@triton.jit
def _fused_divergence_fwd_kernel(
    hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, y_ptr, part_ptr, N, V, H_p, H_q,
    stride_hp, stride_wp, stride_hq, stride_wq, cols_per_split,
    inv_temp_p, inv_temp_p_ptr, softcap_p, inv_temp_q, inv_temp_q_ptr, softcap_q, alpha,
    ignore_index, KIND: tl.constexpr, HAS_BIAS_P: tl.constexpr, HAS_BIAS_Q: tl.constexpr,
    ROW_TEMP_P: tl.constexpr, ROW_TEMP_Q: tl.constexpr, SOFTCAP_P: tl.constexpr,
    SOFTCAP_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    it_p = rows_inv_temp(inv_temp_p, inv_temp_p_ptr, rows, row_ok, ROW_TEMP_P, BLOCK_N)
    it_q = rows_inv_temp(inv_temp_q, inv_temp_q_ptr, rows, row_ok, ROW_TEMP_Q, BLOCK_N)
    m_p = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    m_q = m_p
    m_t = m_p
    s_p = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_q = s_p
    t = s_p
    z_y = s_p
    c_lo = split * cols_per_split
    c_hi = tl.minimum(V, c_lo + cols_per_split)
    for c0 in range(c_lo, c_hi, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols[None, :] < c_hi
        z_p, dcap_p, z_q, dcap_q = _tile_pair(
            hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, rows, cols, N, c_hi, H_p, H_q,
            stride_hp, stride_wp, stride_hq, stride_wq, it_p, softcap_p, it_q, softcap_q,
            HAS_BIAS_P, HAS_BIAS_Q, SOFTCAP_P, SOFTCAP_Q, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
            PRECISION)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z_p, 0.0), axis=1)
        z_p = tl.where(col_ok, z_p, float("-inf"))
        z_q = tl.where(col_ok, z_q, float("-inf"))
        # every sum is relative to the running maxima (never raw logits: their rounding scales
        # with |z|): when they move by (d_p, d_q), t's terms move by d_p - d_q (KLs) and
        # alpha's exponents by -(alpha d_p + (1 - alpha) d_q)
        mp_new, d_p = _new_max(m_p, z_p)
        mq_new, d_q = _new_max(m_q, z_q)
        zc_p = z_p - mp_new[:, None]  # rows past N hold finite zeros, never -inf maxima
        zc_q = z_q - mq_new[:, None]
        e_p = tl.exp(zc_p)
        e_q = tl.exp(zc_q)
        if KIND == 0:  # t = sum e_q ((z_q - m_q) - (z_p - m_p))
            t = tl.exp(-d_q) * (t + s_q * (d_p - d_q)) + \
                tl.sum(tl.where(e_q > 0.0, e_q * (zc_q - zc_p), 0.0), axis=1)
        elif KIND == 1:  # t = sum e_p ((z_p - m_p) - (z_q - m_q))
            t = tl.exp(-d_p) * (t + s_p * (d_q - d_p)) + \
                tl.sum(tl.where(e_p > 0.0, e_p * (zc_p - zc_q), 0.0), axis=1)
        elif KIND == 4:  # (m_t, t) of x = alpha (z_p - m_p) + (1 - alpha) (z_q - m_q)
            x = tl.where(col_ok, alpha * zc_p + (1.0 - alpha) * zc_q, float("-inf"))
            m_t, t = _fold_plain(m_t - (alpha * d_p + (1.0 - alpha) * d_q), t, x)
        s_p = tl.exp(-d_p) * s_p + tl.sum(e_p, axis=1)
        s_q = tl.exp(-d_q) * s_q + tl.sum(e_q, axis=1)
        m_p = mp_new
        m_q = mq_new
    if KIND != 4:
        m_t = m_p  # unused: a finite placeholder
    # part (PARTIALS, n_splits, N)
    out = part_ptr + split * N + rows
    stride = n_splits * N
    tl.store(out, m_p, mask=row_ok)
    tl.store(out + stride, s_p, mask=row_ok)
    tl.store(out + 2 * stride, m_q, mask=row_ok)
    tl.store(out + 3 * stride, s_q, mask=row_ok)
    tl.store(out + 4 * stride, m_t, mask=row_ok)
    tl.store(out + 5 * stride, t, mask=row_ok)
    tl.store(out + 6 * stride, z_y, mask=row_ok)


@triton.jit
def _load_row_terms(terms_ptr, y_ptr, rows, row_ok, N, ignore_index, HAS_G_DIV: tl.constexpr,
                    HAS_G_LOGP: tl.constexpr):
    """-> (y, valid, m_p, ls_p, m_q, ls_q, c_p, c_q, g_D, g_logp) of a block of rows, each
    (BLOCK_N,); the upstream gradients are 0 where absent."""
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = (y != ignore_index) & row_ok
    m_p = tl.load(terms_ptr + rows, mask=row_ok, other=0.0)
    ls_p = tl.load(terms_ptr + N + rows, mask=row_ok, other=0.0)
    m_q = tl.load(terms_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    ls_q = tl.load(terms_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    c_p = tl.load(terms_ptr + 4 * N + rows, mask=row_ok, other=0.0)
    c_q = tl.load(terms_ptr + 5 * N + rows, mask=row_ok, other=0.0)
    g_div = tl.zeros_like(c_p)
    g_logp = g_div
    if HAS_G_DIV:
        g_div = tl.load(terms_ptr + 6 * N + rows, mask=row_ok, other=0.0)
    if HAS_G_LOGP:
        g_logp = tl.load(terms_ptr + 7 * N + rows, mask=row_ok, other=0.0)
    return y, valid, m_p, ls_p, m_q, ls_q, c_p, c_q, g_div, g_logp


@triton.jit
def _log_probs(z_p, z_q, ok, m_p, ls_p, m_q, ls_q):
    """-> (a, b) = (log p, log q) on a tile, -inf outside ``ok``."""
    a = tl.where(ok, (z_p - m_p[:, None]) - ls_p[:, None], float("-inf"))
    b = tl.where(ok, (z_q - m_q[:, None]) - ls_q[:, None], float("-inf"))
    return a, b


@triton.jit
def _fused_divergence_sums_kernel(
    hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, y_ptr, terms_ptr, part_ptr, N, V, H_p, H_q,
    stride_hp, stride_wp, stride_hq, stride_wq, cols_per_split,
    inv_temp_p, inv_temp_p_ptr, softcap_p, inv_temp_q, inv_temp_q_ptr, softcap_q,
    beta, log1m_beta, log_beta, alpha, ignore_index, KIND: tl.constexpr,
    HAS_BIAS_P: tl.constexpr, HAS_BIAS_Q: tl.constexpr, ROW_TEMP_P: tl.constexpr,
    ROW_TEMP_Q: tl.constexpr, SOFTCAP_P: tl.constexpr, SOFTCAP_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """The second forward pass: per split, D = sum term, c_p = sum f_p, c_q = sum f_q."""
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y, valid, m_p, ls_p, m_q, ls_q, c_p_bwd, c_q_bwd, g_div, g_logp = _load_row_terms(
        terms_ptr, y_ptr, rows, row_ok, N, ignore_index, False, False)  # (backward's terms)
    it_p = rows_inv_temp(inv_temp_p, inv_temp_p_ptr, rows, row_ok, ROW_TEMP_P, BLOCK_N)
    it_q = rows_inv_temp(inv_temp_q, inv_temp_q_ptr, rows, row_ok, ROW_TEMP_Q, BLOCK_N)
    d = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_p = d
    c_q = d
    c_lo = split * cols_per_split
    c_hi = tl.minimum(V, c_lo + cols_per_split)
    for c0 in range(c_lo, c_hi, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        ok = valid[:, None] & (cols[None, :] < c_hi)
        z_p, dcap_p, z_q, dcap_q = _tile_pair(
            hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, rows, cols, N, c_hi, H_p, H_q,
            stride_hp, stride_wp, stride_hq, stride_wq, it_p, softcap_p, it_q, softcap_q,
            HAS_BIAS_P, HAS_BIAS_Q, SOFTCAP_P, SOFTCAP_Q, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
            PRECISION)
        a, b = _log_probs(z_p, z_q, ok, m_p, ls_p, m_q, ls_q)
        term, f_p, f_q = elementwise_terms(a, b, beta, log1m_beta, log_beta, alpha, KIND)
        d += tl.sum(tl.where(ok, term, 0.0), axis=1)
        c_p += tl.sum(tl.where(ok, f_p, 0.0), axis=1)
        c_q += tl.sum(tl.where(ok, f_q, 0.0), axis=1)
    out = part_ptr + split * N + rows
    stride = n_splits * N
    tl.store(out, d, mask=row_ok)
    tl.store(out + stride, c_p, mask=row_ok)
    tl.store(out + 2 * stride, c_q, mask=row_ok)


@triton.jit
def _dz_pair(z_p, dcap_p, z_q, dcap_q, ok, hit, m_p, ls_p, m_q, ls_q, c_p, c_q, g_div, g_logp,
             it_p, it_q, beta, log1m_beta, log_beta, alpha, KIND: tl.constexpr,
             HAS_G_DIV: tl.constexpr, HAS_G_LOGP: tl.constexpr):
    """-> (d loss / d raw_p, d loss / d raw_q) on a tile, 0 outside ``ok``."""
    a, b = _log_probs(z_p, z_q, ok, m_p, ls_p, m_q, ls_q)
    dz_p = tl.zeros_like(z_p)
    dz_q = dz_p
    if HAS_G_DIV:
        d_p, d_q = elementwise_grads(a, b, c_p[:, None], c_q[:, None], beta, log1m_beta,
                                     log_beta, alpha, KIND)
        g = g_div[:, None]  # a zero upstream gradient adds nothing, even where D is infinite
        dz_p = tl.where(g == 0.0, 0.0, g * d_p)
        dz_q = tl.where(g == 0.0, 0.0, g * d_q)
    if HAS_G_LOGP:
        dz_p += tl.where(hit, g_logp[:, None], 0.0) - g_logp[:, None] * tl.exp(a)
    dz_p = tl.where(ok, dz_p * dcap_p * it_p, 0.0)
    dz_q = tl.where(ok, dz_q * dcap_q * it_q, 0.0)
    return dz_p, dz_q


@triton.jit
def _fused_divergence_dh_kernel(
    hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, y_ptr, terms_ptr, acc_p_ptr, acc_q_ptr,
    row0, row1, N, V, H_p, H_q, stride_hp, stride_wp, stride_hq, stride_wq, cols_per_split,
    inv_temp_p, inv_temp_p_ptr, softcap_p, inv_temp_q, inv_temp_q_ptr, softcap_q,
    beta, log1m_beta, log_beta, alpha, ignore_index, KIND: tl.constexpr,
    NEED_P: tl.constexpr, NEED_Q: tl.constexpr, HAS_G_DIV: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, HAS_BIAS_P: tl.constexpr, HAS_BIAS_Q: tl.constexpr,
    ROW_TEMP_P: tl.constexpr, ROW_TEMP_Q: tl.constexpr, SOFTCAP_P: tl.constexpr,
    SOFTCAP_Q: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc_p[rows - row0] += dz_p[rows, split's columns] @ W_p[those columns]; acc_q likewise
    with the reference's W_q when NEED_Q."""
    rows = (row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < row1
    y, valid, m_p, ls_p, m_q, ls_q, c_p, c_q, g_div, g_logp = _load_row_terms(
        terms_ptr, y_ptr, rows, row_ok, N, ignore_index, HAS_G_DIV, HAS_G_LOGP)
    it_p = rows_inv_temp(inv_temp_p, inv_temp_p_ptr, rows, row_ok, ROW_TEMP_P, BLOCK_N)
    it_q = rows_inv_temp(inv_temp_q, inv_temp_q_ptr, rows, row_ok, ROW_TEMP_Q, BLOCK_N)
    c_lo = tl.program_id(1) * cols_per_split
    c_hi = tl.minimum(V, c_lo + cols_per_split)
    for c0 in range(c_lo, c_hi, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < c_hi
        z_p, dcap_p, z_q, dcap_q = _tile_pair(
            hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, rows, cols, row1, c_hi, H_p, H_q,
            stride_hp, stride_wp, stride_hq, stride_wq, it_p, softcap_p, it_q, softcap_q,
            HAS_BIAS_P, HAS_BIAS_Q, SOFTCAP_P, SOFTCAP_Q, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
            PRECISION)
        dz_p, dz_q = _dz_pair(z_p, dcap_p, z_q, dcap_q, valid[:, None] & col_ok[None, :],
                              cols[None, :] == y[:, None], m_p, ls_p, m_q, ls_q, c_p, c_q,
                              g_div, g_logp, it_p, it_q, beta, log1m_beta, log_beta, alpha,
                              KIND, HAS_G_DIV, HAS_G_LOGP)
        if NEED_P:
            add_product(acc_p_ptr, rows - row0, row_ok, dot_operand(dz_p, wp_ptr, DOT_FP32),
                        wp_ptr, cols, col_ok, stride_wp, H_p, ATOMIC, BLOCK_H, DOT_FP32,
                        PRECISION)
        if NEED_Q:
            add_product(acc_q_ptr, rows - row0, row_ok, dot_operand(dz_q, wq_ptr, DOT_FP32),
                        wq_ptr, cols, col_ok, stride_wq, H_q, ATOMIC, BLOCK_H, DOT_FP32,
                        PRECISION)


@triton.jit
def _fused_divergence_dw_kernel(
    hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, y_ptr, terms_ptr, acc_p_ptr, acc_q_ptr,
    db_p_ptr, db_q_ptr, col0, col1, N, H_p, H_q, stride_hp, stride_wp, stride_hq, stride_wq,
    rows_per_split, inv_temp_p, inv_temp_p_ptr, softcap_p, inv_temp_q, inv_temp_q_ptr,
    softcap_q, beta, log1m_beta, log_beta, alpha, ignore_index, KIND: tl.constexpr,
    NEED_DW_P: tl.constexpr, NEED_DB_P: tl.constexpr, NEED_Q: tl.constexpr,
    HAS_G_DIV: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_BIAS_P: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr, ROW_TEMP_P: tl.constexpr, ROW_TEMP_Q: tl.constexpr,
    SOFTCAP_P: tl.constexpr, SOFTCAP_Q: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc_p[cols - col0] += dz_p[split's rows, cols].T @ h_p[those rows], db_p[cols] += column
    sums; the reference's acc_q / db_q likewise when NEED_Q."""
    cols = (col0 + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < col1
    r_lo = tl.program_id(1) * rows_per_split
    r_hi = tl.minimum(N, r_lo + rows_per_split)
    db_p = tl.zeros([BLOCK_V], dtype=tl.float32)
    db_q = db_p
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < r_hi
        y, valid, m_p, ls_p, m_q, ls_q, c_p, c_q, g_div, g_logp = _load_row_terms(
            terms_ptr, y_ptr, rows, row_ok, N, ignore_index, HAS_G_DIV, HAS_G_LOGP)
        it_p = rows_inv_temp(inv_temp_p, inv_temp_p_ptr, rows, row_ok, ROW_TEMP_P, BLOCK_N)
        it_q = rows_inv_temp(inv_temp_q, inv_temp_q_ptr, rows, row_ok, ROW_TEMP_Q, BLOCK_N)
        z_p, dcap_p, z_q, dcap_q = _tile_pair(
            hp_ptr, wp_ptr, bp_ptr, hq_ptr, wq_ptr, bq_ptr, rows, cols, r_hi, col1, H_p, H_q,
            stride_hp, stride_wp, stride_hq, stride_wq, it_p, softcap_p, it_q, softcap_q,
            HAS_BIAS_P, HAS_BIAS_Q, SOFTCAP_P, SOFTCAP_Q, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
            PRECISION)
        dz_p, dz_q = _dz_pair(z_p, dcap_p, z_q, dcap_q, valid[:, None] & col_ok[None, :],
                              cols[None, :] == y[:, None], m_p, ls_p, m_q, ls_q, c_p, c_q,
                              g_div, g_logp, it_p, it_q, beta, log1m_beta, log_beta, alpha,
                              KIND, HAS_G_DIV, HAS_G_LOGP)
        if NEED_DB_P:
            db_p += tl.sum(dz_p, axis=0)
        if NEED_DW_P:
            add_product(acc_p_ptr, cols - col0, col_ok,
                        tl.trans(dot_operand(dz_p, hp_ptr, DOT_FP32)), hp_ptr, rows, row_ok,
                        stride_hp, H_p, ATOMIC, BLOCK_H, DOT_FP32, PRECISION)
        if NEED_Q:
            if HAS_BIAS_Q:
                db_q += tl.sum(dz_q, axis=0)
            add_product(acc_q_ptr, cols - col0, col_ok,
                        tl.trans(dot_operand(dz_q, hq_ptr, DOT_FP32)), hq_ptr, rows, row_ok,
                        stride_hq, H_q, ATOMIC, BLOCK_H, DOT_FP32, PRECISION)
    if NEED_DB_P:
        _add_tile(db_p_ptr + cols, db_p, col_ok, ATOMIC)
    if NEED_Q and HAS_BIAS_Q:
        _add_tile(db_q_ptr + cols, db_q, col_ok, ATOMIC)


# ------------------------------------------------------------------------------- launchers

def _check(policy, ref, targets):
    (hp, wp, _), (hq, wq, _) = policy, ref
    for name, (h, w, b) in (("policy", policy), ("reference", ref)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"the {name}'s hidden must be (N, H) and weight (V, H)")
        if not (h.is_contiguous() and w.is_contiguous()):
            raise ValueError(f"the {name}'s hidden and weight must be contiguous")
        if b is not None and b.shape != w.shape[:1]:
            raise ValueError(f"the {name}'s bias must be (V,)")
    if hq.dtype != hp.dtype or wp.dtype != hp.dtype or wq.dtype != hp.dtype or \
            hp.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError("both heads' hidden and weight must share a bf16/fp16/fp32 dtype")
    if hq.shape[0] != hp.shape[0] or wq.shape[0] != wp.shape[0] or \
            targets.shape != hp.shape[:1]:
        raise ValueError("both heads need the same rows and vocabulary, targets (N,)")


def _tiles(dtype: torch.dtype) -> dict:
    """linear_logprobs_fused's launch configuration with tiles sized for two live logit tiles:
    the largest without register spills on sm_90 (tests/aot_compile_kernels.py measures them:
    64 x 128 bf16 tiles spill 0.5-1 KB per thread backward; fp32's FMA-based dots need
    half the rows)."""
    cfg = _config(dtype)
    if cfg["DOT_FP32"]:  # the interpreter: its small tiles already
        return cfg
    return dict(cfg, BLOCK_N=32 if dtype == torch.float32 else 64, BLOCK_V=64, BLOCK_H=64,
                num_warps=8, num_stages=3)


def _sides_args(policy, ref, targets, head_p, head_q, ignore_index) -> dict:
    (hp, wp, bp), (hq, wq, bq) = policy, ref
    # the kernels read a bias at unit stride
    return dict(hp_ptr=hp, wp_ptr=wp, bp_ptr=wp if bp is None else bp.contiguous(), hq_ptr=hq,
                wq_ptr=wq, bq_ptr=wq if bq is None else bq.contiguous(), y_ptr=targets, N=hp.shape[0], H_p=hp.shape[1],
                H_q=hq.shape[1], stride_hp=hp.stride(0), stride_wp=wp.stride(0),
                stride_hq=hq.stride(0), stride_wq=wq.stride(0), ignore_index=ignore_index,
                HAS_BIAS_P=bp is not None, HAS_BIAS_Q=bq is not None,
                **_head_args(*head_p, targets, "p"), **_head_args(*head_q, targets, "q"),
                **_tiles(hp.dtype))


def _row_grid(n: int, v: int, cfg: dict, device) -> tuple[tuple[int, int], int]:
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    n_splits, per_split = _split(v, cfg["BLOCK_V"], row_blocks, device)
    return (row_blocks, n_splits), per_split


@on_tensor_device
def divergence_partials(policy, ref, targets, head_p, head_q, kind: str, alpha: float,
                        ignore_index: int):
    """policy, ref: (hidden (N, H), weight (V, H), bias (V,) or None); head_* = (inv_temp float
    or (N,) fp32, softcap or None) -> (PARTIALS, n_splits, N) fp32: m_p, s_p, m_q, s_q, m_t, t
    and z_p[y] (0 in the splits without the target) of each vocabulary split."""
    _check(policy, ref, targets)
    args = _sides_args(policy, ref, targets, head_p, head_q, ignore_index)
    n, v = policy[0].shape[0], policy[1].shape[0]
    grid, per_split = _row_grid(n, v, args, policy[0].device)
    part = torch.empty((PARTIALS, grid[1], n), dtype=torch.float32, device=policy[0].device)
    if n:
        _fused_divergence_fwd_kernel[grid](part_ptr=part, V=v, cols_per_split=per_split,
                                           alpha=float(alpha), KIND=KIND_IDS[kind], **args)
    return part


@on_tensor_device
def divergence_sums(policy, ref, targets, terms, head_p, head_q, kind: str, beta: float,
                    alpha: float, ignore_index: int):
    """The second forward pass (jsd, tv): terms (ROW_TERMS, N) fp32 led by the rows' m_p, log s_p,
    m_q, log s_q -> (SUMS, n_splits, N) fp32: D, c_p, c_q of each vocabulary split."""
    _check(policy, ref, targets)
    args = _sides_args(policy, ref, targets, head_p, head_q, ignore_index)
    n, v = policy[0].shape[0], policy[1].shape[0]
    grid, per_split = _row_grid(n, v, args, policy[0].device)
    part = torch.empty((SUMS, grid[1], n), dtype=torch.float32, device=policy[0].device)
    if n:
        _fused_divergence_sums_kernel[grid](
            terms_ptr=terms, part_ptr=part, V=v, cols_per_split=per_split, **_beta_args(beta),
            alpha=float(alpha), KIND=KIND_IDS[kind], **args)
    return part


@on_tensor_device
def divergence_bwd(policy, ref, targets, terms, head_p, head_q, kind: str, beta: float,
                   alpha: float, ignore_index: int, need_p, need_q: bool, has_g_div: bool,
                   has_g_logp: bool, fp32_dh: bool = False, deterministic: bool = False):
    """terms (ROW_TERMS, N) fp32: m_p, log s_p, m_q, log s_q, c_p, c_q, g_D, g_logp (each 0
    where absent); need_p (dh, dW, db) of the policy; need_q: all of the reference's ->
    [dh_p, dW_p, db_p, dh_q, dW_q, db_q], None where not needed (dh fp32 with fp32_dh, every
    other gradient in its tensor's dtype)."""
    _check(policy, ref, targets)
    (hp, wp, bp), (hq, wq, bq) = policy, ref
    args = _sides_args(policy, ref, targets, head_p, head_q, ignore_index)
    (n, h_p), h_q, v = hp.shape, hq.shape[1], wp.shape[0]
    bn, bv = args["BLOCK_N"], args["BLOCK_V"]
    need_dh, need_dw, need_db = need_p[0], need_p[1], need_p[2] and bp is not None
    common = dict(terms_ptr=terms, **_beta_args(beta), alpha=float(alpha), KIND=KIND_IDS[kind],
                  HAS_G_DIV=has_g_div, HAS_G_LOGP=has_g_logp, NEED_Q=need_q, **args)
    out = [None] * 6
    dtype = torch.float32 if fp32_dh else hp.dtype
    if need_dh:
        out[0] = torch.empty((n, h_p), dtype=dtype, device=hp.device)
    if need_q:
        out[3] = torch.empty((n, h_q), dtype=dtype, device=hp.device)
    if need_dh or need_q:  # waves of rows; programs split the vocabulary
        widths = (h_p if need_dh else 0, h_q if need_q else 0)
        for row0, row1, grid, per_split, (acc_p, acc_q) in _waves(
                n, bn, v, bv, widths, deterministic, hp.device):
            _fused_divergence_dh_kernel[grid](
                acc_p_ptr=terms if acc_p is None else acc_p,
                acc_q_ptr=terms if acc_q is None else acc_q, row0=row0, row1=row1, V=v,
                cols_per_split=per_split, NEED_P=need_dh, ATOMIC=grid[1] > 1, **common)
            for k, acc in ((0, acc_p), (3, acc_q)):
                if acc is not None:
                    out[k][row0:row1] = acc
        acc_p = acc_q = None  # free the dh scratches: the dW pass allocates its own
    db32 = [torch.zeros(v, dtype=torch.float32, device=hp.device) if needed else None
            for needed in (need_db, need_q and bq is not None)]
    if need_dw or need_db or need_q:  # waves of vocabulary rows; programs split the tokens
        if need_dw:
            out[1] = torch.empty_like(wp)
        if need_q:
            out[4] = torch.empty_like(wq)
        widths = (h_p if need_dw else 0, h_q if need_q else 0)
        for col0, col1, grid, per_split, (acc_p, acc_q) in _waves(
                v, bv, n, bn, widths, deterministic, hp.device):
            _fused_divergence_dw_kernel[grid](
                acc_p_ptr=terms if acc_p is None else acc_p,
                acc_q_ptr=terms if acc_q is None else acc_q,
                db_p_ptr=terms if db32[0] is None else db32[0],
                db_q_ptr=terms if db32[1] is None else db32[1], col0=col0, col1=col1,
                rows_per_split=per_split, NEED_DW_P=need_dw, NEED_DB_P=need_db,
                ATOMIC=grid[1] > 1, **common)
            for k, acc in ((1, acc_p), (4, acc_q)):
                if acc is not None:
                    out[k][col0:col1] = acc
    if db32[0] is not None:
        out[2] = db32[0].to(bp.dtype)
    if db32[1] is not None:
        out[5] = db32[1].to(bq.dtype)
    return out
