"""Results: run metadata, where they go, JSON / CSV / PNG writers and the printed table."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

COLUMNS = ["op", "provider", "mode", "shape", "dtype", "status", "ms_p50", "ms_p20", "ms_p80",
           "peak_extra_GiB", "GBps", "TFLOPs", "baseline", "ratio_to_baseline", "pct_of_copy",
           "max_rel_err", "err_over_bound", "check", "approx"]
META_COLUMNS = ["device", "torch", "triton", "git_commit", "date"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"; other names lower-cased and dashed."""
    name = device_name(device).lower()
    for known in ("gh200", "h200", "h100", "h800", "a100", "a10g", "l40s", "l4", "b200"):
        if re.search(rf"\b{known}\b", name):
            return known
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or device.type


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=where)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def metadata(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "git_commit": _git_commit(Path(__file__).parent),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cpu":
        # CPU times depend on what else runs: record the contention next to them
        meta["cpu_threads"] = torch.get_num_threads()
        meta["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return meta


def default_out_dir(device: torch.device) -> Path:
    """benchmarks/results/<gpu>/ of the checkout this package runs from (GPU runs), else
    ./prefkern_bench_results/<device>/."""
    repo_results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if device.type == "cuda" and repo_results.is_dir():
        return repo_results / device_slug(device)
    return Path("prefkern_bench_results") / device_slug(device)


def write(rows: list[dict], infos: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    """<stem>.json ({meta, inputs, rows}), <stem>.csv (long format, metadata on every row) and
    <stem>.png (when matplotlib is installed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in r.items()} for r in rows]  # strict JSON has no inf / NaN
    json_path.write_text(json.dumps({"meta": meta, "inputs": infos, "rows": finite}, indent=1,
                                    allow_nan=False))
    csv_path = out_dir / f"{stem}.csv"
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra + META_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: meta.get(k) for k in META_COLUMNS}})
    paths = [json_path, csv_path]
    swept = [r for r in rows if r.get("sweep_axis")]
    plain = [r for r in rows if not r.get("sweep_axis")]
    for png in (_plot(plain, out_dir / f"{stem}.png", meta) if plain else None,
                sweep_plot(swept, out_dir / f"{stem}_sweep.png", meta) if swept else None):
        if png:
            paths.append(png)
    return paths


def _figure_label(meta: dict) -> str:
    """Device, versions, commit and date: every figure says where its numbers come from."""
    return (f"{meta['device']} - torch {meta['torch']}, triton {meta.get('triton')} - commit "
            f"{(meta.get('git_commit') or 'unknown')[:12]} - {meta['date'][:10]}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG plot; pip install matplotlib)")
        return None
    return plt


def sweep_plot(rows: list[dict], path: Path, meta: dict) -> Path | None:
    """Sweep rows (with ``sweep_axis``): one row of panels per (op, fixed sizes), median ms
    (p20-p80 band) and peak extra GiB against the swept size, one line per provider, log-log.
    A MISMATCH point is drawn as a red cross."""
    plt = _pyplot()
    timed = [r for r in rows if r.get("ms_p50")]
    if plt is None or not timed:
        return None
    ops = list(dict.fromkeys((r["op"], r["sweep_axis"], r["dtype"]) for r in timed))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.8 * len(ops)), squeeze=False)
    for (op, axis, dtype), (ax_ms, ax_mem) in zip(ops, axes, strict=True):
        sel = [r for r in timed if (r["op"], r["sweep_axis"], r["dtype"]) == (op, axis, dtype)]
        fixed = ", ".join(f"{k}={sel[0][k]}" for k in ("N", "H", "V") if k != axis and k in sel[0])
        for provider in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r for r in sel if r["provider"] == provider), key=lambda r: r[axis])
            xs = [r[axis] for r in pts]
            line, = ax_ms.plot(xs, [r["ms_p50"] for r in pts], marker="o", label=provider)
            ax_ms.fill_between(xs, [r["ms_p20"] for r in pts], [r["ms_p80"] for r in pts],
                               color=line.get_color(), alpha=0.15)
            mem = [(r[axis], r["peak_extra_GiB"]) for r in pts if r.get("peak_extra_GiB")]
            if mem:
                ax_mem.plot(*zip(*mem, strict=True), marker="o", color=line.get_color(),
                            label=provider)
            bad = [r for r in pts if r.get("status") == "MISMATCH"]
            if bad:
                ax_ms.plot([r[axis] for r in bad], [r["ms_p50"] for r in bad], "x",
                           color="tab:red", markersize=10)
        for ax, label in ((ax_ms, "ms (median, p20-p80)"), (ax_mem, "peak extra GiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.set_title(f"{op} {dtype} ({fixed})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_ms.legend(fontsize=7)
    fig.suptitle(_figure_label(meta), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot(rows: list[dict], path: Path, meta: dict) -> Path | None:
    """One horizontal bar chart of median ms per (op, mode, shape), p20-p80 as error bars."""
    plt = _pyplot()
    if plt is None:
        return None
    timed = [r for r in rows if r.get("ms_p50")]
    groups = list(dict.fromkeys((r["op"], r["mode"], r["shape"], r["dtype"]) for r in timed))
    if not groups:
        return None
    key = lambda r: (r["op"], r["mode"], r["shape"], r["dtype"])
    heights = [1.0 + 0.28 * sum(key(r) == g for r in timed) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, group in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in timed if key(r) == group]
        ms = [r["ms_p50"] for r in sel]
        err = [[r["ms_p50"] - r["ms_p20"] for r in sel], [r["ms_p80"] - r["ms_p50"] for r in sel]]
        colors = ["tab:red" if r["status"] == "MISMATCH" else
                  "tab:gray" if r["provider"].startswith(("copy", "floor")) else
                  "tab:green" if r["provider"].startswith("prefkern") else "tab:blue"
                  for r in sel]
        ax.barh([r["provider"] for r in sel], ms, xerr=err, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, p20-p80)")
        ax.set_title(" ".join(group), fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(_figure_label(meta), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / sum(heights)))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value, digits: int = 3) -> str:
    """3 significant digits without exponent noise: 1234 -> 1234, 0.01234 -> 0.0123."""
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if abs(value) >= 1e-4 else f"{value:.1e}"


def table(rows: list[dict]) -> str:
    """The printed table (tabulate): one line per row, numbers right-aligned."""

    header = ["op", "mode", "shape", "dtype", "provider", "ms p50", "p20-p80", "GB/s", "TFLOP/s",
              "% copy", "peak GiB", "ms/base", "err/bound", "status"]
    lines = []
    for r in rows:
        spread = (f"{_num(r['ms_p20'])}-{_num(r['ms_p80'])}" if r.get("ms_p20") is not None
                  else "-")
        peak = r.get("peak_extra_GiB")
        lines.append([r["op"], r["mode"], r["shape"], r.get("dtype", ""), r["provider"],
                      _num(r.get("ms_p50")), spread, _num(r.get("GBps")), _num(r.get("TFLOPs")),
                      _num(r.get("pct_of_copy"), 2),
                      "n/a" if "ms_p50" in r and peak is None else _num(peak),
                      _num(r.get("ratio_to_baseline")), _num(r.get("err_over_bound")),
                      str(r.get("status", "")) + (" (approx)" if r.get("approx") else "")])
    align = ["left"] * 5 + ["right"] * 8 + ["left"]
    return format_table(lines, header, align)


def format_table(lines: list[list[str]], header: list[str], align: list[str]) -> str:
    """tabulate's plain table; without tabulate (a bare GPU image), tab-separated cells, so
    that a long run never loses its printout (the JSON and CSV are complete either way)."""
    try:
        from tabulate import tabulate
    except ImportError:
        return "\n".join("\t".join(cells) for cells in [header, *lines]) + \
            "\n(tabulate not installed: pip install tabulate for an aligned table)"
    return tabulate(lines, headers=header, colalign=align, disable_numparse=True)
