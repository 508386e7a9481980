"""Identity encoder: arcface_torch layout, safe loading, preprocessing, order invariance."""

from __future__ import annotations

import pytest
import torch

from pva.identity import (
    IRESNET_LAYERS,
    IdentityProjection,
    IResNet,
    iresnet,
    iresnet_config_from_state_dict,
    load_iresnet,
    preprocess_faces,
    save_iresnet,
)
from pva.tiny import build_tiny_face_model


def test_r50_and_r100_have_arcface_torch_keys_and_shapes():
    with torch.device("meta"):
        r50, r100 = iresnet("r50"), iresnet("r100")
    s50 = r50.state_dict()
    # keys and shapes of InsightFace's ms1mv3_arcface_r50_fp16/backbone.pth
    assert s50["conv1.weight"].shape == (64, 3, 3, 3)
    assert s50["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert s50["layer3.13.bn3.running_var"].shape == (256,)
    assert s50["layer4.2.prelu.weight"].shape == (512,)
    assert s50["fc.weight"].shape == (512, 512 * 7 * 7)
    assert s50["features.running_mean"].shape == (512,)
    assert "layer3.14.bn1.weight" not in s50 and "layer1.0.bn1.num_batches_tracked" in s50
    # 18 tensors per block (3 BN x 5, 2 convs, PReLU), 6 per downsample (conv + BN) in each of
    # the 4 stages, stem 7 (conv, BN, PReLU), tail 12 (BN, fc weight+bias, BN1d)
    assert len(s50) == 18 * sum(IRESNET_LAYERS["r50"]) + 6 * 4 + 7 + 12
    assert iresnet_config_from_state_dict(s50)["layers"] == list(IRESNET_LAYERS["r50"])
    assert iresnet_config_from_state_dict(r100.state_dict())["layers"] == [3, 13, 30, 3]


def test_arcface_layout_state_dict_loads_strictly_through_load_iresnet(tmp_path):
    model = build_tiny_face_model(seed=3)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    # arcface_torch saves a plain state dict; DDP-trained copies carry a "module." prefix
    # (and some older checkpoints have no BatchNorm num_batches_tracked entries)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "bb.pth")
    loaded = load_iresnet(tmp_path / "bb.pth")
    assert not loaded.training
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_iresnet_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_iresnet(tmp_path / "evil.pth")


def test_load_iresnet_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth.*arcface_torch"):
        load_iresnet(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*not an arcface_torch"):
        load_iresnet(tmp_path / "other.pth")


def test_save_iresnet_round_trip(tmp_path):
    model = build_tiny_face_model()
    save_iresnet(model, tmp_path / "f.pth")
    state = load_iresnet(tmp_path / "f.pth").state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_preprocessing_is_the_reference_crop():
    img = torch.zeros(1, 3, 256, 256)
    img[:, :, 35:223, 32:220] = 1.0  # exactly the crop window
    out = preprocess_faces(img, "celebahq")
    assert out.shape == (1, 3, 112, 112)
    assert torch.allclose(out, torch.ones_like(out))
    assert preprocess_faces(torch.rand(2, 3, 112, 112), "none").shape == (2, 3, 112, 112)


def test_projection_is_order_invariant_and_takes_any_number_of_references():
    torch.manual_seed(0)
    proj = IdentityProjection(embed_dim=64, token_dim=32, num_layers=2, num_heads=4, ffn_dim=64)
    proj.eval()
    with torch.no_grad():
        proj.pos_emb.normal_()  # non-zero, as after training
        for k in range(1, 9):
            emb = torch.randn(2, k, 64)
            out = proj(emb)
            assert out.shape == (2, 10, 32)
            perm = torch.randperm(k)
            torch.testing.assert_close(proj(emb[:, perm]), out, atol=1e-5, rtol=0)
        # padding references with a validity mask equals dropping them
        emb = torch.randn(1, 5, 64)
        padded = proj(emb, torch.tensor([[True, True, True, False, False]]))
        torch.testing.assert_close(padded, proj(emb[:, :3]), atol=1e-5, rtol=0)
        assert (proj(emb) - proj(emb[:, :3])).abs().max() > 1e-4  # references matter


def test_projection_query_std_scales_the_queries_and_lets_references_dominate(make_model):
    torch.manual_seed(0)
    default = make_model()
    torch.manual_seed(0)
    small = make_model(projection_query_std=0.125)
    q_default = default.identity_encoder.projection.queries
    q_small = small.identity_encoder.projection.queries
    # Same draw, scaled: nothing else in the model's initialisation moves.
    torch.testing.assert_close(q_small, q_default * 0.125)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_pva.weight"
    torch.testing.assert_close(small.unet.state_dict()[key], default.unet.state_dict()[key])
    torch.manual_seed(1)
    emb = torch.randn(16, 3, 64) + torch.randn(16, 1, 64)  # 16 persons, 3 references each

    def person_share(model) -> float:
        """Share of the tokens' energy that varies from person to person."""
        proj = model.identity_encoder.projection.eval()
        with torch.no_grad():
            tok = proj(emb)  # (16, 10, D)
        return float((tok - tok.mean(0)).square().sum() / tok.square().sum())

    assert person_share(small) > 2 * person_share(default)
    with pytest.raises(ValueError, match="projection_query_std"):
        IdentityProjection(embed_dim=64, token_dim=32, num_heads=4, query_std=-0.1)


def test_identity_encoder_end_to_end_and_backbone_stays_in_eval(make_model):
    model = make_model()
    model.train()
    enc = model.identity_encoder
    assert not enc.backbone.training and enc.projection.training
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    refs = torch.rand(2, 5, 3, 64, 64) * 2 - 1
    enc.eval()
    with torch.no_grad():
        tokens = enc(refs)
        assert tokens.shape == (2, 10, 32)
        torch.testing.assert_close(enc(refs[:, [4, 2, 0, 1, 3]]), tokens, atol=1e-5, rtol=0)


def test_stage2_face_backbone_trains_in_eval_mode(make_model):
    model = make_model(train_face_backbone=True)
    model.train()
    enc = model.identity_encoder
    assert not enc.backbone.training
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert "conv1.weight" in trainable and "features.weight" not in trainable
    assert "face_backbone" in model.parameter_groups()


def test_custom_width_iresnet_is_inferred():
    m = IResNet(layers=(1, 2, 1, 1), widths=(8, 16, 24, 32), num_features=40)
    cfg = iresnet_config_from_state_dict(m.state_dict())
    assert cfg == {"layers": [1, 2, 1, 1], "widths": [8, 16, 24, 32], "num_features": 40}


def test_iresnet_trains_on_a_channels_last_batch():
    # A batch cut from an (N, H, W, 3) array by permute is channels-last. oneDNN's convolution
    # backward segfaulted on such input on an AVX-512 AMD EPYC (torch 2.14.1): the demo's scoring
    # recognizer trains on exactly that view. In a subprocess: a crash fails this test only.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from pva.identity import IResNet\n"
        "torch.manual_seed(0)\n"
        "m = IResNet((1, 2, 2, 1), (8, 16, 24, 48), 96).train()\n"
        "x = torch.randn(8, 112, 112, 3).permute(0, 3, 1, 2)  # (8, 3, 112, 112), channels-last\n"
        "m(x).square().mean().backward()\n"
        "g = m.conv1.weight.grad\n"
        "assert g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
