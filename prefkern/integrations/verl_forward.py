"""A forward backend for verl's actor: the causal LM's ``forward`` returning per-token
``log_probs`` and ``entropy`` (verl's ``CausalLMOutputForPPO`` contract) from the backbone's
hidden states and the model's own LM head, without logits.

verl (verl-project/verl 1dda039, verl/models/transformers/dense_common.py) swaps
``model.__class__.forward`` for ``forward_with_triton_backend`` / ``forward_with_torch_backend``
when ``use_fused_kernels`` is on (``patch_forward_with_backends``); its actor then calls
``model(input_ids=..., position_ids=..., temperature=T, return_dict=True, use_cache=False)`` and
reads ``output.log_probs`` / ``output.entropy``. :func:`patch_forward` installs
:func:`forward_with_prefkern` the same way. Same labels as verl: ``shift_labels`` when given
(verl's engine rolls them globally under sequence parallelism), else ``torch.roll(labels or
input_ids, -1, -1)`` (the last position wraps around; verl masks it with the response mask).
Differences, both on purpose: the config's logit scale and final-logit softcap are applied
(verl's two kernels skip them: Gemma 2/3 and Cohere get wrong log-probs there), and the head
runs inside the LM head module's call (FSDP / DeepSpeed hooks see a normal forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from prefkern.integrations.hf_head import hf_head_config
from prefkern.integrations.transformers import backbone_of, head_logprobs, lm_head_of

# verl has no ignore index: every rolled label is a token id
_NO_IGNORE = -(2**62)


@dataclass
class CausalLMOutputForPPO(CausalLMOutputWithPast):
    """verl's output of the fused forward: (B, T) fp32 ``log_probs`` and ``entropy``."""

    log_probs: Tensor | None = None
    entropy: Tensor | None = None


def rolled_labels(input_ids: Tensor | None, labels: Tensor | None,
                  shift_labels: Tensor | None) -> Tensor:
    """verl's next-token targets: shift_labels, else labels or input_ids rolled left by one."""
    if shift_labels is not None:
        return shift_labels
    source = labels if labels is not None else input_ids
    if source is None:
        raise RuntimeError("the prefkern forward needs labels, shift_labels or input_ids")
    return torch.roll(source, shifts=-1, dims=-1)


def forward_with_prefkern(self, input_ids: Tensor | None = None,
                          attention_mask: Tensor | None = None,
                          position_ids: Tensor | None = None, past_key_values=None,
                          inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                          use_cache: bool | None = None, output_attentions: bool | None = None,
                          output_hidden_states: bool | None = None,
                          return_dict: bool | None = None, cache_position: Tensor | None = None,
                          logits_to_keep: int | Tensor = 0, temperature: float | Tensor = 1.0,
                          shift_labels: Tensor | None = None,
                          **kwargs) -> CausalLMOutputForPPO:
    """verl's fused-kernel forward signature -> CausalLMOutputForPPO(log_probs, entropy, ...),
    log-probs and entropy shaped like the labels, from prefkern.linear_logprobs. ``kwargs``
    (e.g. multimodal inputs) go to the backbone."""
    if not return_dict:
        raise NotImplementedError("the prefkern forward returns a dict (verl passes "
                                  "return_dict=True with fused kernels)")
    outputs = backbone_of(self)(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, past_key_values=past_key_values,
                              inputs_embeds=inputs_embeds, use_cache=use_cache,
                              output_attentions=output_attentions,
                              output_hidden_states=output_hidden_states,
                              cache_position=cache_position, **kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    targets = rolled_labels(input_ids, labels, shift_labels)
    scale, softcap = hf_head_config(self)
    out = head_logprobs(lm_head_of(self), hidden, targets, temperature=temperature,
                        logit_scale=scale, softcap=softcap, ignore_index=_NO_IGNORE,
                        return_entropy=True)
    return CausalLMOutputForPPO(log_probs=out.logprobs, entropy=out.entropy,
                                past_key_values=getattr(outputs, "past_key_values", None),
                                hidden_states=getattr(outputs, "hidden_states", None),
                                attentions=getattr(outputs, "attentions", None))


def patch_forward(model) -> object:
    """``model.__class__.forward = forward_with_prefkern``, as verl's
    patch_forward_with_backends does with its own backends (every instance of the class is
    affected). Returns the previous forward, to restore with
    ``type(model).forward = previous``."""
    previous = type(model).forward
    type(model).forward = forward_with_prefkern
    return previous
