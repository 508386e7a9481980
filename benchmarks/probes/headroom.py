"""``pva bench headroom``: how much identity a ``pva demo`` evaluation leaves for references to add.

A demo's identity score mixes two things: whether a fill *knows* the person's hidden attributes
(what the references carry) and how well the minutes-old stand-ins *render* a face at all. This
benchmark separates them on a finished ``pva evaluate`` output of a demo run. Every target's hole
is also filled with reference fills that the procedural generator makes exactly, and everything is
scored by the run's scoring recognizer against the ground truth, like the methods:

- ``vae``: the target's own VAE reconstruction pasted into the hole. Every attribute right,
  rendered through the stand-in VAE: what a latent-diffusion fill could reach at best.
- ``rerender``: the generator's render of the same photo, passed through what the data stage does
  to it. A check that the target was re-created (identity ~1, pixel error near 0).
- ``wrong hidden``: the same photo (same pose, light and expression) re-rendered with the hidden
  attributes of another test person (:data:`pva.demo.generator.HIDDEN`; visible ones kept), mean
  over ``draws`` other persons. A perfect renderer that does not know the person: the level a
  reference-free fill can reach on average.

``rerender`` minus ``wrong hidden`` is how much the masked attributes weigh in the score (what the
references can add); the distance from a method's row to ``wrong hidden`` is how far its rendering
is from perfect.

With ``oracle_steps`` it also asks whether PVA's identity *encoder* is what limits zero-shot PVA:
stage 1 is re-run (:class:`~pva.module.PVAModule` on the run's ``stage1.yaml`` model and data,
``oracle_steps`` steps) with every reference's face embedding replaced by its person's true
attributes (one value per attribute choice, :func:`attribute_embedding`), and the targets are
inpainted with identity tokens made from those (row ``pva, oracle tokens``) and, with the same
noise, by the run's own adapter from the person's reference photos (row ``pva, same noise``) and
by the backbone alone (``sd-inpaint, same noise``). Every sample draws its own noise here (``pva
evaluate`` reuses one seed per sampling batch, so within one evaluation seed a mask's fills share
their noise across persons). If the oracle row is no better than ``pva, same noise``, better
identity features would not help; the backbone's rendering would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pva.checks import NONNEGATIVE_INT, POSITIVE_INT, check_ranges
from pva.data.reader import decode_jpeg, decode_jpeg_uint8
from pva.data.writer import encode_jpeg
from pva.evaluate import load_png
from pva.faces import resize_square
from pva.objective import EncodingCache

if TYPE_CHECKING:
    from pva.model import PVAModel

FILLS = ("vae", "rerender", "wrong hidden")
ORACLE = "pva, oracle tokens"
SAME_NOISE = "pva, same noise"
BACKBONE_SAME_NOISE = "sd-inpaint, same noise"
NOT_METHODS = ("_gt", "_timings", "_shards", "edit")


def _shard_view(image: np.ndarray, size: int) -> torch.Tensor:
    """What the demo's data stage makes of a generated photo, as the shards hold it.

    The generator's JPEG file, ``pva shards build``'s CelebAHQ-IDI path (the whole photo resized,
    :func:`pva.faces.resize_square`) and the shard's JPEG.

    Returns:
        (3, size, size) in [-1, 1].
    """
    decoded = decode_jpeg_uint8(encode_jpeg(image)).permute(1, 2, 0).numpy()  # (H, W, 3) uint8
    crop = resize_square(decoded, np.zeros((68, 2), np.float32), size).image  # (size, size, 3)
    return decode_jpeg(encode_jpeg(crop))


def attribute_embedding(attributes: dict[str, str], dim: int, value: float = 2.0) -> torch.Tensor:
    """A person's attributes as a (dim,) vector: ``value`` at each attribute's choice, else 0.

    Choices are laid out in :data:`pva.demo.generator.ATTRIBUTES` order (48 of them), then zeros.
    """
    from pva.demo.generator import ATTRIBUTES

    width = sum(len(c) for c in ATTRIBUTES.values())
    if dim < width:
        raise ValueError(
            f"an attribute embedding needs {width} values; the face embedding has {dim}"
        )
    out, offset = torch.zeros(dim), 0
    for name, choices in ATTRIBUTES.items():
        out[offset + choices.index(attributes[name])] = value
        offset += len(choices)
    return out


class OracleEncodings(EncodingCache):
    """Stage 1's encoding cache, each reference's face embedding replaced by its attributes.

    The person's attributes as :func:`attribute_embedding` writes them.
    """

    def __init__(self, oracle: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.oracle = oracle

    def fill(self, model: PVAModel, batch: dict) -> dict:
        """The cached encodings, then the oracle's embeddings where a reference is present."""
        out = super().fill(model, batch)
        emb = out["reference_embeddings"]  # (B, K, E)
        truth = torch.stack([self.oracle[p] for p in batch["person"]])  # (B, E)
        present = batch["reference_mask"].to(emb.device)  # (B, K) bool
        emb = torch.where(present[..., None], truth[:, None], torch.zeros_like(emb))
        return {**out, "reference_embeddings": emb}  # (B, K, E)


def train_oracle_adapter(run: Path, steps: int, oracle: dict[str, torch.Tensor]) -> PVAModel:
    """Stage 1 of ``run`` (its ``stage1.yaml`` model and data) for ``steps`` with oracle embeddings.

    Returns:
        The trained :class:`~pva.model.PVAModel`, in eval mode.
    """
    import lightning as L
    import yaml

    from datamodules import ShardDataModule
    from pva.model import PVAConfig
    from pva.module import PVAModule

    cfg = yaml.safe_load((run / "stage1.yaml").read_text())
    model_cfg = dict(cfg["model"])
    if not model_cfg.get("cache_encodings"):
        raise ValueError(
            f"{run / 'stage1.yaml'}: the oracle replaces cached face embeddings, "
            f"so model.cache_encodings must be true"
        )
    L.seed_everything(int(cfg.get("seed_everything") or 0), verbose=False)
    data_cfg = dict(cfg["data"]["init_args"])
    pva = PVAConfig(**model_cfg.pop("pva", {}))
    module = PVAModule(pva=pva, batch_size=data_cfg["batch_size"], **model_cfg)
    module.encodings = OracleEncodings(oracle)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=ShardDataModule(**data_cfg))
    assert module.model is not None
    return module.model.eval()


@torch.no_grad()
def headroom(
    run: str | Path,
    eval_dir: str | Path | None = None,
    draws: int = 2,
    seed: int = 0,
    oracle_steps: int = 0,
    guidance: float = 1.0,
    ddim_steps: int = 25,
    num_refs: int = 5,
) -> dict:
    """Score a demo evaluation's fills next to the generator's reference fills (module doc).

    Args:
        run: A ``pva demo --out`` folder (``data/annotation``, ``data/image`` and
            ``models/{backbone,face_score.pth}`` are used).
        eval_dir: A ``pva evaluate`` output on that run's shards (default: the first
            ``RUN/eval/seed*``, the demo's sd-inpaint, pva and pva-ft40 fills; Custom
            Diffusion's are in ``RUN/eval/cd-seed<k>``).
        draws: Other persons whose hidden attributes each target is re-rendered with.
        seed: Seed of the choice of those persons and of the oracle row's sampling noise.
        oracle_steps: Stage-1 steps of the ``pva, oracle tokens`` row (0: no such row).
        guidance: The oracle row's inpainting guidance (the demo evaluates at 1).
        ddim_steps: The oracle row's DDIM steps (the demo evaluates with 25).
        num_refs: References per person for the ``oracle_steps`` rows (``pva evaluate``: 5).

    Returns:
        ``{"identity": {fill: {mask: mean}}, "n": {mask: targets}, "rerender_error": mean
        absolute pixel error of the re-rendered targets ([0, 1])}``; fills are the methods found
        in ``eval_dir`` (by name), then :data:`FILLS`, then, with ``oracle_steps``,
        :data:`ORACLE`, :data:`SAME_NOISE` and :data:`BACKBONE_SAME_NOISE`.
    """
    from pva.backbone import load_backbone
    from pva.demo.generator import ATTRIBUTES, HIDDEN, Person, render
    from pva.recognizers import IResNetRecognizer

    if draws < 1 or oracle_steps < 0:
        raise ValueError(
            f"draws must be >= 1 and oracle_steps >= 0, got {draws} and {oracle_steps}"
        )
    run = Path(run)
    ann_dir = run / "data" / "annotation"
    needed = [
        ann_dir / "attributes.json",
        run / "models" / "backbone",
        run / "models" / "face_score.pth",
    ]
    if oracle_steps:
        needed += [run / "stage1.yaml", run / "adapter.safetensors", run / "shards"]
    for path in needed:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pass a finished `pva demo --out` folder")
    if eval_dir is None:
        found = sorted((run / "eval").glob("seed*"))
        if not found:
            raise FileNotFoundError(
                f"no {run / 'eval'}/seed* folder: run the demo's evaluate stage or pass --eval"
            )
        eval_dir = found[0]
    eval_dir = Path(eval_dir)
    metas = sorted((eval_dir / "_gt").glob("*/*.json"))
    if not metas:
        raise FileNotFoundError(
            f"{eval_dir / '_gt'} holds no targets: pass a `pva evaluate` output folder"
        )
    truth = json.loads((ann_dir / "attributes.json").read_text())
    idi = next(iter(sorted(ann_dir.glob("idi-*.json"))))
    id2image = json.loads(idi.read_text())["id2image"]
    test = sorted(p for p, a in truth["persons"].items() if a["split"] == "test")

    def person_of(pid: str) -> Person:
        a = truth["persons"][pid]
        return Person(**{k: ATTRIBUTES[k].index(a[k]) for k in ATTRIBUTES})

    vae = load_backbone(run / "models" / "backbone").vae
    scorer = IResNetRecognizer(run / "models" / "face_score.pth")
    methods = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name not in NOT_METHODS)
    sims: dict[str, dict[str, list[float]]] = {f: {} for f in (*methods, *FILLS)}
    samplers: dict[str, PVAModel] = {}
    tokens: dict[tuple[str, str], torch.Tensor | None] = {}  # (row, person) -> (1, n_id, D)
    if oracle_steps:
        from pva.apps import load_pipeline
        from pva.identity import load_iresnet

        dim = load_iresnet(run / "models" / "face_cond.pth").fc.out_features
        oracle = {p: attribute_embedding(a, dim) for p, a in truth["persons"].items()}
        with torch.enable_grad():
            samplers[ORACLE] = train_oracle_adapter(run, oracle_steps, oracle)
        samplers[SAME_NOISE] = load_pipeline(run / "adapter.safetensors", None, None).pva.eval()
        samplers[BACKBONE_SAME_NOISE] = samplers[SAME_NOISE]  # without identity tokens
        pids = sorted({m.parent.name for m in metas})
        for pid, refs in _references(run / "shards", pids, num_refs).items():
            tokens[(BACKBONE_SAME_NOISE, pid)] = None
            tokens[(SAME_NOISE, pid)] = samplers[SAME_NOISE].encode_identity(refs[None])
            projection = samplers[ORACLE].identity_encoder.projection
            emb = oracle[pid].expand(1, len(refs), -1)  # (1, K, E): K copies, like the photos
            tokens[(ORACLE, pid)] = projection(emb.to(next(projection.parameters()).dtype))
        sims.update({name: {} for name in samplers})
    rng = np.random.default_rng(seed)
    views: dict[tuple[str, str], dict[str, list[torch.Tensor]]] = {}
    errors: list[float] = []
    for k, meta_path in enumerate(metas):
        pid, stem = meta_path.parent.name, meta_path.name.removesuffix(".json")
        photo_stem, mask_name = stem.rsplit("_", 1)
        meta = json.loads(meta_path.read_text())
        gt = load_png(meta_path.with_name(stem + ".gt.png"))[None]  # (1, 3, S, S)
        mask = (load_png(meta_path.with_name(stem + ".mask.png"))[:1] > 0)[None].float()
        size = gt.shape[-1]
        if (pid, photo_stem) not in views:
            names = id2image[pid]["infer"] + id2image[pid]["ref"]
            photo_index = names.index(f"{photo_stem}.jpg")
            index, person = truth["persons"][pid]["index"], person_of(pid)
            with Image.open(run / "data" / "image" / f"{photo_stem}.jpg") as im:
                source = im.width
            original = render(person, truth["seed"], index, photo_index, source)
            view = _shard_view(original.image, size)
            errors.append(float((view - gt[0]).abs().mean() / 2))
            wrong = []
            others = [p for p in test if p != pid] or test
            for other_id in rng.choice(others, size=draws):
                other = person_of(str(other_id))
                swapped = dataclasses.replace(person, **{k: getattr(other, k) for k in HIDDEN})
                photo = render(swapped, truth["seed"], index, photo_index, source)
                wrong.append(_shard_view(photo.image, size))
            recon = vae.decode(vae.encode(gt).latent_dist.mean).sample.clamp(-1, 1)[0]
            views[(pid, photo_stem)] = {"vae": [recon], "rerender": [view], "wrong hidden": wrong}
        fills = dict(views[(pid, photo_stem)])
        for method in methods:
            produced = eval_dir / method / pid / f"{stem}.png"
            if produced.exists():
                fills[method] = [load_png(produced)]
        for name, model in samplers.items():  # the same noise for both rows, per sample
            fills[name] = [
                _fill(
                    model, gt, mask, tokens[(name, pid)], guidance, ddim_steps, seed * 1_000_003 + k
                )
            ]
        landmarks = np.array(meta["landmarks"], dtype=np.float32)[None]  # (1, 68, 2)
        for name, images in fills.items():
            pasted = torch.stack([gt[0] * (1 - mask[0]) + im * mask[0] for im in images])
            sim = scorer.similarity(pasted, gt.expand_as(pasted), landmarks.repeat(len(images), 0))
            sims[name].setdefault(mask_name, []).append(float(sim.mean()))
    return {
        "identity": {
            name: {m: float(np.mean(v)) for m, v in per.items()}
            for name, per in sims.items()
            if per
        },
        "n": {m: len(v) for m, v in sims["vae"].items()},
        "rerender_error": float(np.mean(errors)),
    }


def _references(shards: Path, pids: list[str], num_refs: int) -> dict[str, torch.Tensor]:
    """Each person's evaluation references, as ``pva evaluate`` takes them: (K, 3, 112, 112)."""
    from datamodules import ShardDataModule

    stream = ShardDataModule(str(shards), max_refs=num_refs, num_workers=0).stream("test")
    stream.rank, stream.world_size = 0, 1
    out = {}
    for rec in stream.records(iter(stream.urls)):
        if rec.meta["person"] in pids:
            _, refs = stream.eval_split(rec)
            out[rec.meta["person"]] = torch.stack([stream.reference(rec, i) for i in refs])
    missing = sorted(set(pids) - set(out))
    if missing:
        raise ValueError(f"persons {', '.join(missing)} are not in the test split of {shards}")
    return out


def _fill(
    model: PVAModel,
    image: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor | None,
    guidance: float,
    steps: int,
    seed: int,
) -> torch.Tensor:
    """Inpaint (1, 3, S, S) ``image`` under ``mask`` with identity ``tokens`` (1, n_id, D).

    ``tokens=None``: the backbone alone with ``photo of a person`` (``pva evaluate``'s sd-inpaint).
    """
    from pva.prompts import TEMPLATE, UNCOND_PROMPT
    from pva.sampling import ddim_inpaint

    prompt = UNCOND_PROMPT if tokens is None else TEMPLATE.format(model.modifier_token.token)
    return ddim_inpaint(
        model,
        image,
        mask,
        None,
        [prompt],
        negative_prompt=UNCOND_PROMPT,
        guidance_scale=guidance,
        num_steps=steps,
        eta=1.0,
        generator=torch.Generator().manual_seed(seed),
        paste_back=True,
        identity_tokens=tokens,
    )[0]


RANGES = {"draws": POSITIVE_INT, "oracle_steps": NONNEGATIVE_INT}


def bench_headroom(
    run: str, eval_dir: str | None = None, draws: int = 2, oracle_steps: int = 0
) -> dict:
    """A ``pva demo`` evaluation beside exact generator fills and PVA on oracle attributes.

    Exact fills with the right and with wrong hidden attributes, the VAE's ceiling, and,
    optionally, PVA trained on oracle attribute embeddings. A research probe: prints
    :func:`headroom`'s table and returns its figures.

    Args:
        run: A finished ``pva demo --out`` folder.
        eval_dir: A ``pva evaluate`` output on the run's shards (default: the first
            RUN/eval/seed*, which holds sd-inpaint, pva and pva-ft40; RUN/eval/cd-seed<k> holds
            Custom Diffusion's fills).
        draws: Other persons whose hidden attributes re-render each target.
        oracle_steps: Also train stage 1 this long on true-attribute embeddings and inpaint with
            them (default: 0, off; the demo's stage 1 is 1200).
    """
    check_ranges("--", locals(), RANGES)
    res = headroom(run, eval_dir, draws=draws, oracle_steps=oracle_steps)
    masks = sorted(res["n"])
    print(
        f"identity to the ground truth, each fill pasted into the hole ({res['n']} targets; "
        f"re-rendered targets' pixel error {res['rerender_error']:.4f})\n"
    )
    print("| fill | mean | " + " | ".join(masks) + " |")
    print("|---|---|" + "---|" * len(masks))
    for name, per in res["identity"].items():
        mean = np.mean([per[m] for m in masks if m in per])
        cells = " | ".join(f"{per[m]:.3f}" if m in per else "-" for m in masks)
        print(f"| {name} | {mean:.3f} | {cells} |")
    return res
