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
from pva.checks import NONNEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, check_ranges
from pva.model import PVAConfig, PVAModel
from pva.objective import DenoisingObjective, EncodingCache, fused_adam_ok

MODULE_RANGES = {
    "batch_size": POSITIVE_INT,
    "lr_pva": POSITIVE,
    "lr_projection": POSITIVE,
    "lr_token": POSITIVE,
    "lr_face_backbone": POSITIVE,
    "weight_decay": NONNEGATIVE,
    "timestep_draws": POSITIVE_INT,
    "text_dropout": PROBABILITY,
    "identity_dropout": PROBABILITY,
}
"""The allowed range of each numeric :class:`PVAModule` argument (``model.*`` in configs)."""

DEFAULT_PVA = PVAConfig()
"""The paper's architecture (frozen; each module takes a private copy)."""


class PVAModule(L.LightningModule):
    """Train PVA (METHOD section 6) with the paper's parameter groups and learning rates.

    Args:
        backbone: SD2-inpainting diffusers folder (or a hub id already in the local cache).
        face_model: The conditioning face encoder (:mod:`pva.face_encoders`): an arcface_torch
            IResNet ``.pth`` (the paper: ArcFace R50, MS1MV3), an InsightFace-format ArcFace
            ``.onnx``, or ``dlib`` (128-d, installed offline; frozen in every stage).
        pva: Architecture of the PVA pathway.
        init_adapter: Adapter ``.safetensors`` to start from (stage 2 starts from stage 1's).
        batch_size: Images per device per step; only used to scale ``lr_pva``.
        lr_pva: Learning rate of the visual Q/K/V per (image x timestep draw) of an optimizer
            step. The effective rate is ``lr_pva * batch_size * timestep_draws * devices *
            nodes * accumulate_grad_batches``, the reference's ``1e-6 x 2 x GPUs x 4``
            (``script/pva_train.py:85-87``: its "total batch" counts each of the 4 timestep
            resamples of a batch as one accumulation micro-step). Logged as
            ``lr_effective/pva``.
        lr_projection: Learning rate of the identity-token transformer (paper: 3.2e-5).
        lr_token: Learning rate of the ``<new1>`` embedding (paper: 1e-3).
        lr_face_backbone: Learning rate of the face recognizer when ``pva.train_face_backbone``
            (stage 2), per (image x timestep draw) and scaled like ``lr_pva``; ``None`` (default)
            is ``lr_pva``, as in the reference, whose face-net group has no rate of its own and
            gets the batch-scaled main one (``lib/pva.py:319-325``).
        weight_decay: AdamW weight decay, all groups (paper: 1e-2).
        timestep_draws: Stratified timesteps per image, all in one optimizer step (paper: 4).
        text_dropout: Probability of dropping a prompt to ``""`` (paper: 0).
        identity_dropout: Probability of hiding a sample's identity tokens (paper: 0).
        nonfinite: On a non-finite loss: ``raise`` (stop, naming the step) or ``skip`` (no update
            for that batch, counted as ``train/nonfinite_skipped``; single-process runs only, as
            DDP ranks must all step together).
        cache_encodings: [ours] Keep, in CPU memory, the VAE posterior of every training photo
            (per flip) and the face backbone's embedding of every reference (per flip), keyed by
            shard record, photo and flip, and reuse them instead of running the frozen encoders
            again (latents are still sampled from the posterior every step; masked images are
            always encoded, as masks are random). Exact while those encoders are frozen, so not
            with ``pva.train_face_backbone``. Memory per photo and flip: 8 x (S/8)^2 + 512 floats
            (SD2 at 512 px: 0.13 MB, 8 GB per rank for CelebAHQ-IDI's 30k photos x 2 flips).
            Needs batches from :class:`datamodules.ShardDataModule` (they carry the keys).
        gradient_checkpointing: Recompute the frozen UNet's activations in the backward pass
            (diffusers' block checkpointing): the same gradients for less activation memory
            and about one more UNet forward per step (BENCHMARKS.md, "What a GPU user needs").
        frozen_dtype: Hold the frozen VAE, text encoder and UNet weights in ``bfloat16`` or
            ``float16`` (half their memory) and run them under autocast; the trainable weights
            and the optimizer state stay ``float32``. ``float32`` (default) holds everything in
            fp32. Independent of ``trainer.precision`` (``bf16-mixed`` autocasts the rest).
        channels_last: Put the UNet's convolution weights in channels-last memory format
            (faster convolutions on tensor-core GPUs; same values).
        compile_unet: ``torch.compile`` the UNet (compiled on the first step; worth it for long
            runs on a GPU, a C++ compiler is needed on a CPU).
        compile_backend: ``torch.compile`` backend of ``compile_unet`` (``inductor``; the tests
            use ``aot_eager``, which traces the same graphs without generating kernels).
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
        lr_face_backbone: float | None = None,
        weight_decay: float = 1e-2,
        timestep_draws: int = 4,
        text_dropout: float = 0.0,
        identity_dropout: float = 0.0,
        nonfinite: Literal["raise", "skip"] = "raise",
        cache_encodings: bool = False,
        gradient_checkpointing: bool = False,
        frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        channels_last: bool = False,
        compile_unet: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        check_ranges("model.", locals(), MODULE_RANGES)
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
        self._batch_skips = 0
        self.objective = DenoisingObjective(timestep_draws, text_dropout, identity_dropout)
        self._step_start: float | None = None
        if frozen_dtype not in ("float32", "bfloat16", "float16"):
            allowed = "float32, bfloat16 or float16"
            raise ValueError(f"model.frozen_dtype must be {allowed}, got {frozen_dtype!r}")
        if cache_encodings and self.pva_config.train_face_backbone:
            raise ValueError(
                "model.cache_encodings needs a frozen face backbone; it cannot be "
                "combined with pva.train_face_backbone (stage 2)"
            )
        self.encodings = EncodingCache()  # cache_encodings: per photo key, on the CPU

    # -------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the backbone and face model, install PVA, optionally load ``init_adapter``."""
        if self.model is not None:
            return
        hp = self.hparams
        self.model = model = PVAModel.from_paths(hp.backbone, hp.face_model, self.pva_config)
        if hp.init_adapter:
            load_adapter(model, hp.init_adapter)
        if hp.frozen_dtype != "float32":
            model.hold_frozen_in(getattr(torch, hp.frozen_dtype))
        if hp.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if hp.channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if hp.compile_unet:
            model.unet.compile(backend=hp.compile_backend)

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

    def lr_scale(self) -> int:
        """(image x timestep draw) pairs per optimizer step, all ranks: what ``lr_pva`` scales by.

        ``batch_size x timestep_draws x devices x nodes x accumulate_grad_batches``; the
        reference's total batch ``2 x GPUs x 4`` (METHOD 6).
        """
        return self.total_batch_size() * self.hparams.timestep_draws

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the paper's groups; PVA (and face-backbone) rates scale with the batch."""
        hp = self.hparams
        face_lr = hp.lr_pva if hp.lr_face_backbone is None else hp.lr_face_backbone
        lrs = {
            "pva": hp.lr_pva * self.lr_scale(),
            "projection": hp.lr_projection,
            "token": hp.lr_token,
            "face_backbone": face_lr * self.lr_scale(),
        }
        groups = self._require_model().parameter_groups()
        self.effective_lrs = {name: lrs[name] for name in groups}
        param_groups = [
            {"params": params, "lr": lrs[name], "name": name} for name, params in groups.items()
        ]
        return torch.optim.AdamW(
            param_groups, weight_decay=hp.weight_decay, fused=fused_adam_ok(param_groups)
        )

    def on_train_start(self) -> None:
        """Log the effective learning rates once (the PVA one depends on the world size)."""
        for name, lr in self.effective_lrs.items():
            self.log(f"lr_effective/{name}", lr, rank_zero_only=True)

    # -------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Epsilon MSE on ``timestep_draws`` stratified timesteps per image."""
        hp = self.hparams
        if hp.cache_encodings:
            batch = self.encodings.fill(self._require_model(), batch)
        loss = self.objective(self._require_model(), batch)
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
        return loss

    def skipped_records(self, batch: dict[str, Any] | None = None) -> int:
        """Shard records and samples skipped so far on this rank (corrupt or unknown data).

        The DataModule's live count when it keeps one (:class:`datamodules.ShardDataModule`
        counts in every worker as records are read), else the sum of the batches' ``skipped``.
        """
        counted = getattr(getattr(self.trainer, "datamodule", None), "skipped_records", None)
        if isinstance(counted, int):
            return counted
        if batch is not None and "skipped" in batch:
            self._batch_skips += int(batch["skipped"])
        return self._batch_skips

    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite: skip`` under several processes (ranks must step together)."""
        if self.hparams.nonfinite == "skip" and self.trainer.world_size > 1:
            raise ValueError("model.nonfinite: skip works in single-process runs only")

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Start the step clock (samples/s)."""
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Log samples/s of this batch (per device) and the records skipped so far (all ranks)."""
        if self._step_start is not None:
            seconds = time.perf_counter() - self._step_start
            self.log("train/samples_per_s", len(batch["prompt"]) / max(seconds, 1e-9))
        self.log(
            "data/skipped_records",
            float(self.skipped_records(batch)),
            reduce_fx="sum",
            sync_dist=self.trainer.world_size > 1,
        )

    def on_train_end(self) -> None:
        """Log the final count of skipped records (a last step need not be a logging step)."""
        total = self.skipped_records()
        if self.logger is not None:
            self.logger.log_metrics({"data/skipped_records": float(total)}, step=self.global_step)
        if total:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{total} shard records or samples were skipped on rank 0 (each "
                f"warned above; logged as data/skipped_records)"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global L2 norm of the trainable parameters' gradients."""
        grads = [
            p.grad.detach().float().norm()
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
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
