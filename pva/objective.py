"""The training objective, apart from the network (METHOD sections 2 and 6).

:class:`DenoisingObjective` draws the timesteps, drops conditions and takes the epsilon MSE;
:class:`EncodingCache` keeps what the frozen encoders made of each input, so that training
(``model.cache_encodings``) and fine-tuning (:func:`pva.personalize.personalized`) run them once
per input; :class:`pva.model.PVAModel` only encodes and predicts noise
(:meth:`PVAModel.predict_noise`).

A training batch (what :class:`DenoisingObjective` takes, and what
:class:`datamodules.ShardDataModule`, :class:`datamodules.PersonPhotosDataModule` and the
fine-tuning loop make) is a dict:

==========================  =====================================================================
``image``                   (B, 3, H, W) in [-1, 1], the targets
``mask``                    (B, 1, H, W), 1 = the hole to fill
``references``              (B, K, 3, h, w) in [-1, 1], faces of the same person
``prompt``                  list of B strings (``photo of a <new1> person``)
``reference_mask``          optional (B, K) bool, ``False`` = padding (fewer than K references)
``image_key``               optional list of B strings naming the target's pixels (flip included)
``reference_keys``          optional (B, K) strings naming each reference's pixels, ``""`` = padding
``latent_moments``          optional (B, 8, H/8, W/8): the VAE posterior of ``image``
``masked_moments``          optional (B, 8, H/8, W/8): the VAE posterior of the masked image
``reference_embeddings``    optional (B, K, E): the frozen face backbone's embeddings
``identity_tokens``         optional (B, n_id, D): the identity encoder's tokens
==========================  =====================================================================

The keyed entries let :class:`EncodingCache` fill in the optional encodings; a batch may carry
more (``landmarks``, ``person``, ``skipped``) for callbacks and logging. :func:`make_batch`
builds one from per-target samples (the shard stream, fine-tuning and the personalization
check use it).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pva.model import PVAModel


def stratified_timesteps(
    num_images: int,
    draws: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Stratified timestep sampling: ``draws`` timesteps per image, one per equal interval.

    Draw ``j`` of every image is uniform on ``[j*T/draws, (j+1)*T/draws)``.

    Args:
        num_images: Images in the batch.
        draws: Timesteps per image (4 in the paper's training, 2 in personalization).
        num_train_timesteps: T (1000).
        generator: Optional random generator (on ``device``).
        device: Output device.

    Returns:
        (num_images * draws,) long, image-major (``[i0 d0, i0 d1, ..., i1 d0, ...]``, matching
        ``x.repeat_interleave(draws, 0)``).
    """
    if draws < 1 or draws > num_train_timesteps:
        raise ValueError(f"draws must be in 1..{num_train_timesteps}, got {draws}")
    edges = torch.linspace(0, num_train_timesteps, draws + 1, device=device)  # (draws+1,)
    lo, hi = edges[:-1].floor().long(), edges[1:].floor().long()  # (draws,) each
    u = torch.rand(num_images, draws, generator=generator, device=device)  # (B, draws)
    t = lo + (u * (hi - lo)).floor().long()  # (B, draws), t in [lo, hi)
    return t.clamp_(max=num_train_timesteps - 1).flatten()


def keep_mask(
    batch_size: int,
    drop_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Per-condition dropout: (B,) bool, ``False`` where the condition is dropped.

    Returns ``None`` when ``drop_prob`` is 0 (nothing dropped, no mask needed).
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {drop_prob}")
    if drop_prob == 0.0:
        return None
    return torch.rand(batch_size, generator=generator, device=device) >= drop_prob


def fused_adam_ok(params: Iterable[Tensor | dict]) -> bool:
    """Whether PyTorch's fused Adam/AdamW kernel can take these parameters (or param groups).

    True when every parameter is a floating tensor on the CPU or a CUDA device. The fused
    kernel computes the same update as the default per-tensor loop in one pass over all
    tensors, which matters for small models dominated by per-tensor overhead (BENCHMARKS.md,
    "Measurements behind the code").
    """
    tensors: list[Tensor] = []
    for p in params:
        tensors.extend(p["params"] if isinstance(p, dict) else [p])
    return bool(tensors) and all(
        t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors
    )


def box_mask(size: int, box: Sequence[float]) -> Tensor:
    """(1, size, size) float mask, 1 inside ``[x0, y0, x1, y1)`` (clipped to the image)."""
    mask = torch.zeros(1, size, size)
    x0, y0, x1, y1 = (max(int(v), 0) for v in box)
    mask[:, y0:y1, x0:x1] = 1.0
    return mask


def make_batch(
    samples: Sequence[Mapping[str, Any]], reference_shape: Sequence[int] = (3, 112, 112)
) -> dict[str, Any]:
    """A training batch (the module docstring's schema) from per-target samples.

    Args:
        samples: One dict per target with ``image`` (3, H, W), ``mask`` (1, H, W) and
            ``prompt``; optionally ``references``, a list of (3, h, w) (any number per sample:
            they are padded to the longest, padding marked in ``reference_mask``) and
            ``reference_keys``, one per reference (padded with ``""``). Every other entry is
            stacked when it is a tensor and listed otherwise.
        reference_shape: The shape of a reference when no sample has one.

    Returns:
        The batch: tensors (B, ...), lists of B values, ``references`` (B, K, 3, h, w) and
        ``reference_mask`` (B, K) bool when the samples have references.
    """
    batch: dict[str, Any] = {}
    for key in samples[0]:
        if key in ("references", "reference_keys"):
            continue
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    if "references" in samples[0]:
        refs = [list(s["references"]) for s in samples]
        width = max(1, max(len(r) for r in refs))
        shape = next((tuple(r[0].shape) for r in refs if r), tuple(reference_shape))
        references = torch.zeros(len(samples), width, *shape)  # (B, K, 3, h, w)
        reference_mask = torch.zeros(len(samples), width, dtype=torch.bool)  # (B, K)
        for b, row in enumerate(refs):
            for j, r in enumerate(row):
                references[b, j], reference_mask[b, j] = r, True
        batch["references"], batch["reference_mask"] = references, reference_mask
    if "reference_keys" in samples[0]:
        batch["reference_keys"] = [  # (B, K) strings, "" = padding
            list(s["reference_keys"])
            + [""] * (batch["references"].shape[1] - len(s["reference_keys"]))
            for s in samples
        ]
    return batch


class EncodingCache:
    """What the frozen encoders made of each input, computed once per key and reused.

    The VAE and a frozen face backbone are deterministic, so their outputs for the same pixels
    never change: the VAE posterior moments of a photo (latents are still drawn from them every
    step, so the loss stays the same random variable) and the face embedding of a reference
    (the identity projection still runs every step). A key names pixels: a photo and its mirror
    image are different keys, and a key is never reused for other pixels. Each call encodes
    the keys it lacks in one encoder call; callers choose the batching.

    Args:
        device: Where the outputs are kept (``"cpu"``: off the accelerator, as training keeps
            one per photo of the dataset).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.moments: dict[Hashable, Tensor] = {}  # key -> (8, h, w) VAE posterior, fp32
        self.embeddings: dict[Hashable, Tensor] = {}  # key -> (E,) face embedding, fp32

    def __len__(self) -> int:
        return len(self.moments) + len(self.embeddings)

    def _keep(self, x: Tensor) -> Tensor:
        return x.detach().to(self.device, torch.float32)

    @torch.no_grad()
    def encode_moments(self, model: PVAModel, keys: Sequence[Hashable], images: Tensor) -> Tensor:
        """(B, 8, h, w) posterior moments of ``images`` (B, 3, H, W), keyed by ``keys``."""
        new = [i for i, k in enumerate(keys) if k not in self.moments]
        if new:
            moments = model.encode_moments(images[new])  # (N, 8, h, w)
            for i, m in zip(new, moments):
                self.moments[keys[i]] = self._keep(m)
        return torch.stack([self.moments[k] for k in keys])

    @torch.no_grad()
    def embed_faces(self, model: PVAModel, keys: Sequence[Hashable], faces: Tensor) -> Tensor:
        """(N, E) frozen face-backbone embeddings of ``faces`` (N, 3, h, w), keyed by ``keys``."""
        todo: dict[Hashable, int] = {}
        for i, k in enumerate(keys):
            if k not in self.embeddings and k not in todo:
                todo[k] = i
        if todo:
            picked = faces[list(todo.values())][None]  # (1, M, 3, h, w)
            emb = model.identity_encoder.embed(picked)[0]  # (M, E)
            for k, e in zip(todo, emb):
                self.embeddings[k] = self._keep(e)
        return torch.stack([self.embeddings[k] for k in keys])

    def fill(self, model: PVAModel, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` plus ``latent_moments`` and ``reference_embeddings`` (the module docstring).

        Needs ``image_key`` and ``reference_keys``; padding references (key ``""``) get zero
        embeddings. Encodes, in one call per encoder, only what the cache lacks.
        """
        if "image_key" not in batch or "reference_keys" not in batch:
            raise KeyError(
                "model.cache_encodings needs batches with image_key and "
                "reference_keys (datamodules.ShardDataModule's)"
            )
        keys: list[str] = list(batch["image_key"])
        moments = self.encode_moments(model, keys, batch["image"])  # (B, 8, h, w)
        refs: Tensor = batch["references"]  # (B, K, 3, H, W)
        ref_keys = [list(row) for row in batch["reference_keys"]]
        where = [(b, j) for b, row in enumerate(ref_keys) for j, k in enumerate(row) if k]
        embeddings = torch.zeros(refs.shape[0], refs.shape[1], 0)  # (B, K, E), 0 = padding
        if where:
            faces = torch.stack([refs[b, j] for b, j in where]).to(model.device)  # (N, 3, H, W)
            emb = self.embed_faces(model, [ref_keys[b][j] for b, j in where], faces)  # (N, E)
            embeddings = emb.new_zeros(refs.shape[0], refs.shape[1], emb.shape[1])
            for (b, j), e in zip(where, emb):
                embeddings[b, j] = e
        return {**batch, "latent_moments": moments, "reference_embeddings": embeddings}


@dataclass
class DenoisingObjective:
    """Epsilon-prediction MSE over the whole latent (METHOD sections 2 and 6).

    Args:
        timestep_draws: Stratified timesteps per image, all in one loss (4 in the paper).
        text_dropout: Probability of replacing a prompt by ``""`` (0 in the paper).
        identity_dropout: Probability of hiding a sample's identity tokens (0 in the paper).
            At 1 the identity encoder is not run at all (Custom Diffusion's fine-tuning).
    """

    timestep_draws: int = 4
    text_dropout: float = 0.0
    identity_dropout: float = 0.0

    def __call__(
        self, model: PVAModel, batch: dict, generator: torch.Generator | None = None
    ) -> Tensor:
        """The loss of ``model`` on ``batch``.

        Args:
            model: The network: encoders and :meth:`PVAModel.predict_noise`.
            batch: ``image`` (B, 3, H, W) in [-1, 1]; ``mask`` (B, 1, H, W), 1 = hole;
                ``references`` (B, K, 3, h, w) in [-1, 1]; ``prompt`` list of B strings;
                optional ``reference_mask`` (B, K) bool. Optional precomputed encodings of
                frozen parts, used instead of running them: ``latent_moments`` and
                ``masked_moments`` (B, 8, h, w), :meth:`PVAModel.encode_moments` of the images
                and of the masked images (latents are still sampled from them here);
                ``identity_tokens`` (B, n_id, D), :meth:`PVAModel.encode_identity` of the
                references; or ``reference_embeddings`` (B, K, E), the frozen face backbone's
                embeddings of the references (only the projection runs).
            generator: Optional randomness source for noise, timesteps and dropout.

        Returns:
            Scalar loss.
        """
        images, masks = batch["image"].to(model.device), batch["mask"].to(model.device)
        b, n = images.shape[0], self.timestep_draws
        with torch.no_grad():
            moments = batch.get("latent_moments")
            if moments is None:
                moments = model.encode_moments(images)  # (B, 8, h, w)
            moments = moments.to(model.device, model.latent_dtype)
            latents = model.sample_latents(moments, generator)  # (B, 4, h, w)
            masked_moments = batch.get("masked_moments")
            if masked_moments is not None:
                masked_moments = masked_moments.to(model.device, model.latent_dtype)
            mask_latent, masked_latent = model.inpaint_conditioning(
                images, masks, generator, masked_moments
            )
        prompts = list(batch["prompt"])
        keep_text = keep_mask(b, self.text_dropout, generator, model.device)
        if keep_text is not None:
            prompts = [p if k else "" for p, k in zip(prompts, keep_text.tolist())]
        text = model.encode_prompt(prompts)  # (B, 77, D)
        keep_id = keep_mask(b, self.identity_dropout, generator, model.device)
        if self.identity_dropout >= 1.0:  # every row drops its tokens: same as no tokens at all
            ident, keep_id = None, None
        elif "identity_tokens" in batch:
            ident = batch["identity_tokens"].to(model.device)  # (B, n_id, D)
        elif "reference_embeddings" in batch:
            projection = model.identity_encoder.projection
            emb = batch["reference_embeddings"].to(
                model.device, next(projection.parameters()).dtype
            )
            mask = batch.get("reference_mask")
            ident = projection(emb, None if mask is None else mask.to(model.device))  # (B, n_id, D)
        else:
            ident = model.encode_identity(batch["references"], batch.get("reference_mask"))

        def rep(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.repeat_interleave(n, dim=0)  # (B*n, ...)

        t = stratified_timesteps(
            b, n, model.scheduler.config.num_train_timesteps, generator, model.device
        )  # (B*n,)
        latents = rep(latents)
        noise = torch.randn(latents.shape, generator=generator, device=model.device)
        noise = noise.to(latents.dtype)
        noisy = model.scheduler.add_noise(latents, noise, t)
        pred = model.predict_noise(
            noisy, t, rep(mask_latent), rep(masked_latent), rep(text), rep(ident), rep(keep_id)
        )
        return F.mse_loss(pred.float(), noise.float())


def denoising_loss(
    model: PVAModel,
    batch: dict,
    timestep_draws: int = 4,
    text_dropout: float = 0.0,
    identity_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``DenoisingObjective(timestep_draws, text_dropout, identity_dropout)(model, batch)``."""
    objective = DenoisingObjective(timestep_draws, text_dropout, identity_dropout)
    return objective(model, batch, generator)
