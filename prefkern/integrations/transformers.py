"""transformers causal LMs without logits: per-token log-probs (and entropy) of a
``*ForCausalLM`` straight from its backbone's last hidden state and its own LM head.

What a causal LM's forward does after the backbone (transformers 5.23.0, e.g. Gemma2ForCausalLM
.forward): ``logits = lm_head(hidden)``, then the config's logit transform (scale and/or tanh
softcap, read by :func:`prefkern.integrations.hf_head_config`). Here the head runs inside the
head module's own call (its forward is swapped for the call's duration), so module hooks (FSDP2's
unshard/reshard, DeepSpeed's gather) see a normal head forward and backward. Nothing here
imports transformers: models are used through their attributes.

Label shift (as transformers' loss and TRL's ``selective_log_softmax(logits[:, :-1],
input_ids[:, 1:])``): position t of the result is ``log p(labels[:, t + 1] | tokens <= t)``.
"""

from __future__ import annotations

import functools
import types
from typing import NamedTuple

import torch
from torch import Tensor

from prefkern.integrations.hf_head import hf_head_config
from prefkern.ops.linear_logprobs import linear_logprobs
from prefkern.outputs import LogprobsEntropy


class CausalLMLogprobsOutput(NamedTuple):
    """What a model patched by :func:`apply_prefkern` returns when given labels: the mean
    negative log-likelihood over the valid shifted labels (transformers' ``loss``), per-token
    log-probs (B, T - 1) and entropy (None unless asked); ``logits`` is always None."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor | None
    logits: None = None


# ------------------------------------------------------------------------------ the head

def lm_head_of(model) -> torch.nn.Module:
    """The model's output head as a module with ``weight`` (V, H) (and maybe ``bias``): PEFT's
    modules_to_save wrapper is unwrapped to its active copy; LoRA on the head is refused."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return unwrap_head(head)


def unwrap_head(head: torch.nn.Module) -> torch.nn.Module:
    if hasattr(head, "lora_A") or hasattr(head, "lora_embedding_A"):
        raise ValueError("the LM head carries a LoRA adapter: prefkern needs the head as one "
                         "weight matrix; merge the adapter or leave lm_head out of the LoRA "
                         "target_modules (modules_to_save is supported)")
    saved = getattr(head, "modules_to_save", None)
    if saved is not None:  # peft ModulesToSaveWrapper
        active = getattr(head, "active_adapters", None) or [getattr(head, "active_adapter",
                                                                    None)]
        if getattr(head, "disable_adapters", False) or not active or active[0] not in saved:
            return unwrap_head(head.original_module)
        return unwrap_head(saved[active[0]])
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"the LM head {type(head).__name__} has no weight tensor")
    return head


def _full(t: Tensor | None) -> Tensor | None:
    """A DTensor parameter (FSDP2, tensor parallel) as the whole tensor, gathered once per call
    (the gather's backward reduce-scatters the gradient back to the shards)."""
    if t is None or not hasattr(t, "full_tensor"):
        return t
    return t.full_tensor()


def _check_not_empty(weight: Tensor) -> None:
    if weight.numel() == 0:
        hint = " (a DeepSpeed ZeRO-3 shard)" if hasattr(weight, "ds_id") else ""
        raise ValueError(f"the LM head weight is empty{hint} inside the head module's call: "
                         "no hook gathered it (a ZeRO-3 model used outside its DeepSpeed "
                         "engine, or a shard of another parallel scheme)")


def head_call(head: torch.nn.Module, fn, *tensors: Tensor, fp32: bool = False):
    """``fn(weight, bias, *tensors)`` run inside ``head(*tensors)``'s call, with the head's own
    weight and bias (a DTensor gathered once, an empty ZeRO-3 shard refused), so that the
    module's hooks see a normal forward and backward: FSDP2 unshards the weight, DeepSpeed
    ZeRO-3 gathers it for the forward and again before the backward reaches the head (its
    hooks on the outputs), which is what a gradient-in-forward loss needs to hand dW to a
    partitioned parameter. ``fn`` may return tensors or a (loss, metrics) pair. ``fp32``: the
    tensors, weight and bias are cast to fp32 first (gradients flow back through the casts).
    E.g. ``head_call(model.lm_head, lambda w, b, h: linear_policy_loss(h, w, ..., bias=b),
    hidden)``."""
    def with_weights(*args):
        if any(hasattr(a, "to_local") for a in args):
            raise ValueError(
                "the head's inputs arrive as DTensors: it is tensor parallel (e.g. "
                "ColwiseParallel), whose output hook would re-shard the per-token results; "
                "call prefkern.linear_logprobs(hidden, head.weight, targets, process_group="
                "<the tensor-parallel group>) directly (a Shard(0) weight runs vocab-parallel "
                "on its rows, no gather)")
        weight = _full(head.weight)
        _check_not_empty(weight)
        bias = _full(getattr(head, "bias", None))
        if fp32:
            args = tuple(a.float() for a in args)
            weight = weight.float()
            bias = None if bias is None else bias.float()
        return fn(weight, bias, *args)

    return inside_call(head, with_weights, *tensors)


def inside_call(module: torch.nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as ``module(*args, **kwargs)``'s forward (swapped in on the
    instance for the call's duration), so the module's hooks run around it: FSDP2's lazy init,
    unshard, and the pre-backward hooks that reduce-scatter its parameters' gradients;
    DeepSpeed ZeRO-3's gather."""
    had_own = "forward" in vars(module)
    previous = vars(module).get("forward")
    module.forward = types.MethodType(lambda self, *a, **k: fn(*a, **k), module)
    try:
        return module(*args, **kwargs)
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


def head_logprobs(head: torch.nn.Module, hidden: Tensor, targets: Tensor | None, *,
                  fp32: bool = False, **options):
    """``linear_logprobs(hidden, head.weight, targets, head.bias, **options)`` computed inside
    ``head(...)``'s call (:func:`head_call`)."""
    return head_call(head, lambda w, b, h: linear_logprobs(h, w, targets, b, **options),
                     hidden, fp32=fp32)


class PrefkernHead(torch.nn.Module):
    """``from_linear(model.lm_head)``: log-probs from hidden states through the model's own head
    module (kept as a submodule: FSDP units and hooks stay intact).
    ``forward(hidden, targets, **per_call)`` == ``linear_logprobs(hidden, head.weight, targets,
    head.bias, **options)``."""

    def __init__(self, linear: torch.nn.Module, **options):
        super().__init__()
        self.linear = unwrap_head(linear)
        self.options = options

    def forward(self, hidden: Tensor, targets: Tensor | None, **per_call):
        return head_logprobs(self.linear, hidden, targets, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def from_linear(linear: torch.nn.Module, **options) -> PrefkernHead:
    """A :class:`PrefkernHead` around ``linear`` (an ``nn.Linear``-like module, e.g.
    ``model.lm_head``); ``options`` are linear_logprobs keywords (temperature, softcap,
    logit_scale, return_entropy, mode, ...)."""
    return PrefkernHead(linear, **options)


# ------------------------------------------------------------------------- the causal LM

def backbone_of(model) -> torch.nn.Module:
    """The module whose ``last_hidden_state`` feeds the head: ``base_model`` (for a
    vision-language model the multimodal one, which consumes pixel inputs; TRL 1.16 uses it),
    else ``get_decoder()``."""
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        getter = getattr(model, "get_decoder", None)
        backbone = getter() if callable(getter) else None
    if backbone is None:
        backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if backbone is None or backbone is model:
        raise ValueError(f"cannot find the backbone of {type(model).__name__} "
                         "(get_decoder() / base_model_prefix)")
    return backbone


def shifted_targets(input_ids: Tensor, attention_mask: Tensor | None = None,
                    labels: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """(B, T - 1) next-token targets: ``labels[:, 1:]`` if given, else ``input_ids[:, 1:]``
    with ``ignore_index`` where the attention mask is 0."""
    if labels is not None:
        return labels[:, 1:]
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = torch.where(attention_mask[:, 1:].bool(), targets, ignore_index)
    return targets


def causal_lm_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                       labels: Tensor | None = None, *, temperature: float | Tensor = 1.0,
                       return_entropy: bool = False, logits_to_keep: int | None = None,
                       ignore_index: int = -100, shift_labels: Tensor | None = None,
                       mode: str = "auto", backend: str | None = None, **model_kwargs):
    """Per-token log-probs of a transformers causal LM without its logits:
    ``(model(input_ids, ...).logits[:, :-1].float() / T).log_softmax(-1).gather(-1,
    targets[..., None])[..., 0]`` with targets from :func:`shifted_targets` -> (B, T - 1) fp32
    (ignored positions 0); with ``logits_to_keep=k``, the log-probs of the last k tokens only
    (B, k), as TRL's ``logits_to_keep`` (the backbone still runs on every token).
    ``shift_labels`` (B, T): targets already aligned with the positions (what transformers'
    loss takes instead of labels, e.g. from HF Trainer under context parallelism): every
    position is scored, no shift -> (B, T). The config's logit scale and softcap are applied
    (:func:`hf_head_config`). ``model_kwargs`` go to the backbone (position_ids, ...;
    ``use_cache`` defaults to False). Returns the log-probs, or ``LogprobsEntropy(logprobs,
    entropy)`` with ``return_entropy``; gradients flow to the backbone and the head."""
    def body(ids):
        return _causal_lm_logprobs(model, ids, attention_mask, labels, temperature,
                                   return_entropy, logits_to_keep, ignore_index, shift_labels,
                                   mode, backend, model_kwargs)[0]

    # Inside the model's own call: a root FSDP2 module (whose shards hold the embeddings, norm
    # and head) unshards them and reduce-scatters their gradients only around its forward.
    return inside_call(model, body, input_ids)


def _causal_lm_logprobs(model, input_ids, attention_mask, labels, temperature, return_entropy,
                        logits_to_keep, ignore_index, shift_labels, mode, backend,
                        model_kwargs):
    """:func:`causal_lm_logprobs` -> (its result, the backbone's outputs)."""
    head = lm_head_of(model)
    scale, softcap = hf_head_config(model)
    model_kwargs.setdefault("use_cache", False)
    outputs = backbone_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                               **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if shift_labels is None:
        targets = shifted_targets(input_ids, attention_mask, labels, ignore_index)
        hidden = hidden[:, :-1]
    else:
        targets = shift_labels
    if logits_to_keep is not None:
        if not 0 < logits_to_keep < input_ids.shape[1]:
            raise ValueError(f"logits_to_keep must be in [1, T - 1], got {logits_to_keep}")
        hidden, targets = hidden[:, -logits_to_keep:], targets[:, -logits_to_keep:]
        if isinstance(temperature, Tensor) and temperature.dim() == 2:
            temperature = temperature[:, -logits_to_keep:]
    out = head_logprobs(head, hidden, targets, temperature=temperature, logit_scale=scale,
                        softcap=softcap, ignore_index=ignore_index,
                        return_entropy=return_entropy, mode=mode, backend=backend)
    if return_entropy:
        out = LogprobsEntropy(out.logprobs, out.entropy)
    return out, outputs


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _router_aux_loss(model, outputs, attention_mask) -> Tensor | None:
    """The MoE load-balancing loss transformers' MoE causal LMs add to the loss (times
    router_aux_loss_coef) when router logits are output, or None."""
    router_logits = getattr(outputs, "router_logits", None)
    config = _text_config(model)
    if router_logits is None or not hasattr(config, "num_experts_per_tok"):
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = getattr(config, "num_local_experts", None) or config.num_experts
    return load_balancing_loss_func(router_logits, experts, config.num_experts_per_tok,
                                    attention_mask)


# ------------------------------------------------------------------------ forward patch

def apply_prefkern(model, *, temperature: float = 1.0, return_entropy: bool = False,
                   mode: str = "auto", backend: str | None = None):
    """Patch ``model`` so that ``model(input_ids, labels=labels, ...)`` returns a
    :class:`CausalLMLogprobsOutput` (loss = mean NLL over the valid shifted labels, as
    transformers computes it, and per-token log-probs/entropy) without building logits. Calls
    without labels (generation) run the original forward. Undo with :func:`remove_prefkern`.
    Returns the model."""
    if getattr(model, "_prefkern_forward", None) is not None:
        return model
    original = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        out, outputs = _causal_lm_logprobs(self, input_ids, attention_mask, labels,
                                           temperature, return_entropy, None, -100,
                                           shift_labels, mode, backend, kwargs)
        logprobs, entropy = (out.logprobs, out.entropy) if return_entropy else (out, None)
        valid = (labels[:, 1:] if shift_labels is None else shift_labels) != -100
        count = valid.sum().clamp(min=1) if num_items is None else num_items
        loss = -torch.where(valid, logprobs, 0).sum() / count
        aux = _router_aux_loss(self, outputs, attention_mask)
        if aux is not None:  # as the MoE models' own forward adds it
            loss = loss + _text_config(self).router_aux_loss_coef * aux.to(loss.device)
        return CausalLMLogprobsOutput(loss, logprobs, entropy)

    model._prefkern_forward = (original, "forward" in vars(model))
    model.forward = types.MethodType(forward, model)
    return model


def remove_prefkern(model):
    """Undo :func:`apply_prefkern`. Returns the model."""
    saved = getattr(model, "_prefkern_forward", None)
    if saved is not None:
        original, had_own = saved
        if had_own:  # e.g. a wrapper another library installed on the instance
            model.forward = original
        else:
            del model.forward
        del model._prefkern_forward
    return model
