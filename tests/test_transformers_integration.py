"""prefkern.integrations.transformers on tiny causal LMs built from configs (no downloads):
log-probs, entropy and gradients equal the logits path (comparison rule against the float64
model), for plain, tied, softcapped (Gemma-2) and logit-scaled (Cohere) heads."""

from __future__ import annotations

import copy

import pytest
import torch
from compare import assert_rule

transformers = pytest.importorskip("transformers")

from prefkern.integrations import transformers as hf  # noqa: E402

V, H = 131, 32


def _tiny(kind: str):
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "qwen2-tied":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            tie_word_embeddings=True, **common))
    elif kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            head_dim=8, final_logit_softcapping=3.0, **common))
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(
            logit_scale=0.5, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # a head with logits of a few nats (random init gives ~0.02)
        model.get_output_embeddings().weight.normal_(0, 2.0 / H**0.5)
    return model.eval()


def _batch(b=3, t=11, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=gen)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[0, -3:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[attention == 0] = -100
    return ids, attention, labels


def _logits_path(model, ids, attention, labels, temperature=1.0):
    """What TRL does: logits from the model, shifted, fp32 log-softmax, gather."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    logp = (logits.float() / temperature).log_softmax(-1)
    targets = labels[:, 1:]
    valid = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, picked, 0), torch.where(valid, entropy, 0)


def _run(model, fn):
    model.zero_grad()
    logp, ent = fn(model)
    g = torch.linspace(-1, 1, logp.numel()).view(logp.shape).to(logp.dtype)
    ((logp * g).sum() + 0.3 * (ent * g.flip(0)).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp, ent, grads


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied", "gemma2", "cohere"])
def test_causal_lm_logprobs_equal_the_logits_path(kind):
    model = _tiny(kind)
    ids, attention, labels = _batch()

    def ours(m):
        out = hf.causal_lm_logprobs(m, ids, attention, labels, temperature=0.8,
                                    return_entropy=True, backend="torch")
        valid = labels[:, 1:] != -100
        return out.logprobs, torch.where(valid, out.entropy, 0)

    spec = lambda m: _logits_path(m, ids, attention, labels, 0.8)  # noqa: E731
    got = _run(model, ours)
    ref = _run(copy.deepcopy(model).double(), spec)
    base = _run(model, spec)
    reduction = V * H
    for name, o, r, b in (("logprobs", got[0], ref[0], base[0]),
                          ("entropy", got[1], ref[1], base[1])):
        assert_rule(o, r.float(), b, name, reduction=reduction)
    assert set(got[2]) == set(ref[2])
    for name in ref[2]:
        assert_rule(got[2][name], ref[2][name].float(), base[2][name], name,
                    reduction=reduction)
    assert (got[0] <= 0).all() and (got[0][labels[:, 1:] == -100] == 0).all()


def test_logits_to_keep_is_trls():
    model = _tiny("qwen2")
    ids, attention, _ = _batch()
    full = hf.causal_lm_logprobs(model, ids, backend="torch")
    last = hf.causal_lm_logprobs(model, ids, logits_to_keep=5, backend="torch")
    torch.testing.assert_close(last, full[:, -5:])
    # TRL: model(..., logits_to_keep=k + 1).logits[:, :-1] scores input_ids[:, -k:]
    logits = model(input_ids=ids, logits_to_keep=6, use_cache=False).logits[:, :-1]
    want = logits.float().log_softmax(-1).gather(-1, ids[:, -5:, None])[..., 0]
    torch.testing.assert_close(last, want, rtol=1e-5, atol=1e-5)


def test_apply_prefkern_loss_is_the_models():
    model = _tiny("gemma2")
    ids, attention, labels = _batch()
    want = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hf.apply_prefkern(model, return_entropy=True, backend="torch")
    out = model(input_ids=ids, attention_mask=attention, labels=labels)
    assert out.logits is None and out.entropy is not None
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6)
    # no labels: the original forward (generation needs the logits)
    assert model(input_ids=ids).logits.shape == (3, 11, V)
    hf.remove_prefkern(model)
    assert not hasattr(model, "_prefkern_forward")
    assert model(input_ids=ids, labels=labels).logits is not None


def test_apply_prefkern_adds_the_router_aux_loss():
    """MoE models add router_aux_loss_coef * load-balancing loss when router logits are output
    (transformers' Mixtral forward): the patched forward too, with its router gradients."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
    model = transformers.MixtralForCausalLM(config)
    ours = hf.apply_prefkern(copy.deepcopy(model), backend="torch")
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    want, got = model(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
    assert model(input_ids=ids, labels=ids).aux_loss > 0
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gate = [m.model.layers[0].mlp.gate.weight.grad for m in (model, ours)]
    torch.testing.assert_close(gate[1], gate[0], rtol=1e-4, atol=1e-7)


def test_apply_prefkern_takes_shift_labels():
    """shift_labels (HF Trainer's context-parallel shards): every position is scored against
    its own label, no shift, as transformers' loss does."""
    model = _tiny("qwen2")
    ids, attention, labels = _batch()
    shift = torch.cat([labels[:, 1:], labels[:, :1]], 1)  # a shard's labels run past its end
    want = model(input_ids=ids, attention_mask=attention, labels=labels, shift_labels=shift).loss
    hf.apply_prefkern(model, backend="torch")
    out = model(input_ids=ids, attention_mask=attention, labels=labels, shift_labels=shift)
    assert out.logprobs.shape == shift.shape
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_from_linear_runs_inside_the_heads_call():
    model = _tiny("qwen2")
    calls = []
    model.lm_head.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    model.lm_head.register_forward_hook(lambda mod, args, out: calls.append("post"))
    head = hf.from_linear(model.lm_head, backend="torch")
    hidden = torch.randn(2, 5, H, requires_grad=True)
    targets = torch.randint(0, V, (2, 5))
    logp = head(hidden, targets)
    assert calls == ["pre", "post"]
    want = (hidden @ model.lm_head.weight.T).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.lm_head)  # the head's own forward is back
    assert model.lm_head(hidden).shape == (2, 5, V)


def test_peft_modules_to_save_and_lora_on_the_head():
    peft = pytest.importorskip("peft")
    model = _tiny("qwen2")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"],
                                                         modules_to_save=["lm_head"]))
    head = hf.lm_head_of(wrapped.base_model.model)
    assert isinstance(head, torch.nn.Linear) and head is not model.lm_head.original_module
    ids, attention, labels = _batch()
    hf.causal_lm_logprobs(wrapped.base_model.model, ids, attention, labels, backend="torch")
    lora = peft.get_peft_model(_tiny("qwen2"), peft.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LoRA"):
        hf.lm_head_of(lora.base_model.model)


def test_empty_head_shard_is_a_clear_error():
    model = _tiny("qwen2")
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))
    ids, _, _ = _batch()
    with pytest.raises(ValueError, match="empty"):
        hf.causal_lm_logprobs(model, ids, backend="torch")


def test_prefkern_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, prefkern, prefkern.integrations.transformers; "
            "print(any(m in sys.modules for m in ('transformers', 'trl', 'verl', 'openrlhf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
