"""Performance suite of every GraftLM architecture against stock GPT-2 (the same as `graftlm bench`).

    python bench/bench_all.py                  # tiny shapes on CPU; results in bench/results/
    python bench/bench_all.py --size small --device cuda --long-context
    python bench/bench_all.py --help
"""

import sys

from graftlm.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
