"""Policy-gradient losses on per-token log-probs (padded (B, T) + mask), with verl's and TRL's
semantics side by side (verl-project/verl core_algos.py ``compute_policy_loss_*`` and
``agg_loss``; huggingface/trl f2cd577 grpo_trainer.py ``_compute_loss``). The aggregation
normalizers that span gradient accumulation or data-parallel ranks are arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern import _checks
from prefkern.losses.sequence import _segment_ids
from prefkern.losses.token_selection import clip_cov_selection, kl_cov_selection
from prefkern.ops.kl_estimate import kl_estimate
from prefkern.reference.logprobs import compute_dtype

SURROGATES = ("ppo", "gspo", "cispo", "sapo", "gpg", "geo_mean", "clip_cov", "kl_cov")
SEQUENCE_LEVEL = ("gspo", "geo_mean")  # a token's gradient depends on its whole sequence
BATCH_LEVEL = ("clip_cov", "kl_cov")  # which tokens are treated specially depends on the batch
# TRL's loss_type names: the PPO surrogate with their aggregation
TRL_ALIASES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
               "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean"}
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                "seq-mean-token-sum-norm")
FORCED_AGG = {"gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean"}


class _Layout:
    """Padded (B, T) tokens, or packed (N,) tokens with cu_seqlens (B + 1,): per-sequence
    sums and the broadcast of per-sequence values back to the tokens, without a host sync."""

    def __init__(self, like: Tensor, cu_seqlens: Tensor | None):
        self.packed = cu_seqlens is not None
        if self.packed:
            self.n_seqs = cu_seqlens.numel() - 1
            seg = _segment_ids(cu_seqlens, like.numel())
            self.inside = seg < self.n_seqs  # tokens past the last sequence count nowhere
            self.seg = torch.where(self.inside, seg, 0)
        else:
            self.n_seqs = like.shape[0]
        self.shape = like.shape

    def seq_sum(self, tokens: Tensor) -> Tensor:
        if not self.packed:
            return tokens.sum(-1)
        return tokens.new_zeros(self.n_seqs).index_add(0, self.seg,
                                                       torch.where(self.inside, tokens, 0))

    def to_tokens(self, per_seq: Tensor) -> Tensor:
        return per_seq[self.seg] if self.packed else per_seq[:, None].expand(self.shape)

    def seq_mean(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The masked mean of each sequence, on its tokens."""
        count = self.seq_sum(mask.to(tokens.dtype)).clamp(min=1)
        return self.to_tokens(self.seq_sum(torch.where(mask, tokens, 0)) / count)


SEQ_COUNTS = ("all", "nonempty")


def aggregation_weights(mask: Tensor, agg: str = "token-mean",
                        normalizer: float | Tensor | None = None,
                        loss_scale_factor: float | None = None,
                        cu_seqlens: Tensor | None = None, seq_count: str = "all") -> Tensor:
    """(B, T) weights w with ``aggregate(L, mask, agg, ...) == (w * L).sum()``: every mode is
    linear in the per-token values (verl's ``agg_loss``):
      token-mean               m / normalizer (default: the local token count, >= 1)
      token-sum                m
      seq-mean-token-sum       m / normalizer (default: B sequences)
      seq-mean-token-mean      m / (max(n_b, 1) * normalizer) (default normalizer: B)
      seq-mean-token-sum-norm  m / (normalizer * loss_scale_factor) (defaults: B, T): Dr.GRPO's
                               sum / (B * max_completion_length)
    ``normalizer``: the global token count (token-mean) or sequence count (seq-mean-*) when
    the loss spans gradient accumulation or ranks (a number or a tensor: no host sync).
    Without one, the seq-mean-* modes divide by B (``seq_count="all"``: TRL's grpo, dr_grpo)
    or by the sequences with at least one valid token (``"nonempty"``: verl 1dda039's agg_loss,
    OpenRLHF's sample mode); they differ only when a sequence is fully masked.
    Packed (N,) tokens with ``cu_seqlens``: B = len(cu_seqlens) - 1, and
    seq-mean-token-sum-norm needs ``loss_scale_factor`` (there is no padded T)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if seq_count not in SEQ_COUNTS:
        raise ValueError(f"seq_count must be one of {SEQ_COUNTS}, got {seq_count!r}")
    layout = _Layout(mask, cu_seqlens)
    m = mask.to(torch.float32)
    if layout.packed:
        m = torch.where(layout.inside, m, 0)
    if agg == "token-sum":
        return m
    if agg == "token-mean":
        return m / (m.sum().clamp(min=1) if normalizer is None else normalizer)
    if normalizer is None:
        normalizer = layout.n_seqs if seq_count == "all" else \
            (layout.seq_sum(m) > 0).sum().clamp(min=1)
    w = m / normalizer
    if agg == "seq-mean-token-mean":
        w = w / layout.to_tokens(layout.seq_sum(m).clamp(min=1))
    if agg == "seq-mean-token-sum-norm":
        if loss_scale_factor is None and layout.packed:
            raise ValueError("packed seq-mean-token-sum-norm needs loss_scale_factor")
        w = w / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return w


def global_normalizer(mask: Tensor, agg: str = "token-mean", process_group=None,
                      seq_count: str = "all", cu_seqlens: Tensor | None = None) -> Tensor:
    """The ``normalizer`` with which each rank's aggregate(...) sums, over the ranks of
    ``process_group`` (data parallel; also over gradient-accumulation steps when their masks
    are summed in), to the loss of the whole batch: the global token count (token-mean) or
    sequence count (seq-mean-*: every sequence, or those with a valid token). An fp32 0-d
    device tensor, all-reduced: no host sync. token-sum needs none (returns 1)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if seq_count not in SEQ_COUNTS:
        raise ValueError(f"seq_count must be one of {SEQ_COUNTS}, got {seq_count!r}")
    keep = mask.bool()
    if agg == "token-sum":
        count = torch.ones((), device=mask.device)
    elif agg == "token-mean":
        count = keep.sum().float()
    else:
        layout = _Layout(keep, cu_seqlens)
        count = torch.full((), float(layout.n_seqs), device=mask.device) if seq_count == "all" \
            else (layout.seq_sum(keep.float()) > 0).sum().float()
    if process_group is not None and agg != "token-sum":
        import torch.distributed as dist

        dist.all_reduce(count, group=process_group)
    return count.clamp(min=1)


def aggregate(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean",
              normalizer: float | Tensor | None = None,
              loss_scale_factor: float | None = None, seq_count: str = "all") -> Tensor:
    """verl's ``agg_loss`` on (B, T) per-token values: ``(aggregation_weights(...) *
    loss_mat).sum()`` over the mask (see :func:`aggregation_weights` for each mode;
    ``seq_count="nonempty"`` is verl's default normalizer)."""
    w = aggregation_weights(mask.bool(), agg, normalizer, loss_scale_factor,
                            seq_count=seq_count)
    return torch.where(mask.bool(), loss_mat * w, 0).sum()


def aux_weights(w: Tensor, mask: Tensor, agg: str, aux_agg: str | None,
                normalizer, aux_normalizer, loss_scale_factor, cu_seqlens,
                seq_count: str) -> Tensor:
    """The KL and entropy terms' aggregation weights: the policy term's ``w`` unless
    ``aux_agg`` or ``aux_normalizer`` says otherwise. ``aux_normalizer`` None: ``normalizer``
    when the modes agree, else the local count of ``mask``."""
    if aux_agg is None:
        aux_agg = agg
    if aux_agg == agg and aux_normalizer is None:
        return w
    return aggregation_weights(mask, aux_agg, aux_normalizer, loss_scale_factor, cu_seqlens,
                               seq_count)


def resolve_loss_type(loss_type: str, agg: str | None) -> tuple[str, str]:
    """-> (surrogate, aggregation): TRL's names are the PPO surrogate with their own
    aggregation; gspo and sapo force seq-mean-token-mean (verl); else token-mean."""
    kind = loss_type
    if kind in TRL_ALIASES:
        agg = agg or TRL_ALIASES[kind]
        kind = "ppo"
    if kind not in SURROGATES:
        raise ValueError(f"loss_type must be one of {SURROGATES + tuple(TRL_ALIASES)}, got "
                         f"{loss_type!r}")
    return kind, agg or FORCED_AGG.get(kind, "token-mean")


def _geo_mean(logp, x, adv, mask, layout, eps_low, eps_high, is_weights, normalizer,
              ref_logprobs, kl_coef, kl_kind, kl_input_clamp, kl_output_clamp, entropy,
              entropy_coef, agg, loss_scale_factor, cu_seqlens, old, seq_count="all",
              aux_agg=None, aux_normalizer=None):
    sign = torch.sign(adv)
    clipped_x = x.clamp(-eps_low, eps_high)
    pessimistic = sign * torch.minimum(sign * x, sign * clipped_x)
    count = layout.seq_sum(mask.to(x.dtype)) + 1e-8  # (verl's +1e-8, not a clamp)
    ratio = torch.exp(layout.seq_sum(torch.where(mask, pessimistic, 0)) / count)
    seq_adv = layout.seq_sum(torch.where(mask, adv, 0)) / count
    losses = -seq_adv * ratio
    if is_weights is not None:
        w = is_weights.float().detach()
        w = w if w.shape == x.shape else layout.to_tokens(w)
        losses = losses * torch.exp(layout.seq_sum(torch.where(mask, torch.log(w + 1e-10), 0))
                                    / count)
    loss = losses.mean() if normalizer is None else losses.sum() / normalizer
    weights = aux_weights(aggregation_weights(mask, agg, normalizer, loss_scale_factor,
                                              cu_seqlens, seq_count),
                          mask, agg, aux_agg, normalizer, aux_normalizer, loss_scale_factor,
                          cu_seqlens, seq_count)
    hit = clipped_x != x
    metrics = {"pg_clipfrac": _masked_mean((hit & (adv > 0)).float(), mask),
               "pg_clipfrac_lower": _masked_mean((hit & (adv < 0)).float(), mask),
               "approx_kl": _masked_mean((old - logp).detach(), mask)}
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = kl_estimate(logp, ref_logprobs, kl_kind, input_clamp=kl_input_clamp,
                         output_clamp=kl_output_clamp).float()
        loss = loss + kl_coef * torch.where(mask, kl * weights, 0).sum()
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    if entropy is not None:
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * torch.where(mask, entropy.float() * weights, 0).sum()
        metrics["entropy"] = _masked_mean(entropy.detach().float(), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                loss_type: str = "ppo", eps_low: float = 0.2, eps_high: float | None = None,
                dual_clip: float | None = None, delta: float | None = None,
                ratio_log_clamp: float | None = 20.0, gspo_form: str = "verl",
                cispo_form: str = "verl", tau_pos: float = 1.0, tau_neg: float = 1.05,
                agg: str | None = None, normalizer: float | Tensor | None = None,
                loss_scale_factor: float | None = None, is_weights: Tensor | None = None,
                aux_agg: str | None = None, aux_normalizer: float | Tensor | None = None,
                ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                kl_input_clamp: float | None = 20.0, kl_output_clamp="auto",
                kl_ratio_weighted: bool = False,
                entropy: Tensor | None = None, entropy_coef: float = 0.0,
                cu_seqlens: Tensor | None = None, token_weights: Tensor | None = None,
                aux_token_weights: Tensor | None = None, token_mask: Tensor | None = None,
                clip_cov_ratio: float = 2e-4,
                clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
                kl_cov_ratio: float = 2e-4, ppo_kl_coef: float = 1.0,
                generator: torch.Generator | None = None, seq_count: str = "all"):
    """Per-token policy-gradient loss, aggregated. logprobs, old_logprobs, mask (B, T);
    advantages (B, T) or per sequence (B,). With x = logp - old (clamped to
    +-``ratio_log_clamp``: verl's and OpenRLHF's 20; None for TRL), r = exp(x), A the
    advantages, eps_high defaulting to eps_low (GSPO never clamps x, in either trainer):
      ppo (and TRL's grpo, bnpo, dr_grpo, dapo, which only pick the aggregation)
          max(-A min(r, delta), -A clamp(r, 1 - eps_low, 1 + eps_high)) (``delta``: TRL's
          two-sided clip, which caps the unclipped term only); ``dual_clip`` c (verl
          clip_ratio_c, e.g. 3): where A < 0,
          min(that, -A c)
      gspo  sequence-level ratio s = exp(masked mean of x), PPO-clipped, aggregated by
          seq-mean-token-mean; ``gspo_form="verl"``: log s_t = logp - sg(logp) + sg(mean x)
          capped at 10 (the token's own gradient); ``"trl"`` (importance_sampling_level=
          "sequence"): the gradient flows through the mean
      cispo  -sg(w) A logp: ``cispo_form="verl"`` w = clamp(r, 1 - eps_low, 1 + eps_high);
          ``"trl"`` w = min(r, eps_high), an absolute one-sided cap (TRL recommends 5)
      sapo  -(4 / tau) sigmoid(tau (r - 1)) A, tau = tau_pos where A > 0 else tau_neg
      gpg   -A logp (REINFORCE)
      clip_cov  Clip-Cov (Cui et al. 2025, arXiv 2505.22617; verl compute_policy_loss_clip_cov):
          the ppo surrogate without the ratio clamp, whose gradient is cut (the loss set to
          0) on a random ``clip_cov_ratio`` share of the valid tokens that the clip left alone
          and whose covariance (A - mean A)(logp - mean logp) lies in (clip_cov_lb,
          clip_cov_ub) (``generator`` draws them; prefkern.losses.token_selection)
      kl_cov  KL-Cov (same paper; verl compute_policy_loss_kl_cov): -A r, plus ``ppo_kl_coef``
          |logp - old| on the ``kl_cov_ratio`` share of valid tokens of largest covariance
      geo_mean  GMPO (Zhao et al. 2025, arXiv 2507.20673; verl's compute_policy_loss_geo_mean):
          x clipped to [-eps_low, eps_high] on the side its advantage's sign makes pessimistic,
          the sequence ratio exp(mean_t x) times the sequence's mean advantage, -that averaged
          over sequences (or / ``normalizer``); IS weights enter as their geometric mean; KL and
          entropy terms are aggregated separately with ``agg``
    Then times ``token_mask`` ((B, T) 0/1: TRL's high-entropy mask, an off-policy mask; the
    aggregation still counts ``mask``), times ``is_weights`` ((B, T) or (B,), detached:
    rollout importance weights, prefkern.losses.rollout_is_weights), plus
    ``kl_coef * kl_estimate(logp, ref_logprobs, kl_kind, ...)`` per token (times the
    unclamped ratio exp(logp - old), or by the sequence ratio for gspo with
    ``gspo_form="trl"``, gradient included, with ``kl_ratio_weighted``: TRL's
    ``use_bias_correction_kl``), aggregated with
    :func:`aggregate` (``agg`` None: the loss type's own; ``seq_count`` as there), minus
    ``entropy_coef`` times the aggregated ``entropy``. The KL and entropy terms are
    aggregated with ``aux_agg`` and ``aux_normalizer`` (None: the policy term's; see
    :func:`aux_weights`): ``loss = aggregate(L, agg) + kl_coef * aggregate(kl, aux_agg) -
    entropy_coef * aggregate(H, aux_agg)``. The trainers differ there: OpenRLHF aggregates
    both by token mean whatever its policy mode; verl by its loss_agg_mode, which gspo and
    sapo ignore for their policy term (seq-mean-token-mean); TRL adds the KL to the per-token
    loss (one aggregation) and takes the entropy bonus's token mean over mask * token_mask,
    not reproduced here (pass entropy_coef = 0 and add it). :func:`policy_preset` sets each.
    ``token_weights`` (B, T) replaces the aggregation by ``sum(token_weights * L)`` and
    ``aux_token_weights`` (default: token_weights) the KL and entropy terms' (the fused path
    applies the loss chunk by chunk this way).
    Returns (loss, metrics): clip fractions (pg_clipfrac, pg_clipfrac_lower for the dual
    clip), approx_kl = mean(old - logp), ratio mean/max/min, kl and entropy means; detached.
    """
    kind, agg = resolve_loss_type(loss_type, agg)
    dims = 1 if cu_seqlens is not None else 2
    if logprobs.dim() != dims or old_logprobs.shape != logprobs.shape or \
            mask.shape != logprobs.shape:
        raise ValueError("logprobs, old_logprobs and mask must all be (B, T), or (N,) with "
                         "cu_seqlens")
    layout = _Layout(logprobs, cu_seqlens)
    if advantages.shape not in (logprobs.shape, (layout.n_seqs,)):
        raise ValueError("advantages must be per token or per sequence (B,)")
    if gspo_form not in ("verl", "trl") or cispo_form not in ("verl", "trl"):
        raise ValueError("gspo_form and cispo_form are 'verl' or 'trl'")
    mask = mask.bool()
    eps_high = eps_low if eps_high is None else eps_high
    logp = logprobs.float()
    old = old_logprobs.float().detach()
    adv = advantages.float().detach()
    if adv.shape != logp.shape:
        adv = layout.to_tokens(adv)
    x = logp - old
    if ratio_log_clamp is not None and kind not in SEQUENCE_LEVEL + BATCH_LEVEL:  # raw there
        x = x.clamp(-ratio_log_clamp, ratio_log_clamp)
    metrics = {}
    if kind == "gspo":
        seq_x = layout.seq_mean(x, mask)
        x = (logp - logp.detach() + seq_x.detach()).clamp(max=10.0) if gspo_form == "verl" \
            else seq_x
    if kind == "geo_mean":
        if kl_ratio_weighted or token_mask is not None:
            raise ValueError("kl_ratio_weighted and token_mask are token-level weights: not "
                             "with geo_mean, whose loss is per sequence")
        return _geo_mean(logp, x, adv, mask, layout, eps_low, eps_high, is_weights, normalizer,
                         ref_logprobs, kl_coef, kl_kind, kl_input_clamp, kl_output_clamp,
                         entropy, entropy_coef, agg, loss_scale_factor, cu_seqlens, old, seq_count,
                         aux_agg, aux_normalizer)
    ratio = torch.exp(x)
    if kind in ("ppo", "gspo"):
        capped = ratio if delta is None else ratio.clamp(max=delta)
        loss1 = -adv * capped  # TRL's delta caps the unclipped term only
        loss2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
        clipped = torch.maximum(loss1, loss2)
        metrics["pg_clipfrac"] = _masked_mean((loss2 > loss1).float(), mask)
        per_token = clipped
        if dual_clip is not None:
            loss3 = -adv * dual_clip
            lower = torch.minimum(loss3, clipped)
            per_token = torch.where(adv < 0, lower, clipped)
            metrics["pg_clipfrac_lower"] = _masked_mean(
                ((clipped > loss3) & (adv < 0)).float(), mask)
    elif kind == "clip_cov":
        loss1 = -adv * ratio
        loss2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
        cut = clip_cov_selection(logp, adv, mask, ratio=clip_cov_ratio, lower=clip_cov_lb,
                                 upper=clip_cov_ub, exclude=loss2 > loss1, generator=generator)
        per_token = torch.where(cut, 0, torch.maximum(loss1, loss2))
        metrics["pg_clipfrac"] = _masked_mean(cut.float(), mask)
    elif kind == "kl_cov":
        chosen = kl_cov_selection(logp, adv, mask, ratio=kl_cov_ratio)
        per_token = torch.where(chosen, -adv * ratio + ppo_kl_coef * x.abs(), -adv * ratio)
        metrics["kl_cov_frac"] = _masked_mean(chosen.float(), mask)
    elif kind == "cispo":
        weight = ratio.clamp(1 - eps_low, 1 + eps_high) if cispo_form == "verl" else \
            ratio.clamp(max=eps_high)
        per_token = -weight.detach() * adv * logp
        metrics["pg_clipfrac"] = _masked_mean((weight != ratio).float(), mask)
    elif kind == "sapo":
        tau = torch.where(adv > 0, tau_pos, tau_neg)
        per_token = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv
    else:
        per_token = -adv * logp
    if token_mask is not None:
        per_token = per_token * token_mask.detach().to(per_token.dtype)
    if is_weights is not None:
        w = is_weights.float().detach()
        per_token = per_token * (w if w.shape == logp.shape else layout.to_tokens(w))
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = kl_estimate(logprobs, ref_logprobs, kl_kind, input_clamp=kl_input_clamp,
                         output_clamp=kl_output_clamp).float()
        metrics["kl"] = _masked_mean(kl.detach(), mask)
        if kl_ratio_weighted:  # the importance-sampled KL: TRL weights it by its coef_1, the
            # raw token ratio, or the sequence ratio at importance_sampling_level="sequence"
            seq_ratio = kind == "gspo" and gspo_form == "trl"
            kl = kl * torch.exp(x if seq_ratio else logp - old)
    if token_weights is None:
        w = aggregation_weights(mask, agg, normalizer, loss_scale_factor, cu_seqlens, seq_count)
        w_aux = aux_weights(w, mask, agg, aux_agg, normalizer, aux_normalizer,
                            loss_scale_factor, cu_seqlens, seq_count)
    else:
        w = token_weights
        w_aux = token_weights if aux_token_weights is None else aux_token_weights
    loss = torch.where(mask, per_token * w, 0).sum()
    if ref_logprobs is not None and kl_coef != 0.0:
        loss = loss + kl_coef * torch.where(mask, kl * w_aux, 0).sum()
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * torch.where(mask, entropy.float() * w_aux, 0).sum()
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach().float(), mask)
    r = ratio.detach()
    big = torch.finfo(r.dtype).max
    metrics.update(approx_kl=_masked_mean((old - logp).detach(), mask),
                   ratio_mean=_masked_mean(r, mask),
                   ratio_max=torch.where(mask, r, -big).max(),
                   ratio_min=torch.where(mask, r, big).min())
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip: float | None = 0.2, agg: str = "token-mean",
               normalizer: float | Tensor | None = None,
               loss_scale_factor: float | None = None, seq_count: str = "all"):
    """PPO's clipped value loss (verl compute_value_loss, OpenRLHF ValueLoss):
    ``0.5 * agg(max((v - R)^2, (v_clip - R)^2))`` with ``v_clip = old + clamp(v - old, -clip,
    clip)`` (clip None: the plain squared error). Returns (loss, {"vf_clipfrac"})."""
    v, old, ret = values.float(), old_values.float().detach(), returns.float().detach()
    mask = mask.bool()
    err = (v - ret) ** 2
    if clip is None:
        per_token = err
        frac = torch.zeros((), device=v.device)
    else:
        v_clip = old + (v - old).clamp(-clip, clip)
        err_clip = (v_clip - ret) ** 2
        per_token = torch.maximum(err, err_clip)
        frac = _masked_mean((err_clip > err).float(), mask)
    loss = 0.5 * aggregate(per_token, mask, agg, normalizer, loss_scale_factor, seq_count)
    return loss, {"vf_clipfrac": frac.detach()}



def linear_policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor,
                       old_logprobs: Tensor | None, advantages: Tensor, *,
                       mask: Tensor | None = None, return_per_token: bool = False,
                       bias: Tensor | None = None, temperature: float | Tensor = 1.0,
                       ignore_index: int = -100, softcap: float | None = None,
                       logit_scale: float | None = None, fused: bool = True,
                       cu_seqlens: Tensor | None = None, process_group=None,
                       vocab_start: int | None = None, vocab_size: int | None = None,
                       dw_budget_bytes: int | None = None, backend: str | None = None,
                       **loss_kw):
    """:func:`policy_loss` on log-probs (and entropies, for the entropy bonus and its metric)
    computed from hidden states (B, T, H) and the LM head, with targets (B, T): no logits; or
    packed hidden (N, H), targets (N,) with ``cu_seqlens``. ``mask`` defaults to
    ``targets != ignore_index``.

    ``fused=True`` (per-token surrogates): the gradient is computed in the forward pass,
    3 GEMMs in all (prefkern.ops.policy_fused); the backward only scales it. gspo and
    geo_mean (sequence-level), clip_cov and kl_cov (batch-level token selection), or
    ``fused=False``: the two-pass path (prefkern.linear_logprobs, a recomputing backward).
    ``process_group`` (vocab-parallel head shards, see prefkern.linear_logprobs) works on
    both paths (the fused one merges each chunk's row statistics across the group).
    ``dw_budget_bytes``: the fused path's fp32 (V, H) dW accumulator for a half-precision
    weight (4VH bytes) must fit it, else the two-pass path runs (None: no limit).
    ``old_logprobs=None``: on-policy, the detached log-probs of this very pass (ratio 1 with
    the gradient of logp, as TRL does when it skips the old-policy pass). Returns (loss,
    metrics); ``return_per_token`` adds the detached per-token "logprobs" and "entropy"."""
    kind, _ = resolve_loss_type(loss_kw.get("loss_type", "ppo"), loss_kw.get("agg"))
    mask = targets != ignore_index if mask is None else mask.bool()
    from prefkern.ops.grad_in_forward import accumulator_fits
    from prefkern.ops.vocab_parallel import full_vocab

    if not fused or kind in SEQUENCE_LEVEL + BATCH_LEVEL or not accumulator_fits(
            weight, dw_budget_bytes, None if dw_budget_bytes is None else
            full_vocab(weight, process_group, vocab_start, vocab_size)):
        from prefkern.ops.linear_logprobs import linear_logprobs

        out = linear_logprobs(hidden, weight, targets, bias, temperature=temperature,
                              ignore_index=ignore_index, softcap=softcap,
                              logit_scale=logit_scale, return_entropy=True,
                              process_group=process_group, vocab_start=vocab_start,
                              vocab_size=vocab_size, backend=backend)
        old = out.logprobs.detach() if old_logprobs is None else old_logprobs
        loss, metrics = policy_loss(out.logprobs, old, advantages, mask, entropy=out.entropy,
                                    cu_seqlens=cu_seqlens, **loss_kw)
        per_token = (out.logprobs, out.entropy)
    else:
        loss, metrics, per_token = _fused_policy_loss(
            hidden, weight, targets, old_logprobs, advantages, mask, bias, temperature,
            ignore_index, softcap, logit_scale, backend, cu_seqlens,
            (process_group, vocab_start, vocab_size), loss_kw)
    if return_per_token:
        metrics = dict(metrics, logprobs=per_token[0].detach(), entropy=per_token[1].detach())
    return loss, metrics


def _fused_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, bias,
                       temperature, ignore_index, softcap, logit_scale, backend, cu_seqlens,
                       shards, loss_kw):
    from prefkern._autocast import without_autocast
    from prefkern.dispatch import resolve_backend
    from prefkern.ops import head as head_mod
    from prefkern.ops import policy_fused
    from prefkern.ops.divergence_passes import HeadArgs, Side
    from prefkern.ops.grad_in_forward import GradientInForward, gradients_needed
    from prefkern.ops.vocab_parallel import resolve_head

    weight, bias, shard = resolve_head(weight, bias, *shards)
    hidden, weight, bias = head_mod.autocast_inputs(hidden, weight, bias)
    device = head_mod.check_linear(hidden, weight, bias)
    if hidden.dim() != (2 if cu_seqlens is not None else 3) or \
            targets.shape != hidden.shape[:-1]:
        raise ValueError("hidden must be (B, T, H) with targets (B, T), or packed (N, H) with "
                         "targets (N,) and cu_seqlens")
    targets, bad = head_mod.screen_fused_targets(targets, weight, shard, ignore_index,
                                                 "linear_policy_loss")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t is not None and t.shape != targets.shape:
            raise ValueError(f"{name} must be shaped like targets {tuple(targets.shape)}")
    lead = targets.shape
    temperature = head_mod.as_rows(temperature, lead)
    head_mod.check_temperature(temperature, lead, device)
    fp64 = hidden.dtype == torch.float64
    name = resolve_backend("linear_policy_loss", backend, device,
                           ("torch",) if fp64 else ("triton", "torch"),
                           () if fp64 else ("triton",))
    folded = head_mod.fold(temperature, logit_scale, softcap, compute_dtype(hidden.dtype))
    head = HeadArgs(folded.inv_temp if folded.row_inv_temp is None else folded.row_inv_temp,
                    folded.softcap)
    kind, agg = resolve_loss_type(loss_kw.pop("loss_type", "ppo"), loss_kw.pop("agg", None))
    normalizer = loss_kw.pop("normalizer", None)
    scale_factor = loss_kw.pop("loss_scale_factor", None)
    seq_count = loss_kw.pop("seq_count", "all")
    aux_agg, aux_normalizer = loss_kw.pop("aux_agg", None), loss_kw.pop("aux_normalizer", None)
    weights = aggregation_weights(mask, agg, normalizer, scale_factor, cu_seqlens, seq_count)
    w_aux = aux_weights(weights, mask, agg, aux_agg, normalizer, aux_normalizer, scale_factor,
                        cu_seqlens, seq_count).reshape(-1)
    weights = weights.reshape(-1)
    layout = _Layout(targets, cu_seqlens)
    adv = advantages if advantages.shape == lead else layout.to_tokens(advantages)
    per_token = {"ref_logprobs": loss_kw.pop("ref_logprobs", None),
                 "is_weights": loss_kw.pop("is_weights", None),
                 "token_mask": loss_kw.pop("token_mask", None)}
    is_w = per_token["is_weights"]
    is_w = is_w if is_w is None or is_w.shape == lead else layout.to_tokens(is_w)
    flat = {k: None if t is None else t.reshape(-1) for k, t in
            dict(old=old_logprobs, adv=adv, mask=mask, ref_logprobs=per_token["ref_logprobs"],
                 is_weights=is_w, token_mask=per_token["token_mask"]).items()}

    def token_loss(rows, lp, ent):
        col = {k: None if t is None else t[rows][:, None] for k, t in flat.items()}
        old = lp.detach()[:, None] if col["old"] is None else col["old"]
        loss, _ = policy_loss(lp[:, None], old, col["adv"], col["mask"],
                              loss_type=kind, token_weights=weights[rows][:, None],
                              aux_token_weights=w_aux[rows][:, None], entropy=ent[:, None],
                              ref_logprobs=col["ref_logprobs"],
                              is_weights=col["is_weights"], token_mask=col["token_mask"],
                              **loss_kw)
        return loss

    need = gradients_needed(hidden, weight, bias)
    with torch.no_grad(), without_autocast(hidden):
        logp, entropy, dh, dw, db = policy_fused.fused_policy(
            Side(hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                 None if bias is None else bias.detach()),
            targets.reshape(-1), head, ignore_index, token_loss, name == "triton", need,
            shard=shard)
        old = logp.view(lead) if old_logprobs is None else old_logprobs
        value, metrics = policy_loss(logp.view(lead), old, advantages, mask,
                                     loss_type=kind, agg=agg, normalizer=normalizer,
                                     loss_scale_factor=scale_factor, seq_count=seq_count,
                                     aux_agg=aux_agg, aux_normalizer=aux_normalizer,
                                     entropy=entropy.view(lead),
                                     cu_seqlens=cu_seqlens, **per_token, **loss_kw)
        value = _checks.poison(value, None if bad is None else bad.any())
    dh = None if dh is None else dh.view(hidden.shape)
    loss = GradientInForward.apply(value, dh, dw, db, hidden, weight, bias)
    return loss, metrics, (logp.view(lead), entropy.view(lead))


# Each trainer's defaults for policy_loss, read from its source (commits in the module doc;
# OpenRLHF 3c3be623 openrlhf/models/loss.py PolicyLoss and utils.compute_approx_kl):
#   ratio clamp  verl and OpenRLHF clamp logp - old to +-20, TRL does not
#   dual clip    verl's clip_ratio_c = 3 is always on in compute_policy_loss_vanilla and
#                absent from its gspo (compute_policy_loss_gspo), so the verl preset drops it
#                there; OpenRLHF's dual_clip defaults to None; TRL has none
#   gspo         verl: stop-gradient form, seq-mean-token-mean; OpenRLHF and TRL: the
#                gradient through the sequence mean (TRL: importance_sampling_level="sequence")
#   cispo        verl: relative two-sided clip; TRL: absolute cap at epsilon_high
#   KL           verl low_var_kl (k3, exponent +-20, value +-10; kl_penalty_forward clamps
#                no other estimator's value: output_clamp "auto"); OpenRLHF k1 by default,
#                every estimator clamped to +-10; TRL k3, no clamps (beta = 0 by default)
#   loss type    TRL's default loss_type is dapo (token mean over the generation batch)
#   aggregation  without a global normalizer, verl's seq-mean-* modes and OpenRLHF's sample
#                mode (token_level_loss=False, forced for gspo) divide by the sequences with
#                a valid token (seq_count="nonempty"), TRL's grpo / dr_grpo by all B;
#                OpenRLHF's token mode is token-mean (normalizer = batch_num_tokens /
#                dp_size when given); tests/test_openrlhf_parity.py
#   KL, entropy  OpenRLHF: aggregate_loss's token mode whatever the policy's mode (ppo_actor.py
#                training_step); verl: agg_loss with loss_agg_mode (workers/utils/losses.py
#                ppo_loss), which compute_policy_loss_gspo / _sapo replace by
#                seq-mean-token-mean for the policy term only; TRL: the KL inside the per-token
#                loss (grpo_trainer.py _compute_loss)
POLICY_PRESETS = {
    "verl": dict(loss_type="ppo", eps_low=0.2, eps_high=0.2, dual_clip=3.0,
                 ratio_log_clamp=20.0, gspo_form="verl", cispo_form="verl", kl_kind="k3",
                 kl_input_clamp=20.0, kl_output_clamp="auto", seq_count="nonempty"),
    "openrlhf": dict(loss_type="ppo", eps_low=0.2, eps_high=0.2, dual_clip=None,
                     ratio_log_clamp=20.0, gspo_form="trl", kl_kind="k1", kl_input_clamp=None,
                     kl_output_clamp=10.0, seq_count="nonempty", aux_agg="token-mean"),
    "trl": dict(loss_type="dapo", eps_low=0.2, eps_high=0.2, dual_clip=None,
                ratio_log_clamp=None, gspo_form="trl", cispo_form="trl", kl_kind="k3",
                kl_input_clamp=None, kl_output_clamp=None),
}


def policy_preset(trainer: str, **overrides) -> dict:
    """policy_loss keyword arguments with ``trainer``'s semantics ("verl", "openrlhf", "trl";
    see POLICY_PRESETS), updated by ``overrides``: ``policy_loss(..., **policy_preset("trl",
    loss_type="grpo"))``. For "verl", ``agg`` is verl's loss_agg_mode: with gspo and sapo it
    aggregates only the KL and entropy terms (``aux_agg``; default token-mean), the policy
    term being seq-mean-token-mean as in verl."""
    if trainer not in POLICY_PRESETS:
        raise ValueError(f"trainer must be one of {tuple(POLICY_PRESETS)}, got {trainer!r}")
    preset = {**POLICY_PRESETS[trainer], **overrides}
    if trainer == "verl" and preset["loss_type"] == "gspo" and "dual_clip" not in overrides:
        preset["dual_clip"] = None  # verl's dual clip is the vanilla loss's only
    if trainer == "verl" and preset["loss_type"] in FORCED_AGG and "aux_agg" not in overrides:
        preset["aux_agg"] = preset.pop("agg", None) or "token-mean"
    return preset
