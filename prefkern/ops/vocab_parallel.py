"""Vocab parallelism for linear_logprobs on torch.distributed: each rank of the group holds a
contiguous shard of the LM head's rows, weight[start:start + V_r] (and bias), and the same
hidden states; the results equal the single-device op.

Forward: each rank folds its shard into unfinished row statistics (m, s, u, z[y] where the
target is in its shard, and (s2, sz, idx) for return_stats; softmax_stats.RawStats), the ranks
all-gather them (4 to 7 floats per token, one collective), and every rank merges and finishes
them: the global lse, log-probs, entropy. A row whose target lies in another shard is scored
with a sentinel target that no column matches.
Backward: each rank recomputes its shard's logits with the global lse and entropy, so its
d logits are those of the full softmax; dweight and dbias stay local, dhidden is all-reduced
(summed) over the group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from prefkern.ops import multi_target, softmax_stats

_SENTINEL = 1 << 62


def shard_layout(weight: Tensor, group, vocab_start: int | None,
                 vocab_size: int | None) -> tuple[int, int]:
    """(this rank's first row, the full vocabulary size). Without both given, the shard sizes
    are all-gathered and read on the host (one small collective and sync per call)."""
    if vocab_start is not None and vocab_size is not None:
        return int(vocab_start), int(vocab_size)
    world = dist.get_world_size(group)
    size = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    rank = dist.get_rank(group)
    return sum(counts[:rank]), sum(counts)


def full_vocab(weight: Tensor, group, vocab_start: int | None, vocab_size: int | None) -> int:
    """The whole head's row count: the weight's own without a group (a DTensor's global
    shape), else ``vocab_size`` or the shard sizes all-gathered (:func:`shard_layout`)."""
    if group is None:
        return weight.shape[0]
    return vocab_size if vocab_size is not None else \
        shard_layout(weight, group, vocab_start, vocab_size)[1]


def local_ignore(ignore_index: int) -> int:
    """The ignore value of shard-local targets: ignore_index itself when negative (no local id
    or sentinel is), else -1 (a non-negative ignore_index can equal a real target's local id
    on some shard). Every pass over local targets takes this value."""
    return ignore_index if ignore_index < 0 else -1


def local_targets(targets: Tensor, start: int, local_vocab: int, ignore_index: int) -> Tensor:
    """Global ids -> this shard's: ids in the shard shifted to it, ids elsewhere a sentinel no
    column matches (the row still counts), ignored entries :func:`local_ignore`. The sentinel
    is far past any column a kernel tile could hold (tiles pad past the vocabulary); int64
    whatever the ids' dtype (the sentinel does not fit int32)."""
    targets = targets.long()
    inside = (targets >= start) & (targets < start + local_vocab)
    shifted = torch.where(inside, targets - start, _SENTINEL)
    return torch.where(targets == ignore_index, local_ignore(ignore_index), shifted)


def _all_gather(t: Tensor, group) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def merge_ranks(raw: softmax_stats.RawStats, start: int, group) -> softmax_stats.RawStats:
    """All-gather every rank's statistics and merge them (the same result on every rank)."""
    columns = [raw.m, raw.s, raw.u, raw.z_target]
    if raw.extra is not None:
        s2, sz, idx = raw.extra
        columns += [s2, sz, idx + start]  # global column ids
    gathered = _all_gather(torch.stack(columns), group)  # (R, k, N)
    m, s, u = softmax_stats.merge_along(gathered[:, 0], gathered[:, 1], gathered[:, 2])
    z_target = gathered[:, 3].sum(0)  # only the owning rank holds a nonzero z[y]
    extra = None
    if raw.extra is not None:
        extra = softmax_stats.merge_extra_along(gathered[:, 0], gathered[:, 4],
                                                gathered[:, 5], gathered[:, 6])
    return softmax_stats.RawStats(m, s, u, z_target, extra)


class VocabParallelLogprobs(torch.autograd.Function):
    """(logp, entropy, lse, stats (N, 4) or (0, 4)) of the full vocabulary from this rank's
    shard; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_inv_temp, group, start, vocab, backend,
                mode, deterministic, inv_temp, softcap, ignore_index, with_stats):
        from prefkern.ops.linear_logprobs import STATS_COLUMNS, _impl, raw_forward

        factor = inv_temp if row_inv_temp is None else row_inv_temp
        multi = targets.dim() == 2
        row_targets = multi_target.representative(targets, ignore_index) if multi else targets
        local = local_targets(row_targets, start, weight.shape[0], ignore_index)
        raw = raw_forward(backend, mode)(hidden, weight, bias, local, factor, softcap,
                                         local_ignore(ignore_index), True, with_stats)
        merged = merge_ranks(raw, start, group)
        logp, entropy, lse, stats = softmax_stats.finish_raw(merged,
                                                             row_targets != ignore_index, vocab)
        local_ids = hidden.new_empty((0, 0), dtype=torch.int64)
        if multi:  # z at the K ids from the shards that own them, summed over the group
            local_ids = local_targets(targets, start, weight.shape[0], ignore_index)
            ids, owned = _owned_ids(local_ids, weight.shape[0], targets != ignore_index)
            picked = multi_target.linear_picked_logits(hidden, weight, bias, ids, factor,
                                                       softcap)
            picked = torch.where(owned, picked, 0)
            dist.all_reduce(picked, group=group)
            logp = multi_target.picked_logprobs(picked, lse, targets != ignore_index)
        if stats is None:
            stats = lse.new_empty((0, STATS_COLUMNS))
        ctx.save_for_backward(hidden, weight, bias, local, local_ids, targets, row_inv_temp,
                              lse, entropy, stats)
        ctx.options = (group, vocab, factor, softcap, ignore_index, deterministic)
        ctx.backward_fn = _impl(backend, mode, deterministic)[1]
        return logp, entropy, lse, stats

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse, g_stats):
        (hidden, weight, bias, local, local_ids, targets, row_inv_temp, lse, entropy,
         stats) = ctx.saved_tensors
        group, vocab, factor, softcap, ignore_index, deterministic = ctx.options
        factor = factor if row_inv_temp is None else row_inv_temp
        need = list(ctx.needs_input_grad[:3])
        need[2] = need[2] and bias is not None
        g_logp, g_ent, g_lse, g_stats = (None if g is None else g.to(lse.dtype).contiguous()
                                         for g in (g_logp, g_ent, g_lse, g_stats))
        g_extra = None
        if g_stats is not None and stats.shape[0]:
            g_lse, g_extra = softmax_stats.extra_gradients(stats, g_stats, g_lse, vocab)
        if not any(need) or all(g is None for g in (g_logp, g_ent, g_lse, g_extra)):
            return (None,) * 15
        multi = targets.dim() == 2
        g_picked = None
        if multi and g_logp is not None:  # the softmax part goes through the lse gradient
            g_lse = multi_target.lse_gradient(g_lse, g_logp, targets != ignore_index)
            g_picked, g_logp = g_logp, None
        dh, dw, db = ctx.backward_fn(hidden, weight, bias, local, lse, entropy, g_logp, g_ent,
                                     g_lse, factor, softcap, local_ignore(ignore_index),
                                     need_dh=need[0],
                                     need_dw=need[1], need_db=need[2], g_extra=g_extra,
                                     fp32_dh=True)
        if g_picked is not None:  # the target columns this shard owns
            ids, owned = _owned_ids(local_ids, weight.shape[0], targets != ignore_index)
            multi_target.linear_picked_grads_(dh, dw, db, hidden, weight, bias, ids, owned,
                                              g_picked, factor, softcap, deterministic)
        if dh is not None:  # every rank holds the same hidden: its gradient sums the shards
            dist.all_reduce(dh, group=group)  # fp32 partial sums, one rounding at the end
            dh = dh.to(hidden.dtype)
        return (dh, dw, db, *(None,) * 12)


def _owned_ids(local_ids: Tensor, local_vocab: int, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) shard-local ids (local_targets) -> (ids safe to gather, 0 elsewhere; whether
    this shard owns each valid entry)."""
    owned = valid & (local_ids >= 0) & (local_ids < local_vocab)
    return torch.where(owned, local_ids, 0), owned


class VocabShard(NamedTuple):
    """Where this rank's head rows sit: the group, its first row and the full vocabulary."""

    group: object
    start: int
    vocab: int


def merge_chunk_stats(m, s, u, z_target, shard: VocabShard | None):
    """(m, s, u, z[y]) of one chunk of rows over this rank's columns -> those of the full
    vocabulary (unchanged without a shard). Every rank must call it for the same rows."""
    if shard is None:
        return m, s, u, z_target
    u_in = torch.zeros_like(s) if u is None else u  # (the same collective either way)
    merged = merge_ranks(softmax_stats.RawStats(m, s, u_in, z_target, None), shard.start,
                         shard.group)
    return merged.m, merged.s, None if u is None else merged.u, merged.z_target


def sum_over_shards(t: Tensor, shard: VocabShard | None) -> Tensor:
    """All-reduce (sum) ``t`` in place over the shard's group; a no-op without a shard."""
    if shard is not None:
        dist.all_reduce(t, group=shard.group)
    return t


class HeadShards(NamedTuple):
    """The LM head as linear_logprobs consumes it: plain tensors, and the vocab-parallel layout
    (process group, first row, full vocabulary) when the weight is sharded by rows."""

    weight: Tensor
    bias: Tensor | None
    group: object
    vocab_start: int | None
    vocab_size: int | None


def _is_dtensor(t) -> bool:
    return t is not None and hasattr(t, "placements") and hasattr(t, "to_local")


def unwrap_dtensor_head(weight, bias, group, vocab_start, vocab_size) -> HeadShards:
    """A DTensor weight is gathered with ``full_tensor()`` (a (V, H) all-gather per call; its
    backward sends the gradient back to the shards): FSDP2 shards the head by rows over
    data-parallel ranks whose tokens differ, so a row-sharded DTensor alone does not mean vocab
    parallelism. With a ``process_group`` given (the caller's statement that the hidden
    states are the same on every rank), a weight sharded by rows (Shard(0)) on a 1-d mesh is
    used as vocab-parallel shards over the mesh's group, without a gather; a process group
    over other ranks than the mesh's is an error. A DTensor bias follows the weight."""
    if not _is_dtensor(weight):
        if _is_dtensor(bias):
            bias = bias.full_tensor()
        return HeadShards(weight, bias, group, vocab_start, vocab_size)
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, weight.placements
    by_rows = mesh.ndim == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0
    if not by_rows or group is None:
        full_bias = bias.full_tensor() if _is_dtensor(bias) else bias
        return HeadShards(weight.full_tensor(), full_bias, group, vocab_start, vocab_size)
    import torch.distributed as dist

    if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(mesh.get_group()):
        raise ValueError(
            f"the weight is a DTensor sharded over ranks "
            f"{dist.get_process_group_ranks(mesh.get_group())}, process_group holds ranks "
            f"{dist.get_process_group_ranks(group)}: pass the weight's own mesh group (its "
            "rows are the vocabulary shards), or its local shard with vocab_start/vocab_size")
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    local_bias = bias
    if _is_dtensor(bias) and bias.placements == placements:
        local_bias = bias.to_local()
    elif _is_dtensor(bias):  # placed otherwise (e.g. replicated): this rank's rows of it; each
        # rank's gradient holds only its rows, so the replicated gradient is their sum
        from torch.distributed.tensor import Partial, Replicate

        full = bias.redistribute(bias.device_mesh, [Replicate()] * bias.device_mesh.ndim)
        grad_placements = [Partial()] * bias.device_mesh.ndim
        local_bias = full.to_local(grad_placements=grad_placements)[
            offset[0]:offset[0] + weight.to_local().shape[0]]
    return HeadShards(weight.to_local(), local_bias, mesh.get_group(), int(offset[0]),
                      int(weight.shape[0]))


def resolve_head(weight, bias, group, vocab_start, vocab_size):
    """-> (weight, bias, VocabShard or None) as the fused losses consume the head: a DTensor
    unwrapped as :func:`unwrap_dtensor_head` does, the layout from :func:`shard_layout`."""
    head = unwrap_dtensor_head(weight, bias, group, vocab_start, vocab_size)
    if head.group is None:
        return head.weight, head.bias, None
    start, vocab = shard_layout(head.weight, head.group, head.vocab_start, head.vocab_size)
    return head.weight, head.bias, VocabShard(head.group, start, vocab)
