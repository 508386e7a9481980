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
from pva.model import TEMPLATE, PVAModel
from pva.objective import fused_adam_ok

FTVariant = Literal["pva", "crossqkv", "custom-diffusion"]


@dataclass
class PersonalizeResult:
    """What a personalization run did."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    state: dict[str, Tensor] = field(default_factory=dict)
    """The personalized tensors (``PVAModel.state_dict()`` keys), detached copies."""


def trainable_for(model: PVAModel, variant: FTVariant) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters fine-tuned per variant, in two groups: ``attention`` and ``token``.

    ``pva`` (PVA-FT): the visual Q/K/V of every ``attn2``. ``crossqkv`` (CrossQKV-FT): those
    plus the pretrained ``attn2`` Q/K/V. ``custom-diffusion`` (the baseline): the pretrained
    ``attn2`` K/V only, trained and used without identity tokens. All also tune ``<new1>``.
    """
    if variant not in ("pva", "crossqkv", "custom-diffusion"):
        raise ValueError(f"variant must be pva, crossqkv or custom-diffusion, got {variant!r}")
    named = dict(model.named_parameters())
    attention = []
    for name, proc in identity_processors(model.unet):
        prefix = "unet." + name
        if variant != "custom-diffusion":
            attention += [(f"{prefix}.{n}", p) for n, p in proc.named_parameters()]
        projections = {"crossqkv": ("to_q", "to_k", "to_v"), "custom-diffusion": ("to_k", "to_v")}
        layer = prefix.removesuffix(".processor")
        for proj in projections.get(variant, ()):
            attention += [(k, named[k]) for k in named if k.startswith(f"{layer}.{proj}.")]
    token = [("modifier_token.embedding", model.modifier_token.embedding)]
    return {"attention": attention, "token": token}


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
    seed: int = 0,
    progress: bool = False,
    prior: Callable[[torch.Generator], dict] | None = None,
    prior_weight: float = 1.0,
    callback: Callable[[int], None] | None = None,
    reuse_encodings: bool = True,
) -> Iterator[PersonalizeResult]:
    """Fine-tune on one person's photos for ``steps`` optimizer steps; restore on exit.

    Each step, the next photo in turn is the target, masked with its wholeface box and flipped with
    ``hflip_prob``; the person's other photos are the references; the prompt is
    ``photo of a <new1> person``; ``timestep_draws`` stratified timesteps. AdamW (weight decay
    1e-2) with ``lr * batch_size`` for attention weights and ``token_lr`` for the token; a fresh
    optimizer every call.

    Args:
        model: The PVA model (its trained adapter is the starting point).
        images: (N, 3, S, S) photos in [-1, 1], N >= 2.
        references: (N, 3, R, R): the same photos as the identity encoder should see them
            (aligned faces, or the photos themselves).
        boxes: N wholeface boxes ``[x0, y0, x1, y1]`` in S-pixel coordinates.
        steps: Optimizer steps (40 in the paper).
        variant: ``pva`` (PVA-FT), ``crossqkv`` (CrossQKV-FT) or ``custom-diffusion`` (the
            baseline: no identity tokens in training).
        lr: Attention learning rate per sample.
        token_lr: Token learning rate.
        batch_size: Targets per step.
        timestep_draws: Stratified timesteps per target.
        hflip_prob: Probability of flipping a target.
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
            drawn from it every step, so the loss is the same random variable) and the
            identity tokens of each target's references (the identity encoder is frozen and in
            eval mode here). ``False`` recomputes them every step.

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
    saved = [(p, p.detach().clone(), None if p.grad is None else p.grad.clone(), p.requires_grad)
             for p in params]  # fmt: skip
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
                [{"params": [p for _, p in groups["attention"]], "lr": lr * batch_size},
                 {"params": [p for _, p in groups["token"]], "lr": token_lr}],
                weight_decay=1e-2, fused=fused_adam_ok(params),
            )  # fmt: skip
            model.eval()  # the projection's dropout off; only attention weights and token train
            t0 = time.perf_counter()
            iterator = range(steps)
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc="personalize", unit="step", leave=False)
            size = images.shape[-1]
            no_identity = variant == "custom-diffusion"  # trains without identity tokens
            moments: dict[tuple[int, bool], tuple[Tensor, Tensor]] = {}  # (t, flip) -> 2x (8,h,w)
            tokens: dict[int, Tensor] = {}  # t -> (n_id, D)
            for step in iterator:
                targets = [(step * batch_size + b) % n for b in range(batch_size)]
                batch_images, batch_masks, batch_refs, keys = [], [], [], []
                for t in targets:
                    image, (x0, y0, x1, y1) = images[t], boxes[t]
                    flip = bool(torch.rand((), generator=flip_gen) < hflip_prob)
                    if flip:
                        image, (x0, x1) = image.flip(-1), (size - x1, size - x0)
                    mask = torch.zeros(1, size, size)
                    mask[:, int(y0) : int(y1), int(x0) : int(x1)] = 1.0
                    batch_images.append(image)
                    batch_masks.append(mask)
                    batch_refs.append(references[[i for i in range(n) if i != t]])
                    keys.append((t, flip))
                batch = {
                    "image": torch.stack(batch_images),
                    "mask": torch.stack(batch_masks),
                    "references": torch.stack(batch_refs),  # (B, N-1, 3, R, R)
                    "prompt": [TEMPLATE.format(model.modifier_token.token)] * batch_size,
                }
                with torch.no_grad():
                    if reuse_encodings:
                        for (t, flip), image, mask in zip(keys, batch_images, batch_masks):
                            if (t, flip) not in moments:
                                masked = (image * (mask < 0.5))[None]  # (1, 3, S, S)
                                moments[t, flip] = (model.encode_moments(image[None])[0],
                                                    model.encode_moments(masked)[0])  # fmt: skip
                        batch["latent_moments"] = torch.stack([moments[k][0] for k in keys])
                        batch["masked_moments"] = torch.stack([moments[k][1] for k in keys])
                    if not no_identity:  # frozen encoder: no gradient, nothing to train there
                        for t, refs in zip(targets, batch_refs):
                            if t not in tokens or not reuse_encodings:
                                tokens[t] = model.encode_identity(refs[None])[0]  # (n_id, D)
                        batch["identity_tokens"] = torch.stack([tokens[t] for t in targets])
                loss = model.training_loss(batch, timestep_draws,
                                           identity_dropout=float(no_identity),
                                           generator=gen)  # fmt: skip
                if prior is not None:
                    prior_batch = prior(flip_gen)
                    prior_loss = model.training_loss(
                        prior_batch, timestep_draws, identity_dropout=1.0, generator=gen
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
