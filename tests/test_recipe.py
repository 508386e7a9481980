"""The authors' recipe, point by point (AtlantixJJ/PVA-CelebAHQ-IDI at 59d75af, METHOD 6-8)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_batch
from data_fixtures import authors_bbox

from pva.attention import identity_processors
from pva.faces import region_box
from pva.module import PVAModule
from pva.personalize import personalized, trainable_for
from pva.prompts import EDIT_SUFFIXES
from pva.tiny import tiny_pva_config


def _stage_module(name: str, tiny_assets) -> tuple[dict, PVAModule]:
    """A shipped stage config's trainer/data/model sections, its model on the tiny assets."""
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    model = dict(cfg["model"])
    pva = tiny_pva_config(**model.pop("pva"))
    model.update(backbone=str(tiny_assets.backbone), face_model=str(tiny_assets.face_model))
    model["init_adapter"] = None  # stage 2 starts from stage 1's file; not needed for the rates
    batch = cfg["data"]["init_args"]["batch_size"]
    return cfg, PVAModule(**model, pva=pva, batch_size=batch)


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml"])
def test_a_stage_step_is_two_images_by_four_timesteps_and_the_rate_scales_as_the_reference(
    name, tiny_assets
):
    cfg, module = _stage_module(name, tiny_assets)
    accumulate = cfg["trainer"].get("accumulate_grad_batches", 1)
    # script/pva_train.py:166-182: one optimizer step per data batch of 2, 4 timestep resamples
    unet_samples_per_step = (
        cfg["data"]["init_args"]["batch_size"] * cfg["model"]["timestep_draws"] * accumulate
    )
    assert unet_samples_per_step == 2 * 4
    for gpus in (1, 8, 16):  # pva_train.py:85-87: lr 1e-6 x 2 x GPUs x 4
        module._trainer = SimpleNamespace(world_size=gpus, accumulate_grad_batches=accumulate)
        groups = {g["name"]: g["lr"] for g in module.configure_optimizers().param_groups}
        assert groups["pva"] == pytest.approx(1e-6 * 2 * gpus * 4)
        assert module.effective_lrs["pva"] == groups["pva"]  # the logged lr_effective/pva
        assert groups["projection"] == pytest.approx(3.2e-5)
        assert groups["token"] == pytest.approx(1e-3)
        if name == "stage2.yaml":  # lib/pva.py:319-325: the face net gets the scaled main rate
            assert groups["face_backbone"] == pytest.approx(groups["pva"])
        else:
            assert "face_backbone" not in groups


def test_region_boxes_are_the_authors_lowerface_is_jaw_points_1_to_15():
    rng = np.random.default_rng(0)
    for _ in range(40):
        lm = rng.uniform(-50, 1074, (68, 2))  # boxes that clip at the edges too
        authors = {  # create_bbox's point sets; lowerface = lm[1:16] (lib/dataset.py:97)
            "leye": lm[36:42],
            "reye": lm[43:48],
            "eye": lm[36:48],
            "eyebrow": np.concatenate([lm[17:27], lm[36:48]]),
            "lowerface": lm[1:16],
            "wholeface": lm,
            "mouth": lm[48:68],
            "nose": lm[27:36],
        }
        for region, points in authors.items():
            row0, col0, row1, col1 = authors_bbox(points, 1024)
            assert region_box(lm, region, (1024, 1024)) == (col0, row0, col1, row1), region


def test_the_editing_prompts_are_the_authors():
    # lib/dataset.py PROMPT_TEMPLATES_CONTROL, in order
    assert EDIT_SUFFIXES == (
        "laughing",
        "serious",
        "smiling",
        "looking sad",
        "angry",
        "surprised",
        "has beard",
        "with heavy makeup",
        "wearing lipstick",
        "making a funny face",
        "putting the tongue out",
        "singing with a microphone",
        "smoking, has a cigarette",
        "wearing eyeglasses",
        "wearing sunglasses",
    )


def test_fine_tuned_parameters_per_variant(make_model):
    model = make_model()
    layers = [("unet." + n).removesuffix(".processor") for n, _ in identity_processors(model.unet)]
    named = dict(model.named_parameters())

    def of(*parts: str) -> set[str]:
        return {
            k
            for k in named
            for layer in layers
            for part in parts
            if k.startswith(f"{layer}.{part}.")
        }

    visual = of("processor")
    assert visual and of("to_out.0")  # the output projection has weight and bias
    expected = {
        "pva": visual,
        "crossqkv": visual | of("to_q", "to_k", "to_v", "to_out.0"),  # lib/pva.py:365-367
        "custom-diffusion": of("to_q", "to_k", "to_v", "to_out.0"),  # --freeze_model crossattn
        "custom-diffusion-kv": of("to_k", "to_v"),  # crossattn_kv
    }
    for variant, keys in expected.items():
        groups = trainable_for(model, variant)
        assert {k for k, _ in groups["attention"]} == keys, variant
        assert [k for k, _ in groups["token"]] == ["modifier_token.embedding"]


def test_fine_tuning_references_are_the_others_flipped_plus_a_flipped_last():
    from pva.personalize import fine_tune_references

    draws = [fine_tune_references(5, 2, torch.Generator().manual_seed(s)) for s in range(200)]
    for refs in draws:
        assert len(refs) == 5  # K = 5 (lib/pva.py:689)
        assert sorted(i for i, _ in refs[:4]) == [0, 1, 3, 4]  # the other photos, shuffled
        assert refs[4] == (refs[3][0], not refs[3][1])  # a flipped copy of the last
    flips = [f for refs in draws for _, f in refs[:4]]
    assert 0.4 < np.mean(flips) < 0.6  # each flipped with p=0.5 (lib/dataset.py:166-170)
    assert len({tuple(i for i, _ in refs[:4]) for refs in draws}) > 10


def test_fine_tuning_rate_and_what_the_identity_encoder_sees(make_model, monkeypatch):
    model = make_model(face_crop="none")
    batch = make_batch(batch_size=4, num_refs=1)  # 4 distinct random photos of "a person"
    photos, boxes = batch["image"], [(16, 16, 48, 48)] * 4
    seen: list[torch.Tensor] = []
    embed = model.identity_encoder.embed

    def spy(references):
        seen.append(references[0, 0].detach().clone())  # one reference per call
        return embed(references)

    monkeypatch.setattr(model.identity_encoder, "embed", spy)
    rates = []
    adamw = torch.optim.AdamW

    class Recording(adamw):
        def __init__(self, groups, **kw):
            rates.append([g["lr"] for g in groups])
            super().__init__(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    with personalized(model, photos, photos, boxes, steps=1, reuse_encodings=False):
        pass
    assert rates == [[pytest.approx(2e-5), pytest.approx(1e-3)]]  # 1e-5 x batch 1 x 2 draws
    assert len(seen) == 4  # target 0: the 3 others, then a flipped copy of the last
    for ref in seen:
        assert any(torch.equal(ref, p) or torch.equal(ref, p.flip(-1)) for p in photos[1:])
    assert torch.equal(seen[3], seen[2].flip(-1))
