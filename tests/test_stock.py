"""PVA inside diffusers' own StableDiffusionInpaintPipeline: same picture, exact unloading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FACES

from pva.adapter import AdapterMismatchError, save_adapter
from pva.attention import identity_processors
from pva.backbone import load_backbone
from pva.model import PVAModel
from pva.pipeline import PVAInpaintPipeline
from pva.stock import load_pva_into
from pva.tiny import tiny_pva_config

PERSON = FACES / "deepface/id01_img1"
TARGET = PERSON / "img1.jpg"
REFS = sorted(PERSON.iterdir())[1:5]
PROMPT = "photo of a <new1> person, smiling"


@pytest.fixture(scope="module")
def adapter(tiny_assets, tmp_path_factory):
    """A personalized (CrossQKV-FT) adapter: PVA weights and the attn2 to_k/to_v perturbed."""
    model = PVAModel.from_paths(tiny_assets.backbone, tiny_assets.face_model, tiny_pva_config())
    g = torch.Generator().manual_seed(0)
    extra = [k for k in model.state_dict() if ".attn2.to_k." in k or ".attn2.to_v." in k]
    with torch.no_grad():
        for _, proc in identity_processors(model.unet):
            for p in proc.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        state = model.state_dict()
        for k in extra:
            state[k].add_(torch.randn(state[k].shape, generator=g) * 0.05)
    root = tmp_path_factory.mktemp("stock")
    return save_adapter(model, root / "adapter.safetensors", extra_keys=extra)


def _snapshot(pipe):
    """Everything loading may touch: weights, processors, config, token table, flags."""
    unet, te = pipe.unet, pipe.text_encoder
    return {
        "unet": {k: v.clone() for k, v in unet.state_dict().items()},
        "text": {k: v.clone() for k, v in te.state_dict().items()},
        "processors": {k: type(v) for k, v in unet.attn_processors.items()},
        "hid": (unet.encoder_hid_proj, unet.config.encoder_hid_dim_type, dict(unet.config)),
        "tokenizer": (len(pipe.tokenizer), pipe.tokenizer.get_vocab()),
        "vocab": te.config.vocab_size,
        "grads": [p.requires_grad for m in (unet, te, pipe.vae) for p in m.parameters()],
    }


def _same(a, b) -> bool:
    tensors = all(
        a[g].keys() == b[g].keys() and all(torch.equal(a[g][k], b[g][k]) for k in a[g])
        for g in ("unet", "text")
    )
    rest = ("processors", "hid", "tokenizer", "vocab", "grads")
    return tensors and all(a[k] == b[k] for k in rest)


def _stock_call(pipe, job, embeds, **kw):
    size = job.image.size[0]
    return pipe(
        image=job.image,
        mask_image=job.mask,
        height=size,
        width=size,
        ip_adapter_image_embeds=None if embeds is None else [embeds],
        num_inference_steps=4,
        eta=1.0,
        **kw,
    ).images


@pytest.mark.parametrize(("mode", "guidance"), [("inpaint", 6.0), ("edit", 6.0), ("inpaint", 1.0)])
def test_the_stock_pipeline_with_pva_gives_pva_pipeline_picture(
    tiny_assets, adapter, mode, guidance
):
    ours = PVAInpaintPipeline.from_pretrained(tiny_assets.backbone).load_pva(adapter)
    expected = ours(
        TARGET,
        mask_region="lowerface",
        reference_images=REFS,
        prompt=PROMPT,
        mode=mode,
        guidance_scale=guidance,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(7),
    ).images[0]

    stock = load_backbone(tiny_assets.backbone).stock_pipeline()
    before = _snapshot(stock)
    pva = load_pva_into(stock, adapter)
    job = pva.prepare(TARGET, mask_region="lowerface")
    embeds = pva.image_embeds(REFS, mode=mode, do_classifier_free_guidance=guidance > 1)
    assert embeds.shape[:2] == ((2, 1) if guidance > 1 else (1, 1))

    def filled(image_embeds) -> np.ndarray:
        """The stock pipeline's picture at seed 7, pasted back into the photo."""
        out = _stock_call(
            stock,
            job,
            image_embeds,
            prompt=PROMPT,
            negative_prompt=pva.negative_prompt,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(7),
        )
        return np.asarray(pva.paste(job, out)[0]).astype(int)

    got = filled(embeds)
    want = np.asarray(expected).astype(int)
    inside = job.full_mask
    # float rounding only: at most 1 level in a few pixels
    assert np.abs(got - want).max() <= 1
    assert (np.abs(got - want) > 0).mean() < 0.01
    assert np.array_equal(got[~inside], want[~inside])  # both pasted back

    # the identity matters: without it (zero embeddings) the stock pipeline draws another fill
    plain_img = filled(torch.zeros_like(embeds))
    assert np.abs(plain_img - want)[inside].mean() > 0.1  # 10x what rounding can account for

    pva.unload()
    assert _same(before, _snapshot(stock))


def test_unloading_restores_the_stock_pipeline_exactly(tiny_assets, adapter):
    stock = load_backbone(tiny_assets.backbone).stock_pipeline()
    job = PVAInpaintPipeline.from_pretrained(tiny_assets.backbone)  # for the square's size only
    size = job.resolution
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 2 :, size // 4 : 3 * size // 4] = 255
    kw = dict(
        prompt="photo of a person",
        image=image,
        mask_image=Image.fromarray(mask),
        height=size,
        width=size,
        num_inference_steps=3,
    )

    def run():
        return np.asarray(stock(generator=torch.Generator().manual_seed(1), **kw).images[0])

    before_out, before = run(), _snapshot(stock)
    pva = load_pva_into(stock, adapter)
    assert stock.tokenizer.convert_tokens_to_ids("<new1>") == len(before["tokenizer"][1])
    assert not _same(before, _snapshot(stock))  # the CrossQKV-FT weights are in the UNet
    with pytest.raises(RuntimeError, match="already loaded"):
        load_pva_into(stock, adapter)
    pva.unload()
    assert _same(before, _snapshot(stock))
    assert np.array_equal(run(), before_out)  # bit for bit


def test_a_refused_adapter_leaves_the_pipeline_untouched(tiny_assets, adapter, tmp_path):
    stock = load_backbone(tiny_assets.backbone).stock_pipeline()
    before = _snapshot(stock)
    other = tmp_path / "other_face.pth"
    from pva.identity import save_iresnet
    from pva.tiny import build_tiny_face_model

    save_iresnet(build_tiny_face_model(num_features=32), other)  # another embedding width
    with pytest.raises(AdapterMismatchError, match="face_embed_dim"):
        load_pva_into(stock, adapter, face_model=other)
    assert _same(before, _snapshot(stock))
    assert getattr(stock, "_pva_stock", None) is None
    load_pva_into(stock, adapter).unload()  # and it still loads afterwards
