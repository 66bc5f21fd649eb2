"""Regression losses on sequence log-ratios and rewards: GVPO, A*-PO and DRO (the loss zoo's
``regress.gvpo``, ``regress.astar_po``, ``dro.mse``). Float64 math on the (B,) scalars, fp32
out; group statistics are segment sums over a dense group index (no Python loop over groups,
no host sync). The loops that define them: :mod:`prefkern.reference.group_losses`.

Inputs are per-sequence scalars: ``logps`` the policy's summed response log-probs
(:func:`prefkern.losses.sequence_reduce` of ``linear_logprobs``), the other log-probs likewise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prefkern import _checks
from prefkern.losses.preference import REDUCTIONS, _f64
from prefkern.ops.group_advantages import dense_group_index, gather_rows


def _check_sequences(reduction: str, **tensors: Tensor | None) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n = None
    for name, t in tensors.items():
        if t is None:
            continue
        if name == "group_ids":
            _checks.check_index(name, t)
        else:
            _checks.check_float(name, t)
        if t.dim() != 1 or (n is not None and t.shape[0] != n):
            raise ValueError(f"{name} must be (B,) like the other sequence inputs, got "
                             f"{tuple(t.shape)}")
        n = t.shape[0]
    _checks.check_same_device(**{k: v for k, v in tensors.items() if v is not None})
    return n


def _reduce(losses: Tensor, reduction: str, count: int | None = None) -> Tensor:
    """none / sum / mean over ``count`` rows (default: these), an empty batch's mean 0."""
    if reduction == "none":
        return losses
    count = losses.shape[0] if count is None else count
    return losses.sum() if reduction == "sum" else losses.sum() / max(count, 1)


def group_mean(x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """(each sample's group mean of x, its group size), x float64 (B,), index dense (B,)."""
    sums = torch.zeros_like(x).index_add(0, index, x)
    sizes = torch.zeros_like(x).index_add_(0, index, torch.ones_like(x))
    return (sums / sizes.clamp(min=1))[index], sizes[index]


def gvpo_loss(logps: Tensor, old_logps: Tensor, rewards: Tensor, group_ids: Tensor, *,
              beta: float = 0.1, reduction: str = "sum", process_group=None
              ) -> tuple[Tensor, dict]:
    """GVPO (Zhang et al. 2025, "GVPO: Group Variance Policy Optimization for Large Language
    Model Post-Training", arXiv:2504.19599), as its authors' verl recipe computes it
    (zichongli5/verl 9cbfa72 recipe/gvpo/gvpo_core_algos.py, ``compute_policy_loss_gvpo``).

    With ``r_i = beta * (logps_i - old_logps_i)`` (the implicit reward against the sampling
    policy) and group means taken over the samples sharing a group id (a prompt's uid):
    ``e_i = (r_i - mean_g(r).detach()) - (rewards_i - mean_g(rewards))``, per sequence
    ``0.5 * e_i ** 2 / (n_g - 1)`` (0 for a group of one). The recipe detaches the group mean
    of r; with centred rewards the gradient is the same as through the mean (sum_i e_i = 0).
    ``rewards`` may be raw or already centred (verl's grpo estimator without std: centring is
    idempotent). reduction "sum" as the recipe (a sum over its micro-batch), "mean" (0 for an
    empty batch), "none".

    ``process_group`` (data parallel, every rank the same B, ranks in batch order): group
    statistics over the whole batch, a prompt's samples on any ranks (one all-gather of r,
    rewards and ids, as the recipe's); each rank gets its rows' share, the shares summing to
    the whole batch's loss ("mean" divides by the whole batch's B). No host sync.
    Returns (loss fp32, {"implicit_reward_mean", "residual_rms"}), metrics of the shard."""
    _check_sequences(reduction, logps=logps, old_logps=old_logps, rewards=rewards,
                     group_ids=group_ids)
    r = beta * (_f64(logps) - _f64(old_logps))
    rewards64 = _f64(rewards)
    all_r, all_rewards, all_ids, rows = r.detach(), rewards64, group_ids, slice(None)
    if process_group is not None:
        all_r, all_rewards, all_ids, rows = gather_rows(process_group, r, rewards64, group_ids)
    index = dense_group_index(all_ids)
    r_mean, sizes = group_mean(all_r, index)
    reward_centred = all_rewards - group_mean(all_rewards, index)[0]
    e = (r - r_mean[rows]) - reward_centred[rows]
    sizes = sizes[rows]
    losses = torch.where(sizes > 1, 0.5 * e.square() / (sizes - 1).clamp(min=1), 0.0)
    metrics = {"implicit_reward_mean": r.detach().mean().float(),
               "residual_rms": e.detach().square().mean().sqrt().float()}
    return _reduce(losses, reduction, all_r.shape[0]).float(), metrics


def astar_values(rewards: Tensor, group_ids: Tensor | None = None, *,
                 beta: float = 0.5) -> Tensor:
    """A*-PO's optimal-value estimate (Brantley et al. 2025, "Accelerating RL for LLM Reasoning
    with Optimal Advantage Regression", arXiv:2505.20686, stage 1) from rewards of responses
    sampled from the reference policy: ``beta * log(mean_i exp(r_i / beta))`` per prompt, the
    plain mean at ``beta = 0`` (the authors' code, ZhaolinGao/A-PO c8823a3
    verl/utils/dataset/rl_dataset.py). ``rewards``: (P, N) (N samples of each of P prompts) ->
    (P,), or (B,) with ``group_ids`` -> (B,) (each sample gets its group's value). fp32."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (0: the mean reward), got {beta}")
    _checks.check_float("rewards", rewards)
    x = _f64(rewards)
    if group_ids is None:
        if rewards.dim() != 2 or rewards.shape[1] == 0:
            raise ValueError("rewards must be (P, N) with N >= 1, or (B,) with group_ids")
        if beta == 0:
            return x.mean(-1).float()
        return (beta * (torch.logsumexp(x / beta, -1) - math.log(x.shape[1]))).float()
    _check_sequences("none", rewards=rewards, group_ids=group_ids)
    index = dense_group_index(group_ids)
    if beta == 0:
        return group_mean(x, index)[0].float()
    z = x / beta
    top = torch.full_like(z, -math.inf).index_reduce_(0, index, z, "amax")  # stable lse
    mean_exp, _ = group_mean((z - top[index]).exp(), index)
    return (beta * (mean_exp.log() + top[index])).float()


def astar_po_loss(logps: Tensor, ref_logps: Tensor, rewards: Tensor, values: Tensor, *,
                  beta: float = 1e-3, reduction: str = "mean") -> tuple[Tensor, dict]:
    """A*-PO stage 2 (arXiv:2505.20686): least-squares regression of the implicit reward on the
    optimal advantage, ``(beta * (logps - ref_logps) - (rewards - values)) ** 2`` per sequence
    (one on-policy sample per prompt; ``values`` from :func:`astar_values`), reduced by mean as
    the authors' code (ZhaolinGao/A-PO c8823a3 verl/trainer/apo/core_algos.py, beta2 = 1e-3 in
    its scripts). Returns (loss fp32, {"advantage_mean"})."""
    _check_sequences(reduction, logps=logps, ref_logps=ref_logps, rewards=rewards,
                     values=values)
    advantage = _f64(rewards) - _f64(values)
    losses = (beta * (_f64(logps) - _f64(ref_logps)) - advantage).square()
    return _reduce(losses, reduction).float(), {"advantage_mean": advantage.mean().float()}


def dro_loss(logps: Tensor, ref_logps: Tensor, rewards: Tensor, values: Tensor, *,
             tau: float, reduction: str = "mean") -> tuple[Tensor, dict]:
    """DRO (Richemond et al. 2024, "Offline Regularised Reinforcement Learning for Large Language
    Models Alignment", arXiv:2405.19107): ``0.5 * (rewards - values - tau * (logps -
    ref_logps)) ** 2`` per sequence, minimized jointly over the policy (through ``logps``) and
    a value estimate of the prompt (``values``, e.g. a scalar head; it takes its gradient when
    it requires one). Single-trajectory, unpaired feedback. Returns (loss fp32,
    {"residual_mean"})."""
    _checks.check_positive("tau", tau)
    _check_sequences(reduction, logps=logps, ref_logps=ref_logps, rewards=rewards,
                     values=values)
    residual = _f64(rewards) - _f64(values) - tau * (_f64(logps) - _f64(ref_logps))
    losses = 0.5 * residual.square()
    return _reduce(losses, reduction).float(), {"residual_mean": residual.detach().mean()
                                                .float()}
