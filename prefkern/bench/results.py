"""Results: metadata, JSON / CSV / PNG writers and the printed table."""

from __future__ import annotations

import csv
import datetime
import json
import re
import subprocess
from pathlib import Path

import torch

COLUMNS = ["op", "provider", "mode", "shape", "dtype", "status", "ms_p50", "ms_p20", "ms_p80",
           "peak_extra_GiB", "throughput", "unit", "approx"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(device: torch.device) -> str:
    name = device_name(device).lower()
    for known in ("h200", "h100", "a100", "l40s", "b200"):
        if known in name:
            return known
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "cpu"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def default_out_dir(device: torch.device) -> Path:
    repo_results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if device.type == "cuda" and repo_results.is_dir():
        return repo_results / device_slug(device)
    return Path("prefkern_bench_results") / device_slug(device)


def write(rows: list[dict], infos: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps({"meta": meta, "inputs": infos, "rows": rows}, indent=1))
    csv_path = out_dir / f"{stem}.csv"
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra + ["device", "git_commit"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "device": meta["device"], "git_commit": meta["git_commit"]})
    paths = [json_path, csv_path]
    png = _plot(rows, out_dir / f"{stem}.png")
    if png:
        paths.append(png)
    return paths


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG plot)")
        return None
    timed = [r for r in rows if r.get("ms_p50")]
    groups = sorted({(r["op"], r["mode"], r["shape"]) for r in timed})
    if not groups:
        return None
    heights = [1.2 + 0.3 * sum((r["op"], r["mode"], r["shape"]) == g for r in timed)
               for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (op, mode, shape) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in timed if (r["op"], r["mode"], r["shape"]) == (op, mode, shape)]
        ax.barh([r["provider"] for r in sel], [r["ms_p50"] for r in sel], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("ms (median)")
        ax.set_title(f"{op} {mode} {shape}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = []
    header = (f"{'op':<22}{'mode':<9}{'shape':<28}{'provider':<28}{'ms':>9}{'thruput':>10}"
              f"{'unit':>9}{'peak GiB':>10}{'x base':>8}  status")
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        ratio = next((v for k, v in r.items() if k.startswith("ratio_to_")), None)
        lines.append(f"{r['op']:<22}{r['mode']:<9}{r['shape'][:27]:<28}{r['provider'][:27]:<28}"
                     f"{_fmt(r.get('ms_p50'), '.3f'):>9}{_fmt(r.get('throughput'), '.1f'):>10}"
                     f"{r.get('unit', ''):>9}{_fmt(r.get('peak_extra_GiB'), '.3f'):>10}"
                     f"{_fmt(ratio, '.2f'):>8}  {r.get('status', '')}")
    return "\n".join(lines)
