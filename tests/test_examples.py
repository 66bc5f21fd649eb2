"""The examples/ scripts run end to end on CPU (tiny models from configs, no downloads)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ppo_step():
    out = _run("ppo_step.py", "--steps", "2", "--device", "cpu")
    losses = [float(x) for x in re.findall(r"policy loss ([-+\d.eE]+|nan|inf)", out)]
    assert len(losses) == 2 and all(map(math.isfinite, losses)), out


@pytest.mark.parametrize("script", ["trl_grpo.py", "trl_dpo.py"])
def test_trl_examples(script):
    pytest.importorskip("trl")
    out = _run(script, "--steps", "2")
    loss = re.search(r"with prefkern: 2 steps, training loss (\S+)", out)
    assert loss and math.isfinite(float(loss.group(1))), out
