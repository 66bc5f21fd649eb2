"""A tiny transformers causal LM and a word-level tokenizer, built from configs and saved to a
folder: what the TRL examples train (random weights, no downloads)."""

from __future__ import annotations

import tempfile

import torch

VOCAB = 256


def tiny_model_dir(preset: str = "tiny") -> str:
    """Save a random causal LM and its word-level tokenizer to a new folder -> the folder.
    ``preset``: "tiny" (Qwen2, V=256, 2 layers of width 64) or "llama-1b" (Llama-3.2-1B's
    shape: 16 layers of width 2048, V=128256, tied embeddings; bf16 weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    vocab_size = vocab_of(preset)
    special = dict(pad_token_id=vocab_size - 2, eos_token_id=vocab_size - 2, bos_token_id=None)
    if preset == "tiny":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            **special))
    elif preset == "llama-1b":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=2048, intermediate_size=8192,
            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
            **special)).to(torch.bfloat16)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<pad>": vocab_size - 2, "<unk>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        unk_token="<unk>", eos_token="<pad>")
    folder = tempfile.mkdtemp(prefix=f"prefkern_{preset}_")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vocab_of(preset: str) -> int:
    return {"tiny": VOCAB, "llama-1b": 128256}[preset]


def prompts(n: int, words: int = 4, vocab: int = VOCAB) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 2, (words,), generator=gen))
            for _ in range(n)]
