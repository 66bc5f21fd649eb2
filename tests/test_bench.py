"""The main job end to end on CPU (tiny shapes): table, JSON and CSV written, providers agree."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from prefkern.bench.core import Case, Problem, run_problem
from prefkern.bench.inputs import logit_stats, peaked_problem
from prefkern.cli import main


def test_bench_cli_tiny(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "provider" in printed and "prefkern_torch" in printed
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert {"device", "torch", "git_commit"} <= set(data["meta"])
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"logprobs_from_logits", "linear_logprobs", "gae"}
    timed = [r for r in rows if r.get("ms_p50") is not None]
    assert timed and all(r["status"] == "ok" for r in timed), [
        (r["op"], r["provider"], r["status"]) for r in timed if r["status"] != "ok"]
    (csv_path,) = tmp_path.glob("*.csv")
    with csv_path.open() as f:
        header = next(csv.reader(f))
    assert {"op", "provider", "mode", "shape", "ms_p50", "peak_extra_GiB"} <= set(header)


def test_mismatch_is_flagged():
    x = torch.randn(10)
    cases = [Case("base", lambda: x, 1.0, "GB/s"), Case("wrong", lambda: x + 1, 1.0, "GB/s")]
    rows = run_problem("demo", Problem("n=10", "fwd", "fp32", cases, "base"), torch.device("cpu"),
                       quick=True)
    assert [r["status"] for r in rows] == ["ok", "MISMATCH"]


def test_peaked_inputs_are_realistic():
    hidden, weight, targets = peaked_problem(128, 512, 8000, torch.float32)
    stats = logit_stats(hidden, weight)
    assert 2.0 < stats["logit_std"] < 5.0
    assert 0.1 < stats["mean_max_p"] < 0.7
    assert targets.min() >= 0 and targets.max() < 8000


def test_unknown_suite_is_an_error():
    assert main(["bench", "--suite", "nope"]) == 2


@pytest.mark.gpu
def test_bench_cli_gpu_tiny(tmp_path):
    assert main(["bench", "--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 0
