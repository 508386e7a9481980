"""Export the trained adapter as ``.safetensors`` when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from pva.module import PVAModule


class AdapterExport(L.Callback):
    """Write ``<dirpath>/<filename>`` (the adapter file) at the end of ``fit``, on rank 0.

    Args:
        dirpath: Folder; default: the trainer's log dir (or ``default_root_dir``).
        filename: File name of the adapter.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "adapter.safetensors") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the adapter (overwriting an earlier export of the same run)."""
        if not isinstance(pl_module, PVAModule):
            raise TypeError(f"AdapterExport needs a PVAModule, got {type(pl_module).__name__}")
        if trainer.is_global_zero:
            folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
            self.path = pl_module.save_adapter(folder / self.filename, overwrite=True)
            print(f"adapter exported to {self.path}")
