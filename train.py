"""Train PVA with LightningCLI: ``python train.py fit --config configs/<name>.yaml``.

The same as ``pva train fit --config ...``; the CLI itself is :mod:`pva.training`.
``python train.py --help`` documents every option; ``--print_config`` builds no model.
"""

from __future__ import annotations

import sys

from pva.training import PVACLI, main

__all__ = ["PVACLI", "main"]

if __name__ == "__main__":
    sys.exit(main())
