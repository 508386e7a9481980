"""PVA inside diffusers' own ``StableDiffusionInpaintPipeline``, through its IP-Adapter inputs.

::

    from diffusers import StableDiffusionInpaintPipeline
    from pva.stock import load_pva_into

    pipe = StableDiffusionInpaintPipeline.from_pretrained("./sd2-inpainting", safety_checker=None)
    pva = load_pva_into(pipe, "pva.safetensors", face_model="./ms1mv3_arcface_r50.pth")
    face = pva.prepare("photo.jpg", mask_region="lowerface")  # the face square, model size
    out = pipe(
        prompt="photo of a <new1> person",
        negative_prompt=pva.negative_prompt,
        image=face.image,
        mask_image=face.mask,
        ip_adapter_image_embeds=[pva.image_embeds(references)],
        guidance_scale=6.0,
        num_inference_steps=100,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    photo = pva.paste(face, out)[0]  # back into the whole photo
    pva.unload()  # the stock pipeline again, exactly

This is how diffusers' IP-Adapter path carries PVA (``load_ip_adapter`` does the same for
IP-Adapter):

* ``unet.encoder_hid_proj`` becomes a ``MultiIPAdapterImageProjection`` around PVA's identity
  projection, so the UNet turns the image embeddings into identity tokens and hands every
  cross-attention the context ``(text, [identity tokens])``.
* Every ``attn2`` gets the PVA processor, reading that context.
* The ``<new1>`` token joins the tokenizer and the text encoder.
* The image embeddings are the references' face embeddings, ``(B, 1, K, E)``. A row of zeros
  means "no identity". That is diffusers' own default negative for IP-Adapters, and it is how
  the unconditional branch of ``inpaint`` mode runs plain SD2-inpainting, as the identity mask of
  :func:`pva.sampling.ddim_inpaint` does. :meth:`StockPVA.image_embeds` stacks the two branches
  as the stock pipeline wants them.

The stock pipeline and :class:`pva.pipeline.PVAInpaintPipeline` draw their random numbers in
the same order, so one image per call with the same seed gives the same picture, up to float
rounding. (With ``num_images_per_prompt > 1`` diffusers encodes the masked photo once for all
images; ``PVAInpaintPipeline`` draws one VAE sample per image.)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from PIL import Image
from torch import Tensor, nn

from pva.adapter import config_from_adapter, load_adapter, read_adapter
from pva.attention import _IdentityAttnBase
from pva.backbone import Backbone, model_resolution
from pva.face_encoders import load_face_encoder
from pva.identity import IdentityProjection
from pva.model import PVAModel
from pva.pipeline import (
    FaceJob,
    ImageInput,
    MaskRegion,
    adapter_face_model,
    paste_fills,
    prepare_face,
    reference_tensors,
)
from pva.prompts import UNCOND_PROMPT


class PVAImageProjection(nn.Module):
    """One IP-Adapter image-projection layer: face embeddings -> PVA identity tokens.

    Args:
        projection: PVA's identity projection (the adapter's ``TransformNetwork``).
    """

    def __init__(self, projection: IdentityProjection) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, embeds: Tensor) -> Tensor:
        """(B, K, E) face embeddings -> (B, n_id, D) tokens; an all-zero row gives zeros."""
        present = embeds.flatten(1).ne(0).any(1)  # (B,)
        weight = next(self.projection.parameters())
        tokens = self.projection(embeds.to(weight.device, weight.dtype))  # (B, n_id, D)
        return tokens * present.to(tokens)[:, None, None]


class StockPVAProcessor(nn.Module):
    """A PVA processor that reads diffusers' IP-Adapter context ``(text, [tokens])``.

    Identity rows that are all zeros are masked out: those rows attend to the text alone,
    exactly like the stock layer.

    Args:
        inner: The installed PVA (or decoupled) processor with the adapter's weights.
    """

    def __init__(self, inner: _IdentityAttnBase) -> None:
        super().__init__()
        self.inner = inner

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | tuple | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Split the context, mask the rows without identity, run the PVA processor."""
        if not isinstance(encoder_hidden_states, tuple):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        text, tokens = encoder_hidden_states[0], encoder_hidden_states[1][0]
        tokens = tokens.flatten(1, 2) if tokens.ndim == 4 else tokens  # (B, n_id, D)
        present = tokens.flatten(1).ne(0).any(1)  # (B,)
        ctx = torch.cat([text, tokens.to(text.dtype)], dim=1)  # (B, 77 + n_id, D)
        return self.inner(attn, hidden_states, ctx, attention_mask, temb, identity_mask=present)


class StockPVA:
    """PVA loaded into a diffusers inpainting pipeline; :meth:`unload` takes it out again.

    Made by :func:`load_pva_into`. Holds the face encoder (it is not a diffusers component) and
    what the stock pipeline looked like before, to restore it.
    """

    negative_prompt: str = UNCOND_PROMPT
    """The unconditional prompt PVA was trained and evaluated with; pass it as
    ``negative_prompt`` (diffusers' default is the empty prompt)."""

    def __init__(self, pipe: Any, model: PVAModel, saved: dict[str, Any]) -> None:
        self.pipe, self.model, self._saved = pipe, model, saved

    @property
    def modifier_token(self) -> str:
        """The person's prompt token (``<new1>``)."""
        return self.model.config.modifier_token

    def prepare(
        self,
        image: ImageInput,
        mask_image: ImageInput | None = None,
        mask_region: MaskRegion | None = None,
        generator: torch.Generator | None = None,
    ) -> FaceJob:
        """The face-centred square of a photo at the model resolution, with its mask.

        Give the result's ``image`` and ``mask`` to the pipeline and its output images to
        :meth:`paste`. Same detection, square and mask as :class:`PVAInpaintPipeline`.

        Args:
            image: The photo (path, PIL or array; any size).
            mask_image: White = fill, the photo's size. Or give ``mask_region``.
            mask_region: ``lowerface``, ``eyebrow``, ``wholeface`` or ``random``.
            generator: Randomness of the ``random`` mask.
        """
        size = model_resolution(self.pipe.unet, self.pipe.vae)
        return prepare_face(image, size, mask_image, mask_region, generator)

    def paste(
        self,
        job: FaceJob,
        images: Sequence[Image.Image],
        paste_back: bool = True,
        blend: bool = False,
    ) -> list[Image.Image]:
        """Put the pipeline's square outputs back into the photo (see ``PVAInpaintPipeline``)."""
        fills = [np.asarray(im.convert("RGB")) for im in images]
        return paste_fills(job, fills, paste_back, blend)

    @torch.no_grad()
    def image_embeds(
        self,
        reference_images: Sequence[ImageInput],
        mode: Literal["inpaint", "edit"] = "inpaint",
        do_classifier_free_guidance: bool = True,
        skip_bad_references: bool = False,
    ) -> Tensor:
        """The person's face embeddings, as ``ip_adapter_image_embeds=[...]`` takes them.

        Args:
            reference_images: Photos of the person (5 in the paper).
            mode: ``inpaint``: the unconditional branch gets no identity (zeros); ``edit``:
                both branches get it.
            do_classifier_free_guidance: Stack ``[negative; positive]`` (for guidance > 1).
            skip_bad_references: Skip photos without a face (warning) instead of failing.

        Returns:
            (2, 1, K, E) with guidance, else (1, 1, K, E).
        """
        if mode not in ("inpaint", "edit"):
            raise ValueError(f"mode must be 'inpaint' or 'edit', got {mode!r}")
        refs, _ = reference_tensors(
            reference_images, self.model.config.face_crop, skip_bad_references
        )
        encoder = self.model.identity_encoder
        weight = next(encoder.projection.parameters())
        emb = encoder.embed(refs[None].to(weight.device, weight.dtype))[:, None]  # (1, 1, K, E)
        if not do_classifier_free_guidance:
            return emb
        negative = emb if mode == "edit" else torch.zeros_like(emb)
        return torch.cat([negative, emb])  # (2, 1, K, E)

    def unload(self) -> None:
        """Restore the stock pipeline exactly: processors, weights, token, config, flags."""
        _restore(self.pipe, self._saved)
        del self.pipe._pva_stock


def _restore(pipe: Any, saved: dict[str, Any]) -> None:
    """Put back everything :func:`load_pva_into` recorded in ``saved`` (what exists of it)."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.set_attn_processor(saved["processors"])
    unet.encoder_hid_proj = saved["encoder_hid_proj"]
    unet.config.encoder_hid_dim_type = saved["encoder_hid_dim_type"]
    state = unet.state_dict()
    with torch.no_grad():
        for key, value in saved.get("weights", {}).items():
            state[key].copy_(value)
    # transformers grows the embedding table in place: give it back its own weight tensor
    table, weight, data, rows, hooks = saved["embeddings"]
    text_encoder.set_input_embeddings(table)
    table.weight = weight
    table.weight.data = data
    table.num_embeddings = rows
    for key in set(table._forward_hooks) - hooks:  # the token's hook
        del table._forward_hooks[key]
    text_encoder.config.vocab_size = saved["vocab_size"]
    pipe.tokenizer = saved["tokenizer"]
    for module, (training, grads) in saved["flags"].items():
        module.train(training)
        for p, g in zip(module.parameters(), grads):
            p.requires_grad_(g)


def load_pva_into(
    pipe: Any, adapter: str | os.PathLike, face_model: str | os.PathLike | None = None
) -> StockPVA:
    """Load a PVA adapter into diffusers' ``StableDiffusionInpaintPipeline`` (in place).

    The adapter is checked as :meth:`PVAInpaintPipeline.load_pva` checks it (backbone, variant,
    face encoder, every tensor's shape); a personalized adapter's fine-tuned cross-attention
    weights are written into the UNet and restored by :meth:`StockPVA.unload`.

    Args:
        pipe: A ``StableDiffusionInpaintPipeline`` (SD2-inpainting, 9-channel UNet).
        adapter: Adapter ``.safetensors`` (training or ``pva personalize`` output).
        face_model: The conditioning face encoder (arcface_torch ``.pth``, InsightFace ``.onnx``
            or ``dlib``); default: the one the adapter records.

    Returns:
        The handle: :meth:`StockPVA.image_embeds`, :meth:`StockPVA.prepare`,
        :meth:`StockPVA.paste`, :meth:`StockPVA.unload`.
    """
    if getattr(pipe, "_pva_stock", None) is not None:
        raise RuntimeError("a PVA adapter is already loaded into this pipeline: unload() it first")
    unet = pipe.unet
    if getattr(unet.config, "encoder_hid_dim_type", None) is not None:
        raise ValueError(
            f"the pipeline's UNet already has an encoder_hid_proj "
            f"({unet.config.encoder_hid_dim_type}): unload the IP-Adapter first"
        )
    read = read_adapter(adapter)  # the file is read once
    header = read[1]
    config = config_from_adapter(header)
    if config.modifier_token in pipe.tokenizer.get_vocab():
        raise ValueError(
            f"the pipeline's tokenizer already has {config.modifier_token}: unload that textual "
            "inversion first"
        )
    face_model = adapter_face_model(adapter, header, face_model)
    modules = (pipe.vae, pipe.text_encoder, unet)
    table = pipe.text_encoder.get_input_embeddings()
    saved: dict[str, Any] = {
        "processors": dict(unet.attn_processors),
        "encoder_hid_proj": unet.encoder_hid_proj,
        "encoder_hid_dim_type": unet.config.encoder_hid_dim_type,
        "tokenizer": pipe.tokenizer,
        "embeddings": (
            table,
            table.weight,
            table.weight.data,
            table.num_embeddings,
            set(table._forward_hooks),
        ),
        "vocab_size": pipe.text_encoder.config.vocab_size,
        "flags": {m: (m.training, [p.requires_grad for p in m.parameters()]) for m in modules},
    }
    tokenizer = copy.deepcopy(pipe.tokenizer)  # the token is added to a copy; unload swaps back
    backbone = Backbone(pipe.vae, pipe.text_encoder, tokenizer, unet, pipe.scheduler)
    try:
        model = PVAModel(backbone, load_face_encoder(face_model), config)
        state = model.state_dict()
        saved["weights"] = {
            key.removeprefix("unet."): state[key].detach().clone()
            for key in read[0]
            if key.startswith("unet.") and not model.is_adapter_key(key) and key in state
        }
        load_adapter(model, adapter, read)
    except Exception:
        _restore(pipe, saved)  # leave the pipeline as it was
        raise
    model.eval()
    model.identity_encoder.to(unet.device)  # load after moving the pipeline to its device
    model.modifier_token.to(pipe.text_encoder.device)
    projection = model.identity_encoder.projection
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([PVAImageProjection(projection)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    wrapped = {
        name: StockPVAProcessor(proc) if isinstance(proc, _IdentityAttnBase) else proc
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(wrapped)
    pipe.tokenizer = tokenizer
    handle = StockPVA(pipe, model, saved)
    pipe._pva_stock = handle
    return handle
