"""TRL GRPO with prefkern's fused LM head: `patch_trl()` before building the trainer, nothing
else changes (trl 1.16). A tiny random Qwen2 from a config, a rule-based reward.

    pip install "trl==1.16.0"
    python examples/trl_grpo.py [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_hf import prompts, tiny_model_dir  # noqa: E402


def even_tokens(completions, **_):
    """The share of even-numbered words in each completion."""
    scores = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("w") and w[1:].isdigit()]
        scores.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from prefkern.integrations.trl import patch_trl

    folder = tiny_model_dir()
    undo = patch_trl()  # GRPO's log-probs and entropies now come from prefkern
    try:
        trainer = GRPOTrainer(
            model=folder, reward_funcs=even_tokens,
            args=GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                            num_generations=4, max_completion_length=8, max_steps=args.steps,
                            logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                            beta=0.04, learning_rate=1e-4),
            train_dataset=Dataset.from_dict({"prompt": prompts(8)}),
            processing_class=PreTrainedTokenizerFast.from_pretrained(folder))
        result = trainer.train()
        print(f"GRPO with prefkern: {args.steps} steps, training loss {result.training_loss:.4f}")
    finally:
        undo()


if __name__ == "__main__":
    main()
