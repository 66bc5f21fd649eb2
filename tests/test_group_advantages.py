"""prefkern.group_advantages against the group loops of prefkern.reference, and against verl's
published formulas worked by hand.

Parity target: verl/trainer/ppo/core_algos.py at volcengine/verl commit
012be9d9dcb7c38499f23616142870d2682757fc (compute_grpo_outcome_advantage with
norm_adv_by_std_in_grpo True/False, compute_rloo_outcome_advantage, compute_opo_outcome_advantage,
compute_gpg_outcome_advantage, compute_reinforce_plus_plus(_baseline)_outcome_advantage,
compute_remax_outcome_advantage), with verl_F.masked_whiten; unchanged at verl-project/verl
018f23b5f83a13340421349e40ec42530739b23a.
"""

from __future__ import annotations

import math

import pytest
import torch
from compare import assert_rule

from prefkern.ops.group_advantages import dense_group_index, group_advantages
from prefkern.reference.advantages import GROUP_METHODS, group_advantages_ref

EPS = 1e-6
IDS = torch.tensor([5, 5, 5, -3, -3, 9, 2**40, 2**40, 2**40, 2**40, 7, 7, 5])


def _inputs(method, layout, dtype):
    n, seq_len = IDS.numel(), 7
    scores = torch.randn(n)
    scores[[3, 6]] = 0.0  # zero scores matter to gpg
    rewards = torch.randn(n, seq_len)
    mask = torch.rand(n, seq_len) > 0.3
    mask[4] = False
    mask[:, 0] = True
    if layout == "scalar":
        return scores.to(dtype), None
    if layout == "scalar+mask":
        return scores.to(dtype), mask
    return rewards.to(dtype), mask


def _cases():
    for method in GROUP_METHODS:
        for layout in ("scalar", "scalar+mask", "token"):
            if method == "reinforce_pp" and layout != "token":
                continue
            if method == "opo" and layout == "scalar":
                continue
            yield method, layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("method", "layout"), list(_cases()))
def test_matches_reference(method, layout, dtype):
    scores, mask = _inputs(method, layout, dtype)
    baseline = torch.randn(IDS.numel(), dtype=dtype)
    kw = {"method": method, "mask": mask, "baseline": baseline, "gamma": 0.9}
    out = group_advantages(scores, IDS, **kw)
    ref = group_advantages_ref(scores.double(), IDS, **{**kw, "baseline": baseline.double()})
    base = group_advantages_ref(scores.float(), IDS, **{**kw, "baseline": baseline.float()})
    for name, o, r, b in zip(("advantages", "returns"), out, ref, base, strict=True):
        assert o.dtype == dtype
        assert_rule(o, r, b, f"{method} {name}")


# scores of 3 groups: {1, 2, 3}, {5, 7}, {4} (a group of one)
HAND_IDS = torch.tensor([0, 0, 0, 1, 1, 2])
HAND_SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 4.0])


def test_grpo_by_hand():
    adv, ret = group_advantages(HAND_SCORES, HAND_IDS, method="grpo")
    s2 = math.sqrt(2.0)  # torch.std of {5, 7}
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -1 / (s2 + EPS), 1 / (s2 + EPS),
                4 / (1 + EPS)]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert ret is adv or torch.equal(ret, adv)


def test_dr_grpo_rloo_gpg_by_hand():
    dr, _ = group_advantages(HAND_SCORES, HAND_IDS, method="dr_grpo")
    torch.testing.assert_close(dr, torch.tensor([-1.0, 0.0, 1.0, -1.0, 1.0, 4.0]))
    rloo, _ = group_advantages(HAND_SCORES, HAND_IDS, method="rloo")
    torch.testing.assert_close(rloo, torch.tensor([-1.5, 0.0, 1.5, -2.0, 2.0, 4.0]))
    with_zero = torch.tensor([0.0, 2.0, 4.0, 5.0, 7.0, 4.0])  # 5 nonzero of 6: alpha = 6/5
    gpg, _ = group_advantages(with_zero, HAND_IDS, method="gpg")
    torch.testing.assert_close(gpg, 1.2 * torch.tensor([-2.0, 0.0, 2.0, -1.0, 1.0, 4.0]))


def test_opo_by_hand():
    lengths = torch.tensor([1, 1, 2, 1, 3, 5])
    mask = torch.arange(5)[None] < lengths[:, None]
    adv, _ = group_advantages(HAND_SCORES, HAND_IDS, method="opo", mask=mask)
    # baselines: (1 + 2 + 2*3) / 4 = 2.25 and (5 + 3*7) / 4 = 6.5; the single keeps its score
    per_sample = torch.tensor([-1.25, -0.25, 0.75, -1.5, 0.5, 4.0])
    torch.testing.assert_close(adv, per_sample[:, None] * mask)


def test_reinforce_pp_baseline_by_hand():
    adv, _ = group_advantages(HAND_SCORES, HAND_IDS, method="reinforce_pp_baseline")
    centered = torch.tensor([-1.0, 0.0, 1.0, -1.0, 1.0, 4.0], dtype=torch.float64)
    mean = centered.mean()
    var = ((centered - mean) ** 2).sum() / (centered.numel() - 1)
    torch.testing.assert_close(adv.double(), (centered - mean) / torch.sqrt(var + 1e-8),
                               rtol=1e-6, atol=1e-6)


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = group_advantages(rewards, method="reinforce_pp", mask=mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0, 0.0]]))
    inside = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    white = (inside - inside.mean()) / torch.sqrt(inside.var() + 1e-8)
    torch.testing.assert_close(adv[0, :3].double(), white, rtol=1e-6, atol=1e-6)
    assert adv[0, 3] == 0


def test_reinforce_pp_carries_the_return_over_observation_spans():
    """Multi-turn: masked tokens inside a response (tool output) neither discount nor cut the
    return (verl 1dda039 / 0.9.1 compute_reinforce_plus_plus_outcome_advantage)."""
    rewards = torch.tensor([[0.0, 1.0, 7.0, 0.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    for fn in (group_advantages, group_advantages_ref):
        _, ret = fn(rewards, method="reinforce_pp", mask=mask, gamma=0.5)
        torch.testing.assert_close(ret, torch.tensor([[1.0, 2.0, 0.0, 0.0, 2.0, 0.0]]))


def test_remax_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0], [0.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    baseline = torch.tensor([1.0, 0.5])
    adv, ret = group_advantages(rewards, method="remax", mask=mask, baseline=baseline)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 2.0, 2.0, 0.0], [3.0, 3.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.0, 1.0, 1.0, 0.0], [2.5, 2.5, 0.0, 0.0]]))


@pytest.mark.parametrize("method", ["grpo", "rloo", "opo", "gpg", "reinforce_pp_baseline"])
def test_any_integer_ids(method):
    """Group ids are labels: relabeling, reordering and the integer dtype change nothing."""
    scores, mask = _inputs(method, "scalar+mask", torch.float32)
    relabeled = dense_group_index(IDS)
    assert sorted(set(relabeled.tolist())) == list(range(len(set(IDS.tolist()))))
    a, _ = group_advantages(scores, IDS, method=method, mask=mask)
    b, _ = group_advantages(scores, relabeled.to(torch.int32), method=method, mask=mask)
    torch.testing.assert_close(a, b)
    perm = torch.randperm(IDS.numel())
    c, _ = group_advantages(scores[perm], IDS[perm], method=method, mask=mask[perm])
    torch.testing.assert_close(c, a[perm])


def test_input_validation():
    scores = torch.randn(4)
    with pytest.raises(ValueError, match="method must be one of"):
        group_advantages(scores, torch.zeros(4, dtype=torch.long), method="ppo")
    with pytest.raises(ValueError, match="needs group_ids"):
        group_advantages(scores, method="grpo")
    with pytest.raises(TypeError, match="integer"):
        group_advantages(scores, torch.zeros(4), method="grpo")
    with pytest.raises(ValueError, match=r"group_ids must be \(4,\)"):
        group_advantages(scores, torch.zeros(3, dtype=torch.long), method="grpo")
    with pytest.raises(ValueError, match="needs baseline"):
        group_advantages(scores, method="remax")
    with pytest.raises(ValueError, match="pass mask"):
        group_advantages(scores, torch.zeros(4, dtype=torch.long), method="opo")
    with pytest.raises(ValueError, match=r"must be \(B, T\)"):
        group_advantages(scores, method="reinforce_pp")
    with pytest.raises(ValueError, match="mask must be"):
        group_advantages(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), method="grpo",
                         mask=torch.ones(4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("method", GROUP_METHODS)
def test_gpu_no_host_sync_and_matches(method):
    n, seq_len = 4096, 512
    ids = torch.randint(0, 512, (n,), device="cuda") * 7919 - 10**6
    rewards = torch.randn(n, seq_len, device="cuda")
    mask = torch.rand(n, seq_len, device="cuda") > 0.2
    baseline = torch.randn(n, device="cuda")
    kw = {"method": method, "mask": mask, "baseline": baseline}
    group_advantages(rewards, ids, **kw)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = group_advantages(rewards, ids, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = group_advantages_ref(rewards.double().cpu(), ids.cpu(), method=method,
                               mask=mask.cpu(), baseline=baseline.double().cpu())
    base = group_advantages_ref(rewards.cpu(), ids.cpu(), method=method, mask=mask.cpu(),
                                baseline=baseline.cpu())
    for o, r, b in zip(out, ref, base, strict=True):
        assert_rule(o.cpu(), r, b, method)
