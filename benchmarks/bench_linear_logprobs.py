"""Benchmark suite 'linear_logprobs': peers side by side in one run
(prefkern/bench/suites/linear_logprobs.py).

    python benchmarks/bench_linear_logprobs.py  # --shapes small|tiny, --quick, --out DIR

Same as `python -m prefkern bench --suite linear_logprobs`; on a GPU, results land in
benchmarks/results/<gpu>/.
"""

import sys

from prefkern.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "linear_logprobs", *sys.argv[1:]]))
