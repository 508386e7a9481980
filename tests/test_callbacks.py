"""Callbacks (callbacks/): the step progress bar. The PVA callbacks run in test_training.py."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import StepProgressBar


class _Line(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_steps, ckpt=None):
    data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[StepProgressBar()],
        logger=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(_Line(), DataLoader(data, batch_size=2), ckpt_path=ckpt)  # 4 steps an epoch
    return trainer


def test_the_bar_counts_steps_over_the_whole_run_with_the_time_left(tmp_path, capsys):
    trainer = _fit(tmp_path, 10)  # 2.5 epochs
    err = capsys.readouterr().err
    assert "train" in err and "10/10" in err and "loss=" in err and "<" in err  # time left
    assert "Epoch" not in err  # the epoch bar is replaced, not doubled
    ckpt = tmp_path / "at10.ckpt"
    trainer.save_checkpoint(ckpt)
    _fit(tmp_path, 14, str(ckpt))  # a resumed run starts at its step
    err = capsys.readouterr().err
    assert "10/14" in err and "14/14" in err and " 0/14" not in err
