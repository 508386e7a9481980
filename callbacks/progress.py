"""One progress bar over the whole training run: optimizer steps done, time left, the loss."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm


class StepProgressBar(ProgressBar):
    """A bar over ``trainer.max_steps`` optimizer steps (not per epoch), with the time left.

    Lightning's own bars count the batches of the current epoch, which says little when a run
    is set by ``max_steps`` over a stream of unknown length. This bar counts global steps from
    where the run starts (a resumed run starts part way), shows the estimated time left and the
    last ``train/loss``, and only on the first process.

    Args:
        description: The bar's label.
    """

    def __init__(self, description: str = "train") -> None:
        super().__init__()
        self.description = description
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        """Turn the bar off (Lightning calls this on every process but the first)."""
        self._enabled = False

    def enable(self) -> None:
        """Turn the bar on."""
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the bar at the run's current step."""
        if not self._enabled:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._bar = tqdm(
            total=total,
            initial=trainer.global_step,
            desc=self.description,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Advance to the global step; show the last loss."""
        if self._bar is None:
            return
        done = trainer.global_step - self._bar.n
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        if done > 0:
            self._bar.update(done)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Close the bar, so that the error prints on a line of its own."""
        self.on_train_end(trainer, pl_module)
