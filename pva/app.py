"""``pva app``: a local web app for personalized face inpainting (Gradio).

Upload a photo and paint the region to fill (or pick one found from the face's landmarks),
add 1-10 photos of the same person, type a prompt, and Generate: the gallery shows the masked
input beside the outputs, and every output is written to ``<out>/outputs`` as a PNG. Personalize
runs the 40-step fine-tune (``pva personalize``) on the uploaded photos with a live progress bar
and writes ``<out>/adapters/<name>.safetensors``; the adapter list offers every adapter made.

After ``pva demo`` (or ``pva demo --quick``) ``pva app`` needs no arguments: it finds
``demo_out/adapter.safetensors``, whose header names the demo's stand-in backbone and face
model. Everything is served from this machine (no fonts, scripts or telemetry from outside) on
127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import os
import re
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pva.adapter import read_adapter_header, save_adapter
from pva.apps import load_pipeline, person_tensors, resolve_paths
from pva.checks import GUIDANCE, SEED, Range, check_ranges
from pva.faces import BadImageError
from pva.fileio import atomic_path
from pva.personalize import personalized
from pva.pipeline import PVAInpaintPipeline, prepare_face

REGIONS = ("brush", "lowerface", "eyebrow", "wholeface")
"""Mask choices: the painted strokes, or a landmark box found on the photo."""
MAX_REFERENCES = 10
APP_RANGES = {"port": Range(0, 65535, integer=True)}
"""The allowed range of each number of :func:`app_cli` (``pva app``)."""
GENERATE_RANGES = {
    "guidance": GUIDANCE,
    "steps": Range(1, 1000, integer=True),
    "seed": SEED,
    "num_images": Range(1, 8, integer=True),
}
PERSONALIZE_STEPS = Range(1, 1000, integer=True)
_TOKEN_HELP = (
    "{token} stands for the person of the reference photos: keep it in the prompt, e.g. "
    "'photo of a {token} person, smiling'. Inpaint mode gives the identity to the conditional "
    "branch only (the paper's inpainting); edit mode to both (stronger, for larger changes; "
    "guidance 15-30)."
)


class UserError(ValueError):
    """A problem with what the user gave; shown in the page as it is."""


def find_adapter(adapter: str | None, demo_out: str) -> str:
    """``--adapter``, else the adapter ``pva demo`` wrote into ``demo_out``."""
    if adapter:
        if not Path(adapter).is_file():
            raise FileNotFoundError(f"--adapter '{adapter}' not found")
        return adapter
    found = Path(demo_out) / "adapter.safetensors"
    if not found.is_file():
        raise FileNotFoundError(
            f"no adapter: pass --adapter (with --backbone and --face-model for real weights), or "
            f"run `pva demo` first (looked for {found})"
        )
    return str(found)


def _mask_from_editor(value: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """The painted strokes of an ``ImageEditor`` value as an (H, W) bool mask."""
    mask = np.zeros(shape, bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.shape[:2] != shape:
            raise UserError(
                "the painted mask is not the photo's size: paint after uploading the photo"
            )
        alpha = (
            arr[..., 3]
            if arr.ndim == 3 and arr.shape[-1] == 4
            else arr.reshape(shape + (-1,)).max(-1)
        )
        mask |= alpha > 0
    return mask


def _overlay(photo: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The photo with the region to fill tinted red: the gallery's first picture."""
    out = photo.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([255, 0, 0], np.float32)
    return Image.fromarray(out.round().astype(np.uint8))


def _safe_name(name: str) -> str:
    """A file stem from what the user typed (letters, digits, ``-`` and ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name.strip()).strip("-")
    if not stem:
        raise UserError("give the personalized adapter a name (letters, digits, - or _)")
    return stem


class PVAApp:
    """What the web page calls: generation, personalization, the adapter list.

    Testable without a browser; :func:`build_ui` wires it to Gradio.

    Args:
        adapter: The base adapter.
        backbone: SD2-inpainting folder (default: recorded in the adapter).
        face_model: The conditioning face encoder (default: recorded in the adapter).
        out: Folder for outputs (``outputs/``) and personalized adapters (``adapters/``).
    """

    def __init__(
        self,
        adapter: str,
        backbone: str | None = None,
        face_model: str | None = None,
        out: str | os.PathLike = "app_out",
    ) -> None:
        self.base = str(adapter)
        self.backbone, self.face_model = resolve_paths(self.base, backbone, face_model)
        self.out = Path(out)
        self.token = read_adapter_header(self.base).get("modifier_token", "<new1>")
        self._lock = threading.Lock()  # one model: one job at a time
        self._pipe: PVAInpaintPipeline | None = None
        self._loaded: str | None = None

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> list[str]:
        """The base adapter, then every personalized one in ``<out>/adapters``, by name."""
        folder = self.out / "adapters"
        made = sorted(str(p) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        return [self.base, *made]

    def adapter_choices(self) -> list[tuple[str, str]]:
        """``(label, path)`` for the adapter list: the base adapter, then each by name."""
        return [
            (f"{Path(a).name} (base)" if a == self.base else Path(a).stem, a)
            for a in self.adapters()
        ]

    def pipeline(self, adapter: str | None = None) -> PVAInpaintPipeline:
        """The pipeline with ``adapter`` loaded (built once; adapters switch in place)."""
        adapter = adapter or self.base
        if adapter not in self.adapters():
            raise UserError(f"unknown adapter '{adapter}': pick one from the list")
        if self._pipe is None:
            self._pipe = load_pipeline(adapter, self.backbone, self.face_model)
        elif self._loaded != adapter:
            self._pipe.load_pva(adapter, self.face_model)
        self._loaded = adapter
        return self._pipe

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        editor: dict[str, Any] | None,
        region: str,
        references: Sequence[str] | None,
        prompt: str,
        mode: str = "inpaint",
        guidance: float = 6.0,
        steps: int = 100,
        seed: int = 0,
        num_images: int = 1,
        blend: bool = True,
        adapter: str | None = None,
    ) -> tuple[list[tuple[Image.Image, str]], list[str]]:
        """Fill the masked region; returns the gallery (masked input, outputs) and the files.

        Raises:
            UserError: Anything wrong with the inputs, in words for the page.
        """
        numbers = {"guidance": guidance, "steps": steps, "seed": seed, "num_images": num_images}
        check_ranges("", numbers, GENERATE_RANGES)
        if region not in REGIONS:
            raise UserError(f"mask must be one of {', '.join(REGIONS)}, got {region!r}")
        if mode not in ("inpaint", "edit"):
            raise UserError(f"mode must be inpaint or edit, got {mode!r}")
        if not editor or editor.get("background") is None:
            raise UserError("upload a photo first")
        photo = np.asarray(editor["background"])
        if photo.ndim != 3 or photo.shape[-1] not in (3, 4):
            raise UserError(f"the photo must be a colour image, got shape {photo.shape}")
        photo = np.ascontiguousarray(photo[..., :3]).astype(np.uint8)
        refs = list(references or [])
        if not refs:
            raise UserError("add 1-10 reference photos of the person")
        if len(refs) > MAX_REFERENCES:
            raise UserError(f"at most {MAX_REFERENCES} reference photos, got {len(refs)}")
        prompt = (prompt or "").strip() or f"photo of a {self.token} person"
        with self._lock:
            pipe = self.pipeline(adapter)
            if region == "brush":
                mask = _mask_from_editor(editor, photo.shape[:2])
                if not mask.any():
                    raise UserError(
                        "the mask is empty: paint over the region to fill, or pick a region"
                    )
                kwargs: dict[str, Any] = {"mask_image": mask.astype(np.uint8) * 255}
            else:
                kwargs = {"mask_region": region}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the page says what matters
                job = prepare_face(photo, pipe.resolution, **kwargs)  # the face, found once
                if job.empty:
                    raise UserError(
                        "the mask is empty at the model resolution: paint a larger region"
                    )
                result = pipe(
                    job,
                    reference_images=refs,
                    prompt=prompt,
                    mode=mode,
                    guidance_scale=float(guidance),
                    num_inference_steps=int(steps),
                    generator=torch.Generator().manual_seed(int(seed)),
                    num_images_per_prompt=int(num_images),
                    blend=bool(blend),
                )
        files = self._write(result.images)
        gallery = [(_overlay(photo, job.full_mask), "masked input")]
        gallery += [(img, f"output {i + 1}") for i, img in enumerate(result.images)]
        return gallery, files

    def _write(self, images: Sequence[Image.Image]) -> list[str]:
        """Save the outputs as ``<out>/outputs/<time>_<i>.png`` (write, then rename)."""
        folder = self.out / "outputs"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        files = []
        for i, img in enumerate(images):
            target = folder / f"{stamp}_{i}.png"
            n = 1
            while target.exists():  # never overwrite an earlier output
                target, n = folder / f"{stamp}_{i}-{n}.png", n + 1
            with atomic_path(target) as tmp:
                img.save(tmp, format="PNG")
            files.append(str(target))
        return files

    # --------------------------------------------------------------- personalize
    def personalize(
        self,
        references: Sequence[str] | None,
        name: str,
        steps: int = 40,
        seed: int = 0,
        adapter: str | None = None,
    ) -> str:
        """Fine-tune ``adapter`` on the references (METHOD 7) -> the new adapter's path.

        Raises:
            UserError: Fewer than 2 usable photos, a name already taken, a bad number.
        """
        check_ranges("", {"steps": steps}, {"steps": PERSONALIZE_STEPS})
        refs = [Path(r) for r in references or []]
        if len(refs) < 2:
            raise UserError("personalizing needs at least 2 photos of the person")
        target = self.out / "adapters" / f"{_safe_name(name)}.safetensors"
        if target.exists():
            raise UserError(f"an adapter named '{target.stem}' exists: pick another name")
        with self._lock:
            pipe = self.pipeline(adapter)
            data = person_tensors(pipe, refs, skip_bad=False)
            model = pipe.pva
            assert model is not None
            with personalized(
                model,
                data["images"],
                data["references"],
                data["boxes"],
                steps=int(steps),
                seed=int(seed),
                progress=True,
            ):
                paths = {"backbone": self.backbone, "face_model": self.face_model}
                target.parent.mkdir(parents=True, exist_ok=True)
                save_adapter(model, target, paths=paths)
        return str(target)


def _page_error(err: Exception) -> Exception:
    """What the page shows: the message of a user error, a short line for anything else."""
    import gradio as gr

    if isinstance(err, UserError | ValueError | FileNotFoundError | BadImageError):
        return gr.Error(str(err))
    traceback.print_exc()  # the console keeps the details; the page stays readable
    return gr.Error(f"{type(err).__name__}: {err}")


def build_ui(app: PVAApp) -> Any:
    """The Gradio page around ``app``."""
    import gradio as gr

    def generate(editor, region, refs, prompt, mode, guidance, steps, seed, n, blend, adapter):
        try:
            return app.generate(
                editor, region, refs, prompt, mode, guidance, steps, seed, n, blend, adapter
            )
        except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
            raise _page_error(err) from None

    def personalize(refs, name, steps, adapter, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        try:
            made = app.personalize(refs, name, steps, adapter=adapter)
        except Exception as err:  # noqa: BLE001
            raise _page_error(err) from None
        label = f"personalized adapter written: {made}"
        return gr.update(choices=app.adapter_choices(), value=made), label

    with gr.Blocks(title="PVA: personalized face inpainting", analytics_enabled=False) as page:
        gr.Markdown(
            "# PVA: personalized face inpainting\n"
            "Upload a photo, paint the region to fill (or pick one), add photos of the same "
            "person, and Generate. Pixels outside the mask stay exactly the photo's."
        )
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(
                    label="Photo (paint the region to fill)",
                    type="numpy",
                    image_mode="RGBA",
                    sources=("upload", "clipboard"),
                    format="png",
                    transforms=(),
                    layers=False,
                    brush=gr.Brush(colors=["#ff0000"], color_mode="fixed", default_size=24),
                    elem_id="photo",
                )
                region = gr.Radio(
                    list(REGIONS),
                    value="brush",
                    label="Mask",
                    info="brush: the painted strokes; or a box from the face's landmarks",
                    elem_id="region",
                )
                refs = gr.File(
                    label=f"Reference photos of the person (1-{MAX_REFERENCES})",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="refs",
                )
                prompt = gr.Textbox(
                    value=f"photo of a {app.token} person",
                    label="Prompt",
                    info=_TOKEN_HELP.format(token=app.token),
                    elem_id="prompt",
                )
                with gr.Row():
                    mode = gr.Radio(["inpaint", "edit"], value="inpaint", label="Mode")
                    blend = gr.Checkbox(value=True, label="Blend the seam")
                with gr.Row():
                    guidance = gr.Slider(1, 30, value=6.0, step=0.5, label="Guidance")
                    steps = gr.Slider(
                        1, 200, value=100, step=1, label="DDIM steps", elem_id="steps"
                    )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    n = gr.Slider(1, 8, value=1, step=1, label="Images")
                adapter = gr.Dropdown(
                    app.adapter_choices(), value=app.base, label="Adapter", elem_id="adapter"
                )
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion(
                    "Personalize (40-step fine-tune on the reference photos)", open=False
                ):
                    name = gr.Textbox(value="person", label="Name of the new adapter")
                    ft_steps = gr.Slider(1, 200, value=40, step=1, label="Fine-tuning steps")
                    ft = gr.Button("Personalize", elem_id="personalize")
                    ft_status = gr.Markdown(elem_id="personalize-status")
            with gr.Column():
                gallery = gr.Gallery(
                    label="Masked input and outputs",
                    columns=2,
                    height="auto",
                    format="png",  # lossless: what the page shows is what was made
                    elem_id="gallery",
                )
                files = gr.File(label="Download", file_count="multiple", elem_id="downloads")
        go.click(
            generate,
            [editor, region, refs, prompt, mode, guidance, steps, seed, n, blend, adapter],
            [gallery, files],
        )
        ft.click(personalize, [refs, name, ft_steps, adapter], [adapter, ft_status])
    return page


def app_cli(
    adapter: str | None = None,
    backbone: str | None = None,
    face_model: str | None = None,
    demo_out: str = "demo_out",
    out: str = "app_out",
    host: str = "127.0.0.1",
    port: int = 7860,
) -> None:
    """Serve the web app: personalized inpainting in the browser.

    With no arguments after ``pva demo`` it serves the demo's adapter on its stand-in backbone
    and face model. Open the printed address in a browser; stop with Ctrl+C.

    Args:
        adapter: Adapter ``.safetensors`` (default: ``<demo-out>/adapter.safetensors``).
        backbone: SD2-inpainting folder (default: recorded in the adapter).
        face_model: Conditioning face encoder: an arcface_torch ``.pth``, an InsightFace
            ``.onnx`` or ``dlib`` (default: recorded in the adapter).
        demo_out: Where ``pva demo`` wrote its run (used when ``adapter`` is not given).
        out: Folder for the app's outputs and personalized adapters.
        host: Address to listen on; 127.0.0.1 keeps the app on this machine (0.0.0.0 opens
            it to the network).
        port: Port (0: any free port).
    """
    check_ranges("--", locals(), APP_RANGES)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = PVAApp(find_adapter(adapter, demo_out), backbone, face_model, out)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {host} makes the app reachable from other machines")
    page, url = serve(app, host, port, block=False)
    print(f"pva app: serving {app.base} at {url} (Ctrl+C stops)", flush=True)
    page.block_thread()


def serve(app: PVAApp, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> tuple:
    """Start the page's server; ``block=False`` returns at once (tests).

    Returns:
        The Gradio ``Blocks`` and the local URL it serves.
    """
    page = build_ui(app)
    _, url, _ = page.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port or None,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=True,  # Gradio's own lines suggest share=True, which pva app never sets
        allowed_paths=[str(app.out.resolve())],
        footer_links=[],
    )
    return page, url
