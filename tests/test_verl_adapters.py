"""prefkern.integrations.verl: verl's signatures and return contracts (verl-project/verl
1dda039 core_algos / torch_functional / linear_cross_entropy). Against verl's formulas always;
against the installed verl package's own functions when it is importable (verl 0.9.1 was
checked this way: every policy loss, aggregation mode and KL estimator, with dp_size 1 and 2;
it does not install beside this project's transformers pin, so CI runs the formula tests)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from test_policy_loss import _verl_agg_loss

from prefkern.integrations import verl as pv
from prefkern.losses.policy import AGGREGATIONS


class Config(dict):
    """The attribute-and-get access verl's policy losses use on their ActorConfig."""

    __getattr__ = dict.__getitem__


def _config(**info):
    return Config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                  tau_pos=1.0, tau_neg=1.05, global_batch_info=info,
                  policy_loss=Config(clip_cov_ratio=1.0, clip_cov_lb=1.0, clip_cov_ub=5.0,
                                     kl_cov_ratio=0.05, ppo_kl_coef=1.0))


def _rollout():
    gen = torch.Generator().manual_seed(0)
    b, t = 6, 20
    old = -torch.rand(b, t, generator=gen) * 3
    logp = old + 0.4 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, t, generator=gen) * 2
    mask = (torch.arange(t)[None] < torch.randint(1, t + 1, (b, 1), generator=gen)).float()
    mask[2] = 0  # a fully masked sequence
    ref = old + 0.2 * torch.randn(b, t, generator=gen)
    return old, logp, adv, mask, ref


INFOS = [dict(dp_size=1), dict(dp_size=2, batch_num_tokens=150, global_batch_size=11)]


@pytest.mark.parametrize("info", INFOS)
def test_agg_loss_is_verls(info):
    _, logp, _, mask, _ = _rollout()
    for mode in AGGREGATIONS:
        torch.testing.assert_close(pv.agg_loss(logp, mask, mode, **info),
                                   _verl_agg_loss(logp, mask, mode, **info))
    with pytest.raises(ValueError, match="required when dp_size > 1"):
        pv.agg_loss(logp, mask, "token-mean", dp_size=2)


@pytest.mark.parametrize("info", INFOS)
def test_vanilla_is_verls(info):
    """compute_policy_loss_vanilla from its formula: log-ratio clamped to +-20, the PPO clip,
    the dual clip at clip_ratio_c where A < 0, rollout IS weights, agg_loss."""
    old, logp, adv, mask, _ = _rollout()
    w = torch.rand(adv.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    results = []
    for fn in ("ours", "verl"):
        x = logp.clone().requires_grad_(True)
        if fn == "ours":
            loss, metrics = pv.policy_loss_fn("vanilla")(old, x, adv, mask, "token-mean",
                                                         _config(**info), w)
        else:
            ratio = torch.exp((x - old).clamp(-20, 20))
            pg1, pg2 = -adv * ratio, -adv * ratio.clamp(0.8, 1.28)
            clip1 = torch.maximum(pg1, pg2)
            losses = torch.where(adv < 0, torch.minimum(-adv * 3.0, clip1), clip1) * w
            loss = _verl_agg_loss(losses, mask, "token-mean", **info)
        loss.backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("name", ["vanilla", "sapo", "cispo", "gspo", "geo_mean", "clip_cov"])
def test_ppo_kl_metric_is_verls(name):
    """actor/ppo_kl: the masked mean of -(logp - old), clamped to +-20 first where verl's loss
    clamps it (vanilla, sapo, cispo), raw elsewhere (gspo, geo_mean, clip_cov)."""
    old, logp, adv, mask, _ = _rollout()
    logp = logp.clone()
    logp[0, 0] = old[0, 0] + 39.0
    _, metrics = pv.policy_loss_fn(name)(old, logp, adv, mask, "token-mean", _config(), None)
    x = logp - old
    if name in ("vanilla", "sapo", "cispo"):
        x = x.clamp(-20.0, 20.0)
    want = -(x * mask).sum() / mask.sum()
    assert metrics["actor/ppo_kl"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+",
                                  "k1+"])
def test_kl_penalty_is_verls(kind):
    _, logp, _, _, ref = _rollout()
    logp = logp * 20  # large log-ratios: k3's clamps matter
    base = kind.rstrip("+")
    results = []
    for fn in ("ours", "verl"):
        x = logp.clone().requires_grad_(True)
        if fn == "ours":
            kl = pv.kl_penalty(x, ref, kind)
        else:
            d = x - ref
            forward = {"kl": d, "k1": d, "abs": d.abs(), "mse": 0.5 * d.square(),
                       "k2": 0.5 * d.square()}.get(base)
            if forward is None:  # low_var_kl / k3
                e = (ref - x).clamp(-20, 20)
                forward = (torch.exp(e) - e - 1).clamp(-10, 10)
            kl = forward
            if kind.endswith("+"):
                back = 0.5 * d.square()
                kl = back - back.detach() + forward.detach()
        kl.sum().backward()
        results.append((kl, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_linear_cross_entropy_and_logits_helpers():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7), generator=gen)
    logp, ent = pv.linear_cross_entropy(hidden, weight, labels, 0.7)
    z = (hidden @ weight.T / 0.7).reshape(-1, 50)
    want = z.log_softmax(-1).gather(-1, labels.reshape(-1, 1))[:, 0]
    assert logp.shape == ent.shape == (14,) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, -(z.softmax(-1) * z.log_softmax(-1)).sum(-1), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        pv.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    logits = z.detach().reshape(2, 7, 50).clone().requires_grad_(True)
    torch.testing.assert_close(pv.logprobs_from_logits(logits, labels, False),
                               want.view(2, 7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pv.entropy_from_logits(logits), ent.view(2, 7).detach(),
                               rtol=1e-5, atol=1e-5)


def test_register_fills_verls_registry(monkeypatch):
    """register() through a stand-in verl package: every loss lands in the registry, and
    gspo's aggregation follows the version (0.9.1 honours loss_agg_mode, later forces
    seq-mean-token-mean)."""
    registry = {}
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.register_policy_loss = lambda name: (lambda fn: registry.__setitem__(name, fn) or fn)
    estimators = {}
    core.register_adv_est = lambda name: (lambda fn: estimators.__setitem__(name, fn) or fn)
    for version, forces in (("0.9.1", False), ("0.10.0.dev0", True)):
        fake = types.ModuleType("verl")
        fake.__version__ = version
        monkeypatch.setitem(sys.modules, "verl", fake)
        monkeypatch.setitem(sys.modules, "verl.trainer", types.ModuleType("verl.trainer"))
        monkeypatch.setitem(sys.modules, "verl.trainer.ppo", types.ModuleType("verl.trainer.ppo"))
        monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
        pv.register()
        assert set(registry) == set(pv.POLICY_LOSSES)
        assert set(estimators) == set(pv.ADV_ESTIMATORS)
        old, logp, adv, mask, _ = _rollout()
        got, _ = registry["gspo"](old, logp, adv, mask, "token-mean", _config(dp_size=1))
        seq, _ = pv.policy_loss_fn("gspo")(old, logp, adv, mask, "seq-mean-token-mean",
                                           _config(dp_size=1))
        assert torch.allclose(got, seq) == forces


def test_against_the_installed_verl():
    ca = pytest.importorskip("verl.trainer.ppo.core_algos")
    old, logp, adv, mask, ref = _rollout()
    for info in INFOS:
        for mode in AGGREGATIONS:
            torch.testing.assert_close(pv.agg_loss(logp, mask, mode, **info),
                                       ca.agg_loss(logp, mask, mode, **info))
    for kind in ("kl", "abs", "mse", "low_var_kl", "k3+"):
        torch.testing.assert_close(pv.kl_penalty(logp, ref, kind),
                                   ca.kl_penalty(logp, ref, kind))
    for name in ("vanilla", "gpg", "kl_cov", "geo_mean", "clip_cov"):
        for info in INFOS:
            for mode in ("token-mean", "seq-mean-token-mean"):
                want, want_m = ca.get_policy_loss_fn(name)(old, logp, adv, mask, mode,
                                                          _config(**info), None)
                got, got_m = pv.policy_loss_fn(name)(old, logp, adv, mask, mode,
                                                     _config(**info), None)
                torch.testing.assert_close(got, want)
                assert got_m.keys() == want_m.keys()


def verl_normalizers(preset: dict, info: dict) -> dict:
    """policy_loss's normalizer / aux_normalizer for verl's global batch info (totals divided
    by dp_size: DDP averages the gradients); {} without totals."""
    if not info.get("batch_num_tokens"):
        return {}
    dp = info["dp_size"]
    tokens, seqs = info["batch_num_tokens"] / dp, info["global_batch_size"] / dp
    policy_mode = preset.get("agg") or "seq-mean-token-mean"  # the preset's forced modes
    aux_mode = preset.get("aux_agg") or policy_mode
    norms = {"normalizer": tokens if policy_mode == "token-mean" else seqs}
    if aux_mode != policy_mode:
        norms["aux_normalizer"] = tokens if aux_mode == "token-mean" else seqs
    return norms


def test_ppo_loss_terms_against_the_installed_verl():
    """verl's ppo_loss (workers/utils/losses.py): pg_loss - entropy_coeff * agg_loss(entropy)
    + kl_loss_coef * agg_loss(kl_penalty), the last two by loss_agg_mode while sapo's policy
    term is seq-mean-token-mean; built from the installed verl's own functions."""
    from prefkern.losses import policy_loss, policy_preset

    ca = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig  # sapo asserts a real one

    old, logp, adv, mask, ref = _rollout()
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) * 3
    for info in INFOS:
        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
        config.global_batch_info.update(info)
        for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            pg, _ = ca.get_policy_loss_fn("sapo")(old, logp, adv, mask, mode, config, None)
            kl = ca.kl_penalty(logp, ref, "low_var_kl")
            want = (pg - 0.05 * ca.agg_loss(entropy, mask, mode, **info)
                    + 0.1 * ca.agg_loss(kl, mask, mode, **info))
            preset = policy_preset("verl", loss_type="sapo", agg=mode)
            got, _ = policy_loss(logp, old, adv, mask, entropy=entropy, entropy_coef=0.05,
                                 ref_logprobs=ref, kl_coef=0.1,
                                 **verl_normalizers(preset, info), **preset)
            torch.testing.assert_close(got, want, msg=f"{info} {mode}")


def _outcome_batch():
    gen = torch.Generator().manual_seed(6)
    b, t = 8, 12
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = torch.randn(b, generator=gen)
    index = ["a", "a", "b", "b", "b", "c", "d", "d"]  # verl's prompt uids
    return rewards, mask, index


def test_advantage_estimators_map_uids_to_groups():
    """verl's estimator signatures over prefkern.group_advantages: string uids become groups
    (first appearance order), the same as integer group ids."""
    import prefkern

    rewards, mask, index = _outcome_batch()
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    for fn, method in ((pv.compute_grpo_outcome_advantage, "grpo"),
                       (pv.compute_rloo_outcome_advantage, "rloo"),
                       (pv.compute_opo_outcome_advantage, "opo"),
                       (pv.compute_reinforce_plus_plus_baseline_outcome_advantage,
                        "reinforce_pp_baseline")):
        got = fn(rewards, mask, index)
        want = prefkern.group_advantages(rewards, groups, method=method, mask=mask)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    adv, _ = pv.compute_gpg_outcome_advantage(rewards, mask, index, f_norm=2.0)
    want, _ = prefkern.group_advantages(rewards, groups, method="gpg", mask=mask)
    torch.testing.assert_close(adv, want / 2.0)
    no_std, _ = pv.compute_grpo_outcome_advantage(rewards, mask, index,
                                                  norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(no_std, prefkern.group_advantages(
        rewards, groups, method="dr_grpo", mask=mask)[0])


def test_advantage_estimators_against_the_installed_verl():
    np = pytest.importorskip("numpy")
    ca = pytest.importorskip("verl.trainer.ppo.core_algos")
    rewards, mask, index = _outcome_batch()
    uids = np.array(index, dtype=object)
    values = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(2))
    baseline = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(3))
    calls = [("compute_gae_advantage_return", (rewards, values, mask, 0.99, 0.95), {}),
             ("compute_grpo_outcome_advantage", (rewards, mask, uids), {}),
             ("compute_rloo_outcome_advantage", (rewards, mask, uids), {}),
             ("compute_opo_outcome_advantage", (rewards, mask, uids), {}),
             ("compute_gpg_outcome_advantage", (rewards, mask, uids), {"f_norm": 2.0}),
             ("compute_reinforce_plus_plus_baseline_outcome_advantage", (rewards, mask, uids),
              {}),
             ("compute_remax_outcome_advantage", (rewards, baseline, mask), {})]
    for name, args, kw in calls:
        for got, want in zip(getattr(pv, name)(*args, **kw), getattr(ca, name)(*args, **kw),
                             strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-5)
