"""Training-time identity checks: inpainting validation and a 40-step personalization check.

Both run on global rank 0 only, on a fixed set drawn from the DataModule's validation split, inside
``torch.no_grad`` (validation) and forked RNG state, and restore the module's train/eval mode, so
training computes exactly what it would without them. Other ranks simply proceed to their next
gradient all-reduce, where they wait for rank 0; nothing here is a collective, so nothing can
deadlock. Scalars and image grids go to the trainer's logger (TensorBoard).
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from pva.checks import GUIDANCE, NONNEGATIVE_INT, POSITIVE_INT, SEED, check_ranges
from pva.module import PVAModule
from pva.objective import box_mask, make_batch
from pva.prompts import UNCOND_PROMPT, conditional_prompt
from pva.recognizers import Recognizer, build_recognizer
from pva.sampling import ddim_inpaint

VALIDATION_RANGES = {
    "every_n_steps": POSITIVE_INT,
    "num_persons": POSITIVE_INT,
    "ddim_steps": POSITIVE_INT,
    "guidance": GUIDANCE,
    "batch_size": POSITIVE_INT,
    "max_samples": POSITIVE_INT,
    "grid_rows": NONNEGATIVE_INT,
    "seed": SEED,
}
"""The allowed range of each numeric :class:`IdentityValidation` argument."""
PERSONALIZATION_RANGES = {
    "every_n_steps": POSITIVE_INT,
    "steps": POSITIVE_INT,
    "person_index": NONNEGATIVE_INT,
    "ddim_steps": POSITIVE_INT,
    "guidance": GUIDANCE,
    "seed": SEED,
}
"""The allowed range of each numeric :class:`PersonalizationCheck` argument."""


def _log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _log_image(trainer: L.Trainer, tag: str, grid: Tensor) -> None:
    """(3, H, W) in [0, 1] to every logger that can show images (TensorBoard)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, grid, global_step=trainer.global_step)


def image_grid(rows: list[list[Tensor]]) -> Tensor:
    """Rows of (3, h, w) images in [-1, 1] (resized to the first one) -> (3, H, W) in [0, 1]."""
    size = rows[0][0].shape[-2:]
    cells = []
    for row in rows:
        resized = [
            F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            for x in row
        ]
        cells.append(torch.cat(resized, dim=-1))
    return ((torch.cat(cells, dim=-2).clamp(-1, 1) + 1) / 2).cpu()


def _due(trainer: L.Trainer, every: int) -> bool:
    return every > 0 and trainer.global_step > 0 and trainer.global_step % every == 0


class IdentityValidation(L.Callback):
    """Every ``every_n_steps``: inpaint fixed validation persons, log identity similarity.

    Similarity is the cosine between output and ground truth under ``recognizer`` (``dlib``, the
    offline default, or an arcface_torch ``.pth`` such as the Glint360K CosFace R100 the paper
    used; either way not the conditioning ArcFace), logged as ``val/identity_sim/<mask>`` and
    ``val/identity_sim`` (mean), with a grid (masked input | output | ground truth | first
    reference) as ``val/inpainting``.

    Args:
        every_n_steps: Interval in optimizer steps (paper: 1000); 0 disables.
        num_persons: Validation persons (paper: 20).
        ddim_steps: DDIM steps per inpainting (few: this is a training signal).
        guidance: Classifier-free guidance scale (inpainting mode).
        recognizer: ``dlib`` or a path to an arcface_torch ``.pth``.
        batch_size: Samples per inpainting call.
        max_samples: Cap on validation samples (targets x masks).
        grid_rows: Rows in the logged image grid.
        seed: Seed of the sampling noise.
        run_at_end: Also run once when ``fit`` ends.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_persons: int = 20,
        ddim_steps: int = 20,
        guidance: float = 1.0,
        recognizer: str = "dlib",
        batch_size: int = 4,
        max_samples: int = 80,
        grid_rows: int = 4,
        seed: int = 0,
        run_at_end: bool = True,
    ) -> None:
        check_ranges("IdentityValidation.", locals(), VALIDATION_RANGES)
        self.every_n_steps, self.num_persons, self.ddim_steps = (
            every_n_steps,
            num_persons,
            ddim_steps,
        )
        self.guidance, self.recognizer_spec, self.batch_size = guidance, recognizer, batch_size
        self.max_samples, self.grid_rows, self.seed = max_samples, grid_rows, seed
        self.run_at_end = run_at_end
        self._batches: list[dict] | None = None
        self._recognizer: Recognizer | None = None
        self.last: dict[str, float] = {}

    def _data(self, trainer: L.Trainer) -> list[dict]:
        if self._batches is None:
            dm = trainer.datamodule
            if not hasattr(dm, "fixed_batches"):
                raise TypeError("IdentityValidation needs a ShardDataModule (fixed_batches)")
            batches, n = [], 0
            for batch in dm.fixed_batches("val", self.num_persons, self.batch_size):
                batches.append(batch)
                n += len(batch["prompt"])
                if n >= self.max_samples:
                    break
            self._batches = batches
        return self._batches

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: PVAModule) -> dict[str, float]:
        """Inpaint the fixed set, score, log; returns the logged scalars."""
        model = pl_module.model
        assert model is not None
        if self._recognizer is None:
            self._recognizer = build_recognizer(self.recognizer_spec)
        was_training = model.training
        model.eval()
        scores: dict[str, list[float]] = {}
        rows: list[list[Tensor]] = []
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            gen = torch.Generator(device=model.device).manual_seed(self.seed)
            for batch in self._data(trainer):
                out = ddim_inpaint(
                    model,
                    batch["image"],
                    batch["mask"],
                    batch["references"],
                    [conditional_prompt(model.modifier_token.token)] * len(batch["prompt"]),
                    negative_prompt=UNCOND_PROMPT,
                    guidance_scale=self.guidance,
                    num_steps=self.ddim_steps,
                    generator=gen,
                    reference_mask=batch["reference_mask"],
                ).cpu()
                sim = self._recognizer.similarity(out, batch["image"], batch["landmarks"].numpy())
                for kind, s in zip(batch["mask_region"], sim.tolist()):
                    scores.setdefault(kind, []).append(s)
                for b in range(len(out)):
                    if len(rows) < self.grid_rows:
                        rows.append(
                            [
                                batch["masked_image"][b],
                                out[b],
                                batch["image"][b],
                                batch["references"][b, 0],
                            ]
                        )
        model.train(was_training)
        metrics = {f"val/identity_sim/{k}": sum(v) / len(v) for k, v in scores.items()}
        every = [s for v in scores.values() for s in v]
        metrics["val/identity_sim"] = sum(every) / max(1, len(every))
        _log_scalars(trainer, metrics)
        if rows:
            _log_image(trainer, "val/inpainting", image_grid(rows))
        self.last = metrics
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if _due(trainer, self.every_n_steps) and trainer.is_global_zero:
            if getattr(self, "_ran_at", None) != trainer.global_step:  # once per optimizer step
                self._ran_at = trainer.global_step
                self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: D102
        if (
            self.run_at_end
            and trainer.is_global_zero
            and getattr(self, "_ran_at", None) != (trainer.global_step)
        ):
            self.run(trainer, pl_module)


class PersonalizationCheck(L.Callback):
    """Every ``every_n_steps``: personalize a COPY of the adapter to one held-out person.

    METHOD section 7's PVA-FT (40 steps by default) on the person's reference photos, then the
    identity similarity of inpainting one of the person's held-out photos (wholeface mask) before
    and after, and the seconds it took: ``personalize/identity_sim_before``, ``..._after``,
    ``personalize/seconds``. The training weights, their gradients and the optimizer are left
    exactly as they were (see :func:`pva.personalize.personalized`).

    Args:
        every_n_steps: Interval in optimizer steps; 0 disables.
        steps: Fine-tuning steps (paper: 40).
        person_index: Which validation person.
        ddim_steps: DDIM steps of the scoring inpainting.
        guidance: Classifier-free guidance scale.
        recognizer: ``dlib`` or a path to an arcface_torch ``.pth``.
        seed: Seed.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        steps: int = 40,
        person_index: int = 0,
        ddim_steps: int = 20,
        guidance: float = 1.0,
        recognizer: str = "dlib",
        seed: int = 0,
    ) -> None:
        check_ranges("PersonalizationCheck.", locals(), PERSONALIZATION_RANGES)
        self.every_n_steps, self.steps, self.person_index = every_n_steps, steps, person_index
        self.ddim_steps, self.guidance, self.recognizer_spec = ddim_steps, guidance, recognizer
        self.seed = seed
        self._recognizer: Recognizer | None = None
        self.last: dict[str, float] = {}

    def _score(self, model, person: dict, target: int, refs: list[int]) -> float:
        image = person["images"][target]  # (3, S, S)
        sample = {
            "image": image,
            "mask": box_mask(image.shape[-1], person["boxes"][target]),  # (1, S, S)
            "references": list(person["references"][refs]),
            "prompt": conditional_prompt(model.modifier_token.token),
        }
        batch = make_batch([sample])  # the one target, its K references
        gen = torch.Generator(device=model.device).manual_seed(self.seed)
        out = ddim_inpaint(
            model,
            batch["image"],
            batch["mask"],
            batch["references"],
            batch["prompt"],
            guidance_scale=self.guidance,
            num_steps=self.ddim_steps,
            generator=gen,
        ).cpu()
        assert self._recognizer is not None
        lm = person["landmarks"][target][None].numpy()
        return float(self._recognizer.similarity(out, batch["image"], lm)[0])

    def run(self, trainer: L.Trainer, pl_module: PVAModule) -> dict[str, float]:
        """Personalize, score before and after, restore, log; returns the logged scalars."""
        from pva.personalize import personalized

        model = pl_module.model
        assert model is not None
        if self._recognizer is None:
            self._recognizer = build_recognizer(self.recognizer_spec)
        person = trainer.datamodule.person_photos("val", self.person_index)
        roles = person["roles"]
        n = len(roles)
        target = next((i for i, r in enumerate(roles) if r == "infer"), 0)
        refs = [i for i in range(n) if i != target and roles[i] != "infer"] or [
            i for i in range(n) if i != target
        ]
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            with torch.no_grad():
                before = self._score(model, person, target, refs)
            t0 = time.perf_counter()
            with personalized(
                model,
                person["images"][refs],
                person["references"][refs],
                [person["boxes"][i] for i in refs],
                steps=self.steps,
                seed=self.seed,
            ):
                seconds = time.perf_counter() - t0
                with torch.no_grad():
                    after = self._score(model, person, target, refs)
        metrics = {
            "personalize/identity_sim_before": before,
            "personalize/identity_sim_after": after,
            "personalize/seconds": seconds,
        }
        _log_scalars(trainer, metrics)
        self.last = metrics
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if _due(trainer, self.every_n_steps) and trainer.is_global_zero:
            if getattr(self, "_ran_at", None) != trainer.global_step:
                self._ran_at = trainer.global_step
                self.run(trainer, pl_module)
