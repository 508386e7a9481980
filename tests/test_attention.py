"""PVA attention: exactness without identity, fused == reference, masking, copy init, variants."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from pva.attention import DecoupledAttnProcessor, PVAAttnProcessor, identity_processors
from pva.backbone import load_backbone


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 9, 16, 16, generator=g)
    with torch.no_grad():
        text = model.encode_prompt(["photo of a <new1> person", "a face"][:batch])
        refs = torch.rand(batch, 3, 3, 64, 64, generator=g) * 2 - 1
        ident = model.encode_identity(refs)
    return x, torch.tensor([10, 700][:batch]), text, ident


def _eps(model, x, t, text, ident=None, identity_mask=None):
    with torch.no_grad():
        return model.predict_noise(x[:, :4], t, x[:, 4:5], x[:, 5:], text, ident, identity_mask)


def test_no_identity_is_bit_identical_to_the_pretrained_unet(make_model, tiny_assets):
    model = make_model().eval()
    base = load_backbone(tiny_assets.backbone)
    x, t, text, _ = _inputs(model)
    with torch.no_grad():
        expected = base.unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(_eps(model, x, t, text), expected)
    # an all-False identity mask also takes the exact path
    ident = torch.randn(2, 10, text.shape[-1])
    assert torch.equal(_eps(model, x, t, text, ident, torch.tensor([False, False])), expected)


def test_every_attn2_gets_pva_and_self_attention_is_untouched(make_model):
    model = make_model()
    procs = dict(identity_processors(model.unet))
    attn2 = [n for n in model.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(procs) == sorted(attn2) and len(procs) == 4
    assert all(isinstance(p, PVAAttnProcessor) for p in procs.values())


def test_visual_qkv_are_copies_of_the_pretrained_projections(make_model):
    model = make_model()
    modules = dict(model.unet.named_modules())
    for name, proc in identity_processors(model.unet):
        attn = modules[name.removesuffix(".processor")]
        for new, old in (
            (proc.to_q_pva, attn.to_q),
            (proc.to_k_pva, attn.to_k),
            (proc.to_v_pva, attn.to_v),
        ):
            assert torch.equal(new.weight, old.weight)
            assert new.weight.data_ptr() != old.weight.data_ptr()  # a copy, not a share
            assert new.weight.requires_grad and not old.weight.requires_grad


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, proc in identity_processors(model.unet):
            for p in proc.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_fused_matches_reference_and_masked_rows_match_no_identity(make_model):
    model = make_model().eval()
    _perturb(model)  # so the visual path differs from the text path
    x, t, text, ident = _inputs(model)
    fused = _eps(model, x, t, text, ident)
    model.set_attention_impl("reference")
    reference = _eps(model, x, t, text, ident)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    no_id = _eps(model, x, t, text)
    assert (fused - no_id).abs().max() > 1e-3  # identity tokens matter
    mask = torch.tensor([True, False])
    for impl in ("reference", "fused"):
        model.set_attention_impl(impl)
        mixed = _eps(model, x, t, text, ident, mask)
        torch.testing.assert_close(mixed[0], fused[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[1], no_id[1], atol=1e-5, rtol=0)


def _attn(dim=32, ctx_dim=16, heads=4):
    torch.manual_seed(0)
    return Attention(dim, cross_attention_dim=ctx_dim, heads=heads, dim_head=dim // heads).eval()


def test_joint_softmax_equation_on_a_single_layer():
    attn = _attn()
    proc = PVAAttnProcessor(attn, num_text_tokens=5, impl="reference")
    with torch.no_grad():
        proc.to_q_pva.weight.normal_()
        proc.to_k_pva.weight.normal_()
    x, text, ident = torch.randn(2, 7, 32), torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        out = proc(attn, x, torch.cat([text, ident], 1))
        # the equation, written independently: one softmax over [Q_t K_t^T, Q_v K_v^T]
        h, d = 4, 8

        def heads(z):
            return z.view(2, -1, h, d).transpose(1, 2)

        lt = heads(attn.to_q(x)) @ heads(attn.to_k(text)).transpose(-1, -2)
        lv = heads(proc.to_q_pva(x)) @ heads(proc.to_k_pva(ident)).transpose(-1, -2)
        p = (torch.cat([lt, lv], -1) / d**0.5).softmax(-1)
        o = p @ torch.cat([heads(attn.to_v(text)), heads(proc.to_v_pva(ident))], 2)
        expected = attn.to_out[0](o.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    proc.impl = "fused"
    with torch.no_grad():
        torch.testing.assert_close(
            proc(attn, x, torch.cat([text, ident], 1)), expected, atol=1e-5, rtol=0
        )


def test_decoupled_variant_scale_zero_is_base_and_scale_on_changes_output():
    attn = _attn()
    proc = DecoupledAttnProcessor(attn, num_text_tokens=5, scale=0.0)
    x, text, ident = torch.randn(2, 7, 32), torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        base = proc(attn, x, text)
        torch.testing.assert_close(
            proc(attn, x, torch.cat([text, ident], 1)), base, atol=1e-6, rtol=0
        )
        proc.scale = 1.0
        on = proc(attn, x, torch.cat([text, ident], 1))
        assert (on - base).abs().max() > 1e-3
        masked = proc(
            attn, x, torch.cat([text, ident], 1), identity_mask=torch.tensor([True, False])
        )
        torch.testing.assert_close(masked[0], on[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(masked[1], base[1], atol=1e-6, rtol=0)


def test_decoupled_variant_installs_through_the_model(make_model):
    model = make_model(variant="decoupled", decoupled_scale=0.5).eval()
    procs = [p for _, p in identity_processors(model.unet)]
    assert procs and all(isinstance(p, DecoupledAttnProcessor) and p.scale == 0.5 for p in procs)
    names = {n for n, _ in model.named_parameters() if n.startswith("unet") and "processor" in n}
    assert any("to_k_ip" in n for n in names) and not any("to_q_pva" in n for n in names)


def test_bad_impl_and_variant_are_refused():
    attn = _attn()
    with pytest.raises(ValueError, match="impl"):
        PVAAttnProcessor(attn, 5, impl="flash")


def test_fused_gradients_match_the_reference(make_model):
    """The fused path's block-wise backward gives the reference's gradients (masked rows too)."""
    model = make_model()
    _perturb(model)
    x, t, text, ident = _inputs(model)
    ident = ident.detach().requires_grad_(True)
    text = text.detach().requires_grad_(True)
    params = [p for _, proc in identity_processors(model.unet) for p in proc.parameters()]
    grads = {}
    for impl in ("reference", "fused"):
        model.set_attention_impl(impl)
        for p in params + [ident, text]:
            p.grad = None
        eps = model.predict_noise(
            x[:, :4], t, x[:, 4:5], x[:, 5:], text, ident, torch.tensor([True, False])
        )
        (eps * torch.linspace(-1, 1, eps.numel()).view_as(eps)).sum().backward()
        grads[impl] = [p.grad.clone() for p in params + [ident, text]]
    for g_ref, g_fused in zip(grads["reference"], grads["fused"]):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4)
    assert grads["fused"][-2][1].abs().max() == 0  # the masked row's identity gets no gradient
    assert grads["fused"][-2][0].abs().max() > 0
