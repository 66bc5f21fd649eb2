"""TRL trainers end to end with prefkern's fused head (trl 1.16.0, transformers 5.23.0): a
GRPO loss and every parameter's gradient on a fixed generated batch, with and without
patch_trainer (tiny Gemma-2 with softcap, built from a config and saved locally: no
downloads)."""

from __future__ import annotations

import pytest
import torch
from test_transformers_integration import V, _tiny

trl = pytest.importorskip("trl")

from prefkern.integrations import trl as pk_trl  # noqa: E402


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V - 2)}
    vocab.update({"<pad>": V - 2, "<unk>": V - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<pad>")


def _step(trainer, batch):
    """One loss and its gradients on a fixed batch: (loss, {parameter: gradient})."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                           if p.grad is not None}


def _assert_same_step(got, want):
    """fp32 on both sides: the loss and every parameter gradient equal to rounding."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    assert set(grads) == set(want_grads) and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4,
                                   atol=1e-5 * want_grads[name].abs().max().item())


def _online_rl_step(trainer_cls, config_cls, kind, tmp_path, fused_loss=None,
                    accumulation=None, off_policy=False, **config):
    """GRPO / RLOO: generate and score one fixed batch (non-zero advantages, KL to the
    reference), then the loss and every gradient with and without prefkern's head.
    ``fused_loss`` (True: must take prefkern's fused loss, False: must fall back to TRL's):
    patch_trainer(fused_loss=True), and TRL's logged metrics must match too."""
    from datasets import Dataset

    model = _tiny(kind)
    model.config.pad_token_id = V - 2
    model.save_pretrained(tmp_path / "model")
    args = config_cls(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=6, report_to="none",
                      use_cpu=True, bf16=False, temperature=0.9, beta=0.05, **config)
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"]})
    trainer = trainer_cls(model=str(tmp_path / "model"), reward_funcs=_reward, args=args,
                          train_dataset=data, processing_class=_tokenizer())
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([data[0], data[0], data[1], data[1]])
    assert inputs["advantages"].abs().sum() > 0
    if off_policy:  # old log-probs off the current ones (num_iterations > 1), a moved reference
        _move_off_policy(trainer, inputs)
    if accumulation is not None:  # inside training: the normalizers count accumulation steps
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = accumulation
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    logged.clear()
    want = _step(trainer, inputs)
    want_metrics = {k: v[-1] for k, v in logged.items()}
    logged.clear()
    if fused_loss is None:
        pk_trl.patch_trainer(trainer, backend="torch")
        _assert_same_step(_step(trainer, inputs), want)
        return
    pk_trl.patch_trainer(trainer, backend="torch", fused_loss=True)
    original, fell_back = trainer._prefkern_original_compute_loss, []
    trainer._prefkern_original_compute_loss = lambda *a: fell_back.append(1) or original(*a)
    _assert_same_step(_step(trainer, inputs), want)
    assert bool(fell_back) != fused_loss, "the fused loss path was (not) taken"
    got_metrics = {k: v[-1] for k, v in logged.items()}
    assert set(got_metrics) == set(want_metrics) and want_metrics
    for name, value in want_metrics.items():
        assert got_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), name


def _offline_step(trainer, rows: int):
    """DPO / KTO: the policy moved off its reference (non-trivial log-ratios and KL), then the
    loss and every gradient on the first ``rows`` examples with and without prefkern's head."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    want = _step(trainer, batch)
    pk_trl.patch_trainer(trainer, backend="torch")
    _assert_same_step(_step(trainer, batch), want)


def _move_off_policy(trainer, inputs):
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].size(1))
    gen = torch.Generator().manual_seed(1)
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=gen)
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + \
        0.2 * torch.randn(logp.shape, generator=gen)


def _reward(completions, **_):
    """A deterministic, non-constant rule-based reward."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_step_with_and_without_prefkern(loss_type, tmp_path):
    _online_rl_step(trl.GRPOTrainer, trl.GRPOConfig, "gemma2", tmp_path, loss_type=loss_type)


@pytest.mark.parametrize("loss_type,extra,fused", [
    ("grpo", {}, True), ("bnpo", {"epsilon_high": 0.28}, True), ("dr_grpo", {}, True),
    ("dapo", {"delta": 1.5}, True), ("dapo", {"use_bias_correction_kl": False}, True),
    ("dapo", {"top_entropy_quantile": 0.5}, False), ("cispo", {}, False)],
    ids=["grpo", "bnpo", "dr_grpo", "dapo-delta", "dapo-no-kl-correction",
         "entropy-mask-falls-back", "cispo-falls-back"])
def test_grpo_fused_loss_is_trls(loss_type, extra, fused, tmp_path):
    """patch_trainer(fused_loss=True): TRL's GRPO loss, every parameter gradient and the
    logged metrics from one gradient-in-forward pass (KL to the reference on: beta 0.05)."""
    _online_rl_step(trl.GRPOTrainer, trl.GRPOConfig, "gemma2", tmp_path, fused_loss=fused,
                    loss_type=loss_type, **extra)


@pytest.mark.parametrize("extra", [{}, {"delta": 1.1, "epsilon_high": 0.28},
                                   {"use_bias_correction_kl": False}],
                         ids=["plain", "delta-below-clip", "no-kl-correction"])
def test_grpo_fused_loss_off_policy(extra, tmp_path):
    """Ratios away from 1 and a non-zero KL: TRL's delta (which caps the unclipped term
    only, whatever epsilon_high) and the bias-corrected KL and its logged metric."""
    _online_rl_step(trl.GRPOTrainer, trl.GRPOConfig, "gemma2", tmp_path, fused_loss=True,
                    off_policy=True, loss_type="dapo", **extra)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_fused_loss_in_training_mode(loss_type, tmp_path):
    """Training mode with 2 accumulation steps: TRL's normalizers divide by them (dapo also
    rescales num_items_in_batch by steps_per_generation)."""
    _online_rl_step(trl.GRPOTrainer, trl.GRPOConfig, "qwen2", tmp_path, fused_loss=True,
                    accumulation=2, loss_type=loss_type, gradient_accumulation_steps=2)


@pytest.mark.parametrize("loss_type,extra", [(["sigmoid", "ipo"], {"use_weighting": True}),
                                             (["sft"], {})], ids=["sigmoid+ipo-wpo", "sft"])
def test_dpo_step_with_and_without_prefkern(loss_type, extra, tmp_path):
    """DPO's loss mixture with WPO weights (log sum p^2 from the fused head) and TRL's sft
    loss type. (TRL 1.16 itself fails on sft together with use_weighting: an in-place multiply
    of an expanded tensor in DPOTrainer._compute_loss.)"""
    from datasets import Dataset

    model = _tiny("cohere")
    model.config.pad_token_id = model.config.eos_token_id = V - 2
    model.save_pretrained(tmp_path / "model")
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"],
                              "chosen": [" w7 w8", " w9 w10 w11"],
                              "rejected": [" w12", " w13 w14"]})
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                         report_to="none", use_cpu=True, bf16=False, loss_type=loss_type,
                         loss_weights=[1.0, 0.5][: len(loss_type)], **extra)
    trainer = trl.DPOTrainer(model=str(tmp_path / "model"), args=args, train_dataset=data,
                             processing_class=_tokenizer())
    _offline_step(trainer, 2)


def test_kto_step_with_and_without_prefkern(tmp_path):
    """KTO (desirable/undesirable completions, the mismatched-pair KL estimate): TRL 1.16's
    KTOTrainer loss and every gradient with and without prefkern's head."""
    from datasets import Dataset

    model = _tiny("qwen2")
    model.config.pad_token_id = model.config.eos_token_id = V - 2
    model.save_pretrained(tmp_path / "model")
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6", "w7 w8"],
                              "completion": [" w7 w8", " w9 w10 w11", " w12", " w13 w14"],
                              "label": [True, False, True, False]})
    args = trl.KTOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, bf16=False)
    trainer = trl.KTOTrainer(model=str(tmp_path / "model"), args=args, train_dataset=data,
                             processing_class=_tokenizer())
    _offline_step(trainer, 4)


def test_sft_step_with_and_without_prefkern(tmp_path):
    """SFT (completion-only loss, Gemma-2 softcap): TRL 1.16's SFTTrainer loss and every
    gradient with and without prefkern's head, which the patched trainer calls."""
    from datasets import Dataset

    import prefkern.integrations.transformers as hf

    model = _tiny("gemma2")
    model.config.pad_token_id = model.config.eos_token_id = V - 2
    model.save_pretrained(tmp_path / "model")
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"],
                              "completion": [" w7 w8", " w9 w10 w11"]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                         report_to="none", use_cpu=True, bf16=False)
    trainer = trl.SFTTrainer(model=str(tmp_path / "model"), args=args, train_dataset=data,
                             processing_class=_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])

    want = _step(trainer, batch)
    pk_trl.patch_trainer(trainer, backend="torch")
    calls = []
    real = hf.linear_logprobs
    hf.linear_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = _step(trainer, batch)
    finally:
        hf.linear_logprobs = real
    assert calls, "the patched trainer must go through prefkern's head"
    _assert_same_step(got, want)


def test_rloo_step_with_and_without_prefkern(tmp_path):
    """RLOO (TRL 1.16's RLOOTrainer, leave-one-out baseline, KL to the reference): the loss
    and every gradient on a fixed generated batch with and without prefkern's head."""
    _online_rl_step(trl.RLOOTrainer, trl.RLOOConfig, "cohere", tmp_path)
