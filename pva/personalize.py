"""Per-identity fine-tuning, "40 steps" (METHOD section 7), as a context manager.

Inside ``with personalized(model, ...)`` the model holds the personalized weights. On exit every
touched tensor (weights, their ``.grad`` and ``requires_grad`` flags) is restored bit-exactly and
the global RNG state is as before. So each identity starts from identical weights (the reference
code leaked CrossQKV-FT weights between identities), and a training run can personalize a copy of
its adapter mid-training without changing what training computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from pva.attention import identity_processors
from pva.model import PVAModel
from pva.objective import EncodingCache, box_mask, denoising_loss, fused_adam_ok, make_batch
from pva.prompts import conditional_prompt

FTVariant = Literal["pva", "crossqkv", "custom-diffusion", "custom-diffusion-kv"]
FT_VARIANTS: tuple[str, ...] = ("pva", "crossqkv", "custom-diffusion", "custom-diffusion-kv")
ATTN2_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""The pretrained parameters of a cross-attention layer (``to_out.1`` is dropout)."""


@dataclass
class PersonalizeResult:
    """What a personalization run did."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    state: dict[str, Tensor] = field(default_factory=dict)
    """The personalized tensors (``PVAModel.state_dict()`` keys), detached copies."""


def trainable_for(model: PVAModel, variant: FTVariant) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters fine-tuned per variant, in two groups: ``attention`` and ``token``.

    ``pva`` (PVA-FT): the visual Q/K/V of every ``attn2``. ``crossqkv`` (CrossQKV-FT): every
    ``attn2`` parameter, the visual Q/K/V and the pretrained ``to_q``, ``to_k``, ``to_v`` and
    ``to_out.0`` (the reference's ``'attn2' in name``, ``lib/pva.py:365-367``).
    ``custom-diffusion`` (the baseline, trained and used without identity tokens): every
    pretrained ``attn2`` parameter, as the paper's runs (``--freeze_model crossattn``,
    ``script/cd_train.py:242-249``); ``custom-diffusion-kv``: only ``to_k`` / ``to_v``
    (``crossattn_kv``, the Custom Diffusion paper's default). All also tune ``<new1>``.
    """
    if variant not in FT_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(FT_VARIANTS)}, got {variant!r}")
    projections = {
        "pva": (),
        "crossqkv": ATTN2_PROJECTIONS,
        "custom-diffusion": ATTN2_PROJECTIONS,
        "custom-diffusion-kv": ("to_k", "to_v"),
    }[variant]
    named = dict(model.named_parameters())
    attention = []
    for name, proc in identity_processors(model.unet):
        prefix = "unet." + name
        if variant in ("pva", "crossqkv"):
            attention += [(f"{prefix}.{n}", p) for n, p in proc.named_parameters()]
        layer = prefix.removesuffix(".processor")
        for proj in projections:
            attention += [(k, named[k]) for k in named if k.startswith(f"{layer}.{proj}.")]
    token = [("modifier_token.embedding", model.modifier_token.embedding)]
    return {"attention": attention, "token": token}


def fine_tune_references(
    n: int, target: int, generator: torch.Generator, flip_prob: float = 0.5
) -> list[tuple[int, bool]]:
    """The references of one fine-tuning step, as ``(photo index, flipped)`` pairs.

    The reference code's ``RotatingTensorDataset`` plus ``finetune`` (``lib/dataset.py:166-170``,
    ``lib/pva.py:689``): the person's other ``n - 1`` photos in random order, each flipped with
    ``flip_prob``, then a flipped copy of the last one, ``n`` references in all (5 for
    CelebAHQ-IDI's 5 reference photos).
    """
    others = [i for i in range(n) if i != target]
    order = torch.randperm(len(others), generator=generator).tolist()
    refs = [(others[j], bool(torch.rand((), generator=generator) < flip_prob)) for j in order]
    last, flipped = refs[-1]
    return [*refs, (last, not flipped)]


def _identity_tokens(
    model: PVAModel,
    references: Tensor,
    refs: list[tuple[int, bool]],
    cache: EncodingCache,
) -> Tensor:
    """(1, n_id, D) identity tokens of ``refs`` (``(photo, flipped)`` pairs).

    Each reference is embedded on its own (so a reused embedding is bit-identical to a fresh
    one) through ``cache``; the projection then runs on the K embeddings.
    """
    dtype = next(model.identity_encoder.projection.parameters()).dtype
    embeddings = []
    for i, flipped in refs:
        photo = references[i].flip(-1) if flipped else references[i]  # (3, R, R)
        photo = photo[None].to(model.device, dtype)  # (1, 3, R, R)
        embeddings.append(cache.embed_faces(model, [(i, flipped)], photo)[0])  # (E,)
    emb = torch.stack(embeddings)[None].to(model.device, dtype)  # (1, K, E)
    return model.identity_encoder.projection(emb)  # (1, n_id, D)


@contextmanager
def personalized(
    model: PVAModel,
    images: Tensor,
    references: Tensor,
    boxes: Sequence[Sequence[int]],
    steps: int = 40,
    variant: FTVariant = "pva",
    lr: float = 1e-5,
    token_lr: float = 1e-3,
    batch_size: int = 1,
    timestep_draws: int = 2,
    hflip_prob: float = 0.5,
    ref_hflip_prob: float = 0.5,
    seed: int = 0,
    progress: bool = False,
    prior: Callable[[torch.Generator], dict] | None = None,
    prior_weight: float = 1.0,
    callback: Callable[[int], None] | None = None,
    reuse_encodings: bool = True,
) -> Iterator[PersonalizeResult]:
    """Fine-tune on one person's photos for ``steps`` optimizer steps; restore on exit.

    Each step, the next photo in turn is the target, masked with its wholeface box and flipped with
    ``hflip_prob``; the references are the person's other photos, each flipped with
    ``ref_hflip_prob``, plus a flipped copy of the last (:func:`fine_tune_references`); the prompt
    is ``photo of a <new1> person``; ``timestep_draws`` stratified timesteps, all in the one
    step. AdamW (weight decay 1e-2) with ``lr * batch_size * timestep_draws`` for attention
    weights (the reference: 1e-5 x batch 1 x 2 = 2e-5, ``script/finetune.py:51-53``) and
    ``token_lr`` for the token; a fresh optimizer every call.

    Args:
        model: The PVA model (its trained adapter is the starting point).
        images: (N, 3, S, S) photos in [-1, 1], N >= 2.
        references: (N, 3, R, R): the same photos as the identity encoder should see them
            (aligned faces, or the photos themselves).
        boxes: N wholeface boxes ``[x0, y0, x1, y1]`` in S-pixel coordinates.
        steps: Optimizer steps (40 in the paper).
        variant: ``pva`` (PVA-FT), ``crossqkv`` (CrossQKV-FT), ``custom-diffusion`` or
            ``custom-diffusion-kv`` (the baseline: no identity tokens in training); see
            :func:`trainable_for`.
        lr: Attention learning rate per (target x timestep draw) of a step (METHOD 7: 1e-5).
        token_lr: Token learning rate.
        batch_size: Targets per step.
        timestep_draws: Stratified timesteps per target.
        hflip_prob: Probability of flipping a target.
        ref_hflip_prob: Probability of flipping each reference.
        seed: Seed of flips, noise and timesteps.
        progress: Show a progress bar.
        prior: Prior preservation (Custom Diffusion's option): a callable returning a batch of
            OTHER persons' photos (``image``, ``mask``, ``references``, ``prompt`` =
            ``photo of a person``); its loss, without identity tokens, is added each step.
        prior_weight: Weight of the prior loss.
        callback: Called after every optimizer step with the number of steps done (1-based),
            with the model in its personalized state (e.g. to sample at intermediate steps).
        reuse_encodings: Run the frozen encoders once per input instead of every step: the VAE
            posterior of each photo and of its masked version (per flip; latents are still
            drawn from it every step, so the loss is the same random variable) and the face
            embedding of each reference photo (per flip; the identity tokens are then projected
            from them, as the identity encoder is frozen and in eval mode here). ``False``
            recomputes them every step.

    Yields:
        A :class:`PersonalizeResult`; ``state`` holds the personalized tensors.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"personalization needs at least 2 photos of the person, got {n}")
    if len(boxes) != n or references.shape[0] != n:
        raise ValueError("images, references and boxes must have the same length")
    groups = trainable_for(model, variant)
    params = [p for g in groups.values() for _, p in g]
    saved = [
        (p, p.detach().clone(), None if p.grad is None else p.grad.clone(), p.requires_grad)
        for p in params
    ]
    was_training = model.training
    result = PersonalizeResult()
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    flip_gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            opt = torch.optim.AdamW(
                [
                    {
                        "params": [p for _, p in groups["attention"]],
                        "lr": lr * batch_size * timestep_draws,
                    },
                    {"params": [p for _, p in groups["token"]], "lr": token_lr},
                ],
                weight_decay=1e-2,
                fused=fused_adam_ok(params),
            )
            model.eval()  # the projection's dropout off; only attention weights and token train
            t0 = time.perf_counter()
            iterator = range(steps)
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc=f"fine-tune ({variant})", unit="step", leave=False)
            size = images.shape[-1]
            prompt = conditional_prompt(model.modifier_token.token)
            no_identity = variant.startswith("custom-diffusion")  # trains without identity tokens
            cache = EncodingCache(device)  # (photo, flip) -> moments, (E,) embedding
            for step in iterator:
                targets = [(step * batch_size + b) % n for b in range(batch_size)]
                samples, batch_refs, keys = [], [], []
                for t in targets:
                    image, (x0, y0, x1, y1) = images[t], boxes[t]
                    flip = bool(torch.rand((), generator=flip_gen) < hflip_prob)
                    if flip:
                        image, (x0, x1) = image.flip(-1), (size - x1, size - x0)
                    mask = box_mask(size, (x0, y0, x1, y1))  # (1, S, S)
                    samples.append({"image": image, "mask": mask, "prompt": prompt})
                    batch_refs.append(fine_tune_references(n, t, flip_gen, ref_hflip_prob))
                    keys.append((t, flip))
                batch = make_batch(samples)  # image (B, 3, S, S), mask (B, 1, S, S), prompt
                if not reuse_encodings:
                    cache = EncodingCache(device)  # a fresh one each step: nothing reused
                with torch.no_grad():
                    if reuse_encodings:
                        latent, masked = [], []
                        for (t, flip), image, mask in zip(keys, batch["image"], batch["mask"]):
                            hole = (image * (mask < 0.5))[None]  # (1, 3, S, S)
                            latent.append(cache.encode_moments(model, [(t, flip)], image[None]))
                            masked.append(cache.encode_moments(model, [(t, flip, "masked")], hole))
                        batch["latent_moments"] = torch.cat(latent)  # (B, 8, h, w)
                        batch["masked_moments"] = torch.cat(masked)  # (B, 8, h, w)
                    if not no_identity:  # frozen encoder: no gradient, nothing to train there
                        tokens = [_identity_tokens(model, references, r, cache) for r in batch_refs]
                        batch["identity_tokens"] = torch.cat(tokens)  # (B, n_id, D)
                loss = denoising_loss(
                    model, batch, timestep_draws, identity_dropout=float(no_identity), generator=gen
                )
                if prior is not None:
                    prior_batch = prior(flip_gen)
                    prior_loss = denoising_loss(
                        model, prior_batch, timestep_draws, identity_dropout=1.0, generator=gen
                    )
                    loss = loss + prior_weight * prior_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                result.losses.append(loss.item())
                if callback is not None:
                    callback(step + 1)
            result.seconds = time.perf_counter() - t0
            names = {id(p): k for g in groups.values() for k, p in g}
            result.state = {names[id(p)]: p.detach().clone() for p in params}
            for p in params:
                p.grad = None
            yield result
        finally:
            with torch.no_grad():
                for p, value, grad, requires_grad in saved:
                    p.copy_(value)
                    p.grad = grad
                    p.requires_grad_(requires_grad)
            model.train(was_training)
