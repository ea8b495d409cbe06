"""The benchmark suite: throughput, MFU, round time, memory and each speed-up on and off.

Usage, from the repository root (``fl2ora bench`` runs the same suite)::

    python benchmarks/suite.py --json bench.json --markdown bench.md
    python benchmarks/suite.py --models tiny --sections steps rounds speedups
    python benchmarks/suite.py --data ../shared/data/cifar10.tar.gz

The measurements live in ``fl2ora.perf.suite``; ``--help`` lists the sizes.
"""

import os
import sys

# Only random-initialised architectures are built, so the hub is never needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fl2ora.perf.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
