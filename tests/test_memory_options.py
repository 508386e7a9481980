"""The GPU user's memory and speed options compute what the plain path computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch

from pva.module import PVAModule
from pva.objective import denoising_loss
from pva.sampling import ddim_inpaint
from pva.tiny import tiny_pva_config


def _module(tiny_assets, **kw) -> PVAModule:
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
    return _loss_and_grads(_module(tiny_assets))


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
    module = _module(tiny_assets, **option)
    if "gradient_checkpointing" in option:
        assert any(getattr(m, "gradient_checkpointing", False) for m in module.model.unet.modules())
    if "channels_last" in option:
        conv = module.model.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    loss, grads = _loss_and_grads(module)
    assert loss == pytest.approx(plain[0], rel=1e-5)
    assert _worst_relative(grads, plain[1]) < 1e-5


def test_frozen_weights_in_bf16_trainable_weights_and_optimizer_state_in_fp32(tiny_assets, plain):
    module = _module(tiny_assets, frozen_dtype="bfloat16")
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
