"""OpenRLHF adapters: prefkern's ops and losses with OpenRLHF's signatures and return contracts
(OpenRLHF/OpenRLHF 3c3be62: openrlhf/models/utils.py, openrlhf/models/loss.py,
openrlhf/trainer/ppo_utils/experience_maker.py). Nothing here imports OpenRLHF.

  compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1")    every estimator +-10
  log_probs_from_logits(logits, labels, temperature=1.0)              (no in-place division of
                                                                      the logits, unlike there)
  compute_entropy(logits)
  get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)
      OpenRLHF zeroes rewards and values off the mask, then scans every position
  PolicyLoss, ValueLoss, DPOLoss: nn.Modules with OpenRLHF's constructors and forward returns

The actor's forward without logits: prefkern.integrations.openrlhf_actor.patch_actor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import prefkern
from prefkern.losses.policy import policy_loss, value_loss
from prefkern.losses.preference import preference_loss
from prefkern.losses.rollout_correction import rollout_is_weights


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, kl_estimator: str = "k1"
                      ) -> Tensor:
    """OpenRLHF's ``compute_approx_kl``: k1, k2 or k3 of x = log_probs - log_probs_base,
    fp32, clamped to [-10, 10] (every estimator, k1 included)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    return prefkern.kl_estimate(log_probs, log_probs_base, kl_estimator, input_clamp=None,
                                output_clamp=10.0)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: log-softmax(logits / T) at the labels, fp32. The
    logits are not divided in place (OpenRLHF's version modifies its argument)."""
    return prefkern.logprobs_from_logits(logits, labels, temperature=temperature,
                                         ignore_index=-(2**62))


def compute_entropy(logits: Tensor) -> Tensor:
    """OpenRLHF's ``compute_entropy``: ``logsumexp(z) - (softmax(z) * z).sum(-1)``, fp32."""
    return prefkern.entropy_from_logits(logits)


def get_advantages_and_returns(values: Tensor, rewards: Tensor, action_mask: Tensor | None,
                               gamma: float, lambd: float) -> tuple[Tensor, Tensor]:
    """OpenRLHF's GAE: rewards and values zeroed off ``action_mask``, then the scan over every
    position; returns = advantages + (masked) values; advantages detached."""
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    advantages, returns = prefkern.gae(rewards, values, None, gamma=gamma, lam=lambd)
    return advantages.detach(), returns


def _agg(token_level: bool, mask: Tensor, dp_size: int, batch_num_tokens, global_batch_size):
    """-> (agg, normalizer, seq_count) of OpenRLHF's aggregate_loss."""
    if token_level:
        return "token-mean", (None if batch_num_tokens is None
                              else batch_num_tokens / dp_size), "all"
    return ("seq-mean-token-mean", None if global_batch_size is None
            else global_batch_size / dp_size, "nonempty")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss``: forward(log_probs, old_log_probs, advantages, action_mask,
    rollout_log_probs=None, dp_size=1, batch_num_tokens=None, global_batch_size=None) ->
    (loss, clip_ratio, ppo_kl, vllm_kl)."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
                 dual_clip: float | None = None, token_level_loss: bool = True,
                 policy_loss_type: str = "ppo", enable_vllm_is_correction: bool = False,
                 vllm_is_truncated_threshold=None, vllm_is_correction_type: str = "tis"):
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if vllm_is_correction_type not in ("tis", "icepop", "seq-mask-tis"):
            raise ValueError(f"Invalid vllm_is_correction_type: {vllm_is_correction_type}")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, \
            dual_clip
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.policy_loss_type = policy_loss_type
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None,
                rollout_log_probs=None, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None):
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else \
            action_mask.bool()
        agg, normalizer, seq_count = _agg(self.token_level_loss, mask, dp_size,
                                          batch_num_tokens, global_batch_size)
        gspo = self.policy_loss_type == "gspo"
        old = old_log_probs
        if gspo and self.enable_vllm_is_correction:
            old = rollout_log_probs  # GSPO's ratio against the rollout policy there
        weights = vllm_kl = None
        if self.enable_vllm_is_correction and not gspo:
            low, high = self.vllm_is_truncated_threshold
            weights = rollout_is_weights(old_log_probs, rollout_log_probs, mask,
                                         mode=self.vllm_is_correction_type, low=low,
                                         high=high)
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
        loss, metrics = policy_loss(
            log_probs, old, advantages, mask, loss_type=self.policy_loss_type,
            eps_low=self.clip_eps_low, eps_high=self.clip_eps_high, dual_clip=self.dual_clip,
            ratio_log_clamp=20.0, gspo_form="trl", agg=agg, normalizer=normalizer,
            seq_count=seq_count, is_weights=weights)
        ppo_kl = _masked_mean(-(log_probs - old_log_probs).detach(), mask)
        return loss, metrics["pg_clipfrac"], ppo_kl, vllm_kl


class ValueLoss(torch.nn.Module):
    """OpenRLHF's ``ValueLoss``: forward(values, old_values, returns, action_mask=None,
    dp_size=1, batch_num_tokens=None, global_batch_size=None) -> loss."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True):
        super().__init__()
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(self, values, old_values, returns, action_mask=None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):
        mask = torch.ones_like(values, dtype=torch.bool) if action_mask is None else \
            action_mask.bool()
        agg, normalizer, seq_count = _agg(self.token_level_loss, mask, dp_size,
                                          batch_num_tokens, global_batch_size)
        return value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg,
                          normalizer=normalizer, seq_count=seq_count)[0]


class DPOLoss(torch.nn.Module):
    """OpenRLHF's ``DPOLoss``: forward(policy_chosen_logps, policy_rejected_logps,
    reference_chosen_logps, reference_rejected_logps) -> (loss, chosen_rewards,
    rejected_rewards); cDPO label smoothing, or IPO on the sequence log-ratios."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False):
        super().__init__()
        self.beta, self.label_smoothing, self.ipo = beta, label_smoothing, ipo

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps):
        if self.ipo:
            ones = torch.ones_like(policy_chosen_logps)  # IPO on raw sums: unit "lengths"
            loss, _ = preference_loss(policy_chosen_logps, policy_rejected_logps,
                                      reference_chosen_logps, reference_rejected_logps,
                                      loss_type="ipo", beta=self.beta, chosen_lengths=ones,
                                      rejected_lengths=ones)
        else:  # cDPO (Mitchell 2023): not a TRL loss type (TRL's sigmoid has no smoothing)
            d = self.beta * ((policy_chosen_logps.double() - policy_rejected_logps.double())
                             - (reference_chosen_logps.double()
                                - reference_rejected_logps.double()))
            ls = self.label_smoothing
            loss = (-(1 - ls) * F.logsigmoid(d) - ls * F.logsigmoid(-d)).mean().float()
        chosen = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return loss, chosen, rejected
