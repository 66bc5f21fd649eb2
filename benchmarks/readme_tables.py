"""Regenerate README.md's benchmark section from the committed results files, and nothing else.

    python benchmarks/readme_tables.py [--results benchmarks/results] [--readme README.md]
                                       [--check]

For each device folder under --results, the newest JSON of each suite (as written by
`python -m prefkern bench`) becomes a table: one row per case and provider with the median
time, the time relative to the case's baseline, the peak extra memory and the status; the
newest `python -m prefkern profile` run per preset (time and peak memory per training step
and phase) and `benchmarks/trl_runs.py` run per preset (TRL steps with and without prefkern)
a table each; above each the device, torch / triton versions, commit and date of that run,
and its PNGs (bars; the sweeps' curves) when they exist. The section between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced; with no results it says the
numbers are pending. ``--check`` exits 1 when README.md is not up
to date (for CI).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROOT = Path(__file__).resolve().parent.parent
PENDING = ("GPU numbers pending: no results under `benchmarks/results/<gpu>/` yet (they come "
           "only from a run on the device, `benchmarks/device_run.sh`).")


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _kind(payload) -> str | None:
    """What wrote a results JSON: "bench" (python -m prefkern bench), "profile" (python -m
    prefkern profile) or "trl_runs" (benchmarks/trl_runs.py); None for anything else."""
    if not isinstance(payload, dict):
        return None
    if "runs" in payload:
        return "trl_runs"
    if "preset" in payload and "rows" in payload:
        return "profile"
    return "bench" if "rows" in payload else None


def _newest_per_suite(folder: Path) -> list[tuple[str, Path, dict]]:
    """-> [(suite, json path, payload)], the newest file of each bench suite, profile preset
    and TRL-runs preset (names start with the run's UTC stamp, so they sort by time)."""
    newest = {}
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kind = _kind(payload)
        if kind == "bench":
            for suite in sorted({row.get("op", "?") for row in payload["rows"]}):
                newest[suite] = (path, payload)
        elif kind is not None:
            preset = payload.get("preset") or payload.get("meta", {}).get("preset", "?")
            newest[f"{kind} {preset}"] = (path, payload)
    return [(suite, *newest[suite]) for suite in sorted(newest)]


def _profile_rows(payload: dict) -> list[str]:
    lines = ["| workload | impl | step ms | forward ms | loss ms | backward ms | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in (
            "workload", "impl", "step_ms", "forward_ms", "loss_ms", "backward_ms",
            "peak_GiB")) + " |")
    return lines


def _trl_rows(payload: dict) -> list[str]:
    lines = ["| trainer | with prefkern | median step ms | peak GiB | losses |",
             "|---|---|---|---|---|"]
    for r in payload["runs"]:
        times = sorted(r.get("step_ms") or [])
        median = times[len(times) // 2] if times else None
        lines.append("| " + " | ".join([
            _fmt(r.get("trainer")), _fmt(r.get("prefkern")), _fmt(median),
            _fmt(r.get("peak_GiB")), ", ".join(_fmt(x, 4) for x in r.get("losses", []))]) + " |")
    return lines


def _table(suite: str, path: Path, payload: dict, readme_dir: Path) -> list[str]:
    meta = payload.get("meta", {})
    commit = (meta.get("git_commit") or "unknown")[:12]
    lines = [f"### {suite} on {meta.get('device', '?')}", "",
             f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, commit "
             f"`{commit}`, {meta.get('date', '?')}; from `{path.relative_to(readme_dir)}`", ""]
    for png in (path.with_suffix(".png"), path.with_name(path.stem + "_sweep.png")):
        if png.exists():
            lines += [f"![{suite}]({png.relative_to(readme_dir)})", ""]
    kind = _kind(payload)
    if kind == "profile":
        return lines + _profile_rows(payload) + [""]
    if kind == "trl_runs":
        return lines + _trl_rows(payload) + [""]
    lines += ["| mode | shape | dtype | provider | ms (p50) | × baseline | peak GiB | status |",
              "|---|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        if row.get("op") != suite:
            continue
        lines.append("| " + " | ".join([
            _fmt(row.get("mode")), _fmt(row.get("shape")), _fmt(row.get("dtype")),
            _fmt(row.get("provider")), _fmt(row.get("ms_p50")),
            _fmt(row.get("ratio_to_baseline")), _fmt(row.get("peak_extra_GiB")),
            _fmt(row.get("status"))]) + " |")
    return lines + [""]


def render(results: Path, readme_dir: Path) -> str:
    """The section's body for every device folder under ``results``."""
    blocks = []
    for folder in sorted(p for p in results.glob("*") if p.is_dir()) if results.is_dir() else []:
        for suite, path, payload in _newest_per_suite(folder):
            blocks += _table(suite, path, payload, readme_dir)
    return "\n".join(blocks).strip() if blocks else PENDING


def update(readme: Path, results: Path) -> tuple[str, str]:
    """-> (current README text, the text with the section regenerated)."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = render(results, readme.parent)
    return text, f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md differs from what the results give")
    args = parser.parse_args(argv)
    current, new = update(args.readme, args.results)
    if args.check:
        if current != new:
            print(f"{args.readme} is out of date: run python benchmarks/readme_tables.py")
            return 1
        return 0
    args.readme.write_text(new)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
