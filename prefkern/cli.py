"""Command line: ``python -m prefkern bench`` (the main job) and ``python -m prefkern info``."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench(args) -> int:
    from prefkern.bench import results
    from prefkern.bench.core import run_suites
    from prefkern.bench.suites import all_suites

    device = _device(args.device)
    suites = all_suites()
    names = args.suite or list(suites)
    unknown = [n for n in names if n not in suites]
    if unknown:
        print(f"unknown suite(s) {unknown}; known: {sorted(suites)}", file=sys.stderr)
        return 2
    meta = results.metadata(device)
    print(f"prefkern bench on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})")
    if device.type != "cuda" and args.shapes == "default":
        print("no GPU: small shapes, torch backend and eager peers only (GPU peers skipped)")
    start = time.perf_counter()
    rows, infos = run_suites([suites[n] for n in names], device, args.shapes, args.quick)
    print()
    print(results.table(rows))
    for info in infos:
        print("inputs:", info)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = f"bench_{'_'.join(names) if args.suite else 'all'}_{args.shapes}_{stamp}"
    out_dir = Path(args.out) if args.out else results.default_out_dir(device)
    paths = results.write(rows, infos, meta, out_dir, stem)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.0f} s")
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
    p_bench.add_argument("--suite", action="append",
                         help="suite to run (repeatable; default: all)")
    p_bench.add_argument("--shapes", default="default", choices=["default", "small", "tiny"],
                         help="shape preset (default: real shapes on a GPU, small on CPU)")
    p_bench.add_argument("--out", help="results folder (default: benchmarks/results/<gpu>/ in "
                         "a checkout on a GPU, else ./prefkern_bench_results/<device>/)")
    p_bench.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p_bench.add_argument("--quick", action="store_true", help="fewer repetitions")
    p_bench.set_defaults(func=bench)
    p_info = sub.add_parser("info", help="versions, device and available backends")
    p_info.add_argument("--device")
    p_info.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)
