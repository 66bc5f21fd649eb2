"""TRL: prefkern behind TRL's own fused-LM-head contract.

TRL 1.16 (huggingface/trl v1.16.0, trl/trainer/utils.py ``add_fused_lm_head``) computes every
per-token quantity of its GRPO, RLOO, DPO, KTO and SFT trainers through one call:
``model(..., labels=labels, fused_lm_head=True)`` returning ``FusedCausalLMOutput(loss,
log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, label_mask, aux_loss)``, the model
having been patched by ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
outputs)``. :func:`add_fused_lm_head` here has that signature and contract, computed by
prefkern (``linear_logprobs`` with ``return_entropy`` / ``return_stats``): so every TRL loss
type, normalizer and metric stays TRL's own code, fed by prefkern's numbers. One difference,
on purpose: TRL's kernel rounds each logit tile to the autocast dtype (bf16) before the
softmax; prefkern keeps the logits in fp32 (its numerics contract), so under bf16 autocast its
log-probs are the closer ones to float64.

Entry points: :func:`patch_trl` (trainers built afterwards use prefkern's head; undo with the
returned callable) and :func:`patch_trainer` (an existing trainer's model and reference model).
Nothing imports trl until one of them is called.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from prefkern.integrations.hf_head import hf_head_config
from prefkern.integrations.transformers import backbone_of, head_call, head_logprobs, lm_head_of

SUPPORTED_TRL = ((1, 16),)  # (major, minor) releases whose add_fused_lm_head contract this is
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TRAINER_MODULES = ("trl.trainer.utils", "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer",
                   "trl.trainer.dpo_trainer", "trl.trainer.kto_trainer",
                   "trl.trainer.sft_trainer")
# trainers that import add_fused_lm_head too, patched when they import (their extras may not
# be installed)
OPTIONAL_TRAINER_MODULES = ("trl.experimental.async_grpo.async_grpo_trainer",)


class FusedCausalLMOutput(NamedTuple):
    """TRL's FusedCausalLMOutput fields (per-token fields (B, T - 1), 0 where the label is
    -100; fields not requested are None)."""

    loss: Tensor
    log_probs: Tensor
    entropy: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    mean_logits: Tensor | None = None
    is_top1: Tensor | None = None
    label_mask: Tensor | None = None
    aux_loss: Tensor | None = None


def check_trl_version(version: str) -> None:
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts not in SUPPORTED_TRL:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_TRL)
        raise RuntimeError(f"prefkern's TRL integration supports trl {supported} (the "
                           f"add_fused_lm_head contract it reproduces); found trl {version}")


def _router_aux_loss(backbone_outputs, text_config, attention_mask):
    """MoE load-balancing loss as TRL adds it (transformers' Mixtral helper, imported lazily)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(backbone_outputs.router_logits, text_config.num_experts,
                                    text_config.num_experts_per_tok, attention_mask)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, backend: str | None = None,
                      mode: str = "auto", skip_ignored: bool = True) -> None:
    """TRL's ``add_fused_lm_head`` computed by prefkern: afterwards ``model(input_ids,
    attention_mask=..., labels=labels, fused_lm_head=True)`` returns a
    :class:`FusedCausalLMOutput` without building logits (``shift_labels`` for pre-shifted
    labels, ``num_items_in_batch`` for the loss normalizer); without ``fused_lm_head`` the
    previous forward runs (generation is unchanged). ``skip_ignored`` scores only positions
    with a label, as TRL's compact path does (it reads the count on the host)."""
    unknown = set(outputs) - {"log_probs", *OPTIONAL_OUTPUTS}
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; known: log_probs, "
                         f"{', '.join(OPTIONAL_OUTPUTS)}")
    previous = model.forward
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    scale, softcap = hf_head_config(model)
    want_stats = bool({"log_sum_sq_probs", "mean_logits", "is_top1"} & set(outputs))

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, prefkern_loss=None, **kwargs):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch)
            return previous(*args, **{k: v for k, v in extra.items() if v is not None},
                            **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = backbone_of(self)(*args, **kwargs)
        hidden = backbone_outputs.last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        head = lm_head_of(self)
        hidden = hidden.to(head.weight.device)
        targets = targets.to(head.weight.device)
        mask = targets != -100
        context = nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            context = torch.autocast(hidden.device.type, enabled=False)
        if prefkern_loss is not None:  # a whole loss from the hidden states (fused_grpo_loss)
            with context:
                head_options = dict(temperature=temperature, logit_scale=scale, softcap=softcap,
                                    backend=backend)
                return head_call(head, lambda w, b, h: prefkern_loss(h, w, b, targets,
                                                                     head_options),
                                 hidden, fp32=cast_lm_head_to_fp32)
        with context:
            out = head_logprobs(head, hidden, targets, temperature=temperature,
                                logit_scale=scale, softcap=softcap,
                                return_entropy="entropy" in outputs, return_stats=want_stats,
                                skip_ignored=skip_ignored, mode=mode, backend=backend,
                                fp32=cast_lm_head_to_fp32)
        if isinstance(out, Tensor):
            log_probs, entropy, stats = out, None, None
        else:
            log_probs, entropy, stats = out.logprobs, out.entropy, getattr(out, "stats", None)
        fields = {"entropy": None if entropy is None else torch.where(mask, entropy, 0)}
        if stats is not None:
            fields.update(
                log_sum_sq_probs=torch.where(mask, torch.log(stats.sum_p2), 0).detach(),
                mean_logits=torch.where(mask, stats.mean_logit, 0).detach(),
                is_top1=stats.target_is_argmax)
        fields = {k: (v if k in outputs else None) for k, v in fields.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(backbone_outputs, text_config,
                                        kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss, log_probs, label_mask=mask, aux_loss=aux_loss,
                                   **fields)

    model.forward = types.MethodType(forward, model)


def patch_trl():
    """Make TRL's trainers use prefkern's fused LM head: replaces ``add_fused_lm_head`` in
    trl's trainer modules (checks the trl version first). Returns a callable that undoes it."""
    import importlib

    import trl

    check_trl_version(trl.__version__)
    replaced = []
    for name in TRAINER_MODULES + OPTIONAL_TRAINER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            if name in TRAINER_MODULES:
                raise
            continue
        if hasattr(module, "add_fused_lm_head"):
            replaced.append((module, module.add_fused_lm_head))
            module.add_fused_lm_head = add_fused_lm_head

    def undo():
        for module, original in replaced:
            module.add_fused_lm_head = original

    return undo


def patch_trainer(trainer, *, backend: str | None = None, mode: str = "auto",
                  fused_loss: bool = False):
    """Put prefkern's fused head on an existing TRL trainer's model (its base model under
    PEFT) and reference model, with the trainer's temperature and
    ``cast_lm_head_to_fp32``; every optional output is computed. ``fused_loss`` (GRPOTrainer):
    the loss itself in one gradient-in-forward pass from the hidden states
    (prefkern.integrations.trl_grpo_loss; TRL's own loss code for the configurations it does
    not cover). Returns the trainer."""
    import trl

    check_trl_version(trl.__version__)
    if fused_loss:
        if not isinstance(trainer, trl.GRPOTrainer):
            raise ValueError("fused_loss is for GRPOTrainer")
        from prefkern.integrations.trl_grpo_loss import fused_grpo_loss

        if not hasattr(trainer, "_prefkern_original_compute_loss"):
            trainer._prefkern_original_compute_loss = trainer._compute_loss
        trainer._compute_loss = types.MethodType(fused_grpo_loss, trainer)
    args = getattr(trainer, "args", None)
    options = dict(temperature=getattr(trainer, "temperature", 1.0),
                   cast_lm_head_to_fp32=bool(getattr(args, "cast_lm_head_to_fp32", False)),
                   outputs=("log_probs", *OPTIONAL_OUTPUTS), backend=backend, mode=mode)
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    add_fused_lm_head(base, **options)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        add_fused_lm_head(ref, **options)
    return trainer
