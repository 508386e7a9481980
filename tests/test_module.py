"""PVAModule under a real Lightning Trainer: lazy building, adapter-only checkpoints, resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_training import FixedBatches
from torch.utils.data import DataLoader

from pva.module import PVAModule
from pva.objective import fused_adam_ok
from pva.tiny import tiny_pva_config


def _module(tiny_assets, **kw):
    return PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(),
        timestep_draws=1,
        **kw,
    )


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_fused_adam_only_where_the_kernel_applies():
    cpu = torch.nn.Parameter(torch.zeros(3))
    assert fused_adam_ok([cpu]) and fused_adam_ok([{"params": [cpu]}])
    assert not fused_adam_ok([cpu, torch.zeros(3, device="meta")])
    assert not fused_adam_ok([{"params": [torch.zeros(3, dtype=torch.long)]}])
    assert not fused_adam_ok([])


def test_construction_builds_nothing(tmp_path):
    module = PVAModule(str(tmp_path / "does-not-exist"), str(tmp_path / "nope.pth"))
    assert module.model is None  # heavy models are built in configure_model


def test_checkpoint_holds_only_adapter_weights_and_resumes(tiny_assets, tmp_path):
    module = _module(tiny_assets)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, DataLoader(FixedBatches(), batch_size=2))
    ckpt_path = (
        trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    )
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # no pickled classes
    keys = set(ckpt["state_dict"])
    assert keys == {f"model.{k}" for k in module.model.adapter_state_dict()}
    assert not any(".processor." not in k and k.startswith("model.unet.") for k in keys)
    size = sum(v.numel() for v in ckpt["state_dict"].values())
    assert size < 0.05 * sum(v.numel() for v in module.model.state_dict().values())
    assert len(ckpt["optimizer_states"][0]["state"]) > 0
    assert trainer.optimizers[0].defaults["fused"]  # CPU parameters: the fused AdamW kernel

    resumed = _module(tiny_assets)
    trainer2 = _trainer(tmp_path / "r", 3)
    trainer2.fit(resumed, DataLoader(FixedBatches(), batch_size=2), ckpt_path=ckpt_path)
    assert trainer2.global_step == 3


def test_loading_a_checkpoint_of_another_configuration_fails_clearly(tiny_assets, tmp_path):
    module = _module(tiny_assets)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, DataLoader(FixedBatches(), batch_size=2))
    ckpt_path = (
        trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    )
    other = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(variant="decoupled"),
        timestep_draws=1,
    )
    with pytest.raises(KeyError, match="lacks .* adapter tensors"):
        _trainer(tmp_path / "o", 2).fit(
            other, DataLoader(FixedBatches(), batch_size=2), ckpt_path=ckpt_path
        )


def test_init_adapter_is_loaded(tiny_assets, tmp_path, make_model):
    source = make_model()
    with torch.no_grad():
        source.modifier_token.embedding.fill_(0.25)
    from pva.adapter import save_adapter

    path = save_adapter(source, tmp_path / "init.safetensors")
    module = _module(tiny_assets, init_adapter=str(path))
    module.configure_model()
    assert torch.all(module.model.modifier_token.embedding == 0.25)
