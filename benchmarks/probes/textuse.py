"""``pva bench text-use``: does a ``pva demo`` stand-in backbone use its text prompt?

PVA's pathway is a copy of the backbone's text cross-attention (METHOD 3: Wq', Wk', Wv' start as
copies of Wq, Wk, Wv and share the pretrained output projection). On SD2 that attention carries
what the prompt says into the picture. A stand-in whose UNet ignores its text leaves the copy
nothing to build on, so this benchmark measures it on a finished demo run:

1. **Text-encoder spread**: how much the token features of a caption differ across positions and
   from ``photo of a person``'s, for the run's text encoder and for a freshly initialised one. A
   text encoder that collapsed to near-constant features has nothing left for the UNet to read.
2. **Oracle captions**: the backbone inpaints validation photos (eyebrow, lowerface and wholeface
   boxes, DDIM, paste-back on) once with ``photo of a person`` and once with
   ``photo of a person. <the photo's caption>``, which names every attribute the masks hide.
   Both are scored by the run's scoring recognizer (identity to the ground truth) and by the
   masked-region error. A backbone that uses its text scores higher with the caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pva.checks import GUIDANCE, POSITIVE_INT, check_ranges
from pva.data.masks import box_mask
from pva.model import PVAModel
from pva.prompts import UNCOND_PROMPT

REGIONS = ("eyebrow", "lowerface", "wholeface")


def _token_spread(tokenizer, text_encoder, caption: str) -> dict[str, float]:
    """Spread of one caption's token features, relative to their overall std."""
    ids = tokenizer(
        [f"{UNCOND_PROMPT}. {caption}", UNCOND_PROMPT],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (2, 77)
    n = int((ids[0] != ids[1]).nonzero().max()) + 1  # tokens up to the caption's end
    feats = text_encoder(ids)[0][:, :n].float()  # (2, n, D)
    scale = float(feats[0].std())
    return {
        "across_positions": float(feats[0].std(0).mean()) / scale,
        "caption_vs_plain": float((feats[0] - feats[1]).norm() / feats[0].norm()),
    }


@torch.no_grad()
def text_use(
    run: str | Path,
    backbone: str | Path | None = None,
    persons: int = 16,
    photos_per_person: int = 3,
    guidance: tuple[float, ...] = (1.0, 4.0),
    steps: int = 25,
    seed: int = 0,
) -> dict:
    """Measure how much a demo backbone's inpainting follows its text (see the module doc).

    Args:
        run: A ``pva demo --out`` folder (its shards, ``models/face_cond.pth`` and
            ``models/face_score.pth`` are used).
        backbone: Backbone folder to measure (default: ``RUN/models/backbone``).
        persons: Validation persons.
        photos_per_person: Photos per person (each inpainted under every region box).
        guidance: CFG scales to sample with (the unconditional branch is ``photo of a person``).
        steps: DDIM steps.
        seed: Seed of the sampling noise.

    Returns:
        ``{"spread": {...}, "spread_init": {...}, "guidance": {g: {"plain" | "caption":
        {"identity": {region: mean}, "identity_mean", "masked_error"}}}}``.
    """
    from pva.backbone import build_tiny_backbone
    from pva.demo import stage0
    from pva.recognizers import IResNetRecognizer
    from pva.sampling import ddim_inpaint
    from pva.tiny import tiny_pva_config

    if persons < 1 or photos_per_person < 1:
        raise ValueError(
            f"persons and photos_per_person must be >= 1, got {persons} and {photos_per_person}"
        )
    run = Path(run)
    backbone = Path(backbone) if backbone is not None else run / "models" / "backbone"
    for path in (
        backbone,
        run / "models" / "face_cond.pth",
        run / "models" / "face_score.pth",
        run / "shards",
    ):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pass a finished `pva demo --out` folder")
    config = tiny_pva_config(face_crop="none", attention_impl="reference")
    model = PVAModel.from_paths(backbone, run / "models" / "face_cond.pth", config).eval()
    scorer = IResNetRecognizer(run / "models" / "face_score.pth")
    val = stage0.load_photos(str(run / "shards"), ("val",))
    idx = []
    for label in range(min(persons, len(val.persons))):
        idx += (val.labels == label).nonzero().flatten().tolist()[:photos_per_person]
    size = val.images.shape[-1]
    images = val.images[idx].repeat_interleave(len(REGIONS), 0)  # (N, 3, S, S)
    masks = torch.stack(
        [
            torch.from_numpy(box_mask(size, val.boxes[i][r]))[None].float()
            for i in idx
            for r in REGIONS
        ]
    )  # (N, 1, S, S)
    landmarks = np.repeat(val.landmarks[idx], len(REGIONS), 0)  # (N, 68, 2)
    captions = [f"{UNCOND_PROMPT}. {val.captions[i]}" for i in idx for _ in REGIONS]
    fresh = build_tiny_backbone(0).text_encoder  # the stage-0 text encoder before training
    caption = val.captions[idx[0]]
    out: dict = {
        "spread": _token_spread(model.tokenizer, model.text_encoder, caption),
        "spread_init": _token_spread(model.tokenizer, fresh, caption),
        "guidance": {},
    }
    for g in guidance:
        row = {}
        for name, prompts in (("plain", [UNCOND_PROMPT] * len(images)), ("caption", captions)):
            filled = torch.cat(
                [
                    ddim_inpaint(
                        model,
                        images[s : s + 48],
                        masks[s : s + 48],
                        None,
                        prompts[s : s + 48],
                        guidance_scale=g,
                        num_steps=steps,
                        generator=torch.Generator().manual_seed(seed),
                        paste_back=True,
                    )
                    for s in range(0, len(images), 48)
                ]
            )  # (N, 3, S, S)
            sims = scorer.similarity(filled, images, landmarks).view(-1, len(REGIONS))
            err = (filled - images).abs().mean(1, keepdim=True).mul(masks).sum() / masks.sum() / 2
            row[name] = {
                "identity": dict(zip(REGIONS, sims.mean(0).tolist())),
                "identity_mean": float(sims.mean()),
                "masked_error": float(err),
            }
        out["guidance"][g] = row
    return out


RANGES = {"persons": POSITIVE_INT, "guidance": GUIDANCE}


def bench_text_use(
    run: str,
    backbone: str | None = None,
    persons: int = 16,
    guidance: Sequence[float] = (1.0, 4.0),
) -> dict:
    """Does a ``pva demo`` stand-in backbone use its text? (oracle captions vs plain prompt).

    A research probe: prints :func:`text_use`'s figures as tables and returns them.

    Args:
        run: A finished ``pva demo --out`` folder.
        backbone: Backbone folder to measure (default: RUN/models/backbone).
        persons: Validation persons.
        guidance: Classifier-free guidance scales.
    """
    check_ranges("--", locals(), RANGES)
    res = text_use(run, backbone, persons=persons, guidance=guidance)
    s, s0 = res["spread"], res["spread_init"]
    print("text-encoder token features (relative to their std)\n")
    print("| text encoder | spread across positions | caption vs `photo of a person` |")
    print("|---|---|---|")
    print(f"| this backbone | {s['across_positions']:.3f} | {s['caption_vs_plain']:.3f} |")
    print(f"| fresh random init | {s0['across_positions']:.3f} | {s0['caption_vs_plain']:.3f} |")
    print("\ninpainting validation photos, `photo of a person` vs + the ground-truth caption\n")
    print("| guidance | prompt | identity | " + " | ".join(REGIONS) + " | masked error |")
    print("|---|---|---|" + "---|" * len(REGIONS) + "---|")
    for g, row in res["guidance"].items():
        for name, r in row.items():
            cells = " | ".join(f"{r['identity'][k]:.3f}" for k in REGIONS)
            print(
                f"| {g:g} | {name} | {r['identity_mean']:.3f} | {cells} | {r['masked_error']:.4f} |"
            )
    return res
