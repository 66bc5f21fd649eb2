"""benchmarks/sanitize_ops.py (the calls compute-sanitizer checks on a GPU) runs: every kernel
family at tiny sizes on the Triton interpreter, so a broken call is seen before device time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sanitize_ops_runs_on_the_interpreter(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("sanitize_ops",
                                                  ROOT / "benchmarks" / "sanitize_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SIZES", dict(logits=(7, 131), linear=(9, 20, 131),
                                              losses=(2, 5, 12, 97), gae=(3, 50)))
    assert module.main(["--device", "cpu"]) == 0
    assert "every kernel family ran" in capsys.readouterr().out
