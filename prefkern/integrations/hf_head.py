"""What a transformers causal LM does to its logits after ``lm_head``, as prefkern arguments.

Read from the modeling files of transformers 5.23.0 (every ``self.lm_head(`` call of
``models/*/modeling_*.py``). All known transforms are a positive scalar multiply of the raw
logits (or of the hidden state before a bias-free head, the same thing) followed by an optional
tanh softcap, which is exactly ``linear_logprobs(..., logit_scale=, softcap=)``:

  field (text config)            models                                  logit_scale
  logit_scale                    cohere, cohere2, cohere2_moe, ...        x
  logits_scaling                 granite* (logits / x)                    1 / x
                                 hyperclovax* (logits * x)                x
                                 minicpm3 (hidden / x before the head)    1 / x
  lm_head_multiplier             falcon_h1                                x
  output_multiplier              muse_glimmer, muse_spark (then softcap)  x
  logits_mup_width_multiplier    inkling (hidden / x before the head)     1 / x
  final_logit_softcapping        gemma2/3/3n/4, vaultgemma, nanochat, ... softcap = x
  logits_soft_cap                recurrent_gemma                          softcap = x

Exceptions the same source shows: Gemma3ForConditionalGeneration does not softcap; the vision
or speech wrappers aya_vision, cohere2_vision, granite_speech and granite_speech_plus have their
own lm_head and ignore their text config's scale. A field that looks like a logit transform but
is not in this table raises, naming it: a silent mismatch would change every log-prob.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple


class HeadConfig(NamedTuple):
    """Keyword arguments for linear_logprobs (None: not applied), which applies them to
    ``hidden @ lm_head.weight.T``. Not for logprobs_from_logits on ``model(...).logits``: the
    model has applied them to those logits already."""

    logit_scale: float | None
    softcap: float | None


_MULTIPLY = {"logit_scale", "lm_head_multiplier", "output_multiplier"}
_DIVIDE = {"logits_mup_width_multiplier"}
_SOFTCAP = {"final_logit_softcapping", "logits_soft_cap"}
_LOGITS_SCALING = {  # model_type prefix -> how logits_scaling applies
    "granite": "divide", "minicpm3": "divide", "hyperclovax": "multiply",
}
# wrappers whose own lm_head ignores the scale of their text config
_IGNORE_TEXT_SCALE = {"aya_vision", "cohere2_vision", "granite_speech", "granite_speech_plus"}
_NO_SOFTCAP_CLASSES = {"Gemma3ForConditionalGeneration"}
# names that look like a transform of the LM-head logits; attention and router caps are not
_SUSPECT = re.compile(r"(logit|lm_head|output_mult|mup)", re.IGNORECASE)
_NOT_HEAD = re.compile(r"(attn|attention|router|init|std|range|keep)", re.IGNORECASE)
_HANDLED = _MULTIPLY | _DIVIDE | _SOFTCAP | {"logits_scaling", "dim_model_base",
                                              "unpadded_vocab_size", "tie_word_embeddings"}


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _fields(config) -> dict:
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def _positive(name: str, value, model_type: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{model_type}: config.{name} = {value} is not a positive finite "
                         "scale; prefkern's logit_scale must be > 0")
    return value


def hf_head_config(model_or_config) -> HeadConfig:
    """``HeadConfig(logit_scale, softcap)`` for a transformers model (or its config) such that
    ``linear_logprobs(hidden, model.lm_head.weight, targets, logit_scale=..., softcap=...)``
    gives the log-probs of ``model(...).logits``. Raises ValueError naming the config field of
    any logit transform it does not know."""
    config = _config_of(model_or_config)
    top_type = str(getattr(config, "model_type", ""))
    text = _text_config(config)
    model_type = str(getattr(text, "model_type", top_type))
    fields = _fields(text)
    scale = 1.0
    softcap = None
    for name, value in fields.items():
        if value is None or not _SUSPECT.search(name) or _NOT_HEAD.search(name):
            continue
        if name in _SOFTCAP:
            softcap = _positive(name, value, model_type)
        elif name in _MULTIPLY:
            scale *= _positive(name, value, model_type)
        elif name in _DIVIDE:
            scale /= _positive(name, value, model_type)
        elif name == "logits_scaling":
            how = next((h for prefix, h in _LOGITS_SCALING.items()
                        if model_type.startswith(prefix)), None)
            if how is None:
                raise ValueError(f"{model_type}: config.logits_scaling = {value}, but prefkern "
                                 "does not know whether this model multiplies or divides by it")
            factor = _positive(name, value, model_type)
            scale = scale / factor if how == "divide" else scale * factor
        elif name not in _HANDLED and not isinstance(value, bool):
            raise ValueError(f"{model_type}: config.{name} = {value!r} looks like a transform of "
                             "the LM-head logits that prefkern does not reproduce; pass "
                             "logit_scale/softcap yourself if it is one, and report it")
    if model_type.startswith("minicpm3") and "logits_scaling" not in fields:
        base = fields.get("dim_model_base")
        if base:  # the property transformers computes: hidden_size / dim_model_base
            scale *= _positive("dim_model_base", base, model_type) / float(text.hidden_size)
    unpadded = fields.get("unpadded_vocab_size")
    if unpadded is not None and unpadded != fields.get("vocab_size"):
        raise ValueError(f"{model_type}: config.unpadded_vocab_size = {unpadded} cuts the logits "
                         f"to the first {unpadded} columns: pass lm_head.weight[:{unpadded}]")
    if top_type in _IGNORE_TEXT_SCALE:
        scale = 1.0
    if type(model_or_config).__name__ in _NO_SOFTCAP_CLASSES:
        softcap = None
    return HeadConfig(None if scale == 1.0 else scale, softcap)
