"""Adapter files: bit-exact round trip, refusal of files that do not fit, safe format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pva.adapter import (
    AdapterMismatchError,
    config_from_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
)
from pva.backbone import build_tiny_backbone
from pva.model import PVAModel
from pva.tiny import build_tiny_face_model, tiny_pva_config


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in model.parameter_groups().values():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g))


def test_round_trip_is_bit_exact(make_model, tmp_path):
    a = make_model()
    _randomize(a)
    path = save_adapter(a, tmp_path / "a.safetensors")
    b = make_model()
    header = load_adapter(b, path)
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 0
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert header["contents"] == ["projection", "pva", "token"]
    assert header["backbone"]["cross_attention_dim"] == 32
    # the file holds only adapter tensors and a JSON header
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["pva"])
    assert keys == set(sa) and meta["format"] == "pva-adapter"
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in keys)
    assert config_from_adapter(path) == a.config


def test_stage2_adapter_carries_the_face_backbone(make_model, tmp_path):
    a = make_model(train_face_backbone=True)
    _randomize(a)
    path = save_adapter(a, tmp_path / "s2.safetensors")
    _, header = read_adapter(path)
    assert "face_backbone" in header["contents"]
    b = make_model()  # a stage-1 model still receives the fine-tuned face backbone
    load_adapter(b, path)
    wa = a.identity_encoder.backbone.conv1.weight
    assert torch.equal(wa, b.identity_encoder.backbone.conv1.weight)


def test_a_file_for_another_backbone_width_is_refused(make_model, tmp_path):
    wide = PVAModel(
        build_tiny_backbone(cross_attention_dim=48),
        build_tiny_face_model(),
        tiny_pva_config(),
    )
    path = save_adapter(wide, tmp_path / "wide.safetensors")
    with pytest.raises(AdapterMismatchError, match="cross_attention_dim=48 \\(this model: 32\\)"):
        load_adapter(make_model(), path)


def test_variant_mismatch_and_foreign_files_are_refused(make_model, tmp_path):
    path = save_adapter(make_model(variant="decoupled"), tmp_path / "d.safetensors")
    with pytest.raises(AdapterMismatchError, match="'decoupled'.*'pva'"):
        load_adapter(make_model(), path)
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterMismatchError, match="no PVA adapter header"):
        read_adapter(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterMismatchError, match="junk.safetensors"):
        read_adapter(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_adapter(tmp_path / "nope.safetensors")


def test_shape_mismatch_names_the_tensor(make_model, tmp_path):
    model = make_model()
    path = save_adapter(model, tmp_path / "a.safetensors")
    tensors, header = read_adapter(path)
    tensors["modifier_token.embedding"] = torch.zeros(7)
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"pva": json.dumps(header)})
    with pytest.raises(AdapterMismatchError, match="modifier_token.embedding.*\\(7,\\)"):
        load_adapter(model, tmp_path / "bad.safetensors")


def test_save_refuses_to_overwrite(make_model, tmp_path):
    model = make_model()
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_adapter(model, tmp_path / "a.safetensors")
    save_adapter(model, tmp_path / "a.safetensors", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp files left
