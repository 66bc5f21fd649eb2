"""GVPO, A*-PO, DRO and DisCO (prefkern.losses): values and every gradient against the loop
specs in prefkern.reference (comparison rule, float64), against the authors' code as
transcribed here (GVPO: zichongli5/verl 9cbfa72 recipe/gvpo; A*-PO: ZhaolinGao/A-PO c8823a3;
DisCO: Optimization-AI/DisCO bd2b078), and metamorphic properties (row order, group labels,
limits in tau and beta)."""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule, leaf

from prefkern.losses import astar_po_loss, astar_values, disco_loss, dro_loss, gvpo_loss
from prefkern.reference import (
    astar_po_loss_ref,
    astar_values_ref,
    disco_loss_ref,
    dro_loss_ref,
    gvpo_loss_ref,
)


def _sequences(b=12, seed=0, dtype=torch.float32):
    """Summed log-probs of B responses in groups of uneven sizes (ids sparse, negative too)."""
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, generator=gen) * 80 - 1
    old = logps + torch.randn(b, generator=gen) * 0.5
    rewards = torch.randint(0, 2, (b,), generator=gen).float() + torch.rand(b, generator=gen)
    values = torch.randn(b, generator=gen)
    ids = torch.tensor([7, -3, 7, 100, -3, 7, 100, 100, 7, 5, -3, 100][:b])
    return [t.to(dtype) for t in (logps, old, rewards, values)], ids


def _check(fn, ref_fn, tensors, n_grad, reduction_size, **kw):
    """Output and gradients of the first n_grad inputs: ours vs the fp64 spec (the spec at the
    inputs' dtype as the rule's base)."""
    runs = []
    for f, dtype in ((fn, None), (ref_fn, torch.float64), (ref_fn, None)):
        xs = [leaf(t, dtype) if i < n_grad else t.to(dtype or t.dtype)
              for i, t in enumerate(tensors)]
        out = f(*xs, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        g = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape).to(loss.dtype)
        (loss * g).sum().backward()
        grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in xs[:n_grad]]
        runs.append([loss, *grads])
    for i, (o, r, b) in enumerate(zip(*runs, strict=True)):
        assert_rule(o, r, b, f"output {i}", reduction=reduction_size)
    return runs[0]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gvpo_against_spec(reduction, dtype):
    (logps, old, rewards, _), ids = _sequences(dtype=dtype)
    _check(lambda a, b, r, i, **k: gvpo_loss(a, b, r, i, **k),
           gvpo_loss_ref, [logps, old, rewards, ids], 2, 12, beta=0.3, reduction=reduction)


def _gvpo_recipe(log_prob, old_log_prob, advantages, response_mask, beta, uid, n):
    """GVPO's verl recipe (zichongli5/verl 9cbfa72, recipe/gvpo/gvpo_core_algos.py) on one
    rank, transcribed: token-level inputs, equal groups of n, a sum over the rows."""
    rtheta = ((log_prob * response_mask).sum(-1) - (old_log_prob * response_mask).sum(-1)) * beta
    r_minus_avg = (advantages * response_mask).sum(-1) / response_mask.sum(-1)
    means = {u: rtheta.detach()[uid == u].mean() for u in uid.unique().tolist()}
    loss = 0
    for i in range(len(rtheta)):
        loss = loss + 0.5 * ((rtheta[i] - means[uid[i].item()]) - r_minus_avg[i]) ** 2
    return loss / (n - 1)


@pytest.mark.parametrize("on_policy", [False, True])
def test_gvpo_equals_the_authors_recipe(on_policy):
    gen = torch.Generator().manual_seed(3)
    b, t, n = 8, 6, 4
    uid = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    mask = (torch.rand(b, t, generator=gen) < 0.8).float()
    mask[:, 0] = 1
    token_logp = (-torch.rand(b, t, generator=gen) * 3).double().requires_grad_(True)
    old = token_logp.detach() if on_policy else token_logp.detach() + 0.3 * torch.randn(
        b, t, generator=gen).double()
    scores = torch.randint(0, 2, (b,), generator=gen).double()
    centred = scores - torch.stack([scores[uid == u].mean() for u in uid.tolist()])
    advantages = centred[:, None].expand(b, t)  # verl's grpo without std, on every token
    want = _gvpo_recipe(token_logp, old, advantages, mask, 0.1, uid, n)
    (want_grad,) = torch.autograd.grad(want, token_logp)
    got, _ = gvpo_loss((token_logp * mask).sum(-1), (old * mask).sum(-1), scores, uid, beta=0.1)
    (got_grad,) = torch.autograd.grad(got, token_logp)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9)
    if on_policy:  # a policy gradient with group-centred rewards, scaled by beta / (n - 1)
        expected = -0.1 * centred[:, None] * mask / (n - 1)
        torch.testing.assert_close(got_grad, expected, rtol=1e-6, atol=1e-9)


def test_gvpo_single_sample_groups_are_zero():
    logps = torch.tensor([-3.0, -4.0, -5.0], requires_grad=True)
    loss, _ = gvpo_loss(logps, logps.detach() + 1, torch.tensor([1.0, 0.0, 1.0]),
                        torch.tensor([0, 1, 1]), reduction="none")
    assert loss[0] == 0 and loss[1:].abs().sum() > 0
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all() and logps.grad[0] == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 3.0])
def test_astar_values(beta):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 2, (5, 8), generator=gen).float() * 3
    got = astar_values(rewards, beta=beta)
    torch.testing.assert_close(got, astar_values_ref(rewards.double(), beta=beta).float())
    # the authors' dataset code: log(mean(exp(v / beta))) * beta, the mean at beta = 0
    want = rewards.double().mean(1) if beta == 0 else \
        torch.log(torch.exp(rewards.double() / beta).mean(1)) * beta
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    flat, ids = rewards.reshape(-1), torch.arange(5).repeat_interleave(8) * 11 - 20
    perm = torch.randperm(40, generator=gen)
    grouped = astar_values(flat[perm], ids[perm], beta=beta)
    torch.testing.assert_close(grouped, got[(ids[perm] + 20) // 11])
    torch.testing.assert_close(grouped, astar_values_ref(flat[perm].double(), ids[perm],
                                                         beta=beta).float())


def test_astar_values_limits_and_extremes():
    rewards = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    torch.testing.assert_close(astar_values(rewards, beta=1e-3), torch.tensor([5.0 - 1e-3 *
                                                                              2 ** 0.5]),
                               rtol=0, atol=2e-3)  # -> max as beta -> 0+
    torch.testing.assert_close(astar_values(rewards, beta=1e5), rewards.mean(1), rtol=1e-4,
                               atol=1e-4)  # -> mean as beta -> inf
    big = torch.tensor([[1e4, 0.0]])  # exp(r / beta) overflows without the max shift
    assert torch.isfinite(astar_values(big, beta=0.5)).all()
    assert torch.isfinite(astar_values(big.reshape(-1), torch.tensor([0, 0]), beta=0.5)).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_astar_po_and_dro_against_spec(reduction):
    (logps, old, rewards, values), _ = _sequences(seed=2)
    _check(astar_po_loss, astar_po_loss_ref, [logps, old, rewards, values], 2, 12, beta=1e-2,
           reduction=reduction)
    _check(dro_loss, dro_loss_ref, [logps, old, values, rewards], 4, 12, tau=0.05,
           reduction=reduction)  # DRO: the value estimate takes a gradient too


def test_astar_po_equals_the_authors_code():
    """ZhaolinGao/A-PO c8823a3 verl/trainer/apo/core_algos.py compute_policy_loss: masked
    token sums, (beta2 * (logp - ref) + v_star - reward) ** 2, mean over the batch."""
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand(6, 9, generator=gen) < 0.7).double()
    logp = (-torch.rand(6, 9, generator=gen) * 2).double().requires_grad_(True)
    ref = (-torch.rand(6, 9, generator=gen) * 2).double()
    token_rewards = torch.zeros(6, 9, dtype=torch.float64)
    token_rewards[:, -1] = torch.randint(0, 2, (6,), generator=gen).double()
    v_star = torch.rand(6, generator=gen).double()
    want = (1e-3 * ((logp * mask).sum(-1) - (ref * mask).sum(-1)) + v_star
            - (token_rewards * mask).sum(-1)).pow(2).mean()
    got, _ = astar_po_loss((logp * mask).sum(-1), (ref * mask).sum(-1),
                           (token_rewards * mask).sum(-1), v_star)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0],
                               torch.autograd.grad(want, logp)[0], rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------ DisCO

def _rollouts(b=12, t=7, seed=0, dtype=torch.float32, groups=3):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 2
    old = logp + torch.randn(b, t, generator=gen) * 0.05
    mask = torch.rand(b, t, generator=gen) < 0.8
    mask[:, 0] = True
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    ids = torch.arange(groups).repeat(b // groups)[torch.randperm(b, generator=gen)] * 3 + 1
    return [logp.to(dtype), old.to(dtype), mask, rewards, ids]


@pytest.mark.parametrize("score", ["log_l", "l_ratio"])
@pytest.mark.parametrize("tau", [None, 10.0, 0.3])
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disco_against_spec(score, tau, kl_kind, dtype):
    data = _rollouts(dtype=dtype)
    data[3][data[4] == 4] = 1.0  # one prompt with positives only: it must not count
    data[3][0] = 0.5  # neither positive nor negative
    # a small delta so the penalty is active (kl ~ 1e-3)
    _check(disco_loss, disco_loss_ref, data, 2, 12 * 7, score=score, tau=tau, beta=50.0,
           delta=1e-5, kl_kind=kl_kind)


def _disco_repo(old_log_prob, log_prob, eos_mask, uid, seq_level_rewards, delta, beta, tau,
                score, kl_type):
    """The authors' loss (Optimization-AI/DisCO bd2b078 core_algos.py,
    compute_policy_loss_disco{,b}_{logL,Lratio}, one process) transcribed: groups of equal
    size sorted by uid, the log-mean-exp as sum / sum.detach(), the penalty as
    relu(beta (kl - delta)).detach() * kl. Same gradients as prefkern's, another value."""
    neg_kl = log_prob - old_log_prob
    ratio = torch.exp(neg_kl)
    per_token = -neg_kl + ratio - 1 if kl_type == "low_var_kl" else -neg_kl
    ppo_kl = (per_token * eos_mask).sum() / eos_mask.sum()
    values = log_prob if score == "log_l" else ratio
    scores = (values * eos_mask).sum(1) / eos_mask.sum(1)
    _, order = uid.sort(stable=True)
    questions = uid.unique().numel()
    grouped = scores[order].view(questions, -1)
    rewards = seq_level_rewards[order].view(questions, -1)
    pos, neg = rewards == 1, rewards == 0
    keep = (pos.sum(1) != 0) & (neg.sum(1) != 0)
    grouped, pos, neg = grouped[keep], pos[keep], neg[keep]
    if tau is None:
        neg_term = (grouped * neg).sum(1, keepdim=True) / neg.sum(1, keepdim=True)
    else:
        shifted = (grouped / tau).masked_fill(~neg, float("-inf"))
        top = shifted.max(-1, keepdim=True)[0]
        top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
        sum_exp = (torch.exp((grouped / tau - top.detach()) * neg) * neg).sum(-1, keepdim=True)
        neg_term = tau * sum_exp / (sum_exp.detach() + torch.finfo(sum_exp.dtype).eps)
    pg = ((grouped - neg_term) * pos).sum(1, keepdim=True) / pos.sum(1, keepdim=True)
    constraint = torch.maximum(beta * (ppo_kl - delta), torch.zeros_like(ppo_kl)).detach() \
        * ppo_kl
    return -pg.sum() / questions + constraint


@pytest.mark.parametrize("score", ["log_l", "l_ratio"])
@pytest.mark.parametrize("tau", [None, 10.0, 1.0])
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_disco_gradients_equal_the_authors_code(score, tau, kl_kind):
    logp, old, mask, rewards, ids = _rollouts(b=12, seed=5, groups=4)
    rewards[ids == 4] = 1.0  # a prompt of positives only: dropped, still counted in Q
    logp, old, mask = logp.double(), old.double(), mask.double()
    for delta in (1e-4, 1e-9):  # penalty off, penalty on
        x = logp.clone().requires_grad_(True)
        got, metrics = disco_loss(x, old, mask, rewards, ids, score=score, tau=tau, beta=1e3,
                                  delta=delta, kl_kind=kl_kind)
        (got_grad,) = torch.autograd.grad(got, x)
        y = logp.clone().requires_grad_(True)
        want = _disco_repo(old, y, mask, ids, rewards, delta, 1e3, tau, score,
                           "kl" if kl_kind == "k1" else "low_var_kl")
        (want_grad,) = torch.autograd.grad(want, y)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-10)
        both = sum(bool((rewards[ids == g] == 1).any() and (rewards[ids == g] == 0).any())
                   for g in ids.unique().tolist())
        assert metrics["valid_groups"] == both and 0 < both < 4


def test_disco_properties():
    logp, old, mask, rewards, ids = _rollouts(b=12, seed=6)
    base, _ = disco_loss(logp, old, mask, rewards, ids, tau=None)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled, _ = disco_loss(logp[perm], old[perm], mask[perm], rewards[perm],
                             ids[perm] * 7 - 100, tau=None)
    torch.testing.assert_close(shuffled, base)  # row order and group labels do not matter
    wide, _ = disco_loss(logp, old, mask, rewards, ids, tau=1e7)
    torch.testing.assert_close(wide, base, rtol=1e-4, atol=1e-5)  # tau -> inf: DisCO-b
    sharp, _ = disco_loss(logp, old, mask, rewards, ids, tau=1e-4)
    assert sharp > base  # tau -> 0: the hardest negative, above the mean
    none_valid, metrics = disco_loss(logp, old, mask, torch.ones(12), ids)
    assert metrics["valid_groups"] == 0  # only the penalty is left
    torch.testing.assert_close(none_valid, 0.5 * 1e3 * torch.relu(metrics["kl"] - 1e-4) ** 2)


def test_disco_ignores_non_finite_padding():
    logp, old, mask, rewards, ids = _rollouts(seed=7)
    mask[2, 3:] = False
    runs = []
    for fill_logp, fill_old in ((-1.0, -2.0), (-torch.inf, torch.nan)):
        x = torch.where(mask, logp, fill_logp).requires_grad_(True)
        for tau in (None, 1.0):
            for score in ("log_l", "l_ratio"):
                loss, _ = disco_loss(x, torch.where(mask, old, fill_old), mask, rewards, ids,
                                     tau=tau, score=score, delta=0.0)
                (grad,) = torch.autograd.grad(loss, x)
                assert (grad[~mask] == 0).all()
                runs.append((loss, grad))
    for (loss, grad), (loss2, grad2) in zip(runs[:4], runs[4:], strict=True):
        assert torch.isfinite(loss2) and torch.isfinite(grad2).all()
        torch.testing.assert_close((loss2, grad2), (loss, grad), rtol=0, atol=0)


def test_errors():
    (logps, old, rewards, values), ids = _sequences()
    with pytest.raises(ValueError, match="reduction"):
        gvpo_loss(logps, old, rewards, ids, reduction="batchmean")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        gvpo_loss(logps, old[:5], rewards, ids)
    with pytest.raises(TypeError, match="group_ids"):
        gvpo_loss(logps, old, rewards, ids.float())
    with pytest.raises(ValueError, match="beta"):
        astar_values(rewards[None], beta=-1.0)
    with pytest.raises(ValueError, match="tau"):
        dro_loss(logps, old, rewards, values, tau=0.0)
    data = _rollouts()
    with pytest.raises(ValueError, match="score"):
        disco_loss(*data, score="ratio")
    with pytest.raises(ValueError, match="kl_kind"):
        disco_loss(*data, kl_kind="k2")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        disco_loss(data[0], data[1][:, :3], *data[2:])
