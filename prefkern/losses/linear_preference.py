"""Preference losses straight from hidden states and the LM head: per-token log-probs
(prefkern.linear_logprobs, no (N, V) logits), sequence sums, then the loss.

Layout: TRL's concatenated batch, the B chosen sequences first and the B rejected ones after:
padded ``hidden`` (2B, T, H) with ``targets`` (2B, T) (``ignore_index`` on prompt and padding
tokens), or packed ``hidden`` (N, H), ``targets`` (N,) with ``cu_seqlens`` (2B + 1,).
The reference model's log-probs are given (``ref_logps``: (chosen (B,), rejected (B,))) or
computed here under no_grad from ``ref_hidden`` / ``ref_weight``.

Two paths. The two-pass one (any family, packed or padded): a forward GEMM for the log-probs,
then a backward that recomputes the logits, because a sequence-level loss's per-token gradient
is known only once the whole sequence's log-prob is. FLOPs: reference forward 2NHV + policy
2NHV forward + 6NHV backward. The fused one (DPO with a pair-separable loss on the padded
layout, prefkern.ops.preference_fused): whole pairs fit a chunk, so their loss and d loss /
d logits are known inside the forward pass: 2NHV + 4NHV, no recompute.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern import _checks
from prefkern.losses.preference import cpo_loss, orpo_loss, preference_loss, tdpo_loss
from prefkern.losses.sequence import ld_token_sums, token_sums, wpo_weights
from prefkern.ops.linear_divergence import linear_divergence
from prefkern.ops.linear_logprobs import linear_logprobs

FAMILIES = ("dpo", "cpo", "orpo", "tdpo")


def _sequence_logps(hidden, weight, targets, bias, cu_seqlens, head: dict,
                    ld_alpha: float | None = None, use_weighting: bool = False):
    """-> (sums (2B,), completion token counts (2B,), WPO weights (2B,) or None, plain sums)
    of the targets' log-probs; LD-DPO sums with ``ld_alpha`` (the plain sums stay: TRL's sft
    term is the plain cross entropy)."""
    mask = targets != head["ignore_index"]
    weights = None
    if use_weighting:  # sum p^2 from the same pass
        out = linear_logprobs(hidden, weight, targets, bias, return_stats=True, **head)
        logp = out.logprobs
        weights = wpo_weights(logp, out.stats.sum_p2, mask, cu_seqlens)
    else:
        logp = linear_logprobs(hidden, weight, targets, bias, **head)
    plain, counts = token_sums(logp, mask, cu_seqlens)
    sums = plain if ld_alpha is None else ld_token_sums(logp, mask, cu_seqlens, ld_alpha)
    return sums, counts, weights, plain


def _reference(ref_logps, ref_hidden, ref_weight, ref_bias, targets, cu_seqlens, head,
               ld_alpha) -> tuple[Tensor | None, Tensor | None]:
    """The reference side of DPO: given (chosen, rejected) sequence log-probs, computed under
    no_grad from the reference model's hidden states and head, or none (reference-free)."""
    if ref_logps is not None and ref_hidden is not None:
        raise ValueError("pass ref_logps or ref_hidden / ref_weight, not both")
    if ref_logps is not None:
        return ref_logps
    if ref_hidden is None:
        return None, None
    if ref_weight is None:
        raise ValueError("ref_hidden needs ref_weight")
    with torch.no_grad():
        ref_sums = _sequence_logps(ref_hidden, ref_weight, targets, ref_bias, cu_seqlens,
                                   head, ld_alpha)[0]
    return _halves(ref_sums)


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    if t.shape[0] % 2:
        raise ValueError(f"the batch must hold B chosen then B rejected sequences: got "
                         f"{t.shape[0]} sequences")
    return t[: t.shape[0] // 2], t[t.shape[0] // 2:]


def linear_preference_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                           family: str = "dpo", cu_seqlens: Tensor | None = None,
                           bias: Tensor | None = None,
                           ref_logps: tuple[Tensor, Tensor] | None = None,
                           ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None,
                           ref_bias: Tensor | None = None, temperature: float = 1.0,
                           ignore_index: int = -100, softcap: float | None = None,
                           logit_scale: float | None = None, ld_alpha: float | None = None,
                           use_weighting: bool = False, process_group=None,
                           fused: bool = True, budget_bytes: int | None = None,
                           dw_budget_bytes: int | None = None,
                           backend: str | None = None, **loss_kw):
    """``family="dpo"``: :func:`prefkern.losses.preference_loss` (every TRL DPO loss type;
    lengths are filled in from the targets); ``"cpo"``: :func:`cpo_loss` (CPO, SimPO,
    AlphaPO; reference-free); ``"orpo"``: :func:`orpo_loss` (reference-free); ``"tdpo"``:
    :func:`tdpo_loss` with each sequence's SeqKL = sum_t KL(ref || policy) from
    prefkern.linear_divergence (needs ref_hidden / ref_weight; the policy's log-probs come
    from the same pass). ``loss_kw``
    go to that function (loss_type, beta, label_smoothing, ...). The reference side of DPO:
    ``ref_logps`` or ``ref_hidden`` + ``ref_weight`` (its head options are the policy's), or
    neither (reference-free DPO). DPO options computed here from the per-token log-probs, as
    TRL's DPOTrainer does: ``ld_alpha`` (LD-DPO sequence log-probs, policy and reference, see
    :func:`prefkern.losses.sequence.ld_token_sums`) and ``use_weighting`` (WPO pair weights
    from the sum of p^2 of the same pass, :func:`prefkern.losses.sequence.wpo_weights`).
    ``process_group``: vocab-parallel head shards (see prefkern.linear_logprobs; not with
    tdpo), on the fused path too. ``fused`` (DPO on the padded layout with pair-separable loss
    types: every type but aot, aot_unpaired and sft, without rpo_alpha or use_weighting): the
    gradient is formed in the forward pass a chunk of whole pairs at a time, 3 GEMMs instead
    of 4 and at most
    ``budget_bytes`` of logits at once (default 32 MiB on CPU, 256 MiB on a GPU;
    prefkern.ops.preference_fused); otherwise, or when
    one pair exceeds the budget, the two-pass path (a pair of 2 x 2048 tokens at V = 128256 is
    2 GiB of fp32 logits: raise the budget to take the fused path there). ``dw_budget_bytes``:
    the fused path's fp32 (V, H) dW accumulator for a half-precision weight (4VH bytes) must
    fit it, else the two-pass path runs (None: no limit). Returns (loss, metrics)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    head = dict(temperature=temperature, ignore_index=ignore_index, softcap=softcap,
                logit_scale=logit_scale, backend=backend)
    if process_group is not None:
        if family == "tdpo":
            raise ValueError("tdpo with process_group is not supported")
        head["process_group"] = process_group
    if family == "tdpo":
        return _tdpo(hidden, weight, targets, cu_seqlens, bias, ref_hidden, ref_weight,
                     ref_bias, head, loss_kw)
    if family != "dpo" and (ld_alpha is not None or use_weighting):
        raise ValueError("ld_alpha and use_weighting are DPO options (family='dpo')")
    from prefkern.ops.grad_in_forward import accumulator_fits
    from prefkern.ops.vocab_parallel import full_vocab

    rows = None if dw_budget_bytes is None else full_vocab(weight, process_group, None, None)
    if family == "dpo" and fused and accumulator_fits(weight, dw_budget_bytes, rows) and \
            _fusable(hidden, cu_seqlens, use_weighting, loss_kw):
        out = _fused(hidden, weight, targets, bias, ref_logps, ref_hidden, ref_weight, ref_bias,
                     head, ld_alpha, budget_bytes, loss_kw)
        if out is not None:
            return out
    sums, counts, weights, plain = _sequence_logps(hidden, weight, targets, bias, cu_seqlens,
                                                   head, ld_alpha, use_weighting)
    (chosen, rejected), (len_c, len_r) = _halves(sums), _halves(counts)
    if family != "dpo":
        if ref_logps is not None or ref_hidden is not None:
            raise ValueError(f"{family} is reference-free: pass no reference")
        fn = cpo_loss if family == "cpo" else orpo_loss
        return fn(chosen, rejected, len_c, len_r, **loss_kw)
    ref_chosen, ref_rejected = _reference(ref_logps, ref_hidden, ref_weight, ref_bias, targets,
                                          cu_seqlens, head, ld_alpha)
    if weights is not None:
        loss_kw = dict(loss_kw, chosen_weights=_halves(weights)[0],
                       rejected_weights=_halves(weights)[1])
    if ld_alpha is not None:
        loss_kw = dict(loss_kw, sft_chosen_logps=_halves(plain)[0])
    return preference_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=len_c,
                           rejected_lengths=len_r, **loss_kw)


def _tdpo(hidden, weight, targets, cu_seqlens, bias, ref_hidden, ref_weight, ref_bias, head,
          loss_kw):
    if ref_hidden is None or ref_weight is None:
        raise ValueError("tdpo needs ref_hidden and ref_weight (its KL is over the vocabulary)")
    out = linear_divergence(hidden, weight, ref_hidden, ref_weight, targets, kind="forward_kl",
                            temperature=head["temperature"], ignore_index=head["ignore_index"],
                            bias=bias, ref_bias=ref_bias, softcap=head["softcap"],
                            logit_scale=head["logit_scale"], ref_softcap=head["softcap"],
                            ref_logit_scale=head["logit_scale"], return_logprobs=True,
                            backend=head["backend"])
    mask = targets != head["ignore_index"]
    kl_sums, _ = token_sums(out.divergence, mask, cu_seqlens)
    sums, _ = token_sums(out.logprobs, mask, cu_seqlens)
    with torch.no_grad():
        ref_sums = _sequence_logps(ref_hidden, ref_weight, targets, ref_bias, cu_seqlens,
                                   head)[0]
    (chosen, rejected), (ref_c, ref_r) = _halves(sums), _halves(ref_sums)
    kl_c, kl_r = _halves(kl_sums)
    return tdpo_loss(chosen, rejected, ref_c, ref_r, kl_c, kl_r, **loss_kw)


def _fusable(hidden, cu_seqlens, use_weighting, loss_kw) -> bool:
    from prefkern.ops.preference_fused import SEPARABLE

    kinds = loss_kw.get("loss_type", "sigmoid")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    per_pair = ("chosen_weights", "rejected_weights", "chosen_lengths", "rejected_lengths")
    return (hidden.dim() == 3 and cu_seqlens is None and not use_weighting
            and loss_kw.get("rpo_alpha") is None
            and not any(loss_kw.get(k) is not None for k in per_pair)
            and loss_kw.get("reduction", "mean") == "mean" and set(kinds) <= SEPARABLE)


def _fused(hidden, weight, targets, bias, ref_logps, ref_hidden, ref_weight, ref_bias, head,
           ld_alpha, budget_bytes, loss_kw):
    """The gradient-in-forward DPO path (prefkern.ops.preference_fused); None when a single
    pair's logits exceed the budget (the caller takes the two-pass path)."""
    from prefkern._autocast import without_autocast
    from prefkern.dispatch import resolve_backend
    from prefkern.ops import head as head_mod
    from prefkern.ops import preference_fused
    from prefkern.ops.divergence_passes import HeadArgs, Side
    from prefkern.ops.grad_in_forward import GradientInForward, gradients_needed
    from prefkern.ops.vocab_parallel import resolve_head
    from prefkern.reference.logprobs import compute_dtype

    weight, bias, shard = resolve_head(weight, bias, head.get("process_group"), None, None)
    hidden, weight, bias = head_mod.autocast_inputs(hidden, weight, bias)
    device = head_mod.check_linear(hidden, weight, bias)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError("targets must be (2B, T), the rows of hidden (2B, T, H)")
    _halves(targets)
    targets, bad = head_mod.screen_fused_targets(targets, weight, shard, head["ignore_index"],
                                                 "linear_preference_loss")
    b2, t = targets.shape
    vocab = weight.shape[0] if shard is None else shard.vocab
    chunks = preference_fused.pair_chunks(b2 // 2, t, vocab, budget_bytes, device)
    if chunks is None:
        return None
    ref_chosen, ref_rejected = _reference(ref_logps, ref_hidden, ref_weight, ref_bias, targets,
                                          None, head, ld_alpha)
    lead = targets.shape
    temperature = head_mod.as_rows(head["temperature"], lead)
    head_mod.check_temperature(temperature, lead, device)
    head_mod.check_logit_scale(head["logit_scale"])
    fp64 = hidden.dtype == torch.float64
    name = resolve_backend("linear_preference_loss", head["backend"], device,
                           ("torch",) if fp64 else ("triton", "torch"),
                           () if fp64 else ("triton",))
    folded = head_mod.fold(temperature, head["logit_scale"], head["softcap"],
                           compute_dtype(hidden.dtype))
    head_args = HeadArgs(folded.inv_temp if folded.row_inv_temp is None else
                         folded.row_inv_temp, folded.softcap)
    need = gradients_needed(hidden, weight, bias)
    with torch.no_grad(), without_autocast(hidden):
        logp, dh, dw, db = preference_fused.fused_dpo(
            Side(hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                 None if bias is None else bias.detach()),
            targets, head_args, head["ignore_index"], ref_chosen, ref_rejected, chunks,
            name == "triton", need, ld_alpha, loss_kw, shard)
        mask = targets != head["ignore_index"]
        per_token = logp.view(lead)
        sums = ld_token_sums(per_token, mask, None, ld_alpha) if ld_alpha is not None else \
            torch.where(mask, per_token, 0).sum(-1)
        counts = mask.sum(-1)
        (chosen, rejected), (len_c, len_r) = _halves(sums), _halves(counts)
        value, metrics = preference_loss(chosen, rejected, ref_chosen, ref_rejected,
                                         chosen_lengths=len_c, rejected_lengths=len_r,
                                         **loss_kw)
        value = _checks.poison(value, None if bad is None else bad.any())
    dh = None if dh is None else dh.view(hidden.shape)
    return GradientInForward.apply(value, dh, dw, db, hidden, weight, bias), metrics
