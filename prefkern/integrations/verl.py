"""verl adapters: prefkern's ops and losses with verl's signatures and return contracts
(verl-project/verl 1dda039; the verl 0.9.1 release has the same ones):

  linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)
      verl/utils/kernel/linear_cross_entropy.py: fp32 (N,) log-probs and entropy, both
      differentiable
  logprobs_from_logits(logits, labels, inplace_backward=True), entropy_from_logits(logits)
      verl/utils/torch_functional.py
  kl_penalty(logprob, ref_logprob, kl_penalty), agg_loss(loss_mat, loss_mask, loss_agg_mode,
      dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
      verl/trainer/ppo/core_algos.py
  policy_loss_fn(name) -> fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
      config, rollout_is_weights) -> (loss, metrics): vanilla, gspo, sapo, gpg, clip_cov,
      kl_cov, geo_mean, cispo, reading the same ActorConfig fields verl reads
  compute_gae_advantage_return, compute_{grpo,rloo,opo,gpg,reinforce_plus_plus_baseline,
      reinforce_plus_plus,remax}_outcome_advantage: verl's estimator signatures (index: the
      prompt uids) over prefkern.gae / prefkern.group_advantages
  register(): puts those policy losses and estimators into verl's registries
      (register_policy_loss, register_adv_est)

Nothing imports verl except :func:`register`. Metrics are floats (``.item()``), as verl's own
policy losses return them (one host read per metric, as there).
"""

from __future__ import annotations

import torch
from torch import Tensor

import prefkern
from prefkern.losses.policy import aggregate, policy_loss

POLICY_LOSSES = ("vanilla", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "cispo")
# verl name -> prefkern loss_type
_KIND = {"vanilla": "ppo", "gspo": "gspo", "sapo": "sapo", "gpg": "gpg",
         "clip_cov": "clip_cov", "kl_cov": "kl_cov", "geo_mean": "geo_mean", "cispo": "cispo"}
# the metric keys each verl policy loss returns ("lower" and "clipfrac" 0.0 where it has none)
_METRICS = {"vanilla": ("clipfrac", "ppo_kl", "lower"), "gspo": ("clipfrac", "ppo_kl", "lower"),
            "sapo": ("clipfrac", "ppo_kl", "lower"), "cispo": ("clipfrac", "ppo_kl", "lower"),
            "geo_mean": ("clipfrac", "ppo_kl", "lower"), "clip_cov": ("clipfrac", "ppo_kl"),
            "kl_cov": ("ppo_kl",), "gpg": ()}


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                         temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None) -> tuple[Tensor, Tensor]:
    """verl's fused LM-head kernel: ``(logprobs, entropy)`` of ``labels`` under
    ``softmax(hidden @ weight.T / temperature)``, each (N,) fp32 over the flattened tokens,
    both with gradients. Only ``reduction="none"`` (what verl's callers pass) is supported.
    ``dist_process_group``: verl's vocab-parallel layout, every rank holding an equal
    contiguous shard, rank r rows [r * V_r, (r + 1) * V_r) (its kernel offsets label ids by
    ``rank * vocab_size``): prefkern's ``process_group`` with that layout, no host read. The
    hidden states' gradient is, as verl's kernel returns it, a per-rank share that verl's
    caller sums over the group (prefkern's op sums it already: each rank gets sum / R)."""
    if reduction != "none":
        raise ValueError("prefkern's verl linear_cross_entropy supports reduction='none' (the "
                         "only value verl's model forwards pass)")
    shards = {}
    if dist_process_group is not None:
        import torch.distributed as dist

        local, world = weight.shape[0], dist.get_world_size(dist_process_group)
        shards = dict(process_group=dist_process_group,
                      vocab_start=dist.get_rank(dist_process_group) * local,
                      vocab_size=world * local)
        hidden = _ShareOfSum.apply(hidden, world)
    out = prefkern.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight,
                                   labels.reshape(-1), temperature=temperature,
                                   ignore_index=_NO_IGNORE, return_entropy=True, **shards)
    return out.logprobs, out.entropy


class _ShareOfSum(torch.autograd.Function):
    """Identity; the backward divides the gradient by the group size R: the op below returns
    the group's summed dhidden on every rank, verl's callers sum the ranks' shares again."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


# verl has no ignore index: every label is a token id (padding included)
_NO_IGNORE = -(2**62)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """verl's ``logprobs_from_logits``: fp32 log-probs of ``labels`` (..., shaped like labels);
    ``inplace_backward`` writes the logits' gradient into their storage, as verl's flash-attn
    path does."""
    return prefkern.logprobs_from_logits(logits, labels, ignore_index=_NO_IGNORE,
                                         inplace_backward=inplace_backward)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """verl's ``entropy_from_logits``: ``logsumexp(z) - (softmax(z) * z).sum(-1)``, fp32."""
    return prefkern.entropy_from_logits(logits)


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's ``kl_penalty``: kl / k1, abs, mse / k2, low_var_kl / k3 (the only clamped one:
    exponent +-20, value +-10), each with a "+" suffix (the value of the estimator with k2's
    gradient); "full" needs the whole vocabulary: use prefkern.linear_divergence."""
    if kl_penalty.rstrip("+") == "full":
        raise NotImplementedError("kl_penalty='full' needs the logits of every token: use "
                                  "prefkern.linear_divergence / logits_divergence")
    clamped = kl_penalty.rstrip("+") in ("low_var_kl", "k3")
    return prefkern.kl_estimate(logprob, ref_logprob, kl_penalty,
                                input_clamp=20.0 if clamped else None,
                                output_clamp=10.0 if clamped else None)


def _normalizer(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size):
    total = batch_num_tokens if loss_agg_mode == "token-mean" else global_batch_size
    if total is None:
        if dp_size > 1 and loss_agg_mode != "token-sum":
            name = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
            raise ValueError(f"(global) {name} is required when dp_size > 1")
        return None
    return total / dp_size


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """verl's ``agg_loss``: global totals divided by dp_size (DDP averages the gradients),
    token-sum scaled by dp_size, seq-mean over the sequences with a valid token."""
    loss = aggregate(loss_mat, loss_mask, loss_agg_mode,
                     _normalizer(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size),
                     loss_scale_factor, seq_count="nonempty")
    return loss * dp_size if loss_agg_mode == "token-sum" else loss


def _get(config, name, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name,
                                                                              default)
    return default if value is None else value


def _policy_kwargs(name: str, config) -> dict:
    clip = config.clip_ratio
    kw = dict(loss_type=_KIND[name], eps_low=_get(config, "clip_ratio_low", clip),
              eps_high=_get(config, "clip_ratio_high", clip), ratio_log_clamp=20.0,
              gspo_form="verl", cispo_form="verl", seq_count="nonempty")
    if name == "vanilla":
        kw["dual_clip"] = _get(config, "clip_ratio_c", 3.0)
        if not kw["dual_clip"] > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {kw['dual_clip']}")
    if name == "sapo":
        kw.update(tau_pos=config.tau_pos, tau_neg=config.tau_neg)
    sub = getattr(config, "policy_loss", None)
    if name == "clip_cov":
        kw.update(clip_cov_ratio=_get(sub, "clip_cov_ratio", 2e-4),
                  clip_cov_lb=_get(sub, "clip_cov_lb", 1.0),
                  clip_cov_ub=_get(sub, "clip_cov_ub", 5.0))
    if name == "kl_cov":
        kw.update(kl_cov_ratio=_get(sub, "kl_cov_ratio", 2e-4),
                  ppo_kl_coef=_get(sub, "ppo_kl_coef", 1.0))
    return kw


def policy_loss_fn(name: str, *, gspo_forces_seq_mean: bool = True):
    """A policy loss with verl's registered signature for ``name`` (see POLICY_LOSSES).
    sapo always aggregates seq-mean-token-mean; gspo too on verl's main branch (1dda039),
    while the 0.9.1 release uses the caller's loss_agg_mode (``gspo_forces_seq_mean=False``;
    :func:`register` picks it from verl's version)."""
    forced = {"sapo": "seq-mean-token-mean"}
    if gspo_forces_seq_mean:
        forced["gspo"] = "seq-mean-token-mean"
    if name not in POLICY_LOSSES:
        raise ValueError(f"prefkern implements the verl policy losses {POLICY_LOSSES}, not "
                         f"{name!r}")

    def loss_fn(old_log_prob, log_prob, advantages, response_mask,
                loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
        if config is None:
            raise ValueError("verl policy losses need the actor config")
        info = dict(getattr(config, "global_batch_info", None) or {})
        dp_size = info.get("dp_size", 1)
        mode = forced.get(name, loss_agg_mode)
        kw = _policy_kwargs(name, config)
        normalizer = _normalizer(mode, dp_size, info.get("batch_num_tokens"),
                                 info.get("global_batch_size"))
        if name == "geo_mean":  # a mean over sequences (torch.mean), not agg_loss
            normalizer = None
        loss, metrics = policy_loss(log_prob, old_log_prob, advantages, response_mask.bool(),
                                    agg=mode, normalizer=normalizer,
                                    loss_scale_factor=info.get("loss_scale_factor"),
                                    is_weights=rollout_is_weights, **kw)
        if mode == "token-sum" and name != "geo_mean":
            loss = loss * dp_size
        return loss, _verl_metrics(name, metrics, log_prob, old_log_prob, response_mask)

    loss_fn.__name__ = f"prefkern_policy_loss_{name}"
    return loss_fn


def _verl_metrics(name, metrics, log_prob, old_log_prob, mask) -> dict:
    ppo_kl = metrics["approx_kl"]  # masked mean of old - logp, unclamped (gspo, geo_mean, ...)
    m = mask.bool()
    x = (log_prob - old_log_prob).detach()
    if name == "kl_cov":  # verl reports the mean |log-ratio| there
        ppo_kl = torch.where(m, x.abs(), 0).sum() / m.sum().clamp(min=1)
    elif name in ("vanilla", "sapo", "cispo"):  # verl averages the +-20-clamped log-ratio
        ppo_kl = torch.where(m, -x.clamp(-20.0, 20.0), 0).sum() / m.sum().clamp(min=1)
    values = {"clipfrac": ("actor/pg_clipfrac", metrics.get("pg_clipfrac", 0.0)),
              "ppo_kl": ("actor/ppo_kl", ppo_kl),
              "lower": ("actor/pg_clipfrac_lower", metrics.get("pg_clipfrac_lower", 0.0))}
    return {values[key][0]: float(values[key][1]) for key in _METRICS[name]}


# ---------------------------------------------------------------- advantage estimators

ADV_ESTIMATORS = ("gae", "grpo", "rloo", "opo", "gpg", "reinforce_plus_plus_baseline",
                  "reinforce_plus_plus", "remax")


def _group_ids(index) -> Tensor:
    """verl's ``index`` (prompt uids: an array of strings or numbers) -> int64 group ids."""
    if isinstance(index, Tensor):
        return index.long()
    ids: dict = {}
    return torch.tensor([ids.setdefault(key, len(ids)) for key in list(index)],
                        dtype=torch.int64)


def _outcome(method: str, token_level_rewards, response_mask, index=None, epsilon=1e-6,
             **kw):
    groups = None if index is None else _group_ids(index).to(token_level_rewards.device)
    return prefkern.group_advantages(token_level_rewards, groups, method=method, eps=epsilon,
                                     mask=response_mask, **kw)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: the scan over the response, then ``masked_whiten`` of the advantages."""
    return prefkern.gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam,
                        whiten=True)


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    return _outcome("grpo" if norm_adv_by_std_in_grpo else "dr_grpo", token_level_rewards,
                    response_mask, index, epsilon)


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   config=None, **_):
    return _outcome("rloo", token_level_rewards, response_mask, index, epsilon)


def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                  config=None, **_):
    return _outcome("opo", token_level_rewards, response_mask, index, epsilon)


def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                  f_norm=1.0, alpha=1.0, config=None, **_):
    adv, ret = _outcome("gpg", token_level_rewards, response_mask, index, epsilon)
    return adv / f_norm, ret / f_norm


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask,
                                                           index, epsilon=1e-6, config=None,
                                                           **_):
    return _outcome("reinforce_pp_baseline", token_level_rewards, response_mask, index,
                    epsilon)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask,
                                                  config=None, **_):
    gamma = _get(config, "gamma", 1.0) if config is not None else 1.0
    return _outcome("reinforce_pp", token_level_rewards, response_mask, gamma=gamma)


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask,
                                    config=None, **_):
    return _outcome("remax", token_level_rewards, response_mask, baseline=reward_baselines)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def register(names=POLICY_LOSSES, advantage_estimators=ADV_ESTIMATORS) -> None:
    """Replace verl's registered policy losses ``names`` and advantage estimators by
    prefkern's (imports verl; gspo's aggregation follows the installed verl version)."""
    import verl
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    forces = _version(getattr(verl, "__version__", "0")) > (0, 9, 1)
    for name in names:
        register_policy_loss(name)(policy_loss_fn(name, gspo_forces_seq_mean=forces))
    functions = {"gae": compute_gae_advantage_return, "grpo": compute_grpo_outcome_advantage,
                 "rloo": compute_rloo_outcome_advantage, "opo": compute_opo_outcome_advantage,
                 "gpg": compute_gpg_outcome_advantage,
                 "reinforce_plus_plus_baseline":
                     compute_reinforce_plus_plus_baseline_outcome_advantage,
                 "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
                 "remax": compute_remax_outcome_advantage}
    for name in advantage_estimators:
        register_adv_est(name)(functions[name])
