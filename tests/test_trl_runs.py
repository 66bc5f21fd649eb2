"""benchmarks/trl_runs.py (the short TRL GRPO / DPO runs with and without prefkern) on the
tiny preset: it runs, writes its JSON, and both sides log the same training losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import trl_runs  # noqa: E402


def test_trl_runs_tiny(tmp_path, capsys):
    assert trl_runs.main(["--preset", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "trl_runs_tiny.json").read_text())
    assert {"trl", "transformers", "device", "git_commit"} <= set(data["meta"])
    runs = {(r["trainer"], r["prefkern"]): r for r in data["runs"]}
    assert set(runs) == {(k, p) for k in ("grpo", "dpo") for p in (False, True)}
    for kind in ("grpo", "dpo"):
        eager, ours = runs[kind, False], runs[kind, True]
        assert len(ours["step_ms"]) == 2 and len(ours["losses"]) == 2
        assert ours["losses"] == pytest.approx(eager["losses"], rel=1e-3, abs=1e-4), kind
        # the losses say little here (GRPO's is ~0, DPO's first is log 2): the gradient norm
        # and every logged metric must agree too
        for step, (mine, theirs) in enumerate(zip(ours["metrics"], eager["metrics"],
                                                   strict=True)):
            assert "grad_norm" in theirs and set(mine) == set(theirs), (kind, step)
            for key, value in theirs.items():
                assert mine[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (kind, step, key)
    assert "median step" in capsys.readouterr().out
