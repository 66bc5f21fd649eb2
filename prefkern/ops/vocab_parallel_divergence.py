"""Vocab parallelism for linear_divergence (see prefkern.ops.vocab_parallel for the layout:
each rank holds contiguous rows [start, start + V_r) of the policy's and the reference's
heads, the same hidden states and targets).

Forward, per chunk of rows (the same chunks on every rank): each rank's logit slices of both
sides; (max, sum exp) of each side all-gathered and merged into the global log-softmax
statistics; then the shard's a = log p, b = log q, its sums of the divergence terms, of
f_p and f_q (divergence_math) and the target's log-prob where it owns the target, all-reduced.
The row math is prefkern.ops.divergence_passes' (torch ops) on every backend.
Backward: the backend's vocab-slice backward on the shard with the global row statistics;
dweight and dbias stay local, the hidden states' gradients are all-reduced in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from prefkern.ops import divergence_math
from prefkern.ops import divergence_passes as passes
from prefkern.ops.softmax_stats import merge
from prefkern.ops.vocab_parallel import _all_gather, local_ignore, local_targets
from prefkern.reference.logprobs import compute_dtype


def global_log_softmax(z, group):
    """z (r, V_r) -> (log p of the shard in z's storage, m, log s) with the full row's m, s."""
    m_local = z.amax(-1)
    s_local = (z - m_local[:, None]).exp_().sum(-1)
    gathered = _all_gather(torch.stack([m_local, s_local]), group)  # (R, 2, r)
    m, s = gathered[0, 0], gathered[0, 1]
    for k in range(1, gathered.shape[0]):
        m, s, _ = merge(m, s, None, gathered[k, 0], gathered[k, 1], None)
    log_s = s.log()
    return z.sub_(m[:, None]).sub_(log_s[:, None]), m, log_s


def chunk_statistics(z_p, z_q, y, valid, div, need_q: bool, group) -> list:
    """One chunk of rows on every rank: z_p, z_q (r, V_r) this rank's logits (consumed), y (r,)
    local targets, valid (r,) -> [D, logp, m_p, log_s_p, m_q, log_s_q, c_p, c_q] (r,) of the
    full vocabulary, 0 where not valid (c_q 0 unless need_q)."""
    a, m_p, log_s_p = global_log_softmax(z_p, group)
    b, m_q, log_s_q = global_log_softmax(z_q, group)
    d, c_p, c_q = divergence_math.row_values(a, b, div, need_q)
    owned = valid & (y >= 0) & (y < a.shape[1])
    logp = torch.where(owned, a.gather(1, torch.where(owned, y, 0).long()[:, None])[:, 0], 0)
    sums = torch.stack([d, logp, c_p, torch.zeros_like(d) if c_q is None else c_q])
    dist.all_reduce(sums, group=group)
    parts = (sums[0], sums[1], m_p, log_s_p, m_q, log_s_q, sums[2], sums[3])
    return [torch.where(valid, part, 0) for part in parts]


def forward(policy, refs, local, head_p, head_q, div, ignore_index, need_q, group, vocab):
    """-> [D, logp, m_p, log_s_p, m_q, log_s_q, c_p, c_q], each (N,), the full vocabulary's."""
    n = policy.hidden.shape[0]
    cdt = compute_dtype(policy.hidden.dtype)
    device = policy.hidden.device
    out = [torch.zeros(n, dtype=cdt, device=device) for _ in range(8)]
    valid = local != ignore_index
    every = slice(None)
    for rows in passes._row_chunks(n, vocab, device):  # vocab: the same chunks on every rank
        z_p = passes._logits([policy], head_p, rows, every, cdt)[0]
        z_q = passes._logits(refs, head_q, rows, every, cdt)[0]
        parts = chunk_statistics(z_p, z_q, local[rows], valid[rows], div, need_q, group)
        for k, part in enumerate(parts):
            out[k][rows] = part
    return out


class VocabParallelDivergence(torch.autograd.Function):
    """(divergence, logp) of the full vocabulary from this rank's shards of both heads."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, head_p,
                head_q, div, ignore_index, group, start, vocab, backend):
        local = local_targets(targets, start, weight.shape[0], ignore_index)
        ignore_index = local_ignore(ignore_index)  # every pass below sees local targets
        policy = passes.Side(hidden, weight, bias)
        refs = [passes.Side(ref_hidden, ref_weight, ref_bias)]
        need_q = any(t is not None and t.requires_grad for t in (ref_hidden, ref_weight,
                                                                  ref_bias))
        outs = forward(policy, refs, local, head_p, head_q, div, ignore_index, need_q, group,
                       vocab)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, local,
                              *outs[2:])
        ctx.options = (head_p, head_q, div, ignore_index, group, backend)
        return outs[0], outs[1]

    @staticmethod
    def backward(ctx, g_div, g_logp):
        from prefkern.ops.linear_divergence import _impl

        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, local, *stats = ctx.saved_tensors
        head_p, head_q, div, ignore_index, group, backend = ctx.options
        need = list(ctx.needs_input_grad[:3])
        need[2] = need[2] and bias is not None
        need_ref = any(ctx.needs_input_grad[3:6])
        nothing = (None,) * 15
        if not (any(need) or need_ref) or (g_div is None and g_logp is None):
            return nothing
        g_div, g_logp = (None if g is None else g.to(stats[0].dtype).contiguous()
                         for g in (g_div, g_logp))
        policy = passes.Side(hidden, weight, bias)
        refs = [passes.Side(ref_hidden, ref_weight, ref_bias)]
        dh, dw, db, *ref_grads = _impl(backend, "fast").backward(
            policy, refs, local, head_p, head_q, div, ignore_index, stats, g_div, g_logp,
            tuple(need), need_ref, fp32_dh=True)
        grads = [dh] + (ref_grads[:1] if need_ref else [])
        for g in grads:  # every rank holds the same hidden states: their gradients sum shards
            if g is not None:
                dist.all_reduce(g, group=group)
        dh = None if dh is None else dh.to(hidden.dtype)
        ref_dh = ref_dw = ref_db = None
        if need_ref:
            ref_dh, ref_dw, ref_db = ref_grads
            ref_dh = ref_dh.to(ref_hidden.dtype)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                ref_dh if ctx.needs_input_grad[3] else None,
                ref_dw if ctx.needs_input_grad[4] else None,
                ref_db if ctx.needs_input_grad[5] else None, *(None,) * 9)
