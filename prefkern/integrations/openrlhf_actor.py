"""OpenRLHF's ``Actor.forward`` without logits (OpenRLHF/OpenRLHF 3c3be62,
openrlhf/models/actor.py).

There, the actor runs the causal LM, upcasts the whole (B, S, V) logits to fp32
(``output["logits"].to(torch.float32)``), takes the entropy at temperature 1
(``compute_entropy``) and the log-probs of the sequence rolled left by one at the actor's
temperature (``log_probs_from_logits``, which divides the logits in place), then keeps
``log_probs[:, :-1]`` and the last ``action_mask.shape[1]`` columns times the mask.
:func:`patch_actor` replaces ``actor.forward`` with the same computation from the backbone's
hidden states and the model's own head (prefkern.linear_logprobs inside the head module's
call): the same values and gradients, no logits, and the config's logit scale and softcap as
the model's own logits have them. Packed samples use OpenRLHF's own
``unpad_and_slice_tensor`` / ``gather_and_pad_tensor`` (looked up in the actor's module, as its
forward does), so ring attention groups work unchanged.

Calls that need the logits (neither ``action_mask`` nor ``return_logprobs``), vision-language
actors, and MoE models that return a router aux loss keep the original forward.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import Tensor

from prefkern.integrations.hf_head import hf_head_config
from prefkern.integrations.transformers import backbone_of, head_logprobs, lm_head_of

# OpenRLHF scores every rolled token (the last column is dropped after)
_NO_IGNORE = -(2**62)


def _causal_lm(actor):
    """The transformers model under the actor (PEFT's wrapper unwrapped: LoRA layers stay in
    place inside it)."""
    model = actor.model
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def _keeps_original(actor, action_mask, return_logprobs) -> bool:
    lm = _causal_lm(actor)
    return (action_mask is None and not return_logprobs) or getattr(actor, "is_vlm", False) \
        or getattr(lm.config, "output_router_logits", False)


def _per_token(actor, sequences, attention_mask, ring_attn_group, return_entropy, mm_inputs):
    """-> (log-probs (B, S) at the actor's temperature, entropy (B, S) at T = 1 or None, the
    backbone's output), in OpenRLHF's (B, S) layout before the last column is dropped."""
    batch, seqlen = sequences.size()
    lm = _causal_lm(actor)
    if actor.packing_samples:
        helpers = sys.modules[type(actor).__module__]
        sequences, position_ids, rolled, pad_len, indices = helpers.unpad_and_slice_tensor(
            sequences, attention_mask, ring_attn_group)
        forward_mask = None
    else:
        rolled = torch.roll(sequences, shifts=-1, dims=1)
        forward_mask = attention_mask
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
    output = backbone_of(lm)(sequences, attention_mask=forward_mask, position_ids=position_ids,
                             **mm_inputs)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    scale, softcap = hf_head_config(lm)
    head = lm_head_of(lm)
    temperature = actor.temperature
    same_t = temperature == 1.0
    out = head_logprobs(head, hidden, rolled, temperature=temperature, logit_scale=scale,
                        softcap=softcap, ignore_index=_NO_IGNORE,
                        return_entropy=return_entropy and same_t)
    log_probs = out.logprobs if return_entropy and same_t else out
    entropy = None
    if return_entropy:  # OpenRLHF's entropy is at temperature 1 whatever the actor's
        entropy = out.entropy if same_t else head_logprobs(
            head, hidden, None, logit_scale=scale, softcap=softcap, return_entropy=True).entropy
    if actor.packing_samples:
        log_probs, entropy = (None if t is None else helpers.gather_and_pad_tensor(
            t, ring_attn_group, pad_len, indices, batch, seqlen) for t in (log_probs, entropy))
    return log_probs, entropy, output


def actor_forward(self, sequences: Tensor, action_mask: Tensor | None = None,
                  attention_mask: Tensor | None = None, return_output=False,
                  allgather_logits=False, return_logprobs=False, ring_attn_group=None,
                  packed_seq_lens=None, return_entropy=False, **mm_inputs):
    """OpenRLHF's ``Actor.forward`` signature and returns: action log-probs (B, A) times the
    mask, or the (B, S - 1) log-probs with ``return_logprobs``; with ``return_output`` also an
    output whose ``entropy`` is (B, S - 1) when ``return_entropy`` and whose ``logits`` is
    None (the point of the patch)."""
    if _keeps_original(self, action_mask, return_logprobs):
        return self._prefkern_original_forward(
            sequences, action_mask, attention_mask, return_output=return_output,
            allgather_logits=allgather_logits, return_logprobs=return_logprobs,
            ring_attn_group=ring_attn_group, packed_seq_lens=packed_seq_lens,
            return_entropy=return_entropy, **mm_inputs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if return_entropy:
        assert return_output  # as OpenRLHF's forward asserts
    log_probs, entropy, backbone_output = _per_token(self, sequences, attention_mask,
                                                     ring_attn_group, return_entropy, mm_inputs)
    output = CausalLMOutputWithPast(logits=None,
                                    past_key_values=getattr(backbone_output, "past_key_values",
                                                            None))
    if entropy is not None:
        output.entropy = entropy[:, :-1]
    log_probs = log_probs[:, :-1]
    if action_mask is None:
        return (log_probs, output) if return_output else log_probs
    action_log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    return (action_log_probs, output) if return_output else action_log_probs


def patch_actor(actor):
    """Replace ``actor.forward`` (this instance) by :func:`actor_forward`; the original stays
    reachable for the calls that need logits. Returns the actor."""
    if not hasattr(actor, "_prefkern_original_forward"):
        actor._prefkern_original_forward = actor.forward
    actor.forward = types.MethodType(actor_forward, actor)
    return actor


def unpatch_actor(actor):
    """Undo :func:`patch_actor`."""
    original = vars(actor).pop("_prefkern_original_forward", None)
    if original is not None:
        vars(actor).pop("forward", None)
    return actor
