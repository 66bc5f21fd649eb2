"""TRL's GRPO loss computed in one fused pass from the hidden states (opt-in:
``patch_trainer(trainer, fused_loss=True)``).

TRL 1.16 (huggingface/trl v1.16.0, ``GRPOTrainer._compute_loss``) takes the per-token log-probs
and entropies from the model, then forms the clipped surrogate, the KL to the reference, the
loss type's normalizer and its metrics. Here the same loss is
``prefkern.losses.linear_policy_loss`` (the gradient formed in the forward pass: 3 GEMMs of the
LM head instead of 4, no logits) run inside the model's forward (``prefkern_loss`` of the fused
head, so DDP / FSDP / DeepSpeed see a normal forward), with TRL's semantics:

  surrogate    -min(r A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) A), r = exp(logp - old)
               (no log-ratio clamp), r capped at ``delta`` first when set; old = the detached
               log-probs of this pass when the batch has none (TRL's on-policy shortcut)
  KL           beta * (exp(ref - logp) - (ref - logp) - 1), no clamps, added per token, times
               r with ``use_bias_correction_kl`` (off by default in TRL)
  grpo         per-sequence token mean, mean over the B sequences, / gradient accumulation
  bnpo         token sum / token count, / gradient accumulation
  dr_grpo      token sum / (B * max_completion_length), / gradient accumulation
  dapo         token sum / (num_items_in_batch / processes), times gradient accumulation /
               steps_per_generation in training

and TRL's metrics (entropy, kl, clip_ratio/low_mean, high_mean, region_mean, low_min,
high_max) from the same per-token values. Anything else TRL's loss can do (other loss types,
sequence-level importance sampling, entropy masks and bonuses, off-policy masks, vLLM
importance sampling, MoE aux losses, multimodal inputs) runs TRL's own
``_compute_loss``, on prefkern's fused head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern.losses.policy import linear_policy_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids", "spatial_shapes",
               "num_tiles")


def supported(trainer, inputs) -> bool:
    """Whether TRL's loss for this trainer configuration and batch is the one computed here."""
    return (trainer.loss_type in LOSS_TYPES
            and trainer.importance_sampling_level == "token"
            and trainer.top_entropy_quantile >= 1.0
            and getattr(trainer, "off_policy_mask_threshold", None) is None
            and not getattr(trainer, "_entropy_bonus_enabled", False)
            and not trainer.aux_loss_enabled
            and not (trainer.use_vllm and trainer.vllm_importance_sampling_correction)
            and all(inputs.get(k) is None for k in _MULTIMODAL))


def _aggregation(trainer, inputs, mask: Tensor) -> dict:
    """The loss type's aggregation as linear_policy_loss keywords (agg, normalizer, ...)."""
    train = trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    b = mask.shape[0]
    if trainer.loss_type == "grpo":
        return dict(agg="seq-mean-token-mean", normalizer=b * accumulation)
    if trainer.loss_type == "bnpo":
        return dict(agg="token-mean", normalizer=mask.sum().clamp(min=1.0) * accumulation)
    if trainer.loss_type == "dr_grpo":
        return dict(agg="seq-mean-token-sum-norm", normalizer=b * accumulation,
                    loss_scale_factor=float(trainer.max_completion_length))
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if train:
        normalizer = normalizer * trainer.current_gradient_accumulation_steps \
            / trainer.args.steps_per_generation
    return dict(agg="token-mean", normalizer=normalizer)  # a tensor: no host read


def fused_grpo_loss(trainer, model, inputs) -> Tensor:
    """``GRPOTrainer._compute_loss(model, inputs)`` in one fused pass (see the module doc);
    falls back to TRL's own where :func:`supported` says no."""
    if not supported(trainer, inputs):
        return trainer._prefkern_original_compute_loss(model, inputs)
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mask = mask.bool()
    advantages = inputs["advantages"]
    advantages = advantages[:, None].expand(mask.shape) if advantages.dim() == 1 else advantages
    old = inputs.get("old_per_token_logps")
    ref = inputs["ref_per_token_logps"] if trainer.beta != 0.0 else None
    options = dict(loss_type="ppo", eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high,
                   delta=trainer.args.delta, ratio_log_clamp=None, dual_clip=None,
                   kl_coef=trainer.beta, ref_logprobs=ref, kl_kind="k3", kl_input_clamp=None,
                   kl_output_clamp=None, seq_count="all",
                   kl_ratio_weighted=bool(getattr(trainer.args, "use_bias_correction_kl",
                                                  False)),
                   **_aggregation(trainer, inputs, mask))

    def loss_fn(hidden, weight, bias, targets, head_options):
        """Called by the fused head inside the model's forward (head_options: its temperature,
        logit scale and softcap)."""
        return linear_policy_loss(hidden[:, -keep:], weight, targets[:, -keep:], old,
                                  advantages, mask=mask, bias=bias, return_per_token=True,
                                  **head_options, **options)

    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-keep] = -100
    with trainer.accelerator.autocast():
        loss, metrics = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              fused_lm_head=True, prefkern_loss=loss_fn)
    _log_metrics(trainer, metrics["logprobs"], old, advantages, mask, metrics["entropy"], ref)
    return loss


def _log_metrics(trainer, logp, old, advantages, mask, entropy, ref) -> None:
    """TRL's GRPO metrics from the per-token values (detached)."""
    from trl.trainer.utils import nanmax, nanmin

    mode = "train" if trainer.model.training else "eval"
    m = mask.float()
    ratio = torch.exp(logp - (logp if old is None else old))
    if trainer.args.delta is not None:
        ratio = torch.clamp(ratio, max=trainer.args.delta)

    def global_masked_mean(x):
        totals = trainer.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]),
                                            reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def seq_mean(x):
        return (x * m).sum(-1) / m.sum(-1)

    metrics = trainer._metrics[mode]
    if ref is not None:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if getattr(trainer.args, "use_bias_correction_kl", False):  # TRL logs the weighted KL
            kl = kl * torch.exp(logp - (logp if old is None else old))
        metrics["kl"].append(global_masked_mean(kl))
    metrics["entropy"].append(global_masked_mean(entropy))
    low = ((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).float()
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(nanmin(trainer.accelerator.gather(seq_mean(low))).item())
    metrics["clip_ratio/high_max"].append(
        nanmax(trainer.accelerator.gather(seq_mean(high))).item())
