"""Minimal-memory linear log-probs: logit tiles z = softcap(h @ W.T + b) / T are computed by
tl.dot and consumed on chip; no (N, V) or (N, C) logits buffer ever exists.

forward   grid (row blocks, vocab splits): each program folds its vocab range into per-row
          statistics (m, s, u, z[y]; and s2, sz, argmax column with EXTRA); the caller merges
          the splits (4 or 7 x splits x N floats).
          FLOPs 2NHV.
backward  two passes, each recomputing its tiles (FLOPs 4NHV each, 8NHV total):
          dh pass, per wave of rows:   scratch[rows] += dz @ W[cols]   (programs split the vocab)
          dW pass, per wave of columns: scratch[cols] += dz.T @ h[rows] (programs split tokens)
          fp32 scratch of at most SCRATCH_BYTES per wave, cast to the input dtype at the end.
          Splits add with fp32 atomics; deterministic=True uses one split (no atomics).
"""

import os

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device
from ._launch_args import softcap_args, temperature_args
from .softmax_stats import capped_logits, fold_extra_rows, fold_rows, grad_z, rows_inv_temp

# 32 MiB: min_memory's whole promise is a small, shape-independent extra footprint (the
# scratch is most of it); waves of >= 2048 rows at H = 4096 still fill an H100's grid.
SCRATCH_BYTES = 32 << 20


@triton.jit
def _raw_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, H, stride_h, stride_w,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h[rows] @ W[cols].T + b[cols]."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    row_ok = rows[:, None] < n_rows
    col_ok = cols[:, None] < n_cols
    offs_k = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + offs_k
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok & (ks[None, :] < H), other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok & (ks[None, :] < H), other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong; never taken on a GPU
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fused_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, N, V, H, stride_h, stride_w, cols_per_split,
    inv_temp, inv_temp_ptr, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ROW_TEMP: tl.constexpr, EXTRA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index).to(tl.int64)
    it = rows_inv_temp(inv_temp, inv_temp_ptr, rows, rows < N, ROW_TEMP, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    sz = tl.zeros([BLOCK_N], dtype=tl.float32)
    idx = tl.full([BLOCK_N], -1, dtype=tl.int32)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(V, c_lo + cols_per_split)
    for c0 in range(c_lo, c_hi, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        raw = _raw_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, c_hi, H, stride_h, stride_w,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
        z, _ = capped_logits(raw, it, softcap, SOFTCAP)
        z = tl.where(cols[None, :] < c_hi, z, float("-inf"))
        m_old = m
        m, s, u = fold_rows(m, s, u, z)
        if EXTRA:
            s2, sz, idx = fold_extra_rows(m_old, m, s2, sz, idx, z, cols[None, :] < c_hi, c0)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    # part (4 or 7, n_splits, N): m, s, u, z_y[, s2, sz, idx]
    out = part_ptr + split * N + rows
    ok = rows < N
    tl.store(out, m, mask=ok)
    tl.store(out + n_splits * N, s, mask=ok)
    tl.store(out + 2 * n_splits * N, u, mask=ok)
    tl.store(out + 3 * n_splits * N, z_y, mask=ok)
    if EXTRA:
        tl.store(out + 4 * n_splits * N, s2, mask=ok)
        tl.store(out + 5 * n_splits * N, sz, mask=ok)
        tl.store(out + 6 * n_splits * N, idx.to(tl.float32), mask=ok)


@triton.jit
def _load_row_terms(y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr, gx_ptr, rows, row_ok,
                    ignore_index, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr,
                    HAS_G_LSE: tl.constexpr, HAS_G_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr):
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = (y != ignore_index) & row_ok
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    zeros = tl.zeros([BLOCK_N], dtype=tl.float32)
    ent = zeros
    gl = zeros
    ge = zeros
    gs = zeros
    g_sq = zeros
    g_const = zeros
    if HAS_G_EXTRA:  # (N, 2): g_sq, g_const
        g_sq = tl.load(gx_ptr + 2 * rows, mask=row_ok, other=0.0)
        g_const = tl.load(gx_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    if HAS_G_LOGP:
        gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    if HAS_G_ENT:
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    if HAS_G_LSE:
        gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
    return y, valid, lse, ent, gl, ge, gs, g_sq, g_const


@triton.jit
def _add_tile(ptrs, value, mask, ATOMIC: tl.constexpr):
    if ATOMIC:  # relaxed: only the sum after the kernel matters, no ordering (the default
        # acq_rel adds a fence around every vector add)
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:  # this program owns these entries: a plain read-modify-write is deterministic
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)
        # the next add to these entries may load them in another thread layout: make this
        # program's stores visible to all its threads first (nothing else orders them)
        tl.debug_barrier()


@triton.jit
def dot_operand(x, like_ptr, DOT_FP32: tl.constexpr):
    """An fp32 tile as a tl.dot operand: rounded to the dtype ``like_ptr`` points to (the only
    rounding of a gradient), then fp32 again on the interpreter (its bf16 tl.dot is wrong;
    never taken on a GPU)."""
    x = x.to(like_ptr.dtype.element_ty)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def add_product(acc_ptr, acc_rows, acc_ok, lhs, src_ptr, src_rows, src_ok, stride_src, H,
                ATOMIC: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    """acc[acc_rows, :H] += lhs @ src[src_rows, :H], BLOCK_H columns at a time (acc fp32 with
    row stride H): dh += dz @ W[cols] and dW += dz.T @ h[rows]."""
    offs_k = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + offs_k
        src = tl.load(src_ptr + src_rows[:, None] * stride_src + ks[None, :],
                      mask=src_ok[:, None] & (ks[None, :] < H), other=0.0)
        if DOT_FP32:
            src = src.to(tl.float32)
        _add_tile(acc_ptr + acc_rows[:, None] * H + ks[None, :],
                  tl.dot(lhs, src, input_precision=PRECISION),
                  acc_ok[:, None] & (ks[None, :] < H), ATOMIC)


@triton.jit
def _fused_dh_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr, gx_ptr, acc_ptr,
    row0, row1, V, H, stride_h, stride_w, cols_per_split, inv_temp, inv_temp_ptr, softcap,
    ignore_index, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ROW_TEMP: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr, HAS_G_EXTRA: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc[rows - row0] += dz[rows, split's columns] @ W[split's columns]."""
    rows = (row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < row1
    y, valid, lse, ent, gl, ge, gs, gq, gc = _load_row_terms(
        y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr, gx_ptr, rows, row_ok, ignore_index,
        HAS_G_LOGP, HAS_G_ENT, HAS_G_LSE, HAS_G_EXTRA, BLOCK_N)
    it = rows_inv_temp(inv_temp, inv_temp_ptr, rows, row_ok, ROW_TEMP, BLOCK_N)
    c_lo = tl.program_id(1) * cols_per_split
    c_hi = tl.minimum(V, c_lo + cols_per_split)
    for c0 in range(c_lo, c_hi, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < c_hi
        raw = _raw_tile(h_ptr, w_ptr, b_ptr, rows, cols, row1, c_hi, H, stride_h, stride_w,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
        z, dcap = capped_logits(raw, it, softcap, SOFTCAP)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        dz = grad_z(z, dcap, cols[None, :] == y[:, None], lse[:, None], ent[:, None], gl[:, None],
                    ge[:, None], gs[:, None], gq[:, None], gc[:, None], it, HAS_G_LOGP,
                    HAS_G_ENT, HAS_G_LSE, HAS_G_EXTRA, SOFTCAP)
        dz = tl.where(valid[:, None] & col_ok[None, :], dz, 0.0)
        add_product(acc_ptr, rows - row0, row_ok, dot_operand(dz, w_ptr, DOT_FP32), w_ptr, cols,
                    col_ok, stride_w, H, ATOMIC, BLOCK_H, DOT_FP32, PRECISION)


@triton.jit
def _fused_dw_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr, gx_ptr, acc_ptr, db_ptr,
    col0, col1, N, H, stride_h, stride_w, rows_per_split, inv_temp, inv_temp_ptr, softcap,
    ignore_index, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ROW_TEMP: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr, HAS_G_LSE: tl.constexpr, HAS_G_EXTRA: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc[cols - col0] += dz[split's rows, cols].T @ h[split's rows]; db[cols] += column sums."""
    cols = (col0 + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < col1
    r_lo = tl.program_id(1) * rows_per_split
    r_hi = tl.minimum(N, r_lo + rows_per_split)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < r_hi
        y, valid, lse, ent, gl, ge, gs, gq, gc = _load_row_terms(
            y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, gs_ptr, gx_ptr, rows, row_ok,
            ignore_index, HAS_G_LOGP, HAS_G_ENT, HAS_G_LSE, HAS_G_EXTRA, BLOCK_N)
        it = rows_inv_temp(inv_temp, inv_temp_ptr, rows, row_ok, ROW_TEMP, BLOCK_N)
        raw = _raw_tile(h_ptr, w_ptr, b_ptr, rows, cols, r_hi, col1, H, stride_h, stride_w,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
        z, dcap = capped_logits(raw, it, softcap, SOFTCAP)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        dz = grad_z(z, dcap, cols[None, :] == y[:, None], lse[:, None], ent[:, None], gl[:, None],
                    ge[:, None], gs[:, None], gq[:, None], gc[:, None], it, HAS_G_LOGP,
                    HAS_G_ENT, HAS_G_LSE, HAS_G_EXTRA, SOFTCAP)
        dz = tl.where(valid[:, None] & col_ok[None, :], dz, 0.0)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            add_product(acc_ptr, cols - col0, col_ok, tl.trans(dot_operand(dz, h_ptr, DOT_FP32)),
                        h_ptr, rows, row_ok, stride_h, H, ATOMIC, BLOCK_H, DOT_FP32, PRECISION)
    if NEED_DB:
        _add_tile(db_ptr + cols, db, col_ok, ATOMIC)


# ------------------------------------------------------------------------------- launchers

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gpu_config(dtype: torch.dtype) -> dict:
    """Tiles and launch options on a GPU (tests/aot_compile_kernels.py compiles exactly these):
    half inputs 64 x 128 x 64; fp32 (exact FMA-based products, no TF32) 32 x 64 x 64 with two
    stages: 64 x 128 x 64 needed 112 KiB of shared memory, over the 99 KiB of sm_86/89, and
    spilled up to 1 KB per thread on sm_90; these fit and spill nothing there."""
    if dtype == torch.float32:
        return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=64, DOT_FP32=False, PRECISION="ieee",
                    num_warps=8, num_stages=2)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, DOT_FP32=False, PRECISION="tf32",
                num_warps=8, num_stages=3)


def _config(dtype: torch.dtype) -> dict:
    if not _interpreting():
        return _gpu_config(dtype)
    # fp32 inputs: exact fp32 products (no TF32); half inputs ignore this
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=32, DOT_FP32=True,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: enough splits to exercise the merge and the atomics


def _split(length: int, block: int, other_programs: int, device) -> tuple[int, int]:
    """(number of splits, length per split, a multiple of block) to reach the target grid."""
    blocks = triton.cdiv(length, block)
    if blocks == 0:
        return 1, block
    splits = max(1, min(blocks, triton.cdiv(_target_programs(device), max(other_programs, 1))))
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(length, per_split), per_split


def _check(hidden, weight, bias, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError("hidden must be (N, H) and weight (V, H)")
    if not (hidden.is_contiguous() and weight.is_contiguous()):
        raise ValueError("hidden and weight must be contiguous")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float16, torch.bfloat16,
                                                            torch.float32):
        raise TypeError("hidden and weight must share a bf16/fp16/fp32 dtype")
    if targets.shape != hidden.shape[:1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError("targets must be (N,) and bias (V,)")


def _common(hidden, weight, bias, inv_temp, softcap, ignore_index):
    cap, has_cap = softcap_args(softcap)
    return dict(softcap=cap, ignore_index=ignore_index, HAS_BIAS=bias is not None,
                SOFTCAP=has_cap, **temperature_args(inv_temp, hidden), **_config(hidden.dtype))


@on_tensor_device
def linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp, softcap,
                        ignore_index: int, extra: bool = False):
    """-> (m, s, u, z_target[, s2, sz, idx]), each (n_splits, N) fp32: the softmax statistics
    of each vocab split (merged by the caller) and z[y] (0 in the splits that do not hold the
    target); with ``extra`` also s2 = sum exp(2 (z - m)), sz = sum z and the first column
    holding the split's max."""
    _check(hidden, weight, bias, targets)
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    (n, h), v = hidden.shape, weight.shape[0]
    cfg = _common(hidden, weight, bias, inv_temp, softcap, ignore_index)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    n_splits, per_split = _split(v, cfg["BLOCK_V"], row_blocks, hidden.device)
    part = torch.empty((7 if extra else 4, n_splits, n), dtype=torch.float32,
                       device=hidden.device)
    if n:
        _fused_fwd_kernel[(row_blocks, n_splits)](
            hidden, weight, bias if bias is not None else weight, targets, part, n, v, h,
            hidden.stride(0), weight.stride(0), per_split, EXTRA=extra, **cfg)
    return part.unbind(0)


def _waves(length: int, block: int, other: int, other_block: int, widths, deterministic: bool,
           device):
    """Waves over ``length`` rows of gradients with fp32 (rows, width) scratches, one per width
    (None for a width of 0), of at most SCRATCH_BYTES together: yields (start, stop, grid,
    other_per_split, zeroed scratches). The grid is (blocks of this wave, splits of ``other``);
    one split when deterministic (no atomics)."""
    per_wave = max(block, SCRATCH_BYTES // (4 * max(1, sum(widths))) // block * block)
    rows = min(length, per_wave)
    scratches = [torch.empty((rows, w), dtype=torch.float32, device=device) if w else None
                 for w in widths]
    for start in range(0, length, per_wave):
        stop = min(length, start + per_wave)
        blocks = triton.cdiv(stop - start, block)
        if deterministic:
            n_splits, per_split = 1, triton.cdiv(other, other_block) * other_block
        else:
            n_splits, per_split = _split(other, other_block, blocks, device)
        yield start, stop, (blocks, n_splits), per_split, [
            None if t is None else t[: stop - start].zero_() for t in scratches]


@on_tensor_device
def linear_logprobs_bwd(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse,
                        inv_temp, softcap, ignore_index: int, need_dh=True, need_dw=True,
                        need_db=True, deterministic=False, g_extra=None, fp32_dh=False):
    """-> (dhidden, dweight, dbias) in the input dtype (None where not needed). g_extra (N, 2)
    [g_sq, g_const] or None adds g_sq p^2 + g_const to d loss / d z."""
    _check(hidden, weight, bias, targets)
    bias = None if bias is None else bias.contiguous()  # read at unit stride
    (n, h), v = hidden.shape, weight.shape[0]
    cfg = _common(hidden, weight, bias, inv_temp, softcap, ignore_index)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    rows_terms = (targets, lse, entropy if entropy is not None else lse,
                  *(lse if g is None else g for g in (g_logp, g_ent, g_lse, g_extra)))
    flags = dict(HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None,
                 HAS_G_LSE=g_lse is not None, HAS_G_EXTRA=g_extra is not None)
    bias_arg = bias if bias is not None else weight
    dh = torch.empty(hidden.shape, dtype=torch.float32 if fp32_dh else hidden.dtype,
                     device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    need_db = need_db and bias is not None
    db32 = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_db else None
    common = dict(**flags, **cfg)

    if need_dh:  # waves of rows; programs split the vocab
        for row0, row1, grid, per_split, (acc,) in _waves(n, bn, v, bv, (h,), deterministic,
                                                          hidden.device):
            _fused_dh_kernel[grid](
                hidden, weight, bias_arg, *rows_terms, acc, row0, row1, v, h, hidden.stride(0),
                weight.stride(0), per_split, ATOMIC=grid[1] > 1, **common)
            dh[row0:row1] = acc
        acc = None  # free the dh scratch: the dW pass allocates its own
    if need_dw or need_db:  # waves of vocab rows; programs split the tokens
        for col0, col1, grid, per_split, (acc,) in _waves(v, bv, n, bn, (h,), deterministic,
                                                          hidden.device):
            _fused_dw_kernel[grid](
                hidden, weight, bias_arg, *rows_terms, acc, db32 if need_db else acc, col0,
                col1, n, h, hidden.stride(0), weight.stride(0), per_split, NEED_DW=need_dw,
                NEED_DB=need_db, ATOMIC=grid[1] > 1, **common)
            if need_dw:
                dw[col0:col1] = acc
    db = None if db32 is None else db32.to(bias.dtype)
    return dh, dw, db
