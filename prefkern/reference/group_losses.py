"""Specs of the group regression losses and DisCO: Python loops over the groups, in the input
dtype (fp32 math for half inputs), written from the papers' formulas."""

from __future__ import annotations

import math

import torch


def _cdt(t):
    return torch.promote_types(t.dtype, torch.float32)


def _groups(group_ids):
    """{group id: list of sample indices}, in order of first appearance."""
    out = {}
    for i, g in enumerate(group_ids.tolist()):
        out.setdefault(g, []).append(i)
    return out


def _reduce(losses, reduction):
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / max(losses.shape[0], 1)


def gvpo_loss_ref(logps, old_logps, rewards, group_ids, *, beta=0.1, reduction="sum"):
    cdt = _cdt(logps)
    r = beta * (logps.to(cdt) - old_logps.to(cdt))
    rew = rewards.to(cdt)
    losses = []
    for i, g in enumerate(group_ids.tolist()):
        members = [j for j, h in enumerate(group_ids.tolist()) if h == g]
        n = len(members)
        r_bar = sum(r[j].detach() for j in members) / n
        rew_bar = sum(rew[j] for j in members) / n
        e = (r[i] - r_bar) - (rew[i] - rew_bar)
        losses.append(0.5 * e * e / (n - 1) if n > 1 else 0.0 * e)
    out = torch.stack(losses) if losses else r[:0]
    return _reduce(out, reduction).float()


def astar_values_ref(rewards, group_ids=None, *, beta=0.5):
    cdt = _cdt(rewards)
    x = rewards.to(cdt)

    def value(samples):
        if beta == 0:
            return sum(samples) / len(samples)
        return beta * (torch.logsumexp(torch.stack(samples) / beta, 0) - math.log(len(samples)))

    if group_ids is None:
        return torch.stack([value(list(row)) for row in x]).float()
    groups = _groups(group_ids)
    ids = group_ids.tolist()
    if not ids:
        return x[:0].float()
    return torch.stack([value([x[j] for j in groups[ids[i]]]) for i in range(len(ids))]).float()


def astar_po_loss_ref(logps, ref_logps, rewards, values, *, beta=1e-3, reduction="mean"):
    cdt = _cdt(logps)
    losses = (beta * (logps.to(cdt) - ref_logps.to(cdt)) + values.to(cdt)
              - rewards.to(cdt)) ** 2
    return _reduce(losses, reduction).float()


def dro_loss_ref(logps, ref_logps, rewards, values, *, tau, reduction="mean"):
    cdt = _cdt(logps)
    losses = 0.5 * (rewards.to(cdt) - values.to(cdt)
                    - tau * (logps.to(cdt) - ref_logps.to(cdt))) ** 2
    return _reduce(losses, reduction).float()


def disco_loss_ref(logprobs, old_logprobs, mask, rewards, group_ids, *, score="log_l", tau=10.0,
                   beta=1e3, delta=1e-4, kl_kind="k1"):
    """-sum over prompts with both kinds of [mean_pos s - tau log mean_neg exp(s / tau)] / Q
    + beta / 2 relu(KL - delta)^2, one prompt at a time."""
    cdt = _cdt(logprobs)
    logp, old, m = logprobs.to(cdt), old_logprobs.to(cdt), mask.to(cdt)
    if kl_kind == "k1":
        per_token_kl = old - logp
    else:
        per_token_kl = torch.exp(logp - old) - 1 - (logp - old)
    kl = (per_token_kl * m).sum() / max(float(m.sum()), 1.0)
    scores = []
    for i in range(logp.shape[0]):
        values = logp[i] if score == "log_l" else torch.exp(logp[i] - old[i])
        scores.append((values * m[i]).sum() / max(float(m[i].sum()), 1.0))
    groups = _groups(group_ids)
    objective = 0.0 * kl
    for members in groups.values():
        pos = [scores[j] for j in members if float(rewards[j]) == 1]
        neg = [scores[j] for j in members if float(rewards[j]) == 0]
        if not pos or not neg:
            continue
        if tau is None:
            neg_term = sum(neg) / len(neg)
        else:
            neg_term = tau * (torch.logsumexp(torch.stack(neg) / tau, 0) - math.log(len(neg)))
        objective = objective + sum(pos) / len(pos) - neg_term
    loss = -objective / max(len(groups), 1) + 0.5 * beta * torch.relu(kl - delta) ** 2
    return loss.float()
