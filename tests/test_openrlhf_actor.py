"""prefkern.integrations.openrlhf_actor.patch_actor on OpenRLHF's Actor.forward (transcribed
from 3c3be62 in openrlhf_actor_transcript.py): action log-probs, entropy at temperature 1 and
every parameter's gradient equal the original forward's (comparison rule against the float64
model), padded and packed samples, temperature 1 and 0.7, a softcapped head; the calls that
need logits keep the original forward."""

from __future__ import annotations

import copy

import pytest
import torch
from compare import assert_rule

pytest.importorskip("transformers")

import openrlhf_actor_transcript as openrlhf  # noqa: E402
from test_transformers_integration import H, V, _batch, _tiny  # noqa: E402

from prefkern.integrations.openrlhf_actor import patch_actor, unpatch_actor  # noqa: E402

A = 5  # action (response) length


def _step(actor, sequences, attention, action_mask):
    actor.zero_grad()
    logp, output = actor(sequences, action_mask, attention, return_output=True,
                         return_entropy=True)
    entropy = output.entropy[:, -A:] * action_mask
    g = torch.linspace(-1, 1, logp.numel()).view(logp.shape).to(logp.dtype)
    ((logp * g).sum() + 0.3 * (entropy * g.flip(0)).sum()).backward()
    grads = {n: p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}
    return logp, entropy, grads, output


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind,temperature", [("qwen2", 1.0), ("qwen2", 0.7),
                                              ("gemma2", 0.7)])
def test_patched_actor_equals_openrlhfs_forward(kind, temperature, packing):
    ids, attention, _ = _batch()
    action_mask = attention[:, -A:].bool()
    model = _tiny(kind)
    actor = openrlhf.Actor(model, temperature, packing_samples=packing, inplace_division=False)
    exact = openrlhf.Actor(copy.deepcopy(model).double(), temperature, packing_samples=packing,
                           inplace_division=False)
    base = _step(actor, ids, attention, action_mask)
    ref = _step(exact, ids, attention, action_mask)
    got = _step(patch_actor(actor), ids, attention, action_mask)
    assert got[3].logits is None and base[3].logits is not None
    for k, name in enumerate(("action log-probs", "entropy")):
        assert got[k].dtype == torch.float32
        assert_rule(got[k], ref[k].float(), base[k], name, reduction=V * H)
    assert set(got[2]) == set(ref[2])
    for name in ref[2]:
        assert_rule(got[2][name], ref[2][name].float(), base[2][name], name, reduction=V * H)
    unpatch_actor(actor)
    assert _step(actor, ids, attention, action_mask)[3].logits is not None


def test_calls_that_need_logits_keep_the_original_forward():
    ids, attention, _ = _batch()
    actor = patch_actor(openrlhf.Actor(_tiny("qwen2")))
    output = actor(ids, attention_mask=attention, return_output=True)
    assert output.logits.shape == (*ids.shape, V)
    logp = actor(ids, attention_mask=attention, return_logprobs=True)  # (B, S - 1), no logits
    want = openrlhf.Actor(actor.model)(ids, attention_mask=attention, return_logprobs=True)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)


def test_openrlhfs_own_forward_cannot_backprop_an_entropy_term_at_another_temperature():
    """The peer bug the patch does not have (see openrlhf_actor_transcript)."""
    ids, attention, _ = _batch()
    action_mask = attention[:, -A:].bool()
    actor = openrlhf.Actor(_tiny("qwen2"), temperature=0.7)
    with pytest.raises(RuntimeError, match="inplace operation"):
        _step(actor, ids, attention, action_mask)
    _step(patch_actor(actor), ids, attention, action_mask)
