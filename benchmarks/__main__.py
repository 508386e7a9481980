"""``python -m benchmarks <name> [flags]``: run one benchmark (``--help`` lists them)."""

import sys

from benchmarks import BENCHMARKS
from pva.cli import run

DESCRIPTION = "Benchmarks and research probes of the PVA implementation (measured figures)."

if __name__ == "__main__":
    sys.exit(run(None, BENCHMARKS, prog="python -m benchmarks", description=DESCRIPTION))
