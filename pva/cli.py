"""The ``pva`` command. Every flag is documented in ``pva <command> --help``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from pva.checks import (
    ETA,
    GUIDANCE,
    IMAGE_SIDE,
    NONNEGATIVE,
    NONNEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    Range,
)
from pva.methods import METHODS


def _quickstart(args: argparse.Namespace) -> None:
    from pva.quickstart import quickstart

    quickstart(
        out=args.out,
        steps=args.steps,
        photos=args.photos,
        image_size=args.image_size,
        sample_steps=args.sample_steps,
        guidance=args.guidance,
        seed=args.seed,
        overwrite=args.overwrite,
    )


def _demo(args: argparse.Namespace) -> None:
    from pva.demo.run import demo

    demo(
        out=args.out,
        quick=args.quick,
        seed=args.seed,
        seeds=args.seeds,
        only=args.only,
        overwrite=args.overwrite,
        workers=args.workers,
        command="pva " + " ".join(sys.argv[1:]),
    )


def _personalize(args: argparse.Namespace) -> None:
    from pva.apps import personalize_cli

    personalize_cli(
        args.adapter,
        args.refs,
        args.out,
        steps=args.steps,
        variant=args.variant,
        seed=args.seed,
        backbone=args.backbone,
        face_model=args.face_model,
        overwrite=args.overwrite,
        skip_bad_refs=args.skip_bad_refs,
    )


def _inpaint(args: argparse.Namespace) -> None:
    from pva.apps import inpaint_cli

    inpaint_cli(
        args.adapter,
        args.image,
        args.refs,
        args.out,
        prompt=args.prompt,
        mask=args.mask,
        mask_region=args.mask_region,
        mode=args.mode,
        guidance=args.guidance,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        num_images=args.num_images,
        paste_back=args.paste_back,
        backbone=args.backbone,
        face_model=args.face_model,
        overwrite=args.overwrite,
        skip_bad_refs=args.skip_bad_refs,
    )


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter .safetensors (training output)")
    p.add_argument(
        "--backbone", default=None, help="SD2-inpainting folder (default: recorded in the adapter)"
    )
    p.add_argument(
        "--face-model",
        default=None,
        help="conditioning arcface_torch .pth (default: recorded in the adapter)",
    )
    p.add_argument("--seed", type=SEED.arg, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out files")
    p.add_argument(
        "--skip-bad-refs",
        action="store_true",
        help="skip reference photos without a detectable face (default: fail, naming it)",
    )


def _evaluate(args: argparse.Namespace) -> None:
    from pva.evaluate import evaluate

    results = evaluate(
        args.data,
        args.out,
        methods=args.methods.split(","),
        adapter=args.adapter,
        backbone=args.backbone,
        face_model=args.face_model,
        split=args.split,
        num_refs=args.num_refs,
        masks=args.masks.split(","),
        guidance=args.guidance,
        edit_guidance=args.edit_guidance,
        steps=args.steps,
        eta=args.eta,
        ft_steps=args.ft_steps,
        cd_steps=args.cd_steps,
        edit=not args.no_edit,
        recognizer=args.recognizer,
        inception_weights=args.inception_weights,
        clip_weights=args.clip_weights,
        paste_back=args.paste_back,
        max_persons=args.max_persons,
        persons=args.persons.split(",") if args.persons else None,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        batch_size=args.batch_size,
        seed=args.seed,
        prior_data=args.prior_data,
        prior_split=args.prior_split,
        prior_weight=args.prior_weight,
        cd_eval_steps=list(args.cd_eval_steps),
        ft_lr=args.ft_lr,
        cd_params=args.cd_params,
        protocol=args.protocol,
        cd_lr=args.cd_lr,
        overwrite=args.overwrite,
    )
    print(f"generated {results['generated_this_run']} images; results in {args.out}/results.md")


def _rehearse(args: argparse.Namespace) -> None:
    from pva.bench.rehearse import rehearse

    rehearse(out=args.out, size=args.size, photos=args.photos, overwrite=args.overwrite)


def _bench_memory(args: argparse.Namespace) -> None:
    from pva.bench.memory import OPTIONS, bench_memory

    options = tuple(args.options.split(",")) if args.options else OPTIONS
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"--options: unknown {unknown}; choose from {', '.join(OPTIONS)}")
    bench_memory(args.models, options, args.image_size)


def _tiny_assets(args: argparse.Namespace) -> None:
    from pva.tiny import write_tiny_assets

    assets = write_tiny_assets(args.out, seed=args.seed)
    print(f"backbone: {assets.backbone}\nface model: {assets.face_model}")


def _shards_build(args: argparse.Namespace) -> None:
    from pva.data.writer import build_shards

    index = build_shards(
        args.input,
        args.out,
        source_format=args.format,
        image_size=args.image_size,
        num_refs=args.num_refs,
        persons_per_shard=args.persons_per_shard,
        min_images=args.min_images,
        workers=args.workers,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for split, info in index["splits"].items():
        print(
            f"{split:>5}: {info['persons']} persons, {info['images']} images, "
            f"{len(info['shards'])} shards"
        )
    print(
        f"skipped images: {len(index['skipped_images'])}, dropped persons: "
        f"{len(index['dropped_persons'])} (reasons in {args.out}/index.json)"
    )


def _bench_attention(args: argparse.Namespace) -> None:
    import torch

    from pva.bench.attention import bench_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    bench_attention(repeats=args.repeats, small=args.small, backward=not args.forward_only)


def _bench_data(args: argparse.Namespace) -> None:
    import torch

    from pva.bench.data import bench_data

    torch.set_num_threads(1)  # one DataLoader worker's view
    bench_data(
        args.photos,
        image_size=args.image_size,
        refs=args.refs,
        samples=args.samples,
        workers_build=args.build_workers,
    )


def _bench_step(args: argparse.Namespace) -> None:
    import torch

    from pva.bench.step import bench_step

    if args.threads:
        torch.set_num_threads(args.threads)
    bench_step(batch_size=args.batch_size, refs=args.refs, repeats=args.repeats)


def _bench_sample(args: argparse.Namespace) -> None:
    from pva.bench.sample import bench_sample

    bench_sample(steps=(args.short, args.long), cd_steps=args.cd_steps, guidance=args.guidance)


def _number_list(allowed: Range) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: ``"1,4"`` -> ``(1, 4)``, each number in ``allowed``."""

    def parse(text: str) -> tuple[float, ...]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return tuple(allowed.arg(t) for t in items)
        except argparse.ArgumentTypeError:
            msg = f"expected comma-separated numbers, each {allowed.describe()}, got '{text}'"
            raise argparse.ArgumentTypeError(msg) from None

    parse.allowed = allowed  # type: ignore[attr-defined]  # what tests/test_checks.py walks
    return parse


def _bench_text_use(args: argparse.Namespace) -> None:
    from pva.bench.textuse import bench_text_use

    bench_text_use(args.run, args.backbone, persons=args.persons, guidance=args.guidance)


def _bench_headroom(args: argparse.Namespace) -> None:
    from pva.bench.headroom import bench_headroom

    bench_headroom(args.run, args.eval, draws=args.draws, oracle_steps=args.oracle_steps)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pva`` command."""
    parser = argparse.ArgumentParser(
        prog="pva",
        description="Parallel Visual Attention: identity-preserving face inpainting.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "train",
        add_help=False,
        help="train PVA with LightningCLI: pva train fit --config configs/stage1.yaml (the same "
        "as python train.py; pva train fit --help documents every option)",
    )

    q = sub.add_parser(
        "quickstart",
        help="train, save, reload and sample PVA end to end on a tiny random backbone (CPU)",
        description=(
            "Writes a tiny random SD2-inpainting backbone and ArcFace checkpoint, trains the PVA "
            "pathway with Lightning, exports and reloads the adapter, and inpaints a photo. "
            "No downloads; about a minute on 2 CPU cores."
        ),
    )
    q.add_argument("--out", default="quickstart_out", help="output folder (default: %(default)s)")
    q.add_argument(
        "--steps", type=POSITIVE_INT.arg, default=40, help="training steps (default: %(default)s)"
    )
    q.add_argument(
        "--photos",
        default=None,
        help="folder of photos of ONE person (default: an embedded portrait)",
    )
    q.add_argument(
        "--image-size",
        type=Range(16, integer=True, multiple_of=16).arg,
        default=64,
        help="resolution, multiple of 16 (default: 64)",
    )
    q.add_argument(
        "--sample-steps",
        type=POSITIVE_INT.arg,
        default=25,
        help="DDIM steps to inpaint (default: 25)",
    )
    q.add_argument(
        "--guidance", type=GUIDANCE.arg, default=3.0, help="classifier-free guidance (default: 3.0)"
    )
    q.add_argument("--seed", type=SEED.arg, default=0, help="random seed (default: 0)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    q.set_defaults(func=_quickstart)

    dm = sub.add_parser(
        "demo",
        help="the paper in miniature on a CPU: procedural faces, stand-in models, PVA, evaluation",
        description=(
            "Generates procedural persons (identity partly inside the masked regions), trains "
            "small stand-ins for SD2-inpainting and ArcFace, trains PVA with train.py, evaluates "
            "sd-inpaint / pva / pva-ft40 / custom-diffusion on held-out persons with pva "
            "evaluate, and writes OUT/report.md. Resumable: finished stages are skipped. "
            "About 18 minutes on 2 CPU cores (measured on an AMD EPYC; slower 2-core machines "
            "took 16-25 with half this stage 1 and a lighter Custom Diffusion); --quick about 3."
        ),
    )
    dm.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    dm.add_argument(
        "--quick", action="store_true", help="a few-minute run of every stage (no evidence)"
    )
    dm.add_argument("--seed", type=SEED.arg, default=0, help="data and training seed (default: 0)")
    dm.add_argument(
        "--seeds",
        type=POSITIVE_INT.arg,
        default=None,
        help="evaluation seeds (default: 3; --quick: 1)",
    )
    dm.add_argument(
        "--only",
        default=None,
        choices=("data", "stage0", "stage1", "evaluate", "report"),
        help="run only this stage (its inputs must exist)",
    )
    dm.add_argument(
        "--workers",
        type=POSITIVE_INT.arg,
        default=2,
        help="evaluation processes, 1 thread each (default: 2)",
    )
    dm.add_argument("--overwrite", action="store_true", help="delete --out and start over")
    dm.set_defaults(func=_demo)

    pz = sub.add_parser(
        "personalize",
        help="fine-tune an adapter to one person (or each person of a folder) in 40 steps",
        description=(
            "METHOD section 7: each reference in turn is the target with its wholeface box "
            "mask; the others, each flipped with p=0.5, plus a flipped copy of the last are the "
            "references; 2 stratified timesteps per step; AdamW lr 1e-5 per timestep draw, "
            "2e-5 per step (token 1e-3). Every person starts from the same weights."
        ),
    )
    _model_flags(pz)
    pz.add_argument("--refs", required=True, help="folder of one person's photos, or of persons")
    pz.add_argument("--out", required=True, help="output .safetensors (a folder for persons)")
    pz.add_argument(
        "--steps", type=POSITIVE_INT.arg, default=40, help="optimizer steps (default: 40)"
    )
    pz.add_argument(
        "--variant",
        choices=["pva", "crossqkv"],
        default="pva",
        help="pva: visual Q/K/V + token (PVA-FT); crossqkv: every cross-attention weight too "
        "(Q/K/V and output projection, CrossQKV-FT)",
    )
    pz.set_defaults(func=_personalize)

    ip = sub.add_parser(
        "inpaint",
        help="inpaint or edit a photo of the person",
        description=(
            "Finds the face, inpaints a face-centred square at the model resolution with DDIM "
            "and one batched classifier-free-guidance UNet call per step, and composites the "
            "result back into the photo."
        ),
    )
    _model_flags(ip)
    ip.add_argument("--image", required=True, help="photo to fill (any size)")
    grp = ip.add_mutually_exclusive_group(required=True)
    grp.add_argument("--mask", help="mask image, white = fill, same size as --image")
    grp.add_argument(
        "--mask-region",
        choices=["lowerface", "eyebrow", "wholeface", "random"],
        help="a mask from dlib landmarks on --image",
    )
    ip.add_argument("--refs", required=True, help="folder of reference photos of the person")
    ip.add_argument(
        "--prompt",
        default=None,
        help="prompt (default: photo of a <new1> person, with the adapter's modifier token)",
    )
    ip.add_argument(
        "--mode",
        choices=["inpaint", "edit"],
        default="inpaint",
        help="inpaint: identity only in the conditional branch; edit: in both (METHOD 8)",
    )
    ip.add_argument(
        "--guidance", type=GUIDANCE.arg, default=6.0, help="CFG scale (default: 6; edit: 15-30)"
    )
    ip.add_argument("--steps", type=POSITIVE_INT.arg, default=100, help="DDIM steps (default: 100)")
    ip.add_argument("--eta", type=ETA.arg, default=1.0, help="DDIM eta (default: 1.0)")
    ip.add_argument(
        "--num-images", type=Range(1, 64, integer=True).arg, default=1, help="outputs (default: 1)"
    )
    ip.add_argument(
        "--paste-back",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every pixel outside the mask equal to the input (default: on)",
    )
    ip.add_argument("--out", required=True, help="output .png")
    ip.set_defaults(func=_inpaint)

    ev = sub.add_parser(
        "evaluate",
        help="the paper's evaluation protocol for PVA and baselines (resumable, shardable)",
        description=(
            "Inpaints every test target under each mask per method, runs the editing track, "
            "and writes results.json, results.md and image grids. Existing outputs are reused "
            "when OUT/run.json shows the same data, models and settings (methods and persons "
            "may be added); other inputs are refused."
        ),
    )
    ev.add_argument(
        "--data", required=True, help="shards folder, or a folder of person folders (built)"
    )
    ev.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    ev.add_argument(
        "--methods",
        default="sd-inpaint,pva",
        help="comma list of: "
        + "; ".join(f"{m.name} ({m.help})" for m in METHODS.values())
        + " (default: %(default)s)",
    )
    ev.add_argument("--adapter", default=None, help="PVA adapter (all methods but sd-inpaint)")
    ev.add_argument("--backbone", default=None, help="SD2-inpainting folder (default: adapter's)")
    ev.add_argument("--face-model", default=None, help="conditioning .pth (default: adapter's)")
    ev.add_argument("--split", default="test", help="split (default: test)")
    ev.add_argument(
        "--num-refs",
        type=Range(1, 5, integer=True).arg,
        default=5,
        help="references per person (1..5)",
    )
    ev.add_argument(
        "--masks", default="lowerface,eyebrow,wholeface,random", help="comma list of masks"
    )
    ev.add_argument(
        "--guidance", type=GUIDANCE.arg, default=6.0, help="inpainting CFG (paper: 1 or 6)"
    )
    ev.add_argument(
        "--edit-guidance", type=GUIDANCE.arg, default=15.0, help="editing CFG (15 or 30)"
    )
    ev.add_argument("--steps", type=POSITIVE_INT.arg, default=100, help="DDIM steps (default: 100)")
    ev.add_argument("--eta", type=ETA.arg, default=1.0, help="DDIM eta (default: 1.0)")
    ev.add_argument(
        "--ft-steps", type=POSITIVE_INT.arg, default=40, help="pva-ft40/crossqkv-ft40 steps"
    )
    ev.add_argument(
        "--cd-steps", type=POSITIVE_INT.arg, default=1000, help="custom-diffusion steps"
    )
    ev.add_argument(
        "--ft-lr",
        type=POSITIVE.arg,
        default=1e-5,
        help="attention learning rate of every fine-tuning method per timestep draw of a step "
        "(paper, SD2: 1e-5, i.e. 2e-5 per step of 2 draws)",
    )
    ev.add_argument(
        "--cd-lr",
        type=POSITIVE.arg,
        default=None,
        help="custom-diffusion's learning rate per timestep draw (default: --ft-lr; the paper's "
        "runs stepped at 0.4x PVA-FT's rate)",
    )
    ev.add_argument(
        "--cd-params",
        choices=["crossattn", "crossattn_kv"],
        default="crossattn",
        help="what custom-diffusion fine-tunes: every cross-attention weight (the paper's "
        "runs, default) or K/V only",
    )
    ev.add_argument(
        "--protocol",
        choices=["ours", "paper"],
        default="ours",
        help="paper: the authors' scoring (--recognizer .pth on the 256 px image with a fixed "
        "crop, clean-fid FID/KID with KID x1000, raw-cosine OpenAI ViT-B/32 CLIP score over "
        "every target x 15 prompts, no paste-back); ours (default): aligned faces, "
        "torch-fidelity resize, 100 x CLIP cosine on first targets",
    )
    ev.add_argument(
        "--cd-eval-steps",
        type=_number_list(POSITIVE_INT),
        default=(),
        help="comma list: also score custom-diffusion after these steps, e.g. 40,100,300",
    )
    ev.add_argument("--no-edit", action="store_true", help="skip the editing track")
    ev.add_argument(
        "--recognizer",
        default="dlib",
        help="identity scorer: dlib, an arcface_torch .pth, or an InsightFace .onnx/folder",
    )
    ev.add_argument("--inception-weights", default=None, help="FID Inception .pth (FID/KID)")
    ev.add_argument(
        "--clip-weights",
        default=None,
        help="open-clip ViT-B/32 checkpoint (the paper protocol: OpenAI's weights in open-clip "
        "format, e.g. open_clip_model.safetensors of timm/vit_base_patch32_clip_224.openai)",
    )
    ev.add_argument(
        "--paste-back",
        action="store_true",
        default=None,
        help="paste input pixels outside the mask (off; refused with --protocol paper)",
    )
    ev.add_argument(
        "--max-persons", type=POSITIVE_INT.arg, default=None, help="first N persons only"
    )
    ev.add_argument(
        "--persons", default=None, help="comma list of person ids: evaluate only these, in order"
    )
    ev.add_argument(
        "--shard-index", type=NONNEGATIVE_INT.arg, default=0, help="this process's shard"
    )
    ev.add_argument(
        "--num-shards", type=POSITIVE_INT.arg, default=1, help="processes sharing the persons"
    )
    ev.add_argument(
        "--batch-size", type=POSITIVE_INT.arg, default=4, help="images per sampling call"
    )
    ev.add_argument("--seed", type=SEED.arg, default=0, help="seed (default: 0)")
    ev.add_argument(
        "--prior-data",
        default=None,
        help="custom-diffusion prior preservation: shards of other persons (default: off)",
    )
    ev.add_argument("--prior-split", default="train", help="split of --prior-data (train)")
    ev.add_argument(
        "--prior-weight", type=NONNEGATIVE.arg, default=1.0, help="prior loss weight (1.0)"
    )
    ev.add_argument(
        "--overwrite",
        action="store_true",
        help="delete --out first; without it an existing --out is resumed only if it was made "
        "from the same data, models and settings (OUT/run.json), and refused otherwise",
    )
    ev.set_defaults(func=_evaluate)

    rh = sub.add_parser(
        "rehearse",
        help="the real-scale path on a CPU: SD2-size random weights through train.py (killed and "
        "resumed), personalize, inpaint, evaluate; time and peak memory per stage",
        description=(
            "Builds the exact SD2-inpainting architecture and an IResNet-50 with random weights, "
            "writes them in the real formats, generates a small CelebAHQ-IDI tree in the authors' "
            "format and runs the real entry points at 512 px: train.py fit with "
            "configs/stage1.yaml (plus an overlay with only what a CPU needs; killed after a "
            "checkpoint and resumed), pva personalize, pva inpaint, a DDIM step beside diffusers' "
            "pipeline and PVA-FT beside Custom Diffusion per step, and pva evaluate on 2 persons. "
            "Writes OUT/report.md and OUT/rehearsal.json; a rerun resumes. About 20 minutes and "
            "17 GB of memory on 2 cores, 10 GB of disk."
        ),
    )
    rh.add_argument("--out", default="rehearse_out", help="output folder (default: %(default)s)")
    rh.add_argument(
        "--size",
        choices=["sd2", "tiny"],
        default="sd2",
        help="sd2: the real architecture (default); tiny: the same path in a minute or two",
    )
    rh.add_argument(
        "--photos",
        default=None,
        help="folder of one person's photos (3+ with a face) for personalize/inpaint "
        "(default: the embedded astronaut crops)",
    )
    rh.add_argument("--overwrite", action="store_true", help="delete --out and start over")
    rh.set_defaults(func=_rehearse)

    t = sub.add_parser(
        "tiny-assets",
        help="write a tiny random SD2-inpainting folder and ArcFace .pth (for configs/tiny.yaml)",
    )
    t.add_argument("--out", default="runs/tiny_assets", help="folder (default: %(default)s)")
    t.add_argument(
        "--seed", type=SEED.arg, default=0, help="seed of the random weights (default: 0)"
    )
    t.set_defaults(func=_tiny_assets)

    shards = sub.add_parser("shards", help="build WebDataset shards from photos")
    shards_sub = shards.add_subparsers(dest="shards", required=True, metavar="ACTION")
    b = shards_sub.add_parser(
        "build",
        help="CelebAHQ-IDI tree or people/<person>/*.jpg -> WebDataset shards + index.json",
        description=(
            "Detects the face (dlib, largest face), its 68 landmarks and region boxes in every "
            "photo, stores a face-centred training crop and a 112x112 aligned face, one record "
            "per person, and writes index.json with counts and every skipped photo's reason."
        ),
    )
    b.add_argument("input", help="CelebAHQ-IDI root (image/, annotation/) or folder of people")
    b.add_argument("--out", required=True, help="output folder for the shards")
    b.add_argument(
        "--format",
        choices=["auto", "celebahq-idi", "people"],
        default="auto",
        help="source layout (default: auto-detect)",
    )
    b.add_argument(
        "--image-size", type=IMAGE_SIDE.arg, default=512, help="stored image side (default: 512)"
    )
    b.add_argument(
        "--num-refs",
        type=POSITIVE_INT.arg,
        default=5,
        help="CelebAHQ-IDI: read idi-N.json (default: 5)",
    )
    b.add_argument(
        "--persons-per-shard",
        type=POSITIVE_INT.arg,
        default=64,
        help="person records per shard (default: 64)",
    )
    b.add_argument(
        "--min-images",
        type=Range(2, integer=True).arg,
        default=2,
        help="drop persons with fewer usable photos (2)",
    )
    b.add_argument(
        "--workers", type=POSITIVE_INT.arg, default=1, help="worker processes (default: 1)"
    )
    b.add_argument(
        "--val-fraction", type=PROBABILITY.arg, default=0.1, help="people: validation persons (0.1)"
    )
    b.add_argument(
        "--test-fraction", type=PROBABILITY.arg, default=0.3, help="people: test persons (0.3)"
    )
    b.add_argument("--seed", type=SEED.arg, default=0, help="people: split seed (default: 0)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    b.set_defaults(func=_shards_build)

    bench = sub.add_parser("bench", help="benchmarks that print measured figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    a = bench_sub.add_parser(
        "attention",
        help="fused vs reference PVA attention vs stock cross-attention at SD2 shapes",
        description=(
            "Times one cross-attention layer at SD2's largest and a mid shape (batch 2, 77 text "
            "+ 10 identity tokens), prints ratios from one run, the trainable parameter count of "
            "the full SD2-inpainting config (meta device) and PVA's FLOP overhead per step."
        ),
    )
    a.add_argument(
        "--repeats", type=POSITIVE_INT.arg, default=10, help="timed runs per figure (default: 10)"
    )
    a.add_argument(
        "--threads",
        type=NONNEGATIVE_INT.arg,
        default=0,
        help="torch CPU threads (default: torch's)",
    )
    a.add_argument("--small", action="store_true", help="tiny shapes: a smoke run, no figures")
    a.add_argument("--forward-only", action="store_true", help="skip forward+backward timing")
    a.set_defaults(func=_bench_attention)
    d = bench_sub.add_parser(
        "data",
        help="training samples/s per worker: our shards vs full-size photos per sample",
        description=(
            "Builds shards from PHOTOS/<source>/<person>/ (persons with refs+1 or more photos), "
            "then times one process producing training samples from them and from a naive layout "
            "that stores each sample's full-size target and reference photos, in one run."
        ),
    )
    d.add_argument(
        "--photos", default="../shared/data/faces", help="photo root (default: %(default)s)"
    )
    d.add_argument(
        "--image-size", type=IMAGE_SIDE.arg, default=512, help="resolution (default: 512)"
    )
    d.add_argument(
        "--refs", type=POSITIVE_INT.arg, default=5, help="references per sample (default: 5)"
    )
    d.add_argument(
        "--samples", type=POSITIVE_INT.arg, default=60, help="samples timed per layout (60)"
    )
    d.add_argument(
        "--build-workers", type=POSITIVE_INT.arg, default=2, help="shard-build processes (2)"
    )
    d.set_defaults(func=_bench_data)
    st = bench_sub.add_parser(
        "step",
        help="PVA training step vs the frozen base UNet's forward+backward (tiny, mid; CPU)",
    )
    st.add_argument(
        "--batch-size", type=POSITIVE_INT.arg, default=2, help="images per step (default: 2)"
    )
    st.add_argument(
        "--refs", type=POSITIVE_INT.arg, default=5, help="references per image (default: 5)"
    )
    st.add_argument(
        "--repeats", type=POSITIVE_INT.arg, default=5, help="timed runs per row (default: 5)"
    )
    st.add_argument(
        "--threads",
        type=NONNEGATIVE_INT.arg,
        default=0,
        help="torch CPU threads (default: torch's)",
    )
    st.set_defaults(func=_bench_step)
    sa = bench_sub.add_parser(
        "sample",
        help="ms per DDIM step vs diffusers' inpainting pipeline; 40-step PVA-FT vs 1000-step CD",
    )
    sa.add_argument("--short", type=POSITIVE_INT.arg, default=5, help="short DDIM run (default: 5)")
    sa.add_argument("--long", type=POSITIVE_INT.arg, default=25, help="long DDIM run (default: 25)")
    sa.add_argument(
        "--cd-steps", type=POSITIVE_INT.arg, default=1000, help="Custom-Diffusion steps (1000)"
    )
    sa.add_argument("--guidance", type=GUIDANCE.arg, default=6.0, help="CFG scale (default: 6)")
    sa.set_defaults(func=_bench_sample)
    tu = bench_sub.add_parser(
        "text-use",
        help="does a `pva demo` stand-in backbone use its text? (oracle captions vs plain prompt)",
    )
    tu.add_argument("--run", required=True, help="a finished `pva demo --out` folder")
    tu.add_argument(
        "--backbone", default=None, help="backbone folder to measure (default: RUN/models/backbone)"
    )
    tu.add_argument(
        "--persons", type=POSITIVE_INT.arg, default=16, help="validation persons (default: 16)"
    )
    tu.add_argument(
        "--guidance",
        type=_number_list(GUIDANCE),
        default=(1.0, 4.0),
        help="comma-separated CFG scales (default: 1,4)",
    )
    tu.set_defaults(func=_bench_text_use)
    me = bench_sub.add_parser(
        "memory",
        help="peak memory and time of one SD2-size training step per memory option (CPU)",
        description=(
            "One training step (batch 1 x 1 timestep, 512 px, AdamW) per option, each in its own "
            "process: fp32, bf16 autocast, gradient checkpointing, frozen weights in bf16, both, "
            "channels-last. Needs the SD2-size models that `pva rehearse` writes."
        ),
    )
    me.add_argument(
        "--models", default="rehearse_out/models", help="pva rehearse's OUT/models (%(default)s)"
    )
    me.add_argument("--options", default=None, help="comma list of options (default: all)")
    me.add_argument(
        "--image-size", type=IMAGE_SIDE.arg, default=512, help="image side (default: 512)"
    )
    me.set_defaults(func=_bench_memory)
    hr = bench_sub.add_parser(
        "headroom",
        help="a `pva demo` evaluation next to exact generator fills (right / wrong hidden "
        "attributes, VAE ceiling) and, optionally, PVA trained on oracle attribute embeddings",
    )
    hr.add_argument("--run", required=True, help="a finished `pva demo --out` folder")
    hr.add_argument(
        "--eval",
        default=None,
        help="a `pva evaluate` output on the run's shards (default: the first "
        "RUN/eval/seed*, which holds sd-inpaint, pva and pva-ft40; "
        "RUN/eval/cd-seed<k> holds Custom Diffusion's fills)",
    )
    hr.add_argument(
        "--draws",
        type=POSITIVE_INT.arg,
        default=2,
        help="other persons whose hidden attributes re-render each target (2)",
    )
    hr.add_argument(
        "--oracle-steps",
        type=NONNEGATIVE_INT.arg,
        default=0,
        help="also train stage 1 this long on true-attribute embeddings and "
        "inpaint with them (default: 0, off; the demo's stage 1 is 1200)",
    )
    hr.set_defaults(func=_bench_headroom)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pva`` console script.

    Errors the user can fix print one line (``pva <command>: error: ...``, exit status 2);
    warnings print as ``pva <command>: warning: ...``, without a source location.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # LightningCLI parses the rest (fit, --config, --model.*, ...)
        from pva.training import main as train_main

        return train_main(argv[1:], prog="pva train")
    args = build_parser().parse_args(argv)
    name = f"pva {args.command}"

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{name}: warning: {message}", file=sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        args.func(args)
    except (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        ValueError,
        RuntimeError,
    ) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())
