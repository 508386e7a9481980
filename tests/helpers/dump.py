"""A callback that writes each rank's view of training to JSON, for subprocess tests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L


def adapter_digest(module) -> str:
    """sha256 of the adapter tensors (names and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.model.adapter_state_dict().items()):
        h.update(k.encode())
        h.update(v.float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class DumpRankState(L.Callback):
    """Records start step/digest, per-step samples seen, and the final digest, per rank."""

    def __init__(self, out: str = "dump") -> None:
        self.out = Path(out)
        self.state: dict = {"samples": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state["start_step"] = trainer.global_step
        self.state["start_digest"] = adapter_digest(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.state["samples"].append([f"{p}/{f}" for p, f in zip(batch["person"], batch["file"])])
        if batch_idx == 0 and trainer.world_size > 1:
            self._probe_gradients(trainer, pl_module, batch)

    def _probe_gradients(self, trainer, pl_module, batch) -> None:
        """Same seed, same batch: this rank's own gradient, and the DDP-averaged gradient."""
        import torch

        from pva.objective import denoising_loss

        params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]

        def flat() -> list[float]:
            grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
            return torch.cat(grads).tolist()

        for p in params:
            p.grad = None
        torch.manual_seed(1234)
        denoising_loss(pl_module.model, batch, pl_module.hparams.timestep_draws).backward()
        self.state["local_grad"] = flat()  # the unwrapped module: no all-reduce
        for p in params:
            p.grad = None
        torch.manual_seed(1234)
        trainer.strategy.training_step(batch, 0).backward()  # through DistributedDataParallel
        self.state["ddp_grad"] = flat()
        for p in params:
            p.grad = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.state["end_step"] = trainer.global_step
        self.state["end_digest"] = adapter_digest(pl_module)
        self.state["world_size"] = trainer.world_size
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.state))
        (self.out / f"pid{rank}").write_text(str(os.getpid()))
