"""Backbone loading through the real loader, and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pva.backbone import BackboneNotFoundError, build_tiny_backbone, load_backbone


def test_tiny_backbone_round_trips_through_the_real_loader(tiny_assets):
    loaded = load_backbone(tiny_assets.backbone)
    fresh = build_tiny_backbone(seed=0)
    for a, b in ((loaded.unet, fresh.unet), (loaded.vae, fresh.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.unet.config.in_channels == 9
    assert loaded.tokenizer.model_max_length == 77
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert not loaded.unet.training
    ids = loaded.tokenizer("photo of a person").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # real CLIP BPE: <start> ... <end>
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"


def test_missing_folder_names_the_path_and_where_to_get_it(tmp_path):
    with pytest.raises(
        BackboneNotFoundError, match="does not exist.*stable-diffusion-2-inpainting"
    ):
        load_backbone(tmp_path / "nope")


def test_uncached_hub_id_fails_without_downloading(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BackboneNotFoundError, match="not.*cache"):
        load_backbone("someone/not-a-cached-model")


def test_incomplete_folder_lists_every_missing_file(tiny_assets, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_assets.backbone, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(BackboneNotFoundError) as err:
        load_backbone(broken)
    assert "unet/diffusion_pytorch_model.safetensors" in str(err.value)
    assert "tokenizer/" in str(err.value)


def test_a_non_inpainting_unet_is_refused(tiny_assets, tmp_path):
    other = tmp_path / "txt2img"
    shutil.copytree(tiny_assets.backbone, other)
    cfg_path = other / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises((ValueError, RuntimeError), match="in_channels|size mismatch"):
        load_backbone(other)


def test_save_refuses_to_overwrite(tiny_assets):
    with pytest.raises(FileExistsError):
        build_tiny_backbone().save_pretrained(tiny_assets.backbone)
