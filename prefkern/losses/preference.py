"""Preference losses on sequence log-probs, with TRL's exact semantics (huggingface/trl
f2cd577: trl/trainer/dpo_trainer.py ``_compute_loss``, trl/experimental/cpo/cpo_trainer.py,
trl/experimental/orpo/orpo_trainer.py). The math runs in float64 on the (B,) scalars (it costs
nothing next to the log-probs and keeps log-ratios of hundreds of nats finite); the loss comes
back in fp32.

Sequence log-probs are sums over completion tokens (prefkern.losses.sequence_reduce);
lengths are the completion token counts where a loss type normalizes by length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL's cap on the exponent of the alpha-divergence score, by input dtype
ALPHA_EXP_CAP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
REDUCTIONS = ("mean", "sum", "none")


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float64)


def _reward_metrics(rewards_c: Tensor, rewards_r: Tensor) -> dict:
    """TRL's reward metrics (batch means) of detached (B,) rewards of each side."""
    return {"rewards/chosen": rewards_c.mean().float(),
            "rewards/rejected": rewards_r.mean().float(),
            "rewards/margins": (rewards_c - rewards_r).mean().float(),
            "rewards/accuracies": (rewards_c > rewards_r).float().mean()}


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def f_score(logratio: Tensor, f_divergence: str, f_alpha: float, dtype: torch.dtype) -> Tensor:
    """f'(u) terms of f-DPO (Wang et al. 2023, "Beyond Reverse KL") on log-ratios c, as TRL:
    reverse_kl c; forward_kl -exp(-c); js_divergence logsigmoid(c); alpha_divergence
    exp(min((alpha - 1) c, cap)) / (alpha - 1) (c itself when |alpha - 1| < 1e-6), cap 11 for
    fp16 inputs and 80 otherwise."""
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return -torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return F.logsigmoid(logratio)
    if abs(f_alpha - 1.0) < 1e-6:
        return logratio
    cap = ALPHA_EXP_CAP.get(dtype, 80.0)
    return torch.exp(((f_alpha - 1.0) * logratio).clamp(max=cap)) / (f_alpha - 1.0)


def _dpo_losses(kind: str, c, r, d, s_c, s_r, raw, beta, ls, tau, lengths, sft_nll):
    """Per-pair losses of one TRL DPO loss type (module doc)."""
    bd = beta * d
    if kind == "sigmoid":  # TRL applies no label smoothing here
        return -F.logsigmoid(bd)
    if kind == "hinge":
        return torch.relu(1 - bd)
    if kind in ("ipo", "sigmoid_norm"):
        len_c, len_r = lengths
        norm = s_c / len_c.clamp(min=1) - s_r / len_r.clamp(min=1)
        return (norm - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * norm)
    if kind == "exo_pair":
        if ls == 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        return (torch.sigmoid(bd) * (F.logsigmoid(bd) - math.log1p(-ls))
                + torch.sigmoid(-bd) * (F.logsigmoid(-bd) - math.log(ls)))
    if kind == "nca_pair":
        return (-F.logsigmoid(beta * s_c) - 0.5 * F.logsigmoid(-beta * s_c)
                - 0.5 * F.logsigmoid(-beta * s_r))
    if kind == "robust":
        return (-(1 - ls) * F.logsigmoid(bd) + ls * F.logsigmoid(-bd)) / (1 - 2 * ls)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * s_c) - F.logsigmoid(-beta * s_r)
    if kind == "sppo_hard":
        return (s_c - 0.5 / beta) ** 2 + (s_r + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):
        chosen, rejected, ref_chosen, ref_rejected = raw
        if kind == "aot":
            delta = (torch.sort(chosen - rejected, 0)[0]
                     - torch.sort(ref_chosen - ref_rejected, 0)[0])
        else:
            delta = torch.sort(c, 0)[0] - torch.sort(r, 0)[0]
        return (-F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls)
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if kind == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(bd)
    if kind == "discopop":
        mix = torch.sigmoid(bd / tau)
        return -F.logsigmoid(bd) * (1 - mix) + torch.exp(-bd) * mix
    return sft_nll.expand(c.shape)  # sft


def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor,
                    ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, *,
                    loss_type: str | Sequence[str] = "sigmoid",
                    loss_weights: Sequence[float] | None = None, beta: float = 0.1,
                    label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                    f_alpha: float = 0.5, discopop_tau: float = 0.05,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    chosen_weights: Tensor | None = None, rejected_weights: Tensor | None = None,
                    hdpo_alpha: float = 1.0, rpo_alpha: float | None = None,
                    reduction: str = "mean", sft_chosen_logps: Tensor | None = None):
    """TRL's DPO loss family on sequence log-probs (sums over completion tokens), (B,) each.

    With c = chosen - ref_chosen, r = rejected - ref_rejected (reference-free when the ref
    log-probs are None: ref = 0), the f-DPO scores s_c = f(c), s_r = f(r) (``f_divergence``,
    :func:`f_score`), d = s_c - s_r and b = beta, ls = label_smoothing:
      sigmoid       -logsigmoid(b d)                      hinge      relu(1 - b d)
      ipo           (s_c / len_c - s_r / len_r - 1 / (2 b))^2     (lengths required)
      sigmoid_norm  -logsigmoid(b (s_c / len_c - s_r / len_r))    (lengths required)
      exo_pair      sigmoid(b d) (logsigmoid(b d) - log(1 - ls))
                    + sigmoid(-b d) (logsigmoid(-b d) - log ls)   (ls > 0)
      nca_pair      -logsigmoid(b s_c) - logsigmoid(-b s_c) / 2 - logsigmoid(-b s_r) / 2
      robust        (-(1 - ls) logsigmoid(b d) + ls logsigmoid(-b d)) / (1 - 2 ls)
      bco_pair      -logsigmoid(b s_c) - logsigmoid(-b s_r)
      sppo_hard     (s_c - 1 / (2 b))^2 + (s_r + 1 / (2 b))^2
      aot           D = sort(chosen - rejected) - sort(ref_chosen - ref_rejected) over the batch,
                    -(1 - ls) logsigmoid(b D) - ls logsigmoid(-b D); aot_unpaired: D = sort(c)
                    - sort(r)
      apo_zero      1 - sigmoid(b c) + sigmoid(b r)       apo_down   sigmoid(b c) + 1 - sigmoid(b d)
      discopop      m = sigmoid(b d / tau): -logsigmoid(b d) (1 - m) + exp(-b d) m
      sft           the chosen NLL per token: -sum(chosen) / sum(len_c)   (lengths required)
    ``loss_type`` a list: ``sum_i loss_weights[i] * reduce(loss_i)``. WPO (``use_weighting``):
    each pair's loss times ``chosen_weights * rejected_weights`` (detached; TRL's weight is
    ``exp(mean_t(logp_t - log sum_v p_v^2))`` over the completion). ``hdpo_alpha`` (H-DPO,
    Omura et al. 2024): c = alpha * chosen - ref_chosen (and r likewise; alpha < 1 sharpens).
    ``rpo_alpha`` (RPO / IRPO, as TRL < 0.29 did): adds rpo_alpha times the chosen NLL per
    token, -sum(chosen) / sum(len_c), to every pair's loss. ``sft_chosen_logps``: the
    chosen sequences' plain log-prob sums for those two NLL terms when ``chosen_logps`` are
    weighted sums (LD-DPO: TRL's sft term is the plain cross entropy); default
    ``chosen_logps``. ``reduction``: mean (TRL),
    sum or none (per pair). Returns (loss fp32, metrics) with TRL's metrics, detached:
    rewards/chosen = b c, rewards/rejected = b r (raw log-ratios), rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (batch means).
    """
    kinds = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(kinds) if loss_weights is None else list(loss_weights)
    if not kinds or len(weights) != len(kinds):
        raise ValueError("loss_weights must give one weight per loss type")
    for kind in kinds:
        if kind not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {kind!r} is not one of {DPO_LOSS_TYPES}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError("chosen_logps and rejected_logps must both be (B,)")
    needs_lengths = ({"ipo", "sigmoid_norm", "sft"} & set(kinds)) | (
        {"rpo"} if rpo_alpha is not None else set())
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss types {sorted(needs_lengths)} need chosen_lengths and "
                         "rejected_lengths (completion token counts)")
    if (chosen_weights is None) != (rejected_weights is None):
        raise ValueError("give both chosen_weights and rejected_weights (WPO) or neither")
    if chosen_weights is not None and {"aot", "aot_unpaired"} & set(kinds):
        raise ValueError("WPO weighting is undefined for aot losses (pairs are re-sorted)")
    dtype = chosen_logps.dtype
    chosen, rejected = _f64(chosen_logps), _f64(rejected_logps)
    zero = torch.zeros_like(chosen)
    ref_chosen = zero if ref_chosen_logps is None else _f64(ref_chosen_logps)
    ref_rejected = zero if ref_rejected_logps is None else _f64(ref_rejected_logps)
    c, r = hdpo_alpha * chosen - ref_chosen, hdpo_alpha * rejected - ref_rejected
    s_c, s_r = (f_score(x, f_divergence, f_alpha, dtype) for x in (c, r))
    lengths = None if chosen_lengths is None else (_f64(chosen_lengths), _f64(rejected_lengths))
    sft_nll = None
    if lengths is not None:
        plain = chosen if sft_chosen_logps is None else _f64(sft_chosen_logps)
        sft_nll = -plain.sum() / lengths[0].sum().clamp(min=1)
    pair_weight = None
    if chosen_weights is not None:
        pair_weight = (_f64(chosen_weights) * _f64(rejected_weights)).detach()
    total = None
    for kind, weight in zip(kinds, weights, strict=True):
        losses = _dpo_losses(kind, c, r, s_c - s_r, s_c, s_r,
                             (chosen, rejected, ref_chosen, ref_rejected), beta,
                             label_smoothing, discopop_tau, lengths, sft_nll)
        if rpo_alpha is not None:
            losses = losses + rpo_alpha * sft_nll
        if pair_weight is not None:
            losses = losses * pair_weight
        term = weight * _reduce(losses, reduction)
        total = term if total is None else total + term
    rewards_c, rewards_r = (beta * c).detach(), (beta * r).detach()
    metrics = {**_reward_metrics(rewards_c, rewards_r),
               "logps/chosen": chosen.detach().mean().float(),
               "logps/rejected": rejected.detach().mean().float()}
    return total.float(), metrics


def _smoothed_sigmoid(z: Tensor, beta: float, ls: float) -> Tensor:
    return -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls


def cpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
             rejected_lengths: Tensor, *, loss_type: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, alpha: float = 0.0,
             cpo_alpha: float = 1.0, reduction: str = "mean"):
    """TRL's CPOTrainer losses (reference-free): CPO, SimPO and AlphaPO.

    Sequence log-probs are sums over completion tokens; for ipo and simpo (and alphapo, which
    is simpo with cpo_alpha = 0) they are divided by the lengths. With alpha != 0 each side
    goes through AlphaPO's reward ``R(x) = (1 - exp(x)^(-alpha)) / alpha`` first; z = R(c) -
    R(r) (or c - r):
      sigmoid  -(1 - ls) logsigmoid(b z) - ls logsigmoid(-b z)
      simpo    the same on z - simpo_gamma / b
      hinge    relu(1 - b z)            ipo   (z - 1 / (2 b))^2
    plus ``cpo_alpha`` times the chosen NLL per token, -sum(chosen) / sum(len_c).
    Returns (loss fp32, metrics: rewards/chosen = b R(chosen) (b chosen when alpha = 0), ...,
    nll_loss)."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    chosen, rejected = _f64(chosen_logps), _f64(rejected_logps)
    len_c, len_r = _f64(chosen_lengths), _f64(rejected_lengths)
    nll = -chosen.sum() / len_c.sum().clamp(min=1)
    if loss_type in ("ipo", "simpo"):
        chosen, rejected = chosen / len_c.clamp(min=1), rejected / len_r.clamp(min=1)
    if alpha != 0.0:
        def reward(x):
            return (1 - torch.exp(x).pow(-alpha)) / alpha
        chosen_r, rejected_r = reward(chosen), reward(rejected)
    else:
        chosen_r, rejected_r = chosen, rejected
    z = chosen_r - rejected_r
    if loss_type == "simpo":
        losses = _smoothed_sigmoid(z - simpo_gamma / beta, beta, label_smoothing)
    elif loss_type == "sigmoid":
        losses = _smoothed_sigmoid(z, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        losses = (z - 1 / (2 * beta)) ** 2
    loss = _reduce(losses, reduction) + (cpo_alpha * nll if cpo_alpha != 0 else 0.0)
    rewards_c, rewards_r = (beta * chosen_r).detach(), (beta * rejected_r).detach()
    metrics = {**_reward_metrics(rewards_c, rewards_r),
               "nll_loss": nll.detach().float()}
    return loss.float(), metrics


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, *, beta: float = 0.1, chosen_nll: Tensor | None = None,
              reduction: str = "mean"):
    """TRL's ORPO (Hong et al. 2024): on mean log-probs a = chosen / len_c, b = rejected /
    len_r, ``log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))``, loss = NLL -
    beta * reduce(logsigmoid(log_odds)). TRL's NLL is the token mean over the chosen prompt
    AND completion: pass it as ``chosen_nll``; None uses the completion, -sum(chosen) /
    sum(len_c). Returns (loss fp32, metrics incl. log_odds_ratio, log_odds_chosen, nll_loss)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    chosen, rejected = _f64(chosen_logps), _f64(rejected_logps)
    len_c, len_r = _f64(chosen_lengths), _f64(rejected_lengths)
    nll = -chosen.sum() / len_c.sum().clamp(min=1) if chosen_nll is None else _f64(chosen_nll)
    mean_c, mean_r = chosen / len_c.clamp(min=1), rejected / len_r.clamp(min=1)
    log_odds = (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * _reduce(ratio, reduction)
    rewards_c, rewards_r = (beta * mean_c).detach(), (beta * mean_r).detach()
    metrics = {**_reward_metrics(rewards_c, rewards_r),
               "log_odds_ratio": ratio.detach().mean().float(),
               "log_odds_chosen": log_odds.detach().mean().float(),
               "nll_loss": nll.detach().float()}
    return loss.float(), metrics


UNPAIRED_LOSS_TYPES = ("kto", "apo_zero_unpaired", "bco", "npo", "simnpo")


def unpaired_loss(logps: Tensor, ref_logps: Tensor | None, desirable: Tensor, *,
                  loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, kl: Tensor | float | None = None,
                  kl_logps: tuple[Tensor, Tensor] | None = None, delta: Tensor | float = 0.0,
                  lengths: Tensor | None = None, simnpo_gamma: float = 0.0,
                  reduction: str = "mean"):
    """Losses on single responses labelled desirable (True) or undesirable, with Delta =
    logps - ref_logps (sums over completion tokens):
      kto                desirable: 1 - sigmoid(b (Delta - z0)); undesirable: 1 - sigmoid(b (z0 -
                         Delta)); z0 = ``kl`` or, from ``kl_logps`` (policy and reference
                         log-probs of mismatched prompt/completion pairs),
                         ``(policy - ref).mean().clamp(min=0)``, detached (TRL KTOTrainer;
                         Ethayarajh et al. 2024)
      apo_zero_unpaired  desirable: 1 - sigmoid(b Delta); undesirable: sigmoid(b Delta)
      bco                desirable: -logsigmoid(b Delta - delta); undesirable:
                         -logsigmoid(-(b Delta - delta)); ``delta`` the running mean of the
                         rewards b Delta, kept by the caller (e.g. prefkern.RunningMoments)
      npo                every response is to forget: -(2 / b) logsigmoid(-b Delta)
                         (Zhang et al. 2024)
      simnpo             reference-free: -(2 / b) logsigmoid(-(b / |y|) logps - gamma)
                         (Fan et al. 2024; ``lengths`` required)
    Desirable and undesirable losses are scaled by their weights; ``reduction`` mean / sum /
    none over the responses. Returns (loss fp32, metrics: rewards of each class, kl)."""
    if loss_type not in UNPAIRED_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {UNPAIRED_LOSS_TYPES}, got {loss_type!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if desirable.shape != logps.shape or desirable.dtype != torch.bool:
        raise ValueError("desirable must be a bool tensor shaped like logps")
    x = _f64(logps)
    delta_theta = x if ref_logps is None else x - _f64(ref_logps)
    z0 = torch.zeros((), dtype=torch.float64, device=x.device)
    if loss_type == "kto":
        if kl_logps is not None:
            z0 = (_f64(kl_logps[0]) - _f64(kl_logps[1])).mean().clamp(min=0)
        elif kl is not None:
            z0 = torch.as_tensor(kl, dtype=torch.float64, device=x.device)
        z0 = z0.detach()
        good = 1 - torch.sigmoid(beta * (delta_theta - z0))
        bad = 1 - torch.sigmoid(beta * (z0 - delta_theta))
    elif loss_type == "apo_zero_unpaired":
        good = 1 - torch.sigmoid(beta * delta_theta)
        bad = torch.sigmoid(beta * delta_theta)
    elif loss_type == "bco":
        shift = torch.as_tensor(delta, dtype=torch.float64, device=x.device).detach()
        good = -F.logsigmoid(beta * delta_theta - shift)
        bad = -F.logsigmoid(-(beta * delta_theta - shift))
    elif loss_type == "npo":
        good = bad = -(2 / beta) * F.logsigmoid(-beta * delta_theta)
    else:
        if lengths is None:
            raise ValueError("simnpo needs lengths (completion token counts)")
        mean = x / _f64(lengths).clamp(min=1)
        good = bad = -(2 / beta) * F.logsigmoid(-beta * mean - simnpo_gamma)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    rewards = (beta * delta_theta).detach()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    n_good, n_bad = desirable.sum().clamp(min=1), (~desirable).sum().clamp(min=1)
    metrics = {"rewards/chosen": (torch.where(desirable, rewards, zero).sum() / n_good).float(),
               "rewards/rejected": (torch.where(desirable, zero, rewards).sum() / n_bad).float(),
               "kl": z0.float()}
    return _reduce(losses, reduction).float(), metrics


def tdpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, chosen_seq_kl: Tensor, rejected_seq_kl: Tensor, *,
              version: int = 2, beta: float = 0.1, alpha: float = 0.5, reduction: str = "mean"):
    """TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization"; reference code
    Vance0124/Token-level-Direct-Preference-Optimization trainers.py). With Delta_w, Delta_l
    the sequence log-ratios and SeqKL(y) = sum_t KL(ref(.|s_t) || policy(.|s_t)) over the
    response tokens (prefkern.linear_divergence kind="forward_kl", summed per sequence):
      v1  -logsigmoid(b ((Delta_w - Delta_l) - (SeqKL_l - SeqKL_w)))
      v2  -logsigmoid(b ((Delta_w - Delta_l) - alpha (SeqKL_l - sg(SeqKL_w))))
    Returns (loss fp32, metrics: rewards b (Delta + SeqKL) of each side, detached, their
    margin and accuracy, the mean SeqKL of each side)."""
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    d_w = _f64(chosen_logps) - _f64(ref_chosen_logps)
    d_l = _f64(rejected_logps) - _f64(ref_rejected_logps)
    kl_w, kl_l = _f64(chosen_seq_kl), _f64(rejected_seq_kl)
    if version == 1:
        logits = (d_w - d_l) - (kl_l - kl_w)
    else:
        logits = (d_w - d_l) - alpha * (kl_l - kl_w.detach())
    losses = -F.logsigmoid(beta * logits)
    rewards_c, rewards_r = (beta * (d_w + kl_w)).detach(), (beta * (d_l + kl_l)).detach()
    metrics = {**_reward_metrics(rewards_c, rewards_r),
               "kl/chosen": kl_w.detach().mean().float(),
               "kl/rejected": kl_l.detach().mean().float()}
    return _reduce(losses, reduction).float(), metrics
