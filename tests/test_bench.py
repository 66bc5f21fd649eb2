"""The main job end to end on CPU (tiny shapes), and the harness's correctness check.
No timing asserts: a benchmark is not a test."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from prefkern.bench.core import Case, Problem, run_problem
from prefkern.bench.inputs import logit_stats, peaked_problem
from prefkern.bench.results import table
from prefkern.bench.suites import all_suites
from prefkern.cli import main

CPU = torch.device("cpu")


def test_bench_cli_tiny(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "provider" in printed and "prefkern_torch" in printed and "torch_eager" in printed
    (json_path,) = tmp_path.glob("*_all_tiny.json")
    data = json.loads(json_path.read_text())
    assert {"device", "torch", "triton", "git_commit", "date"} <= set(data["meta"])
    rows = data["rows"]
    assert {r["op"] for r in rows} == set(all_suites())
    timed = [r for r in rows if r.get("ms_p50") is not None]
    assert timed and all(r["status"] == "ok" for r in timed), [
        (r["op"], r["provider"], r["status"]) for r in timed if r["status"] != "ok"]
    logits_rows = [r for r in timed if r["op"] == "logprobs_from_logits"]
    assert {(r["mode"], r["dtype"]) for r in logits_rows} == {
        (m, d) for m in ("fwd", "fwd+bwd") for d in ("bfloat16", "float32")}
    assert {"torch_eager", "prefkern_torch", "copy"} <= {r["provider"] for r in logits_rows}
    assert all(r["GBps"] > 0 and r["peak_extra_GiB"] is None for r in logits_rows)
    # prefkern's torch backend was checked against eager on outputs and gradients
    checked = [r for r in logits_rows if r["provider"] == "prefkern_torch"]
    assert len(checked) == 4 and all(r["max_rel_err"] < 1e-4 for r in checked)
    assert data["inputs"] and all("logit_std" in i for i in data["inputs"])
    (csv_path,) = tmp_path.glob("*_all_tiny.csv")
    with csv_path.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"op", "provider", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "peak_extra_GiB",
            "GBps", "TFLOPs", "ratio_to_baseline", "device", "torch", "triton", "git_commit",
            "date"} <= set(csv_rows[0])


def test_one_suite_and_list(tmp_path, capsys):
    assert main(["bench", "--list"]) == 0
    assert "logprobs_from_logits" in capsys.readouterr().out
    args = ["bench", "--suite", "logprobs_from_logits", "--shapes", "tiny", "--quick",
            "--no-check", "--out", str(tmp_path)]
    assert main(args) == 0
    (json_path,) = tmp_path.glob("*_logprobs_from_logits_tiny.json")
    assert {r["op"] for r in json.loads(json_path.read_text())["rows"]} == {
        "logprobs_from_logits"}


def _problem(cases, mode="fwd"):
    return Problem("n=10", mode, "fp32", cases, "base")


def test_mismatch_is_flagged_on_outputs():
    x = torch.randn(10)
    cases = [Case("wrong", lambda: x + 1, 1.0, "GB/s"), Case("base", lambda: x, 1.0, "GB/s"),
             Case("same", lambda: x.clone(), 1.0, "GB/s"), Case("copy", lambda: None, 2.0, "GB/s")]
    rows = run_problem("demo", _problem(cases), CPU, quick=True)
    status = {r["provider"]: r["status"] for r in rows}
    assert status == {"base": "ok", "wrong": "MISMATCH", "same": "ok", "copy": "ok"}
    assert rows[0]["provider"] == "base"  # the baseline runs first
    assert all(r["ratio_to_baseline"] > 0 and r["pct_of_copy"] > 0 for r in rows)
    assert "MISMATCH" in table(rows)


def test_mismatch_is_flagged_on_gradients():
    w = torch.randn(10, requires_grad=True)

    def step(scale):
        def fn():
            out = (w * w).sum()
            (out * scale).backward()
            return out.detach()

        return fn

    cases = [Case("base", step(1.0), 1.0, "GB/s", (w,)), Case("bad", step(2.0), 1.0, "GB/s", (w,))]
    rows = run_problem("demo", _problem(cases, "fwd+bwd"), CPU, quick=True)
    assert [r["status"] for r in rows] == ["ok", "MISMATCH"]
    assert w.grad is None


def test_failing_provider_gives_an_error_row():
    def boom():
        raise RuntimeError("peer exploded")

    cases = [Case("base", lambda: torch.ones(3), 1.0, "GB/s"), Case("peer", boom, 1.0, "GB/s")]
    rows = run_problem("demo", _problem(cases), CPU, quick=True)
    assert rows[1]["status"].startswith("error: RuntimeError: peer exploded")


def test_peaked_inputs_are_realistic():
    hidden, weight, targets = peaked_problem(128, 512, 8000, torch.float32)
    stats = logit_stats(hidden, weight)
    assert 2.0 < stats["logit_std"] < 5.0
    assert 0.1 < stats["mean_max_p"] < 0.7
    assert targets.min() >= 0 and targets.max() < 8000


def test_unknown_suite_is_an_error():
    assert main(["bench", "--suite", "nope"]) == 2


def test_info_prints_backends(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "backend torch: available" in printed and "torch:" in printed


@pytest.mark.gpu
def test_bench_cli_gpu_tiny(tmp_path):
    assert main(["bench", "--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    timed = [r for r in data["rows"] if r.get("ms_p50") is not None]
    bad = [(r["op"], r["provider"], r["status"]) for r in timed
           if r["provider"].startswith("prefkern") and r["status"] != "ok"]
    assert not bad, bad
    assert all(r["peak_extra_GiB"] is not None for r in timed)
