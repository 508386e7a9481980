"""PVAModule (pva.module) under a Lightning Trainer: building, checkpoints, rates, memory."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import make_batch
from torch.utils.data import DataLoader, Dataset

from pva.module import PVAModule
from pva.objective import denoising_loss, fused_adam_ok
from pva.sampling import ddim_inpaint
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


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class FixedBatches(Dataset):
    """Samples of ``make_batch`` (one sample per item)."""

    def __init__(self, n: int = 8):
        self.batch = make_batch(batch_size=n, num_refs=2)

    def __len__(self):
        return len(self.batch["prompt"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_optimizer_steps_change_only_the_adapter_and_the_token_row(tiny_assets, tmp_path):
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(),
        batch_size=2,
        lr_pva=1e-3,
        timestep_draws=2,
    )
    module.configure_model()
    model = module.model
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not model.is_adapter_key(k)}
    before_sum = _checksum(frozen)
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    table_before = model.text_encoder.get_input_embeddings().weight.clone()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(FixedBatches(), batch_size=2))
    after = {k: v for k, v in model.state_dict().items() if not model.is_adapter_key(k)}
    assert _checksum(after) == before_sum  # every backbone tensor unchanged
    adapter_after = model.adapter_state_dict()
    for key in adapter_before:
        if "to_q_pva" in key or "to_k_pva" in key or "to_v_pva" in key:
            assert not torch.equal(adapter_before[key], adapter_after[key]), key
    assert not torch.equal(
        adapter_before["modifier_token.embedding"], adapter_after["modifier_token.embedding"]
    )
    # the frozen embedding table (every row, the new token's too) did not move
    assert torch.equal(table_before, model.text_encoder.get_input_embeddings().weight)
    # and what the text encoder produces for <new1> is the trained vector
    tid = model.modifier_token.token_id
    with torch.no_grad():
        emb = model.text_encoder.get_input_embeddings()(torch.tensor([[tid, 320]]))
    assert torch.equal(emb[0, 0], model.modifier_token.embedding)
    assert torch.equal(emb[0, 1], table_before[320])


def test_learning_rates_follow_the_paper_and_total_batch_size(tiny_assets, tmp_path):
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(train_face_backbone=True),
        batch_size=2,
    )
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=4,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(FixedBatches(), batch_size=2))
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    # batch 2 x 4 timestep draws x 1 device x accumulate 4
    assert groups["pva"]["lr"] == pytest.approx(1e-6 * 2 * 4 * 4)
    assert trainer.callback_metrics["lr_effective/pva"] == pytest.approx(groups["pva"]["lr"])
    assert groups["face_backbone"]["lr"] == pytest.approx(groups["pva"]["lr"])
    assert groups["projection"]["lr"] == pytest.approx(3.2e-5)
    assert groups["token"]["lr"] == pytest.approx(1e-3)
    assert all(g["weight_decay"] == pytest.approx(1e-2) for g in groups.values())
    n_train = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_train == sum(p.numel() for p in module.model.parameters() if p.requires_grad)


# The GPU user's memory and speed options compute what the plain path computes.


def _built_module(tiny_assets, **kw) -> PVAModule:
    module = PVAModule(
        str(tiny_assets.backbone),
        str(tiny_assets.face_model),
        pva=tiny_pva_config(),
        timestep_draws=2,
        **kw,
    )
    torch.manual_seed(0)  # the same fresh adapter weights for every variant
    module.configure_model()
    module.model.eval()  # no dropout: the runs must be comparable
    return module


def _loss_and_grads(module: PVAModule) -> tuple[float, dict[str, torch.Tensor]]:
    model = module.model
    batch = make_batch(batch_size=2, num_refs=2)
    loss = denoising_loss(model, batch, 2, generator=torch.Generator().manual_seed(0))
    loss.backward()
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.fixture(scope="module")
def plain(tiny_assets):
    return _loss_and_grads(_built_module(tiny_assets))


def _worst_relative(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys() and len(grads) > 10
    return max(
        float((grads[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference
    )


@pytest.mark.parametrize(
    "option",
    [
        {"gradient_checkpointing": True},
        {"channels_last": True},
        {"compile_unet": True, "compile_backend": "aot_eager"},  # inductor: BENCHMARKS / GPU script
    ],
)
def test_options_give_the_plain_gradients(tiny_assets, plain, option):
    module = _built_module(tiny_assets, **option)
    if "gradient_checkpointing" in option:
        assert any(getattr(m, "gradient_checkpointing", False) for m in module.model.unet.modules())
    if "channels_last" in option:
        conv = module.model.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    loss, grads = _loss_and_grads(module)
    assert loss == pytest.approx(plain[0], rel=1e-5)
    assert _worst_relative(grads, plain[1]) < 1e-5


def test_frozen_weights_in_bf16_trainable_weights_and_optimizer_state_in_fp32(tiny_assets, plain):
    module = _built_module(tiny_assets, frozen_dtype="bfloat16")
    model = module.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trainable or name.startswith(("identity_encoder.", "modifier_token.")):
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16, name
    assert any(".processor." in n for n in trainable)  # PVA weights live inside the bf16 UNet
    loss, grads = _loss_and_grads(module)
    assert loss == pytest.approx(plain[0], rel=1e-3)
    for k, g in grads.items():  # bf16 rounding of the frozen path, same direction
        assert g.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g.flatten(), plain[1][k].flatten(), dim=0)
        assert cos > 0.995, k
    module._trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1)
    optimizer = module.configure_optimizers()
    optimizer.step()
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    # inference (the validation callbacks, the pipeline) runs on the same held weights
    batch = make_batch(batch_size=1, num_refs=2)
    with torch.no_grad():
        out = ddim_inpaint(
            model,
            batch["image"],
            batch["mask"],
            batch["references"],
            batch["prompt"],
            num_steps=2,
            guidance_scale=3.0,
        )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="model.frozen_dtype"):
        PVAModule("b", "f", frozen_dtype="int8")
