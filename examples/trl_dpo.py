"""TRL DPO with prefkern's fused LM head: `patch_trl()` before building the trainer (trl
1.16). A tiny random Qwen2 from a config, a toy preference dataset; WPO weighting on, whose
sum of p^2 also comes from prefkern's pass.

    pip install "trl==1.16.0"
    python examples/trl_dpo.py [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_hf import prompts, tiny_model_dir  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from prefkern.integrations.trl import patch_trl

    folder = tiny_model_dir()
    texts = prompts(8)
    data = Dataset.from_dict({"prompt": texts,
                              "chosen": [" w2 w4 w6" for _ in texts],
                              "rejected": [" w1 w3" for _ in texts]})
    undo = patch_trl()
    try:
        trainer = DPOTrainer(
            model=folder,
            args=DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                           max_steps=args.steps, logging_steps=1, report_to="none",
                           use_cpu=True, bf16=False, use_weighting=True, learning_rate=1e-4),
            train_dataset=data, processing_class=PreTrainedTokenizerFast.from_pretrained(folder))
        result = trainer.train()
        print(f"DPO with prefkern: {args.steps} steps, training loss {result.training_loss:.4f}")
    finally:
        undo()


if __name__ == "__main__":
    main()
