"""hf_head_config: the logit transforms of transformers models as logit_scale/softcap, checked
on stand-in configs (transformers is not a dependency) against the formulas each model's
modeling file applies (transformers 5.23.0), and refusing what it does not know."""

from __future__ import annotations

import pytest
import torch

import prefkern
from prefkern.integrations import HeadConfig, hf_head_config


class Config:
    def __init__(self, model_type, text=None, **fields):
        self.model_type = model_type
        self._text = text
        self.__dict__.update(fields)

    def get_text_config(self):
        return self._text or self


class Gemma3ForConditionalGeneration:
    def __init__(self, config):
        self.config = config


@pytest.mark.parametrize("config,expected", [
    (Config("llama", vocab_size=10, hidden_size=4), HeadConfig(None, None)),
    (Config("cohere2", logit_scale=0.0625), HeadConfig(0.0625, None)),
    (Config("granitemoehybrid", logits_scaling=8.0), HeadConfig(0.125, None)),
    (Config("hyperclovax", logits_scaling=2.0), HeadConfig(2.0, None)),
    (Config("falcon_h1", lm_head_multiplier=0.5), HeadConfig(0.5, None)),
    (Config("gemma2", final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
     HeadConfig(None, 30.0)),
    (Config("recurrent_gemma", logits_soft_cap=30.0), HeadConfig(None, 30.0)),
    (Config("muse_spark", output_multiplier=0.25, final_logit_softcapping=20.0),
     HeadConfig(0.25, 20.0)),
    (Config("minicpm3", hidden_size=2560, dim_model_base=256), HeadConfig(0.1, None)),
    (Config("inkling", logits_mup_width_multiplier=24.0), HeadConfig(1 / 24, None)),
    # composite: the text sub-config holds the fields
    (Config("gemma3n", text=Config("gemma3n_text", final_logit_softcapping=30.0)),
     HeadConfig(None, 30.0)),
    # wrappers with their own lm_head ignore the text config's scale
    (Config("aya_vision", text=Config("cohere2", logit_scale=0.0625)), HeadConfig(None, None)),
    (Config("gemma2", final_logit_softcapping=None), HeadConfig(None, None)),
])
def test_known_heads(config, expected):
    got = hf_head_config(config)
    assert got.softcap == expected.softcap
    assert (got.logit_scale is None) == (expected.logit_scale is None)
    if expected.logit_scale is not None:
        assert got.logit_scale == pytest.approx(expected.logit_scale, rel=1e-12)


def test_model_class_exceptions():
    text = Config("gemma3_text", final_logit_softcapping=30.0)
    model = Gemma3ForConditionalGeneration(Config("gemma3", text=text))
    assert hf_head_config(model) == HeadConfig(None, None)
    assert hf_head_config(model.config) == HeadConfig(None, 30.0)


@pytest.mark.parametrize("config,field", [
    (Config("phi3small", mup_width_multiplier=8.0), "mup_width_multiplier"),
    (Config("newmodel", logits_scaling=2.0), "logits_scaling"),
    (Config("newmodel", final_logits_multiplier=3.0), "final_logits_multiplier"),
    (Config("inkling", vocab_size=100, unpadded_vocab_size=90), "unpadded_vocab_size"),
    (Config("cohere", logit_scale=-1.0), "logit_scale"),
])
def test_unknown_or_invalid_transforms_are_refused(config, field):
    with pytest.raises(ValueError, match=field):
        hf_head_config(config)


def test_the_config_reproduces_the_model_head():
    """A Granite-style head (logits / 4) then a softcap, through linear_logprobs with the
    returned arguments, equals the log-softmax of the model's own logits."""
    config = Config("granite", logits_scaling=4.0, final_logit_softcapping=15.0)
    head = hf_head_config(config)
    hidden, weight = torch.randn(7, 16, dtype=torch.float64), torch.randn(50, 16,
                                                                           dtype=torch.float64)
    targets = torch.randint(0, 50, (7,))
    logits = (hidden @ weight.T) / 4.0
    logits = torch.tanh(logits / 15.0) * 15.0  # what the modeling file does
    want = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    got = prefkern.linear_logprobs(hidden, weight, targets, backend="torch", **head._asdict())
    torch.testing.assert_close(got, want)
