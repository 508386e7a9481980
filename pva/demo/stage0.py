"""Stage 0 of ``pva demo``: small stand-ins for the pretrained models PVA builds on.

The paper starts from Stable Diffusion 2 inpainting and an ArcFace recognizer, both pretrained on
data far larger than CelebAHQ-IDI. Nothing can be downloaded here, so the demo trains miniatures
on the procedural training persons, then freezes them:

* :func:`train_vae`: a small ``AutoencoderKL`` (4x downsampling, 4 latent channels);
* :func:`train_backbone`: a 9-channel inpainting ``UNet2DConditionModel`` and a CLIP text encoder
  trained together on the inpainting objective with captions and NO references (the stand-in for
  SD2-inpainting: it can only guess what a mask hides);
* :func:`train_recognizer`: arcface_torch IResNets trained with a CosFace margin on person
  labels: one conditions PVA, a different one (architecture, seed, input view) only scores.

Each is written in the real on-disk format and loaded back by the real loaders.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

from datamodules.shards import ShardDataModule
from pva.backbone import Backbone, build_tiny_backbone
from pva.data.masks import box_mask, training_mask
from pva.data.reader import decode_jpeg
from pva.faces import align_face
from pva.identity import IResNet
from pva.prompts import UNCOND_PROMPT


@dataclass
class PhotoSet:
    """Every photo of some splits, decoded once into memory.

    Attributes:
        images: (N, 3, S, S) in [-1, 1].
        faces: (N, 3, 112, 112) aligned faces from the shards (the conditioning view).
        landmarks: (N, 68, 2) in S-pixel coordinates.
        boxes: N dicts of region boxes.
        captions: N captions (``""`` when absent).
        labels: (N,) person index.
        persons: Person id per label.
    """

    images: Tensor
    faces: Tensor
    landmarks: np.ndarray
    boxes: list[dict]
    captions: list[str]
    labels: Tensor
    persons: list[str]


def load_photos(shards: str, splits: tuple[str, ...] = ("train",)) -> PhotoSet:
    """Decode every photo of ``splits`` from shards written by ``pva shards build``."""
    dm = ShardDataModule(shards, num_workers=0)
    images, faces, landmarks, boxes, captions, labels, persons = [], [], [], [], [], [], []
    for split in splits:
        for rec in dm.records(split):
            persons.append(rec.meta["person"])
            for i, entry in enumerate(rec.meta["images"]):
                images.append(decode_jpeg(rec.img[i]))
                faces.append(decode_jpeg(rec.face[i]))
                landmarks.append(np.asarray(entry["landmarks"], dtype=np.float32))
                boxes.append(entry["boxes"])
                captions.append(entry.get("caption") or "")
                labels.append(len(persons) - 1)
    if not images:
        raise ValueError(f"no photos in splits {splits} of '{shards}'")
    return PhotoSet(
        torch.stack(images),
        torch.stack(faces),
        np.stack(landmarks),
        boxes,
        captions,
        torch.tensor(labels),
        persons,
    )


def _steps(steps: int, desc: str, progress: bool, position: int | None = None) -> Iterator[int]:
    if not progress:
        return iter(range(steps))
    from tqdm.auto import tqdm

    return iter(tqdm(range(steps), desc=desc, unit="step", leave=False, position=position))


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, steps: int) -> None:
    warm = max(1, steps // 20)
    scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups:
        g["lr"] = base * max(scale, 0.02)


def _constant_then_decay(opt: torch.optim.Optimizer, base: float, step: int, steps: int) -> None:
    """Constant ``base``, then a linear decay to 5% over the last 15% of the steps.

    A parameter group with an ``lr_scale`` entry runs at ``base * lr_scale``.
    """
    start = int(0.85 * steps)
    scale = 1.0 if step < start else 1.0 - 0.95 * (step - start) / max(1, steps - start)
    for g in opt.param_groups:
        g["lr"] = base * scale * g.get("lr_scale", 1.0)


def train_vae(
    images: Tensor,
    steps: int = 1200,
    batch_size: int = 16,
    crop: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    single_thread_steps: int = 0,
) -> AutoencoderKL:
    """Train a small ``AutoencoderKL`` on random crops (it is fully convolutional).

    It is trained as a deterministic autoencoder (L1 + MSE reconstruction of the posterior mean),
    then its log-variance output is pinned to -20 (std 4.5e-5), so the posterior samples that
    :meth:`pva.model.PVAModel.encode_latents` draws equal the mean to 1e-4. The latent scaling
    factor is set to 1 / (std of the training latents), as SD's 0.18215 was chosen.

    Args:
        images: (N, 3, S, S) in [-1, 1].
        steps: Optimizer steps.
        batch_size: Crops per step.
        crop: Crop side (a multiple of 4).
        lr: Adam learning rate (constant, then decayed over the last 15% of the steps).
        seed: Seed of weights and sampling.
        progress: Show a progress bar.
        single_thread_steps: Run the first this many steps on one thread (leaving the other
            cores to work beside it), then on the thread count this was called with. A fixed
            count, so the result does not depend on how long the other work takes.
    """
    vae = build_tiny_backbone(seed).vae.train()
    for p in vae.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr, fused=True)
    n, size = images.shape[0], images.shape[-1]
    threads = torch.get_num_threads()
    try:
        for step in _steps(steps, "stage 0: VAE", progress):
            if step == 0 and single_thread_steps > 0:
                torch.set_num_threads(1)
            elif step == single_thread_steps:
                torch.set_num_threads(threads)
            _constant_then_decay(opt, lr, step, steps)
            idx = torch.randint(n, (batch_size,), generator=gen)
            ys = torch.randint(0, size - crop + 1, (batch_size,), generator=gen)
            xs = torch.randint(0, size - crop + 1, (batch_size,), generator=gen)
            x = torch.stack(
                [images[i, :, y : y + crop, x0 : x0 + crop] for i, y, x0 in zip(idx, ys, xs)]
            )  # (B, 3, crop, crop)
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    vae.eval().requires_grad_(False)
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0.0  # rows c..2c of quant_conv produce the log-variance
        vae.quant_conv.bias[c:] = -20.0
        lat = torch.cat(
            [vae.encode(images[i : i + 64]).latent_dist.mean for i in range(0, min(n, 512), 64)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


def _masks(boxes: list[dict], size: int, rng: random.Random, full_prob: float) -> Tensor:
    """Training masks (strokes + one region box), or the whole image with ``full_prob``."""
    out = []
    for b in boxes:
        if rng.random() < full_prob:
            m = box_mask(size, (0, 0, size, size))
        else:
            m = training_mask(size, b, rng)[0]
        out.append(torch.from_numpy(m)[None].float())
    return torch.stack(out)  # (B, 1, S, S)


def train_backbone(
    vae: AutoencoderKL,
    photos: PhotoSet,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 3e-3,
    caption_prob: float = 0.5,
    text_dropout: float = 0.1,
    full_mask_prob: float = 0.1,
    min_snr_gamma: float = 5.0,
    text_lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Backbone:
    """Train the inpainting UNet (and the text encoder) with ``vae`` frozen, without references.

    Same conditioning as SD2-inpainting (and :class:`~pva.model.PVAModel`): noisy latent, the
    mask downsampled by nearest neighbour, and the latent of the image with the hole set to 0.
    Prompts: ``photo of a person``, plus ``. <caption>`` with ``caption_prob``; ``""`` with
    ``text_dropout`` (for classifier-free guidance). Masks: METHOD 6's strokes + region box, or
    the whole image with ``full_mask_prob``. Epsilon MSE at uniform timesteps, each sample
    weighted by ``min(SNR, min_snr_gamma) / SNR`` (Min-SNR weighting, Hang et al. 2023: the
    low-noise steps, whose large epsilon errors barely matter to sampling, stop dominating; 0
    turns it off); AdamW at ``lr``, decayed over the last 15% of the steps; gradients clipped to
    norm 1. The text encoder trains with the UNet at ``text_lr`` (default: ``lr``) or stays at its
    random initialisation with ``text_lr=0``.

    What the stand-in does NOT do (BENCHMARKS.md, "The stand-in backbone ignores its text"): use
    its prompt much. Trained jointly, the text encoder collapses to near-constant token
    features, and even with it frozen the UNet barely reads a caption that names every hidden
    attribute; SD2's UNet, trained much longer on captioned data, does.

    Why it matters here: a stand-in that is far from converged leaves PVA's stage 1 a lot of
    reference-independent denoising to learn, which its identity pathway then spends its steps on
    and classifier-free guidance amplifies (BENCHMARKS.md, "Why the zero-shot claim was fragile").

    Returns:
        A frozen :class:`~pva.backbone.Backbone` (tokenizer and DDIM scheduler included).
    """
    if min_snr_gamma < 0:
        raise ValueError(f"min_snr_gamma must be >= 0 (0: no weighting), got {min_snr_gamma}")
    bb = build_tiny_backbone(seed)
    bb.vae = vae
    if text_lr is None:
        text_lr = lr
    if text_lr < 0:
        raise ValueError(f"text_lr must be >= 0 (0: frozen text encoder), got {text_lr}")
    unet = bb.unet.train().requires_grad_(True)
    text = bb.text_encoder.train(text_lr > 0).requires_grad_(text_lr > 0)
    params = list(unet.parameters())
    groups: list[dict] = [{"params": params}]
    if text_lr > 0:
        groups.append({"params": list(text.parameters()), "lr_scale": text_lr / lr})
        params = params + groups[1]["params"]
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2, fused=True)
    n, size = photos.images.shape[0], photos.images.shape[-1]
    with torch.no_grad():
        latents = (
            torch.cat(
                [vae.encode(photos.images[i : i + 64]).latent_dist.mean for i in range(0, n, 64)]
            )
            * vae.config.scaling_factor
        )  # (N, 4, h, w)
    sched = bb.scheduler
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)  # (T,) signal-to-noise ratio
    for step in _steps(steps, "stage 0: inpainting UNet", progress):
        _constant_then_decay(opt, lr, step, steps)
        idx = torch.randint(n, (batch_size,), generator=gen).tolist()
        images = photos.images[idx]
        masks = _masks([photos.boxes[i] for i in idx], size, rng, full_mask_prob)
        with torch.no_grad():
            masked = vae.encode(images * (masks < 0.5)).latent_dist
            masked_latent = masked.sample(generator=gen) * vae.config.scaling_factor  # (B, 4, h, w)
        mask_latent = F.interpolate(masks, size=masked_latent.shape[-2:])  # (B, 1, h, w)
        prompts = []
        for i in idx:
            u = rng.random()
            if u < text_dropout:
                prompts.append("")
            elif u < text_dropout + caption_prob * (1 - text_dropout) and photos.captions[i]:
                prompts.append(f"{UNCOND_PROMPT}. {photos.captions[i]}")
            else:
                prompts.append(UNCOND_PROMPT)
        ids = bb.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.set_grad_enabled(text_lr > 0):
            ctx = text(ids)[0]  # (B, 77, D)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        noisy = sched.add_noise(latents[idx], noise, t)
        x = torch.cat([noisy, mask_latent, masked_latent], dim=1)  # (B, 9, h, w)
        err = (unet(x, t, encoder_hidden_states=ctx).sample - noise).square().mean((1, 2, 3))
        if min_snr_gamma > 0:
            err = err * (snr[t].clamp(max=min_snr_gamma) / snr[t])  # (B,) Min-SNR weights
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return bb


def score_view(photos: PhotoSet) -> Tensor:
    """The scoring recognizer's view: each S-pixel photo aligned to 112 px by its landmarks.

    This is exactly what :class:`pva.recognizers.IResNetRecognizer` feeds it at evaluation.
    """
    arr = ((photos.images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    crops = np.stack([align_face(a, lm) for a, lm in zip(arr, photos.landmarks)])
    return torch.from_numpy(crops).float().permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, 112, 112)


def train_recognizer(
    faces: Tensor,
    labels: Tensor,
    layers: tuple[int, ...] = (1, 1, 1, 1),
    widths: tuple[int, ...] = (8, 16, 32, 64),
    num_features: int = 64,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    margin: float = 0.25,
    scale: float = 16.0,
    seed: int = 0,
    desc: str = "stage 0: recognizer",
    progress: bool = True,
    position: int | None = None,
) -> IResNet:
    """Train an arcface_torch IResNet with a CosFace head on person labels.

    Augmentation: brightness / contrast jitter and shifts of up to 4 pixels (no flips: a mole's
    side is part of the identity).

    Args:
        faces: (N, 3, 112, 112) aligned faces in [-1, 1].
        labels: (N,) person index.
        layers: Blocks per stage.
        widths: Channels per stage.
        num_features: Embedding size.
        steps: Optimizer steps.
        batch_size: Faces per step.
        lr: AdamW learning rate (cosine decay).
        margin: CosFace additive margin.
        scale: CosFace logit scale.
        seed: Seed of weights, sampling and augmentation.
        desc: Progress-bar label.
        progress: Show a progress bar.
        position: The bar's terminal line (1: under another process's bar).
    """
    torch.manual_seed(seed)
    model = IResNet(layers, widths, num_features).train()
    classes = int(labels.max()) + 1
    head = nn.Parameter(torch.randn(classes, num_features) * 0.01)
    opt = torch.optim.AdamW([*model.parameters(), head], lr=lr, weight_decay=5e-4, fused=True)
    gen = torch.Generator().manual_seed(seed)
    n = faces.shape[0]
    for step in _steps(steps, desc, progress, position):
        _cosine_lr(opt, lr, step, steps)
        idx = torch.randint(n, (batch_size,), generator=gen)
        x = faces[idx]
        gain = 1 + 0.2 * (torch.rand(batch_size, 1, 1, 1, generator=gen) - 0.5)
        bias = 0.2 * (torch.rand(batch_size, 1, 1, 1, generator=gen) - 0.5)
        x = (x * gain + bias).clamp(-1, 1)
        dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        emb = F.normalize(model(x), dim=-1)  # (B, D)
        cos = emb @ F.normalize(head, dim=-1).T  # (B, classes)
        y = labels[idx]
        logits = scale * (cos - margin * F.one_hot(y, classes))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def verification_accuracy(model: IResNet, faces: Tensor, labels: Tensor) -> float:
    """Nearest-neighbour identification accuracy (leave one out) of held-out faces."""
    emb = torch.cat(
        [F.normalize(model(faces[i : i + 128]), dim=-1) for i in range(0, len(faces), 128)]
    )  # (N, D)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    return float((labels[sim.argmax(1)] == labels).float().mean())
