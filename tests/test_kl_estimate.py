"""kl_estimate against its reference (values and both gradients) and against each trainer's
formula, transcribed from their source: verl 1dda039b (core_algos.kl_penalty), OpenRLHF
0.11.0 / 3c3be623 (models/utils.compute_approx_kl), TRL GRPO's k3."""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule, leaf

import prefkern
from prefkern.reference import kl_estimate_ref

KINDS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]
SETTINGS = {"verl": dict(), "openrlhf": dict(input_clamp=None, output_clamp=10.0),
            "trl": dict(input_clamp=None, output_clamp=None)}


def _pair(shape=(5, 37), scale=3.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=gen) * 10
    ref = logp + scale * torch.randn(shape, generator=gen)
    ref[0, :4] = logp[0, :4] + torch.tensor([30.0, -30.0, 0.0, 25.0])  # past the clamps
    return logp.to(dtype), ref.to(dtype)


def _run(fn, logp, ref, g, kind, dtype=None, **kw):
    a, b = leaf(logp, dtype), leaf(ref, dtype)
    out = fn(a, b, kind, **kw)
    (out * g.to(out.dtype)).sum().backward()
    return out, a.grad, b.grad


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", KINDS + [k + "+" for k in ("k1", "abs", "k3", "low_var_kl")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_the_reference(kind, setting, dtype):
    logp, ref = _pair(dtype=dtype)
    g = torch.randn(logp.shape)
    kw = SETTINGS[setting]
    ours = _run(prefkern.kl_estimate, logp, ref, g, kind, **kw)
    want = _run(kl_estimate_ref, logp, ref, g, kind, torch.float64, **kw)
    base = _run(kl_estimate_ref, logp, ref, g, kind, **kw)
    assert ours[0].dtype == torch.float32
    for name, o, r, b in zip(("value", "dlogprobs", "dref"), ours, want, base, strict=True):
        assert_rule(o, r, b, name)


# --- each trainer's code path, as written in its source --------------------------------------
def verl_kl_penalty(logprob, ref_logprob, kind):
    if kind.endswith("+"):
        forward = verl_kl_penalty(logprob, ref_logprob, kind[:-1])
        k2 = verl_kl_penalty(logprob, ref_logprob, "k2")
        return k2 - k2.detach() + forward.detach()
    if kind in ("kl", "k1"):
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kind):
    log_ratio = log_probs.float() - log_probs_base.float()
    if kind == "k2":
        log_ratio = log_ratio**2 / 2.0
    if kind == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10)


def trl_grpo_k3(per_token_logps, ref_per_token_logps):
    return torch.exp(ref_per_token_logps - per_token_logps) - (
        ref_per_token_logps - per_token_logps) - 1


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "low_var_kl", "k1+", "k3+"])
def test_verl_parity(kind):
    _parity(lambda a, b: verl_kl_penalty(a, b, kind),
            lambda a, b: prefkern.kl_estimate(a, b, kind))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_openrlhf_parity(kind):
    _parity(lambda a, b: openrlhf_compute_approx_kl(a, b, kind),
            lambda a, b: prefkern.kl_estimate(a, b, kind, **SETTINGS["openrlhf"]))


def test_trl_parity():
    _parity(trl_grpo_k3, lambda a, b: prefkern.kl_estimate(a, b, "k3", **SETTINGS["trl"]))


def _parity(theirs, ours):
    logp, ref = _pair(scale=4.0, seed=1)
    g = torch.randn(logp.shape)
    results = []
    for fn in (theirs, ours):
        a, b = leaf(logp), leaf(ref)
        out = fn(a, b)
        (out * g).sum().backward()
        results.append((out, a.grad, b.grad))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_the_three_settings_differ_where_the_trainers_do():
    logp, ref = torch.tensor([0.0, 0.0, -1.0]), torch.tensor([30.0, -25.0, -1.5])
    verl = prefkern.kl_estimate(logp, ref, "k3")
    assert verl[0] == 10.0  # u = 30 clamped to 20, then the value to 10
    assert torch.equal(prefkern.kl_estimate(logp, ref, "k1"), logp - ref)  # verl: k1 unclamped
    openrlhf = prefkern.kl_estimate(logp, ref, "k1", **SETTINGS["openrlhf"])
    assert openrlhf[0] == -10.0 and openrlhf[1] == 10.0
    trl = prefkern.kl_estimate(logp, ref, "k3", **SETTINGS["trl"])
    assert trl[0] > 1e12


def test_straight_through_has_k2_gradient():
    logp, ref = _pair()
    a = leaf(logp)
    prefkern.kl_estimate(a, ref, "k3+").sum().backward()
    torch.testing.assert_close(a.grad, logp - ref)


class TestBadInput:
    def test_kind(self):
        with pytest.raises(ValueError, match="kind must be one of"):
            prefkern.kl_estimate(torch.zeros(3), torch.zeros(3), "k4")

    def test_shapes(self):
        with pytest.raises(ValueError, match="one shape"):
            prefkern.kl_estimate(torch.zeros(3), torch.zeros(4))

    def test_clamps(self):
        with pytest.raises(ValueError, match="input_clamp must be > 0"):
            prefkern.kl_estimate(torch.zeros(3), torch.zeros(3), input_clamp=0.0)
        with pytest.raises(ValueError, match="output_clamp must be"):
            prefkern.kl_estimate(torch.zeros(3), torch.zeros(3), output_clamp="verl")
