"""Checkpoints written under a temporary name and renamed: a crash never leaves half a file."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pva.fileio import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that saves to ``.<name>.tmp-<pid>`` then ``os.replace``-s it.

    Use as ``trainer.plugins: [{class_path: callbacks.AtomicCheckpointIO}]``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (local filesystems)."""
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
