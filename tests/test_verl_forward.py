"""prefkern.integrations.verl_forward: the forward verl's actor calls with fused kernels
(``model(input_ids, position_ids, temperature=T, return_dict=True)`` -> log_probs, entropy of
the next token, labels rolled as verl rolls them), against verl's unfused path on the model's
own logits (comparison rule against the float64 model, values and every parameter's gradient),
padded and packed (rmpad) layouts, a softcapped head (Gemma-2: verl's fused kernels skip the
softcap)."""

from __future__ import annotations

import copy

import pytest
import torch
from compare import assert_rule

pytest.importorskip("transformers")

from test_transformers_integration import H, V, _batch, _run, _tiny  # noqa: E402

from prefkern.integrations import verl_forward  # noqa: E402

T = 0.7


def _inputs(layout: str):
    ids, attention, _ = _batch()
    if layout == "padded":
        return dict(input_ids=ids, attention_mask=attention, position_ids=None)
    lengths = attention.sum(-1)
    packed = ids[attention.bool()][None]  # verl's remove-padding layout: (1, total tokens)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    return dict(input_ids=packed, attention_mask=None, position_ids=positions)


def _verl_unfused(model, inputs):
    """verl's actor without fused kernels: logits / T, log_softmax, gather of the ids rolled
    left by one (verl/utils/torch_functional.py logprobs_from_logits, entropy_from_logits)."""
    logits = model(**inputs, use_cache=False).logits
    logp = (logits.float() / T).log_softmax(-1)
    rolled = torch.roll(inputs["input_ids"], shifts=-1, dims=-1)
    return logp.gather(-1, rolled[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def _patched(model, inputs):
    previous = verl_forward.patch_forward(model)
    try:
        out = model(**inputs, temperature=T, return_dict=True, use_cache=False)
    finally:
        type(model).forward = previous
    assert isinstance(out, verl_forward.CausalLMOutputForPPO)
    return out.log_probs, out.entropy


@pytest.mark.parametrize("layout", ["padded", "rmpad"])
@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_forward_backend_equals_verls_unfused_path(kind, layout):
    model = _tiny(kind)
    inputs = _inputs(layout)
    got = _run(model, lambda m: _patched(m, inputs))
    ref = _run(copy.deepcopy(model).double(), lambda m: _verl_unfused(m, inputs))
    base = _run(model, lambda m: _verl_unfused(m, inputs))
    assert got[0].shape == inputs["input_ids"].shape and got[0].dtype == torch.float32
    for name, o, r, b in (("log_probs", got[0], ref[0], base[0]),
                          ("entropy", got[1], ref[1], base[1])):
        assert_rule(o, r.float(), b, name, reduction=V * H)
    assert set(got[2]) == set(ref[2])
    for name in ref[2]:
        assert_rule(got[2][name], ref[2][name].float(), base[2][name], name, reduction=V * H)
    assert type(model).forward is not verl_forward.forward_with_prefkern  # restored


def test_shift_labels_win_and_return_dict_is_required():
    model = _tiny("qwen2")
    inputs = _inputs("padded")
    shifted = torch.randint(0, V, inputs["input_ids"].shape)
    previous = verl_forward.patch_forward(model)
    try:
        out = model(**inputs, shift_labels=shifted, return_dict=True, use_cache=False)
        with pytest.raises(NotImplementedError, match="return_dict"):
            model(**inputs, use_cache=False)
    finally:
        type(model).forward = previous
    logits = model(**inputs, use_cache=False).logits.float()
    want = logits.log_softmax(-1).gather(-1, shifted[..., None])[..., 0]
    torch.testing.assert_close(out.log_probs, want, rtol=1e-5, atol=1e-5)


def test_against_verls_own_torch_backend():
    """Where verl is importable (not in CI: verl pins transformers < 5.11), verl's own
    forward_with_torch_backend on a head without softcap gives the same values and gradients."""
    dense = pytest.importorskip("verl.models.transformers.dense_common")
    model = _tiny("qwen2")
    inputs = _inputs("rmpad")

    def run(forward):
        def fn(m):
            previous = type(m).forward
            type(m).forward = forward
            try:
                out = m(**inputs, temperature=T, return_dict=True, use_cache=False)
            finally:
                type(m).forward = previous
            return out.log_probs, out.entropy
        return _run(model, fn)

    theirs, ours = run(dense.forward_with_torch_backend), run(verl_forward.forward_with_prefkern)
    for got, want in zip(ours[:2], theirs[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, grad in theirs[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-3, atol=1e-4, msg=name)
