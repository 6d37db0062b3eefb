"""The benchmark: every speed figure measured side by side in one run (the sections live in
:mod:`benchmarks.run`).

    OMP_NUM_THREADS=1 python jobs/benchmark.py [--quick] [--out BENCHMARKS.md] \
        [--sections prefill,scoring,actors,weight_sync,data,stage]
"""

import sys

try:
    import _bootstrap  # noqa: F401  (repo root on sys.path when run as a script)
except ImportError:
    pass

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main())
