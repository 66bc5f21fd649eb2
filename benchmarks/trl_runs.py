"""Short TRL training runs with and without prefkern: GRPO and DPO on a random model built from
a config (no downloads), the same seed, data and settings on both sides; per step: wall time,
the training loss, and on a GPU the peak allocated memory of the run. JSON to --out.

    python benchmarks/trl_runs.py --preset llama-1b --steps 6      # on a GPU (bf16)
    python benchmarks/trl_runs.py --preset tiny --steps 2          # CPU smoke run

"with prefkern": patch_trainer(trainer, fused_loss=True) (GRPO: the loss in one
gradient-in-forward pass; DPO: TRL's loss on prefkern's log-probs), never any logits. Needs
trl 1.16 and transformers (the test extra's pins); on the GPU machine carry their wheels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _tiny_hf import prompts, tiny_model_dir, vocab_of  # noqa: E402
from trl_grpo import even_tokens  # noqa: E402  (the example's rule-based reward)

SETTINGS = {  # per preset: batch, completion length, DPO sequence words
    "tiny": dict(batch=4, generations=2, completion=8, words=6),
    "llama-1b": dict(batch=8, generations=4, completion=256, words=512),
}


class _StepClock:
    """A TrainerCallback recording each optimizer step's wall time (device-synchronized)."""

    def __init__(self):
        self.times, self._start = [], None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, *args, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self._sync()
        self.times.append(1e3 * (time.perf_counter() - self._start))


def _trainer(kind: str, folder: str, preset: str, steps: int, out_dir: str):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    s, vocab = SETTINGS[preset], vocab_of(preset)
    gpu = torch.cuda.is_available()
    common = dict(output_dir=out_dir, per_device_train_batch_size=s["batch"], max_steps=steps,
                  logging_steps=1, report_to="none", use_cpu=not gpu, bf16=gpu,
                  learning_rate=1e-5, save_strategy="no", seed=0, gradient_checkpointing=gpu)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if kind == "grpo":
        data = Dataset.from_dict({"prompt": prompts(64, 16, vocab)})
        args = GRPOConfig(num_generations=s["generations"],
                          max_completion_length=s["completion"], beta=0.04, **common)
        trainer = GRPOTrainer(model=folder, reward_funcs=even_tokens, args=args,
                              train_dataset=data, processing_class=tokenizer)
    else:
        texts = prompts(96, s["words"], vocab)
        data = Dataset.from_dict({"prompt": texts[:32], "chosen": [" " + t for t in texts[32:64]],
                                  "rejected": [" " + t for t in texts[64:]]})
        trainer = DPOTrainer(model=folder, args=DPOConfig(**common), train_dataset=data,
                             processing_class=tokenizer)
    clock = _StepClock()
    trainer.add_callback(type("Clock", (TrainerCallback,), {
        "on_step_begin": lambda self, *a, **k: clock.on_step_begin(),
        "on_step_end": lambda self, *a, **k: clock.on_step_end()})())
    return trainer, clock


def run(kind: str, folder: str, preset: str, steps: int, with_prefkern: bool) -> dict:
    from transformers import set_seed

    from prefkern.integrations.trl import patch_trainer

    set_seed(0)
    trainer, clock = _trainer(kind, folder, preset, steps, tempfile.mkdtemp())
    if with_prefkern:
        patch_trainer(trainer, fused_loss=kind == "grpo")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    steps_logged = [h for h in trainer.state.log_history if "loss" in h]
    # every numeric per-step metric the trainer logs (grad_norm, log-probs, rewards, KL...)
    # except timings: the same with and without prefkern when the gradients are
    metrics = [{k: v for k, v in h.items() if isinstance(v, (int, float)) and not any(
        word in k for word in ("time", "runtime", "per_second"))} for h in steps_logged]
    return dict(trainer=kind, prefkern=with_prefkern, steps=steps, step_ms=clock.times,
                losses=[h["loss"] for h in steps_logged], metrics=metrics, peak_GiB=peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trainer", action="append", choices=["grpo", "dpo"])
    parser.add_argument("--out", default="prefkern_trl_runs")
    args = parser.parse_args(argv)
    import transformers
    import trl

    from prefkern.bench.results import metadata

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = tiny_model_dir(args.preset)
    rows = [run(kind, folder, args.preset, args.steps, pk)
            for kind in (args.trainer or ["grpo", "dpo"]) for pk in (False, True)]
    meta = dict(metadata(device), trl=trl.__version__, transformers=transformers.__version__,
                preset=args.preset, settings=SETTINGS[args.preset])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trl_runs_{args.preset}.json"
    path.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    for r in rows:
        median = sorted(r["step_ms"])[len(r["step_ms"]) // 2] if r["step_ms"] else float("nan")
        peak = "n/a (CPU)" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f} GiB"
        print(f"{r['trainer']:5} {'prefkern' if r['prefkern'] else 'eager':9} median step "
              f"{median:8.1f} ms  peak {peak}  losses {[round(x, 4) for x in r['losses']]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
