"""prefkern.integrations.trl against TRL's own fused LM head (trl 1.16.0, add_fused_lm_head):
every FusedCausalLMOutput field and the gradients of the loss and entropy, on tiny models built
from configs; and a GRPO trainer's per-token log-probs with and without patch_trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from compare import assert_rule
from test_transformers_integration import V, _batch, _tiny

trl = pytest.importorskip("trl")

from prefkern.integrations import trl as pk_trl  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _greedy_batch(model):
    """_batch() with every other token the model's own greedy choice: is_top1 has hits."""
    ids, attention, labels = _batch()
    with torch.no_grad():
        for t in range(4, ids.shape[1] - 1, 2):
            ids[:, t + 1] = model(input_ids=ids[:, : t + 1]).logits[:, -1].argmax(-1)
    labels = torch.where(labels == -100, labels, ids)
    return ids, attention, labels


def _fused(model, patch, ids, attention, labels, temperature, **call):
    patch(model, temperature=temperature, outputs=OUTPUTS)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True,
                **call)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "cohere"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_fields_equal_trls(kind, temperature):
    from trl.trainer.utils import add_fused_lm_head as trl_add

    model = _tiny(kind)
    ids, attention, labels = _greedy_batch(model)
    ours, ours_g = _fused(copy.deepcopy(model), pk_trl.add_fused_lm_head, ids, attention,
                          labels, temperature)
    theirs, theirs_g = _fused(copy.deepcopy(model), trl_add, ids, attention, labels,
                              temperature)
    spec, spec_g = _fused(copy.deepcopy(model).double(), trl_add, ids, attention, labels,
                          temperature)
    assert torch.equal(ours.label_mask, theirs.label_mask)
    assert torch.equal(ours.is_top1, theirs.is_top1) and ours.is_top1.any()
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        o, t, r = (getattr(x, name) for x in (ours, theirs, spec))
        assert o.dtype == torch.float32 and o.shape == t.shape, name
        assert_rule(o, r.float(), t, name, reduction=V * 32)
    for name, g in spec_g.items():
        assert_rule(ours_g[name], g.float(), theirs_g[name], name, reduction=V * 32)


def test_num_items_shift_labels_and_generation():
    ids, attention, labels = _batch()
    model = _tiny("qwen2")
    pk_trl.add_fused_lm_head(model, outputs=("log_probs",))
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True,
                num_items_in_batch=torch.tensor(7.0))
    assert out.entropy is None and out.mean_logits is None
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / 7.0)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    pre = model(input_ids=ids, attention_mask=attention, shift_labels=shifted,
                fused_lm_head=True)
    torch.testing.assert_close(pre.log_probs[:, :-1], out.log_probs)
    assert model(input_ids=ids).logits.shape == (3, 11, V)  # the original forward


def test_patch_trl_swaps_and_restores():
    import trl.trainer.grpo_trainer as grpo

    try:  # TRL's experimental async GRPO imports the fused head too
        import trl.experimental.async_grpo.async_grpo_trainer as async_grpo
    except ImportError:
        async_grpo = None
    original = grpo.add_fused_lm_head
    undo = pk_trl.patch_trl()
    try:
        assert grpo.add_fused_lm_head is pk_trl.add_fused_lm_head
        if async_grpo is not None:
            assert async_grpo.add_fused_lm_head is pk_trl.add_fused_lm_head
    finally:
        undo()
    assert grpo.add_fused_lm_head is original
    with pytest.raises(RuntimeError, match="supports trl"):
        pk_trl.check_trl_version("1.9.0")


def test_bf16_autocast_is_closer_to_float64_than_trls():
    """Under bf16 autocast TRL's kernel rounds each logit tile to bf16 before the softmax;
    prefkern keeps fp32 logits (its numerics contract). Same bf16 hidden states and head for
    both, logits of std ~6 (bf16 spacing there: 2^-5)."""
    from trl.kernels import ChunkedLogProbFunction

    import prefkern

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=gen).bfloat16()
    weight = (torch.randn(V, 32, generator=gen) * 6 / 32**0.5).bfloat16()
    targets = torch.randint(0, V, (64,), generator=gen)
    want = (hidden.double() @ weight.double().T).log_softmax(-1)
    want = want.gather(-1, targets[:, None])[:, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prefkern.linear_logprobs(hidden, weight, targets, backend="torch")
        theirs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None,
                                              1.0, ("log_probs",))[0]
    err_ours = (ours.double() - want).abs().max().item()
    err_theirs = (theirs.double() - want).abs().max().item()
    assert err_ours < 1e-5 < err_theirs, (err_ours, err_theirs)


def test_generation_keeps_the_models_signature():
    """generate() validates its kwargs against the forward's signature: TRL's patch keeps it
    (functools.wraps), so must prefkern's."""
    ids, _, _ = _batch()
    model = _tiny("qwen2")
    pk_trl.add_fused_lm_head(model)
    out = model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, logits_to_keep=1)
    assert out.shape == (3, 6)
