"""``PVAModule``: the LightningModule that trains the PVA pathway on a frozen backbone.

Heavy models are built in :meth:`PVAModule.configure_model`, so constructing the module (and
``--help`` / ``--print_config`` of the CLI) is instant and configs hold only paths and numbers.
Checkpoints hold the adapter weights and optimizer state only, never the frozen backbone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from pva.adapter import load_adapter, save_adapter
from pva.model import PVAConfig, PVAModel

DEFAULT_PVA = PVAConfig()
"""The paper's architecture (frozen; each module takes a private copy)."""


class PVAModule(L.LightningModule):
    """Train PVA (METHOD section 6) with the paper's parameter groups and learning rates.

    Args:
        backbone: SD2-inpainting diffusers folder (or a hub id already in the local cache).
        face_model: arcface_torch IResNet ``.pth`` used to condition (ArcFace R50, MS1MV3).
        pva: Architecture of the PVA pathway.
        init_adapter: Adapter ``.safetensors`` to start from (stage 2 starts from stage 1's).
        batch_size: Images per device per step; only used to scale ``lr_pva``.
        lr_pva: Learning rate of the visual Q/K/V per sample of total batch; the effective rate
            is ``lr_pva * batch_size * devices * nodes * accumulate_grad_batches`` (paper: 1e-6).
        lr_projection: Learning rate of the identity-token transformer (paper: 3.2e-5).
        lr_token: Learning rate of the ``<new1>`` embedding (paper: 1e-3).
        lr_face_backbone: Learning rate of the face recognizer when ``pva.train_face_backbone``
            (stage 2; not given by METHOD, [ours] default 1e-6).
        weight_decay: AdamW weight decay, all groups (paper: 1e-2).
        timestep_draws: Stratified timesteps per image (paper: 4).
        text_dropout: Probability of dropping a prompt to ``""`` (paper: 0).
        identity_dropout: Probability of hiding a sample's identity tokens (paper: 0).
        nonfinite: On a non-finite loss: ``raise`` (stop, naming the step) or ``skip`` (no update
            for that batch, counted as ``train/nonfinite_skipped``; single-process runs only, as
            DDP ranks must all step together).
    """

    def __init__(
        self,
        backbone: str,
        face_model: str,
        pva: PVAConfig = DEFAULT_PVA,
        init_adapter: str | None = None,
        batch_size: int = 2,
        lr_pva: float = 1e-6,
        lr_projection: float = 3.2e-5,
        lr_token: float = 1e-3,
        lr_face_backbone: float = 1e-6,
        weight_decay: float = 1e-2,
        timestep_draws: int = 4,
        text_dropout: float = 0.0,
        identity_dropout: float = 0.0,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if isinstance(pva, dict):  # as stored in checkpoint hyperparameters
            pva = PVAConfig(**pva)
        self.pva_config = dataclasses.replace(pva)  # a private copy
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["pva"])
        self.hparams["pva"] = dataclasses.asdict(self.pva_config)
        self.model: PVAModel | None = None
        self.strict_loading = False  # checkpoints hold the adapter only; checked in on_load
        self.effective_lrs: dict[str, float] = {}
        self.nonfinite_skipped = 0
        self._step_start: float | None = None

    # -------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the backbone and face model, install PVA, optionally load ``init_adapter``."""
        if self.model is not None:
            return
        hp = self.hparams
        self.model = PVAModel.from_paths(hp.backbone, hp.face_model, self.pva_config)
        if hp.init_adapter:
            load_adapter(self.model, hp.init_adapter)

    def _require_model(self) -> PVAModel:
        if self.model is None:
            self.configure_model()
        assert self.model is not None
        return self.model

    def total_batch_size(self) -> int:
        """Images per optimizer step over all devices, nodes and accumulation steps."""
        world, accumulate = 1, 1
        if self._trainer is not None:
            world = self.trainer.world_size
            accumulate = self.trainer.accumulate_grad_batches
        return self.hparams.batch_size * world * accumulate

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the paper's groups; the PVA learning rate scales with total batch size."""
        hp = self.hparams
        lrs = {
            "pva": hp.lr_pva * self.total_batch_size(),
            "projection": hp.lr_projection,
            "token": hp.lr_token,
            "face_backbone": hp.lr_face_backbone,
        }
        groups = self._require_model().parameter_groups()
        self.effective_lrs = {name: lrs[name] for name in groups}
        param_groups = [
            {"params": params, "lr": lrs[name], "name": name} for name, params in groups.items()
        ]
        return torch.optim.AdamW(param_groups, weight_decay=hp.weight_decay)

    def on_train_start(self) -> None:
        """Log the effective learning rates once (the PVA one depends on the world size)."""
        for name, lr in self.effective_lrs.items():
            self.log(f"lr_effective/{name}", lr, rank_zero_only=True)

    # -------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Epsilon MSE on ``timestep_draws`` stratified timesteps per image."""
        hp = self.hparams
        loss = self._require_model().training_loss(
            batch, hp.timestep_draws, hp.text_dropout, hp.identity_dropout
        )
        if not torch.isfinite(loss):
            if hp.nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite training loss {loss.item()} at step {self.global_step} "
                    f"(set model.nonfinite: skip to skip such batches)"
                )
            self.nonfinite_skipped += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        if "skipped" in batch:  # corrupt or unknown shard records skipped by the data stream
            self.log(
                "data/skipped_records",
                batch["skipped"].float(),
                reduce_fx="sum",
                batch_size=len(batch["prompt"]),
            )
        return loss

    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite: skip`` under several processes (ranks must step together)."""
        if self.hparams.nonfinite == "skip" and self.trainer.world_size > 1:
            raise ValueError("model.nonfinite: skip works in single-process runs only")

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Start the step clock (samples/s)."""
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Log samples/s of this batch (per device)."""
        if self._step_start is not None:
            seconds = time.perf_counter() - self._step_start
            self.log("train/samples_per_s", len(batch["prompt"]) / max(seconds, 1e-9))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global L2 norm of the trainable parameters' gradients."""
        grads = [p.grad.detach().float().norm() for g in optimizer.param_groups
                 for p in g["params"] if p.grad is not None]  # fmt: skip
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm())

    # ----------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only adapter tensors in the checkpoint (megabytes, not gigabytes)."""
        model = self._require_model()
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith("model.") and model.is_adapter_key(k.removeprefix("model."))
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that a checkpoint holds every adapter tensor this model needs."""
        model = self._require_model()
        have = set(checkpoint.get("state_dict", {}))
        need = {f"model.{k}" for k in model.adapter_state_dict()}
        missing = sorted(need - have)
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} adapter tensors, e.g. '{missing[0]}'; it was "
                f"written by a model with a different PVA configuration"
            )

    def save_adapter(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Export the trainable weights as an adapter ``.safetensors`` file."""
        return save_adapter(self._require_model(), path, overwrite=overwrite)
