"""A tiny transformers causal LM and a word-level tokenizer, built from configs and saved to a
folder: what the TRL examples train (random weights, no downloads)."""

from __future__ import annotations

import tempfile

import torch

VOCAB = 256


def tiny_model_dir() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=VOCAB - 2,
                         eos_token_id=VOCAB - 2, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"<pad>": VOCAB - 2, "<unk>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        unk_token="<unk>", eos_token="<pad>")
    folder = tempfile.mkdtemp(prefix="prefkern_tiny_")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (4,), generator=gen))
            for _ in range(n)]
