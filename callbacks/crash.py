"""``SimulatedCrash``: SIGKILL the training process right after a checkpoint, to rehearse resume."""

from __future__ import annotations

import os
import signal

import lightning as L

from pva.checks import POSITIVE_INT


class SimulatedCrash(L.Callback):
    """Kill this process with SIGKILL (no cleanup, as a crash) when step ``at_step + 1`` begins.

    By then every checkpoint of step ``at_step`` is on disk (checkpoints are written at the end
    of a step), so a run resumed with ``--ckpt_path .../last.ckpt`` continues from ``at_step``:
    what ``pva rehearse`` does, deterministically at any step speed.

    Args:
        at_step: The last optimizer step completed before the crash.
    """

    def __init__(self, at_step: int) -> None:
        self.at_step = POSITIVE_INT.check("SimulatedCrash.at_step", at_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_step >= self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)
