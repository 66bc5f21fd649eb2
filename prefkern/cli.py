"""Command line: ``python -m prefkern bench`` (the main job), ``python -m prefkern profile``
(training steps with and without prefkern) and ``python -m prefkern info``.

    python -m prefkern bench [--suite NAME ...] [--shapes default|small|tiny] [--out DIR]
                             [--quick] [--no-check] [--device cuda|cpu] [--threads N]
                             [--list]
    python -m prefkern profile [--preset tiny|llama3-8b-head|qwen2.5-7b-head] [--dtype fp32|bf16]
                               [--workload dpo|grpo|distill ...] [--device cuda|cpu] [--out DIR]
    python -m prefkern info [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

SHAPE_PRESETS = ("default", "small", "tiny")


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench(args) -> int:
    from prefkern.bench import results
    from prefkern.bench.core import run_suites
    from prefkern.bench.suites import all_suites
    from prefkern.bench.timing import CPU_PEAK_METHOD

    suites = all_suites()
    if args.list:
        for name, suite in suites.items():
            note = " (a sweep: only when named with --suite)" if suite.sweep else ""
            print(f"{name:<24}{suite.description}{note}")
        return 0
    names = list(dict.fromkeys(args.suite)) if args.suite else \
        [name for name, suite in suites.items() if suite.sweep is None]
    unknown = [n for n in names if n not in suites]
    if unknown:
        print(f"unknown suite(s) {unknown}; known: {list(suites)}", file=sys.stderr)
        return 2
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = results.metadata(device)
    print(f"prefkern bench on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {(meta['git_commit'] or 'unknown')[:12]})")
    if device.type != "cuda" and args.shapes == "default":
        print("no GPU: small shapes, the torch backend and CPU-capable peers only")
    if meta.get("load_avg_1m") is not None and meta["load_avg_1m"] > 0.5:
        print(f"note: load average {meta['load_avg_1m']:.1f} on {meta['cpu_threads']} threads: "
              "other processes share the CPU, times are noisy")
    start = time.perf_counter()
    rows, infos = run_suites([suites[n] for n in names], device, args.shapes, args.quick,
                             check=not args.no_check)
    elapsed = time.perf_counter() - start
    print()
    print(results.table(rows))
    print("\nms/base: median time over the baseline's (first row of each group); % copy: GB/s "
          "over a device copy of the same bytes; peak GiB: memory above the inputs (CUDA: "
          "max_memory_allocated; CPU: " + CPU_PEAK_METHOD + ")")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M")
    stem = f"{stamp}_{'+'.join(names) if args.suite else 'all'}_{args.shapes}"
    out_dir = Path(args.out) if args.out else results.default_out_dir(device)
    paths = results.write(rows, infos, meta, out_dir, stem)
    print(f"\nran in {elapsed:.1f} s; wrote:")
    for path in paths:
        print(f"  {path}")
    return 0


def profile(args) -> int:
    import json

    from prefkern.bench import profile as prof
    from prefkern.bench.results import metadata

    device = _device(args.device)
    preset = args.preset or ("llama3-8b-head" if device.type == "cuda" else "tiny")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = prof.PRESETS[preset]
    print(f"prefkern profile: {preset} (H={cfg.hidden} V={cfg.vocab} layers={cfg.layers} "
          f"batch={cfg.batch}x{cfg.seq}) {str(dtype).replace('torch.', '')} on {device}")
    rows = prof.run_profile(preset, device, dtype, args.workload)
    print()
    print(prof.table(rows))
    print(f"\nforward: the backbone (and, eager, the LM head's logits); loss: the loss (prefkern: "
          f"with its LM head); backward. Memory above the weights and inputs: "
          f"{prof.MEMORY_METHOD.get(device.type, 'n/a')}.")
    meta = metadata(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M")
    out_dir = Path(args.out) if args.out else Path("prefkern_profile_results") / device.type
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{stamp}_profile_{preset}"
    payload = dict(meta=meta, preset=preset, config=cfg.__dict__, dtype=str(dtype),
                   memory_method=prof.MEMORY_METHOD.get(device.type), rows=rows)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {stem.with_suffix('.json')}")
    if prof.plot(rows, stem.with_suffix(".png")):
        print(f"wrote {stem.with_suffix('.png')}")
    return 0


def info(args) -> int:
    import prefkern
    from prefkern.bench.results import metadata

    device = _device(args.device)
    print(f"prefkern {prefkern.__version__}")
    for key, value in metadata(device).items():
        print(f"{key}: {value}")
    for backend, why in prefkern.available_backends(device).items():
        print(f"backend {backend}: {'available' if why is None else why}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prefkern")
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="microbenchmarks + memory profile vs the peers")
    p_bench.add_argument("--suite", action="append", metavar="NAME",
                         help="suite to run (repeatable; default: all; --list shows them)")
    p_bench.add_argument("--shapes", default="default", choices=SHAPE_PRESETS,
                         help="shape preset (default: real shapes on a GPU, small ones on CPU)")
    p_bench.add_argument("--out", metavar="DIR",
                         help="results folder (default: benchmarks/results/<gpu>/ in a "
                         "checkout on a GPU, else ./prefkern_bench_results/<device>/)")
    p_bench.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p_bench.add_argument("--threads", type=int, metavar="N",
                         help="torch CPU threads (default: torch's choice; 1 is steadier on a "
                         "shared machine)")
    p_bench.add_argument("--quick", action="store_true", help="fewer repetitions")
    p_bench.add_argument("--no-check", action="store_true",
                         help="skip comparing each provider's outputs and gradients with the "
                         "baseline's before timing")
    p_bench.add_argument("--list", action="store_true", help="list the suites and exit")
    p_bench.set_defaults(func=bench)
    p_prof = sub.add_parser("profile", help="one DPO, GRPO and distillation training step, "
                            "materialized logits vs prefkern: time and memory per phase")
    p_prof.add_argument("--preset", choices=["micro", "tiny", "llama3-8b-head",
                                             "qwen2.5-7b-head"],
                        help="model (default: tiny on CPU, llama3-8b-head on a GPU)")
    p_prof.add_argument("--dtype", choices=["fp32", "bf16"],
                        help="weights and activations (default: fp32 on CPU, bf16 on a GPU)")
    p_prof.add_argument("--workload", action="append", choices=["dpo", "grpo", "distill"],
                        help="repeatable (default: all three)")
    p_prof.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p_prof.add_argument("--out", metavar="DIR", help="results folder "
                        "(default: ./prefkern_profile_results/<device>/)")
    p_prof.set_defaults(func=profile)
    p_info = sub.add_parser("info", help="versions, device and available backends")
    p_info.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p_info.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)
