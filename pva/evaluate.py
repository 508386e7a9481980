"""``pva evaluate``: METHOD section 8's protocol for PVA and its baselines, in one harness.

For every person of a split (``--shard-index`` / ``--num-shards`` deal persons to processes) and
every method, each target photo is inpainted under each evaluation mask (lowerface, eyebrow,
wholeface, random) with fixed seeds; the editing track inpaints each person's first target (every
target with ``protocol="paper"``) under the wholeface mask with the 15 editing prompts. Outputs
are PNGs at stable paths::

    OUT/<method>/<person>/<photo>_<mask>.png          inpainting track
    OUT/<method>/<person>/edit/<photo>_<k>.png        editing track, prompt k
    OUT/_gt/<person>/<photo>_<mask>.{gt,mask}.png + .json (landmarks)

Existing outputs are never recomputed (a person's adaptation runs only if one of its outputs is
missing), so re-running resumes. Metrics are computed at the end over every output present, per
method and mask: identity similarity to the ground truth (a recognizer other than the conditioning
one), masked-region error (mean absolute difference inside the mask), masked PSNR / SSIM,
outside-mask error, FID and KID (with ``inception_weights``), CLIP score
of edits (with ``clip_weights``), and seconds of adaptation per person and sampling per image.
``results.json``, ``results.md`` and a grid per method are written to OUT.

Methods: ``sd-inpaint`` (the frozen backbone, ``photo of a person``, no references), ``pva``
(zero-shot), ``pva-ft40`` / ``crossqkv-ft40`` (METHOD 7, ``ft_steps``), ``custom-diffusion``
(every cross-attention weight + token, or K/V only with ``cd_params="crossattn_kv"``,
``cd_steps``, no identity tokens; with ``cd_eval_steps`` also scored after fewer steps, as
``custom-diffusion@<steps>``, from the same fine-tuning run).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from datamodules.shards import ShardDataModule
from pva.backbone import model_resolution
from pva.checks import (
    ETA,
    GUIDANCE,
    NONNEGATIVE,
    NONNEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Range,
    check_ranges,
)
from pva.data.masks import EVAL_MASKS
from pva.data.reader import decode_jpeg
from pva.face_encoders import face_model_present, face_model_source
from pva.fileio import atomic_path, check_record, content_stamp, refuse_file_as_folder, remove_path
from pva.methods import METHODS
from pva.metrics import (
    FeatureFn,
    InceptionFeatures,
    fid_from_features,
    kid_from_features,
    masked_error,
    masked_psnr,
    masked_ssim,
    outside_mask_error,
)
from pva.model import PVAModel
from pva.personalize import personalized
from pva.prompts import EDIT_SUFFIXES, UNCOND_PROMPT, conditional_prompt, edit_prompt
from pva.recognizers import PaperIdentityScorer, build_recognizer
from pva.sampling import ddim_inpaint


@dataclass(frozen=True)
class Metric:
    """A per-image inpainting metric, averaged per method and mask.

    Args:
        name: Key in ``results.json``.
        title: Table title in ``results.md``.
        fmt: Number format of the table cells.
        fn: ``fn(output, ground_truth, mask, landmarks, scorer)`` -> one float; images are
            (1, 3, H, W) in [-1, 1], the mask (1, 1, H, W) with 1 = filled, landmarks (1, 68, 2).
    """

    name: str
    title: str
    fmt: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, Any], float]


METRICS: dict[str, Metric] = {}
"""Every per-image metric, by name, in table order; :func:`register_metric` adds one."""


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (scored for every output, tabled in ``results.md``)."""
    METRICS[metric.name] = metric
    return metric


for _metric in (
    Metric(
        "identity_sim",
        "identity similarity to ground truth (mean ± std)",
        "{:.3f}",
        lambda o, gt, m, lm, scorer: float(scorer.similarity(o, gt, lm)[0]),
    ),
    Metric(
        "masked_error",
        "masked-region error (mean |diff|, [0, 1])",
        "{:.4f}",
        lambda o, gt, m, lm, scorer: float(masked_error(o, gt, m)[0]),
    ),
    Metric(
        "psnr",
        "masked-region PSNR (dB)",
        "{:.2f}",
        lambda o, gt, m, lm, scorer: float(masked_psnr(o, gt, m)[0]),
    ),
    Metric(
        "ssim",
        "masked-region SSIM",
        "{:.3f}",
        lambda o, gt, m, lm, scorer: float(masked_ssim(o, gt, m)[0]),
    ),
    Metric(
        "outside_error",
        "outside-mask error (mean |diff|, [0, 1])",
        "{:.4f}",
        lambda o, gt, m, lm, scorer: float(outside_mask_error(o, gt, m)[0]),
    ),
):
    register_metric(_metric)
PROTOCOLS = ("ours", "paper")
"""``pva evaluate --protocol``: ``ours`` or ``paper`` (see :func:`evaluate`)."""
RANGES = {
    "num_refs": Range(1, 5, integer=True),
    "guidance": GUIDANCE,
    "edit_guidance": GUIDANCE,
    "steps": POSITIVE_INT,
    "eta": ETA,
    "ft_steps": POSITIVE_INT,
    "cd_steps": POSITIVE_INT,
    "max_persons": POSITIVE_INT,
    "shard_index": NONNEGATIVE_INT,
    "num_shards": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "seed": SEED,
    "prior_weight": NONNEGATIVE,
    "ft_lr": POSITIVE,
    "cd_lr": POSITIVE,
    "cd_eval_steps": POSITIVE_INT,
}
"""The allowed range of each numeric argument of :func:`evaluate` (and flag of ``pva evaluate``)."""

CD_PARAMS = {"crossattn": "custom-diffusion", "crossattn_kv": "custom-diffusion-kv"}
"""``--cd-params``: what Custom Diffusion fine-tunes (``cd_train.py --freeze_model``)."""


@dataclass(frozen=True)
class Selection:
    """Which persons, targets and masks ``pva evaluate`` runs.

    Args:
        split: Split to evaluate.
        num_refs: References per person (1..5).
        masks: Evaluation masks.
        edit: Run the editing track.
        persons: Evaluate only these person ids of ``split``, in this order (before
            ``max_persons`` and sharding); an id not in the split is an error.
        max_persons: Evaluate only the first persons (quick runs).
        shard_index: This process's shard of persons.
        num_shards: Number of processes sharing the persons.
    """

    split: str = "test"
    num_refs: int = 5
    masks: Sequence[str] = EVAL_MASKS
    edit: bool = True
    persons: Sequence[str] | None = None
    max_persons: int | None = None
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        check_ranges("--", vars(self), RANGES)
        if self.shard_index >= self.num_shards:
            message = f"--shard-index must be below --num-shards ({self.num_shards})"
            raise ValueError(f"{message}, got {self.shard_index}")


@dataclass(frozen=True)
class Sampling:
    """How ``pva evaluate`` samples each output.

    Args:
        guidance: Inpainting guidance (paper: 1 or 6).
        edit_guidance: Editing guidance (paper: 15 or 30).
        steps: DDIM steps (paper: 100).
        eta: DDIM eta (paper: 1.0).
        seed: Sampling and adaptation seed.
        paste_back: Paste input pixels outside the mask; ``None``: off (the paper's protocol
            keeps it off and refuses ``True``).
        batch_size: Images per sampling call.
    """

    guidance: float = 6.0
    edit_guidance: float = 15.0
    steps: int = 100
    eta: float = 1.0
    seed: int = 0
    paste_back: bool | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_ranges("--", vars(self), RANGES)


@dataclass(frozen=True)
class FineTuning:
    """How ``pva evaluate``'s fine-tuning methods adapt to each person.

    Args:
        ft_steps: Steps of ``pva-ft40`` / ``crossqkv-ft40``.
        ft_lr: Attention learning rate of every fine-tuning method per (target x timestep
            draw) of a step (METHOD 7: 1e-5, which is 2e-5 per step of 2 draws).
        cd_steps: Steps of ``custom-diffusion``.
        cd_lr: ``custom-diffusion``'s attention learning rate per (target x timestep draw);
            ``None``: ``ft_lr``. The paper's Custom Diffusion runs stepped at 8e-6 (1e-6 x batch
            1 x accumulation 4 x 2 GPUs, ``scale_lr``; ``script/submit.py``), 0.4x PVA-FT's 2e-5.
        cd_params: What ``custom-diffusion`` fine-tunes: ``crossattn`` (every cross-attention
            weight, the paper's runs) or ``crossattn_kv`` (K/V only, Custom Diffusion's default).
        cd_eval_steps: Also score ``custom-diffusion`` after these fine-tuning steps (its
            inpainting track, as methods ``custom-diffusion@<steps>``), e.g. ``(40, 100, 300)``.
        prior_data: Shards of OTHER persons for Custom Diffusion's prior preservation (off
            when ``None``); its ``prior_split`` photos, wholeface-masked, ``photo of a person``.
        prior_split: Split of ``prior_data`` to draw prior photos from.
        prior_weight: Weight of the prior-preservation loss.
    """

    ft_steps: int = 40
    ft_lr: float = 1e-5
    cd_steps: int = 1000
    cd_lr: float | None = None
    cd_params: Literal["crossattn", "crossattn_kv"] = "crossattn"
    cd_eval_steps: Sequence[int] = ()
    prior_data: str | None = None
    prior_split: str = "train"
    prior_weight: float = 1.0

    def __post_init__(self) -> None:
        check_ranges("--", vars(self), RANGES)
        if self.cd_params not in CD_PARAMS:
            message = f"--cd-params must be one of {', '.join(CD_PARAMS)}"
            raise ValueError(f"{message}, got {self.cd_params!r}")


@dataclass(frozen=True)
class Scoring:
    """How ``pva evaluate`` scores the outputs (the protocol, its models).

    Args:
        protocol: ``ours`` or ``paper`` (the command's description says how each scores).
        recognizer: Scoring recognizer: ``dlib``, an arcface_torch ``.pth`` (paper: Glint360K
            CosFace R100) or an InsightFace ``.onnx`` / model folder.
        inception_weights: FID Inception weights file; FID/KID are skipped without it.
        clip_weights: open-clip ViT-B/32 checkpoint for the editing CLIP score.
        feature_fn: Inject a feature extractor for FID/KID instead (tests, other backbones).
    """

    protocol: Literal["ours", "paper"] = "ours"
    recognizer: str = "dlib"
    inception_weights: str | None = None
    clip_weights: str | None = None
    feature_fn: FeatureFn | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            message = f"--protocol must be one of {', '.join(PROTOCOLS)}"
            raise ValueError(f"{message}, got {self.protocol!r}")


def _png(path: Path, image: torch.Tensor) -> None:
    """(3, H, W) in [-1, 1] -> PNG, written atomically."""
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def load_png(path: Path) -> torch.Tensor:
    """An output image of this protocol, (3, H, W) in [-1, 1]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)


def _stem(sample: dict) -> str:
    return Path(sample["file"]).stem


class Evaluator:
    """Generation for :func:`evaluate`: each method's outputs for each person."""

    def __init__(
        self, model: PVAModel, out: Path, sampling: Sampling, fine_tuning: FineTuning
    ) -> None:
        self.model, self.out = model.eval(), out
        self.guidance, self.edit_guidance = sampling.guidance, sampling.edit_guidance
        self.steps, self.eta, self.seed = sampling.steps, sampling.eta, sampling.seed
        self.paste_back, self.batch_size = bool(sampling.paste_back), sampling.batch_size
        ft = fine_tuning
        self.ft_steps, self.cd_steps = ft.ft_steps, ft.cd_steps
        self.cd_eval_steps = tuple(k for k in ft.cd_eval_steps if 0 < k < ft.cd_steps)
        self.ft_lr = ft.ft_lr
        self.cd_lr = ft.ft_lr if ft.cd_lr is None else ft.cd_lr
        self.cd_variant = CD_PARAMS[ft.cd_params]
        self.generated = 0
        self.prior: Callable[[torch.Generator], dict] | None = None  # custom-diffusion only
        self.prior_weight = 1.0

    # ---------------------------------------------------------------------- generation
    def _sample(
        self,
        method: str,
        samples: list[dict],
        refs: torch.Tensor,
        prompts: list[str],
        mode: str,
        guidance: float,
    ) -> list[torch.Tensor]:
        model, outs = self.model, []
        identity = METHODS[method.split("@")[0]].identity
        tokens = model.encode_identity(refs[None]) if identity else None  # once per person
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            n = len(chunk)
            gen = torch.Generator(device=model.device).manual_seed(self.seed)
            out = ddim_inpaint(
                model,
                torch.stack([s["image"] for s in chunk]),
                torch.stack([s["mask"] for s in chunk]),
                None,
                prompts[i : i + n],
                negative_prompt=UNCOND_PROMPT,
                guidance_scale=guidance,
                num_steps=self.steps,
                eta=self.eta,
                mode=mode,
                generator=gen,
                paste_back=self.paste_back,
                identity_tokens=None if tokens is None else tokens.repeat(n, 1, 1),
            )
            outs.extend(out.cpu())
        return outs

    def _missing(self, method: str, pid: str, samples: list[dict]) -> list[dict]:
        return [
            s
            for s in samples
            if not (self.out / method / pid / f"{_stem(s)}_{s['mask_region']}.png").exists()
        ]

    def _write(self, method: str, pid: str, samples: list[dict], outs: list[torch.Tensor]) -> None:
        for s, o in zip(samples, outs):
            _png(self.out / method / pid / f"{_stem(s)}_{s['mask_region']}.png", o)

    def person(
        self, method: str, person: dict, samples: list[dict], edits: list[dict], timings: dict
    ) -> None:
        """Generate the missing outputs of one person for one method.

        ``edits``: the wholeface samples of the editing track (each gets the 15 prompts).

        For ``custom-diffusion`` with ``cd_eval_steps``, the inpainting track is also sampled
        after those fine-tuning steps, as method ``custom-diffusion@<steps>``.
        """
        pid, spec = person["person"], METHODS[method]
        cd = spec.schedule == "cd"
        todo = self._missing(method, pid, samples)
        edit_todo = [
            (edit, k)
            for edit in edits
            for k in range(len(EDIT_SUFFIXES))
            if not (self.out / method / pid / "edit" / f"{_stem(edit)}_{k}.png").exists()
        ]
        checkpoints: dict[int, list[dict]] = {}
        if cd:
            checkpoints = {
                k: self._missing(f"{method}@{k}", pid, samples) for k in self.cd_eval_steps
            }
        if not todo and not edit_todo and not any(checkpoints.values()):
            return
        refs = person["references"]
        base_prompt = conditional_prompt(self.model.modifier_token.token)
        prompt = base_prompt if spec.token else UNCOND_PROMPT
        sampling = [0.0]  # seconds spent sampling inside the fine-tuning loop

        def run() -> None:
            t0 = time.perf_counter()
            if todo:
                outs = self._sample(
                    method, todo, refs, [prompt] * len(todo), "inpaint", self.guidance
                )
                self._write(method, pid, todo, outs)
            if edit_todo:
                token = self.model.modifier_token.token if spec.token else None
                prompts = [edit_prompt(EDIT_SUFFIXES[k], token) for _, k in edit_todo]
                edit_samples = [e for e, _ in edit_todo]
                outs = self._sample(method, edit_samples, refs, prompts, "edit", self.edit_guidance)
                for (edit, k), o in zip(edit_todo, outs):
                    _png(self.out / method / pid / "edit" / f"{_stem(edit)}_{k}.png", o)
            count = len(todo) + len(edit_todo)
            if count:
                timings["sample_s_per_image"].append((time.perf_counter() - t0) / count)
            self.generated += count

        def at_step(step: int) -> None:
            pending = checkpoints.get(step)
            if pending:
                t0 = time.perf_counter()
                outs = self._sample(
                    method, pending, refs, [prompt] * len(pending), "inpaint", self.guidance
                )
                self._write(f"{method}@{step}", pid, pending, outs)
                self.generated += len(pending)
                sampling[0] += time.perf_counter() - t0

        if spec.variant is not None:
            steps = self.cd_steps if cd else self.ft_steps
            t0 = time.perf_counter()
            prior = self.prior if cd else None
            lr = self.cd_lr if cd else self.ft_lr
            variant = self.cd_variant if cd else spec.variant
            with personalized(
                self.model,
                person["images"],
                person["references"],
                person["boxes"],
                steps=steps,
                variant=variant,
                seed=self.seed,
                lr=lr,
                prior=prior,
                prior_weight=self.prior_weight,
                callback=at_step if checkpoints else None,
                progress=True,  # under the persons bar
            ):
                timings["adapt_s_per_person"].append(time.perf_counter() - t0 - sampling[0])
                run()
        else:
            run()


def _shards_for_folder(
    folder: str, shards: Path, split: str, model: PVAModel, stamp: dict | None = None
) -> str:
    """Build shards of a people folder with every person in ``split``, once per content.

    ``shards/source.json`` records what they were built from (the folder's content stamp, the
    split and the size); when that differs from ``folder`` now, they are built again.
    """
    from pva.data.writer import build_shards

    size = model_resolution(model.unet, model.vae)
    fractions = {"test": (0.0, 1.0), "val": (1.0, 0.0)}.get(split)
    if fractions is None:
        raise ValueError(f"a photo folder can be evaluated as split test or val, not {split}")
    stamp = content_stamp(folder) if stamp is None else stamp  # the caller's, when it has one
    source = {"data": stamp, "split": split, "image_size": size}
    record = shards / "source.json"
    if (shards / "index.json").is_file() and record.is_file():
        if json.loads(record.read_text()) == json.loads(json.dumps(source)):
            return str(shards)
    build_shards(
        folder,
        shards,
        image_size=size,
        val_fraction=fractions[0],
        test_fraction=fractions[1],
        overwrite=True,
    )
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(source, indent=1))
    return str(shards)


def _prior_sampler(shards: str, split: str, num_refs: int) -> Callable[[torch.Generator], dict]:
    """A callable drawing one prior-preservation batch (another person, wholeface mask)."""
    dm = ShardDataModule(shards, max_refs=num_refs, eval_masks=("wholeface",), num_workers=0)
    stream = dm.stream(split, False)
    stream.rank, stream.world_size = 0, 1
    pool = []
    for rec in dm.records(split):
        pool.extend(stream.person_eval_samples(rec))
        if len(pool) >= 256:
            break
    if not pool:
        raise ValueError(f"--prior-data '{shards}' has no {split} photos")

    def draw(gen: torch.Generator) -> dict:
        s = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        return {
            "image": s["image"][None],
            "mask": s["mask"][None],
            "references": torch.stack(s["references"])[None],
            "prompt": [UNCOND_PROMPT],
        }

    return draw


def _save_ground_truth(out: Path, person: str, samples: list[dict]) -> None:
    for s in samples:
        base = out / "_gt" / person / f"{_stem(s)}_{s['mask_region']}"
        if not base.with_suffix(".json").exists():
            _png(base.with_suffix(".gt.png"), s["image"])
            _png(base.with_suffix(".mask.png"), s["mask"].repeat(3, 1, 1) * 2 - 1)
            with atomic_path(base.with_suffix(".json")) as tmp:
                tmp.write_text(
                    json.dumps({"landmarks": s["landmarks"].tolist(), "mask": s["mask_region"]})
                )


def evaluate(
    data: str,
    out: str,
    methods: Sequence[str] = ("sd-inpaint", "pva"),
    adapter: str | None = None,
    backbone: str | None = None,
    face_model: str | None = None,
    selection: Selection = Selection(),
    sampling: Sampling = Sampling(),
    fine_tuning: FineTuning = FineTuning(),
    scoring: Scoring = Scoring(),
    overwrite: bool = False,
) -> dict:
    """The paper's evaluation protocol for PVA and baselines (resumable, shardable).

    Inpaints every test target under each mask per method, runs the editing track, and writes
    ``results.json``, ``results.md`` and image grids; returns the results.
    ``protocol="paper"`` scores as the authors' figure scripts do and says so in the results:
    identity with the ``recognizer`` ``.pth`` (Glint360K CosFace R100 in the paper) on the
    256 px image (PIL bilinear), crop [35:223, 35:223], pooled to 112, no alignment
    (:class:`pva.recognizers.PaperIdentityScorer`); FID and KID with clean-fid's ``clean``
    resize, KID reported x1000; the CLIP score as the raw cosine with OpenAI's ViT-B/32
    (``clip_weights`` in open-clip format, architecture ``ViT-B-32-quickgelu``) over every test
    target x the 15 prompts; paste-back off. ``ours`` (default): the recognizer on 5-point
    aligned faces, torch-fidelity's resize, KID as is, ``100 * max(cos, 0)`` with open-clip's
    ViT-B/32, the editing track on each person's first target.

    Args:
        data: Shards folder (``pva shards build`` output), or a folder of person folders (shards
            are built into ``OUT/_shards`` at the model resolution, every person in ``split``).
        out: Output folder (resumed when it exists).
        methods: Methods to run, names in :data:`pva.methods.METHODS`.
        adapter: PVA adapter (needed by every method but ``sd-inpaint``).
        backbone: SD2-inpainting folder; default: the one recorded in the adapter.
        face_model: Conditioning face encoder (an arcface_torch ``.pth``, an InsightFace
            ``.onnx`` or ``dlib``); default: recorded in the adapter.
        selection: Which persons, targets and masks (:class:`Selection`).
        sampling: How each output is sampled (:class:`Sampling`).
        fine_tuning: How the fine-tuning methods adapt (:class:`FineTuning`).
        scoring: How the outputs are scored (:class:`Scoring`).
        overwrite: Delete ``out`` first. Otherwise an existing ``out`` is resumed only when
            ``OUT/run.json`` shows it was made from the same inputs and settings (the data's and
            models' content stamps, split, masks, sampling and fine-tuning settings, protocol);
            any difference is refused with the keys that differ. ``methods``, ``persons``,
            ``max_persons``, sharding, ``batch_size`` and the scorers may change between runs.

    Raises:
        FileExistsError: ``out`` holds an evaluation made from other inputs.
        RangeError: A number outside its range (:data:`RANGES`).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    split, num_refs, masks, edit = (
        selection.split,
        selection.num_refs,
        selection.masks,
        selection.edit,
    )
    persons, max_persons = selection.persons, selection.max_persons
    shard_index, num_shards = selection.shard_index, selection.num_shards
    guidance, edit_guidance, steps, eta = (
        sampling.guidance,
        sampling.edit_guidance,
        sampling.steps,
        sampling.eta,
    )
    seed, paste_back = sampling.seed, sampling.paste_back
    ft_steps, ft_lr, cd_steps, cd_lr, cd_params = (
        fine_tuning.ft_steps,
        fine_tuning.ft_lr,
        fine_tuning.cd_steps,
        fine_tuning.cd_lr,
        fine_tuning.cd_params,
    )
    prior_data, prior_split, prior_weight = (
        fine_tuning.prior_data,
        fine_tuning.prior_split,
        fine_tuning.prior_weight,
    )
    protocol, recognizer, feature_fn = scoring.protocol, scoring.recognizer, scoring.feature_fn
    inception_weights, clip_weights = scoring.inception_weights, scoring.clip_weights
    if overwrite and num_shards > 1:
        raise ValueError(
            "--overwrite deletes --out, so it cannot run in --num-shards processes; "
            "delete --out first, then start them"
        )
    paper = protocol == "paper"
    if paper and paste_back:
        message = "--protocol paper keeps paste-back off (the reference composites nothing)"
        raise ValueError(message + "; drop --paste-back")
    paste_back = bool(paste_back)
    if any(METHODS[m].identity or METHODS[m].token for m in methods) and adapter is None:
        raise ValueError("--adapter is required for every method but sd-inpaint")
    out_dir = Path(out)
    refuse_file_as_folder(out_dir, "--out", overwrite)
    if inception_weights is not None and feature_fn is None:  # fails early, clearly, if absent
        feature_fn = InceptionFeatures(inception_weights, "clean" if paper else "tf1-bilinear")
    clip = None
    if clip_weights is not None:
        from pva.metrics import ClipScorer

        arch = "ViT-B-32-quickgelu" if paper else "ViT-B-32"
        clip = ClipScorer(clip_weights, arch, protocol=protocol)
    if paper:
        if recognizer == "dlib" or Path(recognizer).suffix != ".pth":
            message = "--protocol paper scores identity with an arcface_torch .pth (the paper:"
            raise ValueError(f"{message} glint360k_cosface_r100.pth); pass it as --recognizer")
        scorer = PaperIdentityScorer(recognizer)
    else:
        scorer = build_recognizer(recognizer)
    if adapter is not None:
        from pva.apps import resolve_paths

        if not Path(adapter).is_file():
            raise FileNotFoundError(f"--adapter '{adapter}' not found")
        backbone, face_model = resolve_paths(adapter, backbone, face_model)
    elif backbone is None or face_model is None:
        raise ValueError("without --adapter, give --backbone and --face-model")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data '{data}' is not a folder")
    if not face_model_present(face_model):
        raise FileNotFoundError(f"--face-model '{face_model}' not found")
    if prior_data is not None and not Path(prior_data).exists():
        raise FileNotFoundError(f"--prior-data '{prior_data}' not found")
    if overwrite and (out_dir.exists() or out_dir.is_symlink()):
        remove_path(out_dir)
    inputs = {
        "data": content_stamp(data),
        "adapter": None if adapter is None else content_stamp(adapter),
        "backbone": content_stamp(backbone) if Path(backbone).exists() else backbone,  # or hub id
        "face_model": "dlib"
        if face_model_source(face_model) == "dlib"
        else content_stamp(face_model),
        "prior_data": None if prior_data is None else content_stamp(prior_data),
        "split": split,
        "num_refs": num_refs,
        "masks": list(masks),
        "guidance": guidance,
        "edit_guidance": edit_guidance,
        "steps": steps,
        "eta": eta,
        "ft_steps": ft_steps,
        "cd_steps": cd_steps,
        "edit": edit,
        "paste_back": paste_back,
        "seed": seed,
        "prior_split": prior_split,
        "prior_weight": prior_weight,
        "ft_lr": ft_lr,
        "cd_params": cd_params,
        "protocol": protocol,
        "cd_lr": cd_lr,
    }
    record = out_dir / "run.json"
    if out_dir.is_dir():  # anything but the record is written after it: check the record last
        made = [p for p in out_dir.iterdir() if p.name not in ("run.json",) and p.name[0] != "."]
        if made and not record.is_file():
            raise FileExistsError(
                f"--out '{out_dir}' holds files but no run.json recording what "
                f"they were made from; use another --out, or pass --overwrite"
            )
    check_record(
        record,
        inputs,
        f"--out '{out_dir}'",
        "use another --out, or pass --overwrite to start it over",
    )
    if adapter is not None:
        from pva.apps import load_pipeline

        model = load_pipeline(adapter, backbone, face_model).pva
    else:
        model = PVAModel.from_paths(backbone, face_model)
    assert model is not None
    if not (Path(data) / "index.json").is_file():
        data = _shards_for_folder(data, out_dir / "_shards", split, model, inputs["data"])
    dm = ShardDataModule(data, max_refs=num_refs, eval_masks=tuple(masks), num_workers=0)
    stream = dm.stream(split, False)
    stream.rank, stream.world_size = 0, 1
    settings = dataclasses.replace(sampling, paste_back=paste_back)
    ev = Evaluator(model, out_dir, settings, fine_tuning)
    if prior_data is not None:
        ev.prior = _prior_sampler(prior_data, prior_split, num_refs)
        ev.prior_weight = prior_weight
    timings: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    records = list(dm.records(split))
    if persons is not None:
        by_id = {rec.meta["person"]: rec for rec in records}
        missing = [p for p in persons if p not in by_id]
        if missing:
            raise ValueError(
                f"--persons: {', '.join(missing)} not in the {split} split of "
                f"'{data}' (it has {', '.join(list(by_id)[:5])}, ...)"
            )
        records = [by_id[p] for p in dict.fromkeys(persons)]
    records = records[: max_persons or None]
    for k, rec in enumerate(tqdm(records, desc="persons", unit="person")):
        if k % num_shards != shard_index:
            continue
        samples = list(stream.person_eval_samples(rec))
        if not samples:
            continue
        targets, refs = stream.eval_split(rec)
        person = {
            "person": rec.meta["person"],
            "images": torch.stack([decode_jpeg(rec.img[i]) for i in refs]),
            "references": torch.stack([stream.reference(rec, i) for i in refs]),
            "boxes": [rec.meta["images"][i]["boxes"]["wholeface"] for i in refs],
        }
        _save_ground_truth(out_dir, person["person"], samples)
        edits = [s for s in samples if s["mask_region"] == "wholeface"] if edit else []
        edits = edits if paper else edits[:1]  # the paper: every target x 15 prompts
        for method in methods:
            ev.person(method, person, samples, edits, timings[method])
    _merge_timings(out_dir, timings, shard_index)
    scored = list(methods)
    for name in [m for m in methods if METHODS[m].schedule == "cd"]:
        i = scored.index(name)
        scored[i:i] = [f"{name}@{k}" for k in ev.cd_eval_steps]  # before it: rows in step order
    results = score(out_dir, scored, scorer, feature_fn, clip, kid_scale=1000.0 if paper else 1.0)
    results["protocol"] = protocol
    results["generated_this_run"] = ev.generated
    results["plots"] = write_plots(out_dir, results, ft_steps, cd_steps)
    with atomic_path(out_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(results_markdown(results))
    return results


def _merge_timings(out: Path, timings: dict, shard_index: int) -> None:
    """Accumulate this run's timings in ``OUT/_timings/<shard>.json``."""
    path = out / "_timings" / f"{shard_index}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    for method, t in timings.items():
        for key, values in t.items():
            old.setdefault(method, {}).setdefault(key, []).extend(values)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(old))


def _mean_std(values: list[float]) -> list[float]:
    arr = np.array([v for v in values if np.isfinite(v)], dtype=np.float64)
    return [float(arr.mean()), float(arr.std())] if len(arr) else [float("nan"), float("nan")]


@torch.no_grad()
def score(
    out: Path,
    methods: Sequence[str],
    scorer,
    feature_fn: FeatureFn | None,
    clip,
    kid_scale: float = 1.0,
) -> dict:
    """Metrics over every output present in ``out`` (see the module docstring).

    ``kid_scale`` multiplies KID (1000 in the paper's tables); it is recorded as ``kid_scale``.
    """
    results: dict = {
        "methods": {},
        "recognizer": scorer.name,
        "kid_scale": kid_scale,
        "edit_prompts": [edit_prompt(s) for s in EDIT_SUFFIXES],
    }
    timings: dict = defaultdict(lambda: defaultdict(list))
    for f in sorted((out / "_timings").glob("*.json")):
        for method, t in json.loads(f.read_text()).items():
            for key, values in t.items():
                timings[method][key].extend(values)
    gt_feats: dict[str, list] = defaultdict(list)
    for method in methods:
        per_mask: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        feats: dict[str, list] = defaultdict(list)
        grid: list[torch.Tensor] = []
        for meta_path in sorted((out / "_gt").glob("*/*.json")):
            person, stem = meta_path.parent.name, meta_path.name.removesuffix(".json")
            produced = out / method / person / f"{stem}.png"
            if not produced.exists():
                continue
            meta = json.loads(meta_path.read_text())
            gt = load_png(meta_path.with_name(stem + ".gt.png"))[None]
            mask = (load_png(meta_path.with_name(stem + ".mask.png"))[:1] > 0)[None].float()
            o = load_png(produced)[None]
            lm = np.array(meta["landmarks"], dtype=np.float32)[None]
            m = per_mask[meta["mask"]]
            for metric in METRICS.values():
                m[metric.name].append(metric.fn(o, gt, mask, lm, scorer))
            if feature_fn is not None:
                feats[meta["mask"]].append(feature_fn(o))
                if method == methods[0]:
                    gt_feats[meta["mask"]].append(feature_fn(gt))
            if len(grid) < 8:
                grid.append(torch.cat([gt * (mask < 0.5), o, gt], dim=-1)[0])
        entry: dict = {}
        for mask_kind, metrics in per_mask.items():
            entry[mask_kind] = {k: _mean_std(v) for k, v in metrics.items()}
            entry[mask_kind]["n"] = len(next(iter(metrics.values())))
            if feature_fn is not None and len(feats[mask_kind]) >= 2:
                a, b = torch.cat(feats[mask_kind]), torch.cat(gt_feats[mask_kind])
                entry[mask_kind]["fid"] = fid_from_features(a, b)
                kid = kid_from_features(a, b, subsets=20)
                entry[mask_kind]["kid"] = [kid_scale * kid[0], kid_scale * kid[1]]
        edits = sorted(out.glob(f"{method}/*/edit/*.png"))
        if edits and clip is not None:
            prompts = [
                edit_prompt(EDIT_SUFFIXES[int(p.stem.rsplit("_", 1)[1])], None) for p in edits
            ]
            scores = []
            for i in range(0, len(edits), 64):  # bounded memory on the paper's 47k edits
                imgs = torch.stack([load_png(p) for p in edits[i : i + 64]])
                scores.extend(clip(imgs, prompts[i : i + 64]).tolist())
            by_prompt: dict[str, list[float]] = defaultdict(list)
            for prompt, value in zip(prompts, scores):
                by_prompt[prompt].append(value)
            entry["edit"] = {
                "clip_score": _mean_std(scores),
                "n": len(edits),
                "clip_score_per_prompt": {p: _mean_std(v) for p, v in by_prompt.items()},
            }
        elif edits:
            entry["edit"] = {"n": len(edits), "clip_score": None}
        entry["seconds"] = {k: _mean_std(v) for k, v in timings.get(method, {}).items()}
        results["methods"][method] = entry
        if grid:
            img = torch.cat(grid, dim=-2)
            _png(out / f"grid_{method}.png", img)
    return results


def identity_mean(entry: dict) -> float:
    """A method's identity similarity averaged over its masks (each mask weighs the same)."""
    values = [
        v["identity_sim"][0] for v in entry.values() if isinstance(v, dict) and "identity_sim" in v
    ]
    return float(np.mean(values)) if values else float("nan")


def write_plots(out: Path, results: dict, ft_steps: int, cd_steps: int) -> list[str]:
    """``OUT/identity_by_mask.svg`` and, with fine-tuning methods, ``identity_vs_steps.svg``.

    The bars are each method's identity similarity per mask (mean and std over targets). The
    line chart puts each fine-tuning method at its step count (Custom Diffusion at every
    ``custom-diffusion@<k>`` and at ``cd_steps``) beside the methods without fine-tuning, drawn
    across it; each point is the mean over masks. Returns the file names written.
    """
    from pva.plots import bars_plot, steps_plot

    methods = results["methods"]
    masks = [m for m in EVAL_MASKS if any("identity_sim" in e.get(m, {}) for e in methods.values())]
    if not masks:
        return []
    series = {
        name: [tuple(entry.get(m, {}).get("identity_sim", (float("nan"),) * 2)) for m in masks]
        for name, entry in methods.items()
    }
    written = ["identity_by_mask.svg"]
    with atomic_path(out / written[0]) as tmp:
        tmp.write_text(bars_plot(masks, series))
    curves: dict[str, list[tuple[float, float]]] = {}
    levels: dict[str, float] = {}
    for name, entry in methods.items():
        base, _, at = name.partition("@")
        spec = METHODS.get(base)
        if spec is None:
            continue
        if spec.variant is None:
            levels[name] = identity_mean(entry)
            continue
        steps = int(at) if at else (cd_steps if spec.schedule == "cd" else ft_steps)
        curves.setdefault(base, []).append((steps, identity_mean(entry)))
    if curves:
        written.append("identity_vs_steps.svg")
        with atomic_path(out / written[1]) as tmp:
            tmp.write_text(steps_plot(curves, levels))
    return written


def results_markdown(results: dict) -> str:
    """The paper-layout tables: one row per method, columns per mask; then editing and time."""
    methods = results["methods"]
    masks = [m for m in EVAL_MASKS if any(m in e for e in methods.values())]
    protocol = results.get("protocol", "ours")
    kid_title = "KID x1000" if results.get("kid_scale", 1.0) == 1000.0 else "KID"
    lines = [f"# Evaluation ({protocol} protocol; identity scorer: {results['recognizer']})"]
    lines += [f"\n![{name.removesuffix('.svg')}]({name})" for name in results.get("plots", [])]

    def cell(method: str, mask: str, key: str, fmt: str = "{:.3f}") -> str:
        v = methods[method].get(mask, {}).get(key)
        if v is None:
            return "-"
        if isinstance(v, list):
            return (fmt + " ± " + fmt).format(*v) if len(v) == 2 else "-"
        return fmt.format(v)

    tables = [(metric.title, metric.name, metric.fmt) for metric in METRICS.values()]
    for title, key, fmt in [*tables, ("FID", "fid", "{:.2f}"), (kid_title, "kid", "{:.4f}")]:
        lines += [
            "",
            f"## Inpainting: {title}",
            "",
            "| method | " + " | ".join(masks) + " |",
            "|---|" + "---|" * len(masks),
        ]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(cell(m, k, key, fmt) for k in masks) + " |")
    lines += [
        "",
        "## Editing (15 prompts, wholeface mask)",
        "",
        "| method | outputs | CLIP score |",
        "|---|---|---|",
    ]
    for m, e in methods.items():
        ed = e.get("edit", {})
        cs = ed.get("clip_score")
        cs_fmt = "{:.3f} ± {:.3f}" if protocol == "paper" else "{:.2f} ± {:.2f}"  # raw cosine
        cs_text = cs_fmt.format(*cs) if cs else "- (no --clip-weights)"
        lines.append(f"| {m} | {ed.get('n', 0)} | {cs_text} |")
    lines += [
        "",
        "## Seconds",
        "",
        "| method | adaptation per person | sampling per image |",
        "|---|---|---|",
    ]
    for m, e in methods.items():
        s = e.get("seconds", {})

        def sec(key: str, s=s) -> str:
            v = s.get(key)
            return "{:.1f} ± {:.1f}".format(*v) if v and np.isfinite(v[0]) else "-"

        lines.append(f"| {m} | {sec('adapt_s_per_person')} | {sec('sample_s_per_image')} |")
    return "\n".join(lines) + "\n"
