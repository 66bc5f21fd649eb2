#!/usr/bin/env bash
# The GPU job (the device tool): build the CUDA extension, run the GPU tests, run the main job on
# the real shapes and the training-step profile, copy the results to $OUT. Peers come from ./.whl
# (made on the machine with network: pip download --no-deps -d .whl liger-kernel==0.8.5
# cut-cross-entropy==25.1.1 tabulate tqdm, + trl transformers datasets for the TRL runs).
# Usage, from the repo root:
#   bash benchmarks/device_run.sh [extra args for `python -m prefkern bench`]
# The device tool gives a command 10 minutes: pick stages per call, e.g.
#   PREFKERN_STAGES="build tests sanitize" bash benchmarks/device_run.sh
#   PREFKERN_STAGES="build bench" bash benchmarks/device_run.sh --suite linear_logprobs
#   PREFKERN_STAGES="build profile trl" bash benchmarks/device_run.sh
# (default: every stage). Each stage has its own time limit (PREFKERN_STAGE_TIMEOUT, seconds)
# so that one that hangs leaves the others their time.
set -uo pipefail
OUT="${OUT:-/tmp/prefkern_out}"
STAGES=" ${PREFKERN_STAGES:-build tests sanitize bench sweeps profile trl} "
LIMIT="${PREFKERN_STAGE_TIMEOUT:-540}"
mkdir -p "$OUT"
wants() { [[ "$STAGES" == *" $1 "* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
if wants build; then
  # no network there: build with what is installed (setuptools, pybind11 or cmake may be missing)
  PREFKERN_BUILD_CUDA=1 PREFKERN_CUDA_ARCHS=90 timeout "$LIMIT" python3 -m pip install -q \
    --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
fi
python3 -m prefkern info | tee "$OUT/info.txt"
if wants tests; then
  # every failure listed (not -x): the first run on a GPU should show them all
  timeout "$LIMIT" python3 -m pytest -q -m gpu --maxfail=40 -rf -p no:cacheprovider 2>&1 \
    | tail -80 | tee "$OUT/gpu_tests.log"
fi
if wants sanitize; then
  # memcheck over one small fwd+bwd of every kernel family (CUDA and Triton); no caching
  # allocator, so a read past a tensor is reported rather than landing in a pooled block
  SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$LIMIT" "$SANITIZER" --tool memcheck \
    --error-exitcode 1 python3 benchmarks/sanitize_ops.py 2>&1 | tail -40 \
    | tee "$OUT/memcheck.log"
  echo "memcheck exit: ${PIPESTATUS[0]}" | tee -a "$OUT/memcheck.log"
fi
if wants bench; then
  timeout "$LIMIT" python3 -m prefkern bench --out "$OUT/results" "$@" 2>&1 | tail -150 \
    | tee "$OUT/bench.log"
fi
# time and memory against N and V (PNG); long: on when PREFKERN_SWEEPS=1
if wants sweeps && [ "${PREFKERN_SWEEPS:-0}" = "1" ]; then
  timeout "$LIMIT" python3 -m prefkern bench --suite sweep_tokens --suite sweep_vocab \
    --out "$OUT/results" 2>&1 | tail -60 | tee "$OUT/sweeps.log"
fi
if wants profile; then
  # one training step per workload, materialized logits vs prefkern, on a real head size
  timeout "$LIMIT" python3 -m prefkern profile --out "$OUT/results" 2>&1 | tail -20 \
    | tee "$OUT/profile.log"
fi
if wants trl; then
  # short TRL GRPO / DPO runs on a Llama-3.2-1B-shaped random model, with and without prefkern
  # (needs trl 1.16 + transformers 5.23 and their dependencies carried in .whl)
  if python3 -c "import trl, transformers, datasets" 2>/dev/null; then
    timeout "$LIMIT" python3 benchmarks/trl_runs.py --preset llama-1b --steps 6 \
      --out "$OUT/results" 2>&1 | tail -12 | tee "$OUT/trl_runs.log"
  else
    echo "trl / transformers / datasets not installed: TRL runs skipped" | tee "$OUT/trl_runs.log"
  fi
fi
