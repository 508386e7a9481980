"""``python -m benchmarks seam --run DEMO_OUT``: the error along the mask border, with the blend.

With and without the seam blend (:func:`pva.composite.composite`), on a ``pva demo`` run's
test persons.

Each test target of the run's shards is inpainted under each evaluation mask by the run's PVA
adapter (zero-shot, the demo's guidance, paste-back off), then put back three ways: the fill as
it is (``paste``), its colour matched to a ring of the photo just outside the mask (``colour``:
``feather=1``, no feathering), and the full blend (``blend``: colour match plus feathering over
``feather`` pixels inside the border). The table gives the mean absolute error to the ground
truth, in [0, 255], on a ring ``ring`` pixels wide inside the mask border (where a seam shows),
over the whole mask, and outside it (always 0: the blend never touches those pixels).

Read ``blend`` with care: inside its feather band it mixes in the photo's own pixels under the
mask, which are the ground truth here; ``colour`` has no such help.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from pva.checks import NONNEGATIVE_INT, POSITIVE_INT, check_ranges
from pva.composite import border_ring, composite

RANGES = {
    "persons": POSITIVE_INT,
    "ring": POSITIVE_INT,
    "feather": POSITIVE_INT,
    "steps": POSITIVE_INT,
    "seed": NONNEGATIVE_INT,
}


def _uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def bench_seam(
    run: str,
    persons: int = 12,
    ring: int = 3,
    feather: int = 4,
    steps: int = 25,
    seed: int = 0,
) -> dict:
    """Border error of paste-back with and without the seam blend on a demo's test persons.

    Args:
        run: A finished ``pva demo --out`` folder (its adapter, models and shards).
        persons: Test persons to use (the first ones of the split).
        ring: Width in pixels of the ring inside the mask border that is scored.
        feather: The blend's ring and feather width in pixels.
        steps: DDIM steps.
        seed: Sampling seed.
    """
    check_ranges("--", locals(), RANGES)
    from datamodules.shards import ShardDataModule
    from pva.apps import load_pipeline
    from pva.demo.run import GUIDANCE
    from pva.prompts import UNCOND_PROMPT, conditional_prompt
    from pva.sampling import ddim_inpaint

    folder = Path(run)
    adapter, shards = folder / "adapter.safetensors", folder / "shards"
    for needed in (adapter, shards / "index.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"--run: '{needed}' is missing; run `pva demo --out {run}`")
    model = load_pipeline(str(adapter), None, None).pva
    assert model is not None
    model.eval()
    dm = ShardDataModule(str(shards), num_workers=0)
    stream = dm.stream("test", False)
    stream.rank, stream.world_size = 0, 1
    prompt = conditional_prompt(model.modifier_token.token)
    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in list(dm.records("test"))[:persons]:
        samples = list(stream.person_eval_samples(rec))
        _, refs = stream.eval_split(rec)
        references = torch.stack([stream.reference(rec, i) for i in refs])  # (K, 3, r, r)
        tokens = model.encode_identity(references[None])  # (1, n_id, D)
        n = len(samples)
        fills = ddim_inpaint(
            model,
            torch.stack([s["image"] for s in samples]),
            torch.stack([s["mask"] for s in samples]),
            None,
            [prompt] * n,
            negative_prompt=UNCOND_PROMPT,
            guidance_scale=GUIDANCE,
            num_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            paste_back=False,
            identity_tokens=tokens.repeat(n, 1, 1),
        )
        for s, fill in zip(samples, fills):
            photo, out = _uint8(s["image"]), _uint8(fill.cpu())
            mask = s["mask"][0].numpy() > 0.5  # (S, S)
            band = border_ring(mask, ring)
            ways = {
                "paste": composite(photo, out, mask),
                "colour": composite(photo, out, mask, blend=True, feather=1),
                "blend": composite(photo, out, mask, blend=True, feather=feather),
            }
            for way, result in ways.items():
                diff = np.abs(result.astype(np.int16) - photo.astype(np.int16))  # (S, S, 3)
                for mask_kind in (s["mask_region"], "all"):
                    errors[way][f"{mask_kind}/ring"].append(float(diff[band].mean()))
                    errors[way][f"{mask_kind}/mask"].append(float(diff[mask].mean()))
                    errors[way][f"{mask_kind}/outside"].append(float(diff[~mask].mean()))
    table = {way: {k: float(np.mean(v)) for k, v in per.items()} for way, per in errors.items()}
    kinds = sorted({k.split("/")[0] for k in table["paste"]} - {"all"}) + ["all"]
    count = len(errors["paste"]["all/ring"])
    print(
        f"mean |composite - ground truth| in [0, 255]: ring = {ring} px inside the mask border, "
        f"mask = the whole hole; {count} fills, {steps} DDIM steps, blend feather {feather} px\n"
    )
    print("| mask | " + " | ".join(f"{w} ring" for w in table) + " | paste mask | blend mask |")
    print("|---|" + "---|" * (len(table) + 2))
    for kind in kinds:
        cells = " | ".join(f"{table[w][f'{kind}/ring']:.2f}" for w in table)
        print(
            f"| {kind} | {cells} | {table['paste'][f'{kind}/mask']:.2f} | "
            f"{table['blend'][f'{kind}/mask']:.2f} |"
        )
    outside = max(table[w]["all/outside"] for w in table)
    print(f"\noutside the mask, every way: {outside:.2f} (the input, exactly)")
    return {"table": table, "fills": count}
