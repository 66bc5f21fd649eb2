"""Reference preference losses: TRL's formulas (huggingface/trl f2cd577,
trl/trainer/dpo_trainer.py ``_compute_loss``; trl/experimental/cpo and orpo), one expression
per loss type, float64, gradients by autograd."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LS = F.logsigmoid


def _dpo_table(beta, ls, tau):
    """loss type -> f(chosen, rejected, ref_chosen, ref_rejected, s_c, s_r, len_c, len_r)."""
    def aot(ch, rj, rc, rr, sc, sr, lc, lr):
        delta = torch.sort(ch - rj, 0)[0] - torch.sort(rc - rr, 0)[0]
        return -_LS(beta * delta) * (1 - ls) - _LS(-beta * delta) * ls

    def aot_unpaired(ch, rj, rc, rr, sc, sr, lc, lr):
        delta = torch.sort(ch - rc, 0)[0] - torch.sort(rj - rr, 0)[0]
        return -_LS(beta * delta) * (1 - ls) - _LS(-beta * delta) * ls

    def discopop(ch, rj, rc, rr, sc, sr, lc, lr):
        z = beta * (sc - sr)
        m = torch.sigmoid(z / tau)
        return -_LS(z) * (1 - m) + torch.exp(-z) * m

    return {
        "sigmoid": lambda ch, rj, rc, rr, sc, sr, lc, lr: -_LS(beta * (sc - sr)),
        "hinge": lambda ch, rj, rc, rr, sc, sr, lc, lr: torch.relu(1 - beta * (sc - sr)),
        "ipo": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            ((sc / lc.clamp(min=1) - sr / lr.clamp(min=1)) - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            -_LS(beta * (sc / lc.clamp(min=1) - sr / lr.clamp(min=1))),
        "exo_pair": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            torch.sigmoid(beta * (sc - sr)) * (_LS(beta * (sc - sr)) - math.log(1 - ls))
            + torch.sigmoid(-beta * (sc - sr)) * (_LS(-beta * (sc - sr)) - math.log(ls)),
        "nca_pair": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            -_LS(beta * sc) - 0.5 * _LS(-beta * sc) - 0.5 * _LS(-beta * sr),
        "robust": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            (-(1 - ls) * _LS(beta * (sc - sr)) + ls * _LS(-beta * (sc - sr))) / (1 - 2 * ls),
        "bco_pair": lambda ch, rj, rc, rr, sc, sr, lc, lr: -_LS(beta * sc) - _LS(-beta * sr),
        "sppo_hard": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            (sc - 0.5 / beta) ** 2 + (sr + 0.5 / beta) ** 2,
        "aot": aot,
        "aot_unpaired": aot_unpaired,
        "apo_zero": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            1 - torch.sigmoid(beta * (ch - rc)) + torch.sigmoid(beta * (rj - rr)),
        "apo_down": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            torch.sigmoid(beta * (ch - rc)) + 1 - torch.sigmoid(beta * (sc - sr)),
        "discopop": discopop,
        "sft": lambda ch, rj, rc, rr, sc, sr, lc, lr:
            (-ch.sum() / lc.sum().clamp(min=1)).expand(ch.shape),
    }


def _score(x, f_divergence, f_alpha, dtype):
    if f_divergence == "forward_kl":
        return -torch.exp(-x)
    if f_divergence == "js_divergence":
        return _LS(x)
    if f_divergence == "alpha_divergence" and abs(f_alpha - 1) >= 1e-6:
        cap = 11.0 if dtype == torch.float16 else 80.0
        return torch.exp(torch.clamp((f_alpha - 1) * x, max=cap)) / (f_alpha - 1)
    return x


def preference_loss_ref(chosen_logps, rejected_logps, ref_chosen_logps=None,
                        ref_rejected_logps=None, *, loss_type="sigmoid", loss_weights=None,
                        beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5,
                        discopop_tau=0.05, chosen_lengths=None, rejected_lengths=None,
                        chosen_weights=None, rejected_weights=None, hdpo_alpha=1.0,
                        rpo_alpha=None, reduction="mean"):
    """-> the loss of :func:`prefkern.losses.preference_loss` (metrics not included)."""
    dtype = chosen_logps.dtype
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ch, rj = d64(chosen_logps), d64(rejected_logps)
    rc = torch.zeros_like(ch) if ref_chosen_logps is None else d64(ref_chosen_logps)
    rr = torch.zeros_like(rj) if ref_rejected_logps is None else d64(ref_rejected_logps)
    sc, sr = (_score(x, f_divergence, f_alpha, dtype)
              for x in (hdpo_alpha * ch - rc, hdpo_alpha * rj - rr))
    lc, lr = d64(chosen_lengths), d64(rejected_lengths)
    kinds = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(kinds)
    table = _dpo_table(beta, label_smoothing, discopop_tau)
    total = 0
    for kind, w in zip(kinds, weights, strict=True):
        losses = table[kind](ch, rj, rc, rr, sc, sr, lc, lr)
        if rpo_alpha is not None:
            losses = losses + rpo_alpha * (-ch.sum() / lc.sum().clamp(min=1))
        if chosen_weights is not None:
            losses = losses * (d64(chosen_weights) * d64(rejected_weights)).detach()
        total = total + w * {"mean": losses.mean, "sum": losses.sum,
                             "none": lambda losses=losses: losses}[reduction]()
    return total


def cpo_loss_ref(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *,
                 loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0,
                 cpo_alpha=1.0, reduction="mean"):
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    ch, rj = chosen_logps.double(), rejected_logps.double()
    lc, lr = chosen_lengths.double(), rejected_lengths.double()
    nll = -ch.sum() / lc.sum()
    if loss_type in ("ipo", "simpo"):
        ch, rj = ch / lc, rj / lr
    if alpha != 0:
        ch, rj = ((1 - torch.exp(x).pow(-alpha)) / alpha for x in (ch, rj))
    z = ch - rj
    ls = label_smoothing
    if loss_type == "simpo":
        z = z - simpo_gamma / beta
    if loss_type in ("simpo", "sigmoid"):
        losses = -_LS(beta * z) * (1 - ls) - _LS(-beta * z) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        losses = (z - 1 / (2 * beta)) ** 2
    reduced = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    return reduced + cpo_alpha * nll


def orpo_loss_ref(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=0.1,
                  chosen_nll=None, reduction="mean"):
    ch = chosen_logps.double() / chosen_lengths.double()
    rj = rejected_logps.double() / rejected_lengths.double()
    nll = (-chosen_logps.double().sum() / chosen_lengths.double().sum() if chosen_nll is None
           else chosen_nll.double())
    # log(1 - e^x) written the plain way, in float64
    log_odds = (ch - rj) - (torch.log1p(-torch.exp(ch)) - torch.log1p(-torch.exp(rj)))
    ratio = _LS(log_odds)
    reduced = {"mean": ratio.mean(), "sum": ratio.sum(), "none": ratio}[reduction]
    return nll - beta * reduced


def _reduced(losses, reduction):
    return {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]


def unpaired_loss_ref(logps, ref_logps, desirable, *, loss_type="kto", beta=0.1,
                      desirable_weight=1.0, undesirable_weight=1.0, kl=None, kl_logps=None,
                      delta=0.0, lengths=None, simnpo_gamma=0.0, reduction="mean"):
    x = logps.double()
    d = x if ref_logps is None else x - ref_logps.double()
    if loss_type == "kto":
        z0 = torch.zeros((), dtype=torch.float64)
        if kl_logps is not None:
            z0 = torch.clamp((kl_logps[0].double() - kl_logps[1].double()).mean(), min=0)
        elif kl is not None:
            z0 = torch.tensor(float(kl), dtype=torch.float64)
        z0 = z0.detach()
        good, bad = 1 - torch.sigmoid(beta * (d - z0)), 1 - torch.sigmoid(beta * (z0 - d))
    elif loss_type == "apo_zero_unpaired":
        good, bad = 1 - torch.sigmoid(beta * d), torch.sigmoid(beta * d)
    elif loss_type == "bco":
        good, bad = -_LS(beta * d - delta), -_LS(-(beta * d - delta))
    elif loss_type == "npo":
        good = bad = -(2 / beta) * _LS(-beta * d)
    else:  # simnpo
        good = bad = -(2 / beta) * _LS(-beta * x / lengths.double() - simnpo_gamma)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return _reduced(losses, reduction)


def tdpo_loss_ref(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_seq_kl, rejected_seq_kl, *, version=2, beta=0.1, alpha=0.5,
                  reduction="mean"):
    margin = (chosen_logps.double() - ref_chosen_logps.double()) - \
        (rejected_logps.double() - ref_rejected_logps.double())
    kl_w, kl_l = chosen_seq_kl.double(), rejected_seq_kl.double()
    if version == 1:
        logits = margin - (kl_l - kl_w)
    else:
        logits = margin - alpha * (kl_l - kl_w.detach())
    return _reduced(-_LS(beta * logits), reduction)


def pro_loss_ref(scores, *, temperature=1.0, sft_weight=0.0, reduction="mean"):
    z = scores.double() / temperature
    k = z.shape[1]
    losses = sum(-(z[:, i] - torch.logsumexp(z[:, i:], -1)) for i in range(k - 1))
    return _reduced(losses - sft_weight * scores.double()[:, 0], reduction)


def lipo_lambda_loss_ref(scores, labels, *, reduction="mean"):
    s, psi = scores.double(), labels.double()
    b, k = s.shape
    out = []
    for row in range(b):
        order = sorted(range(k), key=lambda i: -s[row, i].item())
        tau = {i: order.index(i) + 1 for i in range(k)}
        total = torch.zeros((), dtype=torch.float64)
        for i in range(k):
            for j in range(k):
                if psi[row, i] > psi[row, j]:
                    gain = abs((2 ** psi[row, i] - 1) - (2 ** psi[row, j] - 1))
                    disc = abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                    total = total + gain * disc * torch.log1p(torch.exp(-(s[row, i] - s[row, j])))
        out.append(total)
    return _reduced(torch.stack(out), reduction)


def set_bt_loss_ref(logratios, rewards, *, beta=0.1, weighting="deviation", mask=None,
                    reduction="mean"):
    """MPO's set-level Bradley-Terry loss, one prompt at a time (see losses.set_bt_loss)."""
    s, r = beta * logratios.double(), rewards.double()
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.bool()
    out, used = [], []
    for row in range(s.shape[0]):
        idx = [k for k in range(s.shape[1]) if valid[row, k]]
        r_bar = sum(r[row, k] for k in idx) / max(len(idx), 1)
        pos = [k for k in idx if r[row, k] > r_bar]
        if not pos or len(pos) == len(idx):
            out.append(torch.zeros((), dtype=torch.float64))
            used.append(False)
            continue
        w = {k: abs(r[row, k] - r_bar) if weighting == "deviation" else 1.0 for k in idx}
        num = sum(w[k] * torch.exp(s[row, k]) for k in pos)
        den = sum(w[k] * torch.exp(s[row, k]) for k in idx)
        out.append(-torch.log(num / den))
        used.append(True)
    losses = torch.stack(out)
    if reduction == "mean":
        return losses.sum() / max(sum(used), 1)
    return _reduced(losses, reduction)


def sppo_loss_ref(logratios, win_probs, *, eta=1000.0, reduction="mean"):
    return _reduced((logratios.double() - eta * (win_probs.double() - 0.5)) ** 2, reduction)


def irepo_loss_ref(chosen_logratios, rejected_logratios, pref_probs, *, beta=0.1, eps=1e-6,
                   reduction="mean"):
    p = torch.clamp(pref_probs.double(), eps, 1 - eps)
    target = torch.log(p / (1 - p))
    diff = chosen_logratios.double() - rejected_logratios.double()
    return _reduced((beta * diff - target) ** 2, reduction)
