"""@triton.jit helpers shared by the log-prob kernels: capped logits, online softmax statistics,
and the logits gradient. Statistics of a set of logits z are (m, s, u) with m = max z,
s = sum exp(z - m), u = sum exp(z - m) * (z - m), so that lse = m + log s and
entropy = log s - u / s (u relative to m: no cancellation when |z| is large).
Extra statistics (EXTRA): s2 = sum exp(2 (z - m)), sz = sum z and the first column holding m, so
that sum p^2 = s2 / s^2 and the mean logit is sz / V; their gradient adds g_sq p^2 + g_const
per logit."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp overflow gives inf -> 1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def capped_logits(raw, inv_temp, softcap, SOFTCAP: tl.constexpr):
    """raw fp32 -> (z, dcap): z = softcap * tanh(raw / softcap) * inv_temp and the softcap's
    derivative dcap = 1 - tanh^2, computed as 4q / (1 + q)^2 with q = exp(-2|x|) so that it
    keeps its relative accuracy where tanh saturates (1 - t * t cancels to 0 there); dcap = 1
    without softcap. Unused outputs cost nothing (the compiler drops them)."""
    if SOFTCAP:
        x = raw / softcap
        q = tl.exp(-2.0 * tl.abs(x))
        dcap = 4.0 * q / ((1.0 + q) * (1.0 + q))
        z = tanh(x) * (softcap * inv_temp)
    else:
        dcap = tl.zeros_like(raw) + 1.0
        z = raw * inv_temp
    return z, dcap


@triton.jit
def row_inv_temp(inv_temp, inv_temp_ptr, row, ROW_TEMP: tl.constexpr):
    """The temperature factor of one row: the scalar ``inv_temp`` or ``inv_temp_ptr[row]``."""
    if ROW_TEMP:
        return tl.load(inv_temp_ptr + row)
    return inv_temp


@triton.jit
def rows_inv_temp(inv_temp, inv_temp_ptr, rows, mask, ROW_TEMP: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The temperature factors of a block of rows as a (BLOCK, 1) fp32 column, ready to
    broadcast over a (BLOCK, cols) tile."""
    if ROW_TEMP:
        it = tl.load(inv_temp_ptr + rows, mask=mask, other=1.0)
    else:
        it = tl.zeros([BLOCK], dtype=tl.float32) + inv_temp
    return it[:, None]


@triton.jit
def fold_block(m, s, u, z):
    """Fold z (BLOCK,) into per-lane accumulators s, u (BLOCK,) that share the scalar max m."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
    centered = z - m_safe
    e = tl.exp(centered)
    u = alpha * (u + s * shift) + tl.where(e > 0.0, e * centered, 0.0)
    s = s * alpha + e
    return m_new, s, u


@triton.jit
def fold_rows(m, s, u, z):
    """Fold a tile z (ROWS, COLS) into per-row statistics m, s, u (ROWS,)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
    centered = z - m_safe[:, None]
    e = tl.exp(centered)
    u = alpha * (u + s * shift) + tl.sum(tl.where(e > 0.0, e * centered, 0.0), axis=1)
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, u


@triton.jit
def fold_extra_block(m_old, m_new, s2, sz, idx, z, ok, col0):
    """Fold z (BLOCK,) of columns col0.. into per-lane s2 = sum exp(2 (z - m)) and sz = sum z
    over the ``ok`` lanes, as fold_block moves the shared max from m_old to m_new, and the
    scalar idx of the first column holding the max."""
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_old - m_safe)
    e = tl.exp(z - m_safe)
    idx = tl.where(m_new > m_old, (col0 + tl.argmax(z, axis=0)).to(tl.int32), idx)
    return s2 * (alpha * alpha) + e * e, sz + tl.where(ok, z, 0.0), idx


@triton.jit
def fold_extra_rows(m_old, m_new, s2, sz, idx, z, ok, col0):
    """fold_extra_block for a tile z (ROWS, COLS) of columns col0.. and per-row s2, sz, idx,
    m (ROWS,)."""
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_old - m_safe)
    e = tl.exp(z - m_safe[:, None])
    idx = tl.where(m_new > m_old, (col0 + tl.argmax(z, axis=1)).to(tl.int32), idx)
    return (s2 * (alpha * alpha) + tl.sum(e * e, axis=1),
            sz + tl.sum(tl.where(ok, z, 0.0), axis=1), idx)


@triton.jit
def merge_extra(m_a, s2_a, sz_a, idx_a, m_b, s2_b, sz_b, idx_b):
    """(s2, sz, idx) of the union of two sets with maxima m_a and m_b (the b columns come
    after the a columns: a tie keeps idx_a, the first)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(m_a - m_safe)
    w_b = tl.exp(m_b - m_safe)
    return (s2_a * (w_a * w_a) + s2_b * (w_b * w_b), sz_a + sz_b,
            tl.where(m_b > m_a, idx_b, idx_a))


@triton.jit
def merge_stats(m_a, s_a, u_a, m_b, s_b, u_b):
    """Statistics of the union of two sets (scalars or matching shapes)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(m_a - m_safe)
    w_b = tl.exp(m_b - m_safe)
    shift_a = tl.where(m_a == float("-inf"), 0.0, m_a - m_safe)
    shift_b = tl.where(m_b == float("-inf"), 0.0, m_b - m_safe)
    s = s_a * w_a + s_b * w_b
    u = w_a * (u_a + s_a * shift_a) + w_b * (u_b + s_b * shift_b)
    return m, s, u


@triton.jit
def row_stats(row_ptr, n_read, inv_temp, softcap, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
              EXTRA: tl.constexpr):
    """(m, s, u, s2, sz, idx) of the capped logits row_ptr[0:n_read] (n_read = 0 gives
    (-inf, 0, 0, 0, 0, -1)); s2, sz and idx (the first column holding m) are 0 / -1 unless
    EXTRA."""
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    u = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    sz = tl.zeros([BLOCK], dtype=tl.float32)
    idx = tl.max(tl.full([BLOCK], -1, tl.int32), axis=0)
    for start in range(0, n_read, BLOCK):
        cols = start + offs
        raw = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        z, _ = capped_logits(raw, inv_temp, softcap, SOFTCAP)
        z = tl.where(cols < n_read, z, float("-inf"))
        m_old = m
        m, s, u = fold_block(m, s, u, z)
        if EXTRA:
            s2, sz, idx = fold_extra_block(m_old, m, s2, sz, idx, z, cols < n_read, start)
    s_row = tl.sum(s, axis=0)
    # lanes were all rescaled to the final m inside fold_block, so sums combine directly
    return m, s_row, tl.sum(u, axis=0), tl.sum(s2, axis=0), tl.sum(sz, axis=0), idx


@triton.jit
def load_upstream(row, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, g_lse_ptr,
                  HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr):
    """Per-row terms of the logits gradient: (lse, entropy, g_logp, g_ent, g_lse); absent
    upstream gradients (and the entropy they would need) are 0."""
    lse = tl.load(lse_ptr + row)
    entropy = tl.zeros_like(lse)
    g_logp = tl.zeros_like(lse)
    g_ent = tl.zeros_like(lse)
    g_lse = tl.zeros_like(lse)
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row)
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    if HAS_G_LSE:
        g_lse = tl.load(g_lse_ptr + row)
    return lse, entropy, g_logp, g_ent, g_lse


@triton.jit
def load_extra_grad(row, g_extra_ptr, HAS_G_EXTRA: tl.constexpr):
    """(g_sq, g_const) of one row from the (N, 2) extra-statistics gradient (0 when absent)."""
    if HAS_G_EXTRA:
        return tl.load(g_extra_ptr + 2 * row), tl.load(g_extra_ptr + 2 * row + 1)
    return 0.0, 0.0


@triton.jit
def grad_z(z, dcap, is_target, lse, entropy, g_logp, g_ent, g_lse, g_sq, g_const, inv_temp,
           HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr,
           HAS_G_EXTRA: tl.constexpr, SOFTCAP: tl.constexpr):
    """d loss / d raw logit, for z and dcap from capped_logits; per-row terms already broadcast:
    dz = g_logp (onehot - p) - g_ent p (log p + entropy) + g_lse p + g_sq p^2 + g_const, times
    inv_temp and the softcap derivative dcap."""
    log_p = z - lse
    p = tl.exp(log_p)
    dz = tl.zeros_like(z)
    if HAS_G_LOGP:
        dz += tl.where(is_target, g_logp, 0.0) - g_logp * p
    if HAS_G_ENT:
        dz -= g_ent * tl.where(p > 0.0, p * (log_p + entropy), 0.0)
    if HAS_G_LSE:
        dz += g_lse * p
    if HAS_G_EXTRA:
        dz += g_sq * p * p + g_const
    dz = dz * inv_temp
    if SOFTCAP:
        dz = dz * dcap
    return dz
