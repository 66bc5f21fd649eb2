"""Benchmark suite 'gae': peers side by side in one run
(prefkern/bench/suites/gae.py).

    python benchmarks/bench_gae.py  # --shapes small|tiny, --quick, --out DIR

Same as `python -m prefkern bench --suite gae`; on a GPU, results land in
benchmarks/results/<gpu>/.
"""

import sys

from prefkern.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "gae", *sys.argv[1:]]))
