"""benchmarks/readme_tables.py: README's benchmark section comes from the committed results
files, and the committed README is up to date with them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("readme_tables",
                                                  ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_readme_is_up_to_date():
    assert _module().main(["--check"]) == 0


def test_tables_from_a_results_file(tmp_path):
    from prefkern.bench import results

    rows = [dict(op="gae", provider="verl_loop", mode="fwd", shape="B=256 T=2048",
                 dtype="float32", status="ok", ms_p50=12.5, ms_p20=12.0, ms_p80=13.0,
                 ratio_to_baseline=1.0,
                 peak_extra_GiB=0.01),
            dict(op="gae", provider="prefkern_triton", mode="fwd", shape="B=256 T=2048",
                 dtype="float32", status="ok", ms_p50=0.25, ms_p20=0.24, ms_p80=0.26,
                 ratio_to_baseline=0.02,
                 peak_extra_GiB=0.004)]
    rows = [{**dict.fromkeys(results.COLUMNS), **row} for row in rows]
    meta = dict(results.metadata(torch.device("cpu")), device="NVIDIA H100 80GB HBM3",
                git_commit="0123456789abcdef")
    results.write(rows, [], meta, tmp_path / "results" / "h100", "2026-11-23_1200_gae_default")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    module = _module()
    assert module.main(["--results", str(tmp_path / "results"), "--readme", str(readme),
                        "--check"]) == 1
    assert module.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "### gae on NVIDIA H100 80GB HBM3" in text and "`0123456789ab`" in text
    assert "| fwd | B=256 T=2048 | float32 | prefkern_triton | 0.25 | 0.02 | 0.004 | ok |" in text
    assert "old" not in text and text.endswith("tail\n")
    assert module.main(["--results", str(tmp_path / "results"), "--readme", str(readme),
                        "--check"]) == 0


def test_profile_and_trl_runs_results_become_tables(tmp_path):
    import json

    folder = tmp_path / "results" / "h100"
    folder.mkdir(parents=True)
    meta = dict(device="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6",
                git_commit="abcdef0123456789", date="2026-11-23T12:00:00+00:00")
    profile = dict(meta=meta, preset="llama3-8b-head", rows=[
        dict(workload="dpo", impl="prefkern", step_ms=12.5, forward_ms=4.0, loss_ms=6.0,
             backward_ms=2.5, peak_GiB=1.25, loss=0.69)])
    runs = dict(meta=dict(meta, preset="llama-1b"), runs=[
        dict(trainer="grpo", prefkern=True, steps=2, step_ms=[100.0, 90.0, 95.0],
             losses=[0.5, 0.25], peak_GiB=20.5)])
    (folder / "2026-11-23_1200_profile_llama3-8b-head.json").write_text(json.dumps(profile))
    (folder / "trl_runs_llama-1b.json").write_text(json.dumps(runs))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    assert _module().main(["--results", str(tmp_path / "results"), "--readme",
                           str(readme)]) == 0
    text = readme.read_text()
    assert "### profile llama3-8b-head on NVIDIA H100 80GB HBM3" in text
    assert "| dpo | prefkern | 12.5 | 4 | 6 | 2.5 | 1.25 |" in text
    assert "### trl_runs llama-1b on NVIDIA H100 80GB HBM3" in text
    assert "| grpo | True | 95 | 20.5 | 0.5, 0.25 |" in text
