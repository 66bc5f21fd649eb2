"""The passes of linear_divergence on (hidden, weight) pairs: whole rows forward, vocabulary
slices backward, never an (N, V) tensor.

Forward, per chunk of rows: z_p (r, V) and z_q (r, V) in fp32 (fp64 for fp64 inputs), then per
row the log-softmax statistics (m, log s) of both, D, c_p = sum f_p, c_q = sum f_q
(divergence_math) and the target log-prob.
FLOPs 2NHV per model side. Peak extra memory: a few (r, V) fp32 chunks.
Backward, per vocabulary slice over all rows: recompute the two logit slices, form
dz_p = g_D (f_p - p c_p) + g_logp (onehot(y) - p) (and dz_q = g_D (f_q - q c_q) when the
reference takes a gradient), times the head's derivative, then dW_c = dz.T @ h (one GEMM per
slice, complete), dh += dz @ W_c in fp32, db_c = dz.sum(0). FLOPs 2NHV recompute per side +
4NHV per side that takes a gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from prefkern.ops import divergence_math, gemm
from prefkern.ops.torch_chunked import CHUNK_ELEMENTS, _is_unit, head_transform_, rows_factor
from prefkern.reference.divergence import Divergence
from prefkern.reference.logprobs import compute_dtype

# vocabulary block of one CPU GEMM for half inputs (their operands are upcast block by block)
CPU_VOCAB_BLOCK = 4096


class Side(NamedTuple):
    """One linear head: raw logits ``hidden @ weight.T + bias``, scaled per row by ``coeff``
    (an (N,) tensor) when it is a member of a mixture."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    coeff: Tensor | None = None


class HeadArgs(NamedTuple):
    """The folded head of one side (prefkern.ops.head): factor a float or (N,) per row."""

    factor: float | Tensor
    softcap: float | None


def _raw(side: Side, rows: slice, cols: slice, cdt: torch.dtype) -> Tensor:
    h, w = side.hidden[rows], side.weight[cols]
    if h.device.type == "cpu" and h.dtype != cdt:
        z = torch.empty(h.shape[0], w.shape[0], dtype=cdt, device=h.device)
        for c0 in range(0, w.shape[0], CPU_VOCAB_BLOCK):
            z[:, c0:c0 + CPU_VOCAB_BLOCK] = gemm.fp32_mm(h, w[c0:c0 + CPU_VOCAB_BLOCK].T)
    else:
        z = gemm.fp32_mm(h, w.T)
    if side.bias is not None:
        z += side.bias[cols].to(cdt)
    if side.coeff is not None:
        z *= side.coeff[rows, None].to(cdt)
    return z


def mixed_logits(sides, rows, cols, cdt) -> Tensor:
    """Raw logits of one side, or of a mixture (sum of its members' coeff * raw), rows x cols."""
    z = _raw(sides[0], rows, cols, cdt)
    for side in sides[1:]:
        z += _raw(side, rows, cols, cdt)
    return z


def _logits(sides, head: HeadArgs, rows, cols, cdt, with_grad=False):
    """-> (z, dz/draw or None) of a side (or a mixture) on rows x cols."""
    return head_transform_(mixed_logits(sides, rows, cols, cdt), rows_factor(head.factor, rows),
                           head.softcap, with_grad)


def _row_chunks(n: int, width: int, device: torch.device):
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    step = max(1, budget // max(4 * width, 1))  # ~4 live (r, V) buffers
    return (slice(r0, min(n, r0 + step)) for r0 in range(0, n, step))


def log_softmax_(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z (r, V) -> (log p in z's storage, m, log s): log p = (z - m) - log s with
    m = max z and s = sum exp(z - m). Not z - lse: lse rounds to the spacing of |z| (1e-4 at
    1e3 in fp32), which shifts every log p by that much and a divergence by it times (b - a)."""
    m = z.amax(-1)
    z.sub_(m[:, None])
    log_s = z.exp().sum(-1).log_()
    return z.sub_(log_s[:, None]), m, log_s


def forward_rows(n: int, row_chunks, logits_of, targets: Tensor, div: Divergence,
                 ignore_index: int, need_q: bool, cdt: torch.dtype, device) -> list[Tensor]:
    """Whole rows: ``logits_of(rows) -> (z_p, z_q)`` (r, V) in the compute dtype, consumed ->
    [D, logp, m_p, log_s_p, m_q, log_s_q, c_p, c_q], each (N,) in ``cdt``; 0 on ignored rows
    (c_q is 0 unless need_q). The last six are the backward's row statistics."""
    out = [torch.zeros(n, dtype=cdt, device=device) for _ in range(8)]
    valid = targets != ignore_index
    for rows in row_chunks:
        z_p, z_q = logits_of(rows)
        a, m_p, log_s_p = log_softmax_(z_p)
        b, m_q, log_s_q = log_softmax_(z_q)
        d, c_p, c_q = divergence_math.row_values(a, b, div, need_q)
        keep = valid[rows]
        logp = a.gather(1, torch.where(keep, targets[rows], 0).long()[:, None])[:, 0]
        parts = (d, logp, m_p, log_s_p, m_q, log_s_q, c_p,
                 torch.zeros_like(d) if c_q is None else c_q)
        for k, part in enumerate(parts):
            out[k][rows] = torch.where(keep, part, 0)
    return out


def forward(policy: Side, refs: list[Side], targets: Tensor, head_p: HeadArgs,
            head_q: HeadArgs, div: Divergence, ignore_index: int, need_q: bool):
    """-> forward_rows' outputs for a policy head and a reference head (or mixture)."""
    n, v = policy.hidden.shape[0], policy.weight.shape[0]
    cdt = compute_dtype(policy.hidden.dtype)
    every = slice(None)

    def logits_of(rows):
        return (_logits([policy], head_p, rows, every, cdt)[0],
                _logits(refs, head_q, rows, every, cdt)[0])

    return forward_rows(n, _row_chunks(n, v, policy.hidden.device), logits_of, targets, div,
                        ignore_index, need_q, cdt, policy.hidden.device)


def grads_of_logits(z_p, z_q, col0: int, stats, rows: slice, targets, valid, gd, gl,
                    div: Divergence, need_q: bool):
    """d loss / d z on a block of rows x columns from col0, consumes z_p, z_q: ->
    (dz_p, dz_q or None) for upstream gd (on D) and gl (on logp), (N,) or None, already 0 on
    ignored rows; stats (m_p, log_s_p, m_q, log_s_q, c_p, c_q) (N,) from forward_rows."""
    m_p, log_s_p, m_q, log_s_q, c_p, c_q = (t[rows, None] for t in stats)
    a = z_p.sub_(m_p).sub_(log_s_p)
    b = z_q.sub_(m_q).sub_(log_s_q)
    dz_p, dz_q = None, None
    if gd is not None:
        dz_p, dz_q = divergence_math.grads(a, b, c_p[:, 0], c_q[:, 0], div, need_q)
        g = gd[rows, None]  # a zero upstream gradient adds nothing, even where D is infinite
        dz_p = torch.where(g == 0, 0, dz_p.mul_(g))
        if dz_q is not None:
            dz_q = torch.where(g == 0, 0, dz_q.mul_(g))
    if gl is not None:
        softmax_part = a.exp().mul_(gl[rows, None])
        dz_p = softmax_part.neg_() if dz_p is None else dz_p.sub_(softmax_part)
        local = targets[rows].long() - col0
        hit = valid[rows] & (local >= 0) & (local < dz_p.shape[1])
        dz_p.scatter_add_(1, torch.where(hit, local, 0)[:, None],
                          torch.where(hit, gl[rows], 0)[:, None])
    if need_q and dz_q is None:
        dz_q = torch.zeros_like(b)
    return dz_p, dz_q


def _vocab_slices(n: int, vocab: int, device: torch.device):
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    width = min(vocab, max(128, budget // max(n, 1)))
    return (slice(c0, min(vocab, c0 + width)) for c0 in range(0, vocab, width))


class SideGrads:
    """dh (fp32 accumulated), dW and db of one side, filled slice by slice."""

    def __init__(self, side: Side, need: tuple[bool, bool, bool]):
        self.side = side
        h, w, b = side.hidden, side.weight, side.bias
        self.dh32 = torch.zeros(h.shape, dtype=compute_dtype(h.dtype), device=h.device) \
            if need[0] else None
        self.dw = torch.empty_like(w) if need[1] else None
        self.db = torch.empty_like(b) if (need[2] and b is not None) else None

    def add(self, cols: slice, dz: Tensor) -> None:
        """dz (N, C) d loss / d raw logits of this side on vocabulary columns ``cols``."""
        h, w = self.side.hidden, self.side.weight
        if self.side.coeff is not None:
            dz = dz * self.side.coeff[:, None].to(dz.dtype)
        if self.db is not None:
            self.db[cols] = dz.sum(0).to(self.db.dtype)
        dz_in = dz if dz.dtype == h.dtype else dz.to(h.dtype)  # the only rounding: the GEMM input
        if self.dw is not None:
            torch.mm(dz_in.T, h, out=self.dw[cols])
        if self.dh32 is not None:
            gemm.accumulate_mm(self.dh32, dz_in, w[cols])

    def result(self, fp32_dh: bool = False) -> list[Tensor | None]:
        """[dh (fp32 with ``fp32_dh``, else the input dtype), dW, db]."""
        dh = self.dh32
        if dh is not None and not fp32_dh:
            dh = dh.to(self.side.hidden.dtype)
        return [dh, self.dw, self.db]


def _finish_dz(dz: Tensor, dcap, factor, valid: Tensor) -> Tensor:
    """d/draw from d/dz: the softcap derivative and the temperature; 0 on ignored rows."""
    if dcap is not None:
        dz.mul_(dcap)
    if not _is_unit(factor):
        dz.mul_(factor)
    return dz.masked_fill_(~valid[:, None], 0)


def backward(policy: Side, refs: list[Side], targets: Tensor, head_p: HeadArgs,
             head_q: HeadArgs, div: Divergence, ignore_index: int, stats, g_div, g_logp,
             need_p: tuple[bool, bool, bool], need_ref: bool, fp32_dh: bool = False):
    """stats: forward_rows' row statistics; g_div, g_logp (N,) or None ->
    [dh, dW, db of the policy] + [dh, dW, db of each ref side if need_ref] (None if not needed)."""
    n, v = policy.hidden.shape[0], policy.weight.shape[0]
    cdt = compute_dtype(policy.hidden.dtype)
    valid = targets != ignore_index
    gd, gl = (None if g is None else torch.where(valid, g.to(cdt), 0) for g in (g_div, g_logp))
    grads_p = SideGrads(policy, need_p)
    grads_q = [SideGrads(side, (True, True, True)) for side in refs] if need_ref else []
    every = slice(None)
    for cols in _vocab_slices(n, v, policy.hidden.device):
        z_p, dcap_p = _logits([policy], head_p, every, cols, cdt, with_grad=True)
        z_q, dcap_q = _logits(refs, head_q, every, cols, cdt, with_grad=need_ref)
        dz_p, dz_q = grads_of_logits(z_p, z_q, cols.start, stats, every, targets, valid, gd, gl,
                                     div, need_ref)
        grads_p.add(cols, _finish_dz(dz_p, dcap_p, rows_factor(head_p.factor, every), valid))
        if grads_q:
            dz_q = _finish_dz(dz_q, dcap_q, rows_factor(head_q.factor, every), valid)
            for g in grads_q:
                g.add(cols, dz_q)
    return grads_p.result(fp32_dh) + [t for g in grads_q for t in g.result(fp32_dh)]
