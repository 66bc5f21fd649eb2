"""GAE throughput: verl's Python loop over time vs prefkern's torch / Triton / CUDA backends vs
the bandwidth floor, in one run on the same inputs.

    python benchmarks/bench_gae.py        # CUDA: B x T = 256x2048, 1024x8192, 256x32768
    python benchmarks/bench_gae.py --shapes 1024x8192 --dtype bf16 --egae

The floor is the time a device-to-device copy needs to move the bytes GAE must move: read
rewards, values, mask, write advantages and returns (fp32). Timings: triton.testing.do_bench
medians (the loop: median of a few CUDA-event-timed runs). On CPU only small shapes run, with
time.perf_counter, for the loop and the torch backend (the Triton interpreter is not timed).
Results: a table on stdout and JSON under benchmarks/results/<gpu>/gae.json.
Self-contained: prefkern/bench/ had no shared harness when this was written.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

import prefkern
from prefkern.dispatch import available_backends
from prefkern.reference.advantages import gae_loop_over_time

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(n_rows, seq_len, dtype, device, hole_frac, generator):
    """Ragged responses (lengths uniform in [T/2, T]) with tool-call holes, and the EGAE
    extras (half of the responses truncated, a critic lambda)."""
    rewards = torch.randn(n_rows, seq_len, device=device, generator=generator).to(dtype)
    values = torch.randn(n_rows, seq_len, device=device, generator=generator).to(dtype)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n_rows,), device=device,
                            generator=generator)
    mask = torch.arange(seq_len, device=device)[None] < lengths[:, None]
    mask &= torch.rand(n_rows, seq_len, device=device, generator=generator) >= hole_frac
    truncated = torch.rand(n_rows, device=device, generator=generator) < 0.5
    return rewards, values, mask, truncated


def bytes_moved(rewards, values, mask) -> int:
    return (rewards.numel() * rewards.element_size() + values.numel() * values.element_size()
            + mask.numel() * mask.element_size() + 2 * rewards.numel() * 4)


def time_cuda(fn, reps_ms: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median"))


def time_cuda_slow(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_shape(n_rows, seq_len, args, device) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    rewards, values, mask, truncated = make_inputs(n_rows, seq_len, DTYPES[args.dtype], device,
                                                   args.hole_frac, gen)
    kw = {"gamma": args.gamma, "lam": args.lam}
    if args.egae:
        kw.update(truncated=truncated, lam_critic=1.0)
    moved = bytes_moved(rewards, values, mask)
    cuda = device.type == "cuda"
    rows = []

    def record(provider, ms, check=None):
        row = {"B": n_rows, "T": seq_len, "dtype": args.dtype, "egae": args.egae,
               "provider": provider, "ms": ms, "GB/s": moved / ms / 1e6}
        if check is not None:
            row["max_abs_diff_vs_torch"] = check
        rows.append(row)

    expected = prefkern.gae(rewards, values, mask, backend="torch", **kw)
    if not args.skip_loop:
        loop = lambda: gae_loop_over_time(rewards, values, mask, **kw)  # noqa: E731
        ms = time_cuda_slow(loop, args.loop_reps) if cuda else time_cpu(loop, args.loop_reps)
        record("python loop (verl)", ms)
    backends = ["torch"]
    if cuda:
        status = available_backends(device)
        backends += [b for b in ("triton", "cuda") if status[b] is None]
    for backend in backends:
        fn = lambda b=backend: prefkern.gae(rewards, values, mask, backend=b, **kw)  # noqa: E731
        diff = max((o - e).abs().max().item() for o, e in zip(fn(), expected, strict=True))
        record(f"prefkern {backend}", time_cuda(fn) if cuda else time_cpu(fn, 5), diff)
    if cuda:
        half = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(half)
        record("copy floor", time_cuda(lambda: dst.copy_(half)))
    loop_ms = next((r["ms"] for r in rows if r["provider"].startswith("python")), None)
    floor_ms = next((r["ms"] for r in rows if r["provider"] == "copy floor"), None)
    for row in rows:
        row["speedup_vs_loop"] = loop_ms / row["ms"] if loop_ms else None
        row["fraction_of_floor"] = floor_ms / row["ms"] if floor_ms else None
    return rows


def print_table(rows) -> None:
    head = f"{'B x T':>12} {'provider':>20} {'ms':>10} {'GB/s':>8} {'x loop':>9} {'% floor':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['speedup_vs_loop']:.0f}" if r["speedup_vs_loop"] else "-"
        floor = f"{100 * r['fraction_of_floor']:.0f}" if r["fraction_of_floor"] else "-"
        print(f"{r['B']:>5}x{r['T']:<6} {r['provider']:>20} {r['ms']:>10.4f} "
              f"{r['GB/s']:>8.1f} {speed:>9} {floor:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=None,
                        help="comma-separated BxT (default: CUDA 256x2048,1024x8192,256x32768; "
                             "CPU 16x512,64x2048)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--hole-frac", type=float, default=0.05,
                        help="fraction of masked-out tokens inside responses")
    parser.add_argument("--egae", action="store_true",
                        help="half the responses truncated (EGAE) + a critic lambda")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--loop-reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "256x2048,1024x8192,256x32768" if device.type == "cuda" else "16x512,64x2048"
    shapes = [tuple(int(x) for x in shape.lower().split("x"))
              for shape in (args.shapes or default).split(",")]
    rows = []
    for n_rows, seq_len in shapes:
        rows += bench_shape(n_rows, seq_len, args, device)
    print_table(rows)

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        import triton

        triton_version = triton.__version__
    else:
        name, triton_version = f"cpu-{platform.machine()}", None
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_dir = args.out / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.dtype}" + ("_egae" if args.egae else "")
    path = out_dir / f"gae{suffix}.json"
    meta = {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(), "gamma": args.gamma, "lam": args.lam,
            "hole_frac": args.hole_frac,
            "floor": "device copy of the bytes GAE reads (r, V, mask) and writes (A, returns)"}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
