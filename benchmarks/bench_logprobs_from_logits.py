"""Benchmark suite 'logprobs_from_logits': peers side by side in one run
(prefkern/bench/suites/logprobs_from_logits.py).

    python benchmarks/bench_logprobs_from_logits.py  # --shapes small|tiny, --quick, --out DIR

Same as `python -m prefkern bench --suite logprobs_from_logits`; on a GPU, results land in
benchmarks/results/<gpu>/.
"""

import sys

from prefkern.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "logprobs_from_logits", *sys.argv[1:]]))
