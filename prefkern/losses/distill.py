"""Distillation losses: full-vocabulary divergences to a teacher with an optional hard-label
term (TRL GKD, Liger's distillation losses), and verl's top-k forward KL."""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern import _checks
from prefkern._autocast import without_autocast
from prefkern.losses.reduction import reduce_tokens
from prefkern.ops.grad_in_forward import (
    GradientInForward,
    accumulator_fits,
    gradients_needed,
)
from prefkern.ops.linear_divergence import linear_divergence
from prefkern.ops.linear_logprobs import linear_logprobs


def topk_forward_kl(logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor | None = None, *,
                    log_prob_min_clamp: float | None = None,
                    loss_max_clamp: float | None = None) -> Tensor:
    """verl's ``forward_kl_topk`` per token (verl-project/verl 1dda039,
    verl/trainer/distillation/losses.py): the forward KL restricted to the teacher's top-k ids,
    ``(t.exp() * (t - s)).sum(-1).clamp(min=0)`` with s, t the student's and the teacher's
    full-vocabulary log-probs at those ids (neither renormalized over the K ids, so the sum can
    go negative: hence the clamp at 0), both first clamped from below at
    ``log_prob_min_clamp`` when given, the result then clamped to ``[-c, c]`` by
    ``loss_max_clamp``.

    Args:
        logprobs: (..., K) the student's log-probs of the teacher's top-k ids, e.g.
            ``linear_logprobs(hidden, weight, topk_ids)`` (gradients flow through it).
        teacher_logprobs: (..., K). mask: (..., K) bool, the entries that count (None: all).
    Returns: (...) fp32 per-token loss.
    """
    if logprobs.shape != teacher_logprobs.shape or logprobs.dim() < 1:
        raise ValueError(f"logprobs and teacher_logprobs must both be (..., K), got "
                         f"{tuple(logprobs.shape)} and {tuple(teacher_logprobs.shape)}")
    s, t = logprobs.float(), teacher_logprobs.float().detach()
    if log_prob_min_clamp is not None:
        s, t = s.clamp(min=log_prob_min_clamp), t.clamp(min=log_prob_min_clamp)
    per_k = t.exp() * (t - s)
    if mask is not None:
        per_k = torch.where(mask, per_k, 0)
    loss = per_k.sum(-1).clamp(min=0)
    if loss_max_clamp is not None:
        loss = loss.clamp(min=-loss_max_clamp, max=loss_max_clamp)
    return loss


def distill_loss(hidden: Tensor, weight: Tensor, teacher_hidden, teacher_weight: Tensor | None,
                 labels: Tensor, *, kind: str = "jsd", beta: float = 0.5, alpha: float = 0.5,
                 temperature: float = 1.0, weight_soft_loss: float = 1.0,
                 weight_hard_loss: float = 0.0, reduction: str = "batchmean",
                 num_items_in_batch: float | Tensor | None = None, ignore_index: int = -100,
                 bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                 softcap: float | None = None, logit_scale: float | None = None,
                 teacher_softcap: float | None = None,
                 teacher_logit_scale: float | None = None, process_group=None,
                 vocab_start: int | None = None, vocab_size: int | None = None,
                 mode: str = "auto", backend: str | None = None):
    """``weight_soft_loss * reduce(D) + weight_hard_loss * reduce(-log p_1(labels))`` where D is
    the per-token :func:`prefkern.linear_divergence` of ``kind`` between the student (hidden,
    weight) and the teacher (teacher_hidden, teacher_weight, or a mixture) at ``temperature``,
    and p_1 the student's softmax at temperature 1 (the hard loss is on the untempered logits,
    as in Liger's distillation losses). TRL GKD is ``kind="jsd"`` with no hard term; Liger's
    LigerFusedLinearJSDLoss is the same with weight_hard_loss = weight_soft_loss = 0.5.

    Tokens with ``labels == ignore_index`` count nowhere. ``reduction`` and
    ``num_items_in_batch`` as :func:`prefkern.losses.reduce_tokens` (default batchmean: the sum
    over valid tokens / their count; with num_items_in_batch, the sum / it, TRL's convention
    for gradient accumulation). The teacher takes no gradient unless its tensors require it.
    ``process_group`` / ``vocab_start`` / ``vocab_size``: vocab-parallel head shards of both
    models (see prefkern.linear_divergence). ``mode``: the passes' memory mode ("fast" or
    "min_memory", as :func:`prefkern.linear_divergence`).
    Returns (loss, metrics) with metrics {"soft_loss", "hard_loss"} detached (hard_loss is 0
    when weight_hard_loss is 0: that term is not computed).
    """
    shards = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
    mask = labels != ignore_index
    same_pass = weight_hard_loss != 0 and not isinstance(temperature, Tensor) and \
        temperature == 1.0
    out = linear_divergence(hidden, weight, teacher_hidden, teacher_weight, labels, kind=kind,
                            beta=beta, alpha=alpha, temperature=temperature,
                            ignore_index=ignore_index, bias=bias, ref_bias=teacher_bias,
                            softcap=softcap, logit_scale=logit_scale, ref_softcap=teacher_softcap,
                            ref_logit_scale=teacher_logit_scale, return_logprobs=same_pass,
                            mode=mode, backend=backend, **shards)
    divergence = out.divergence if same_pass else out
    soft = reduce_tokens(divergence, mask, reduction, num_items_in_batch)
    hard = torch.zeros_like(soft)
    if weight_hard_loss != 0:
        logp = out.logprobs if same_pass else linear_logprobs(
            hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
            logit_scale=logit_scale, mode=mode, backend=backend, **shards)
        hard = reduce_tokens(-logp, mask, reduction, num_items_in_batch)
    loss = weight_soft_loss * soft + weight_hard_loss * hard
    return loss, {"soft_loss": soft.detach(), "hard_loss": hard.detach()}


def linear_distill_loss(hidden: Tensor, weight: Tensor, teacher_hidden,
                        teacher_weight: Tensor | None, labels: Tensor, *, kind: str = "jsd",
                        beta: float = 0.5, alpha: float = 0.5, temperature: float = 1.0,
                        weight_soft_loss: float = 1.0, weight_hard_loss: float = 0.0,
                        reduction: str = "batchmean",
                        num_items_in_batch: float | Tensor | None = None,
                        ignore_index: int = -100, bias: Tensor | None = None,
                        teacher_bias: Tensor | None = None, softcap: float | None = None,
                        logit_scale: float | None = None, teacher_softcap: float | None = None,
                        teacher_logit_scale: float | None = None, process_group=None,
                        vocab_start: int | None = None, vocab_size: int | None = None,
                        dw_budget_bytes: int | None = None, backend: str | None = None):
    """:func:`distill_loss` (same arguments and value) with the student's gradient computed
    in the forward pass: 4 GEMMs in all (prefkern.ops.distill_fused). A half-precision
    student weight needs an fp32 (V, H) dW accumulator there (4VH bytes): with
    ``dw_budget_bytes`` set below that, :func:`distill_loss`'s two-pass path runs instead
    (no accumulator, 6 GEMMs). The teacher takes no
    gradient (pass frozen tensors); ``reduction`` is batchmean, mean or sum (the per-token
    gradient must be known in the forward). Runs eagerly (an autograd.Function around the
    fused pass, not a custom op: torch.compile traces into it). ``process_group`` /
    ``vocab_start`` / ``vocab_size``: vocab-parallel shards of both heads (as
    :func:`distill_loss`), each chunk's row statistics merged over the group in the same
    fused pass. Returns (loss, metrics) with metrics {"soft_loss", "hard_loss"} detached."""
    from prefkern.ops import distill_fused
    from prefkern.ops.divergence_passes import HeadArgs, Side
    from prefkern.ops.linear_divergence import prepare

    if reduction not in ("batchmean", "mean", "sum"):
        raise ValueError(f"linear_distill_loss needs a reduced loss (batchmean, mean or sum), "
                         f"got {reduction!r}: use distill_loss for per-token losses")
    from prefkern.ops.vocab_parallel import full_vocab

    rows = None if dw_budget_bytes is None else \
        full_vocab(weight, process_group, vocab_start, vocab_size)
    if not accumulator_fits(weight, dw_budget_bytes, rows):
        return distill_loss(
            hidden, weight, teacher_hidden, teacher_weight, labels, kind=kind, beta=beta,
            alpha=alpha, temperature=temperature, weight_soft_loss=weight_soft_loss,
            weight_hard_loss=weight_hard_loss, reduction=reduction,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, bias=bias,
            teacher_bias=teacher_bias, softcap=softcap, logit_scale=logit_scale,
            teacher_softcap=teacher_softcap, teacher_logit_scale=teacher_logit_scale,
            process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size,
            backend=backend)
    shard = None
    if process_group is not None:
        from prefkern.ops.vocab_parallel import VocabShard, shard_layout

        if not isinstance(teacher_hidden, Tensor):
            raise ValueError("a teacher mixture is not supported with process_group")
        shard = VocabShard(process_group, *shard_layout(weight, process_group, vocab_start,
                                                        vocab_size))
    c = prepare(hidden, weight, teacher_hidden, teacher_weight, labels, kind, beta, alpha,
                temperature, ignore_index, bias, teacher_bias, softcap, logit_scale,
                teacher_softcap, teacher_logit_scale, backend, "linear_distill_loss",
                None if shard is None else shard.vocab)
    teacher = (*c.ref_hiddens, *c.ref_weights, *(b for b in c.ref_biases if b is not None))
    if any(t.requires_grad for t in teacher):
        raise ValueError("linear_distill_loss computes no teacher gradient: pass detached "
                         "teacher tensors, or use distill_loss")
    mask = c.targets != c.ignore_index
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    if num_items_in_batch is not None:
        norm = torch.as_tensor(num_items_in_batch, device=mask.device).to(cdt)
    elif reduction == "sum":
        norm = torch.ones((), dtype=cdt, device=mask.device)
    else:
        norm = mask.sum().clamp(min=1).to(cdt)
    need = gradients_needed(hidden, weight, bias)
    coeffs = c.ref_coeffs if c.ref_coeffs else [None] * len(c.ref_hiddens)
    refs = [Side(*parts) for parts in zip(c.ref_hiddens, c.ref_weights, c.ref_biases, coeffs,
                                          strict=True)]
    head_hard = None
    if isinstance(temperature, Tensor) or temperature != 1.0:
        from prefkern.ops.head import fold

        hard = fold(1.0, logit_scale, softcap)  # the untempered student's head
        head_hard = HeadArgs(hard.inv_temp, hard.softcap)
    hidden2d = c.hidden.detach()
    with torch.no_grad(), without_autocast(hidden2d):
        d, logp, dh, dw, db = distill_fused.fused_distill(
            Side(hidden2d, c.weight.detach(), None if c.bias is None else c.bias.detach()),
            refs, c.targets, HeadArgs(c.head_p.row_inv_temp if c.head_p.row_inv_temp is not None
                                      else c.head_p.inv_temp, c.head_p.softcap),
            HeadArgs(c.head_q.row_inv_temp if c.head_q.row_inv_temp is not None
                     else c.head_q.inv_temp, c.head_q.softcap),
            head_hard, c.div, c.ignore_index, weight_soft_loss / norm, weight_hard_loss / norm,
            c.backend == "triton", need, shard)
        soft = torch.where(mask, d, 0).sum() / norm
        hard = -torch.where(mask, logp, 0).sum() / norm
        if weight_hard_loss == 0:
            hard = torch.zeros_like(hard)  # the term is off (as distill_loss reports it)
        value = weight_soft_loss * soft + weight_hard_loss * hard
        value = _checks.poison(value, None if c.bad is None else c.bad.any())
    dh = None if dh is None else dh.view(hidden.shape)
    loss = GradientInForward.apply(value, dh, dw, db, hidden, weight, bias)
    return loss, {"soft_loss": soft, "hard_loss": hard}
