"""Adapter files: the trainable PVA weights as one ``.safetensors`` file with a JSON header.

The safetensors metadata holds one key, ``pva``, a JSON object::

    {"format": "pva-adapter", "version": 1,
     "contents": ["pva", "projection", "token"(, "face_backbone")],
     "config": {...PVAConfig...},
     "backbone": {"cross_attention_dim": 1024, "num_text_tokens": 77, "attn2_layers": 16,
                  "face_embed_dim": 512, "face_encoder": "arcface"},
     "modifier_token": "<new1>"}

Tensor names are ``PVAModel.state_dict()`` keys (``unet.<...>.attn2.processor.to_q_pva.weight``,
``identity_encoder.projection.<...>``, ``modifier_token.embedding``,
``identity_encoder.backbone.<...>``). Loading checks the header and every tensor's shape against
the model and names the first mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pva.attention import identity_processors
from pva.face_encoders import encoder_kind_of
from pva.fileio import atomic_path
from pva.model import PVAConfig, PVAModel

ADAPTER_FORMAT = "pva-adapter"
ADAPTER_VERSION = 1
_CROSSQKV = (".attn2.to_q.", ".attn2.to_k.", ".attn2.to_v.", ".attn2.to_out.0.")
_GROUP_PREFIXES = {
    "projection": "identity_encoder.projection.",
    "token": "modifier_token.",
    "face_backbone": "identity_encoder.backbone.",
}


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the model it is loaded into."""


def backbone_signature(model: PVAModel) -> dict[str, int | str]:
    """The backbone facts an adapter depends on (the face encoder's kind among them)."""
    return {
        "cross_attention_dim": int(model.unet.config.cross_attention_dim),
        "num_text_tokens": int(model.num_text_tokens),
        "attn2_layers": sum(1 for _ in identity_processors(model.unet)),
        "face_embed_dim": int(model.identity_encoder.backbone.num_features),
        "face_encoder": encoder_kind_of(model.identity_encoder.backbone),
    }


def _group_of(key: str) -> str:
    if any(part in key for part in _CROSSQKV):
        return "crossqkv"
    for group, prefix in _GROUP_PREFIXES.items():
        if key.startswith(prefix):
            return group
    return "pva"


def save_adapter(
    model: PVAModel,
    path: str | os.PathLike,
    overwrite: bool = False,
    extra_keys: Iterable[str] = (),
    paths: dict[str, str] | None = None,
) -> Path:
    """Write the model's adapter weights to ``path`` (temporary file, then rename).

    Args:
        model: The PVA model.
        path: Destination ``.safetensors`` file.
        overwrite: Replace an existing file.
        extra_keys: More ``state_dict`` keys to store (CrossQKV-FT's ``attn2.to_{q,k,v,out.0}``).
        paths: Optional ``{"backbone": ..., "face_model": ...}`` recorded in the header, so
            ``pva inpaint`` can find them; default: the paths the model was loaded from.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite)")
    tensors = {k: v.contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    state = model.state_dict()
    tensors.update({k: state[k].detach().contiguous().cpu() for k in extra_keys})
    header = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "contents": sorted({_group_of(k) for k in tensors}),
        "config": dataclasses.asdict(model.config),
        "backbone": backbone_signature(model),
        "modifier_token": model.modifier_token.token,
    }
    paths = paths if paths is not None else getattr(model, "source_paths", None)
    if paths:
        header["paths"] = {k: str(v) for k, v in paths.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"pva": json.dumps(header)})
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an adapter file: ``(tensors, header)``.

    Raises:
        FileNotFoundError: No such file.
        AdapterMismatchError: Not a PVA adapter file.
    """
    return _read(path, tensors=True)


def read_adapter_header(path: str | os.PathLike) -> dict[str, Any]:
    """An adapter file's header only (config, paths, backbone signature): no tensor is read.

    Raises:
        FileNotFoundError: No such file.
        AdapterMismatchError: Not a PVA adapter file.
    """
    return _read(path, tensors=False)[1]


def _read(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file '{path}' not found")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - any parse error is "not an adapter"
        raise AdapterMismatchError(f"'{path}' is not a safetensors file: {err}") from None
    try:
        header = json.loads(meta["pva"])
    except (KeyError, json.JSONDecodeError):
        raise AdapterMismatchError(f"'{path}' has no PVA adapter header") from None
    if header.get("format") != ADAPTER_FORMAT:
        raise AdapterMismatchError(f"'{path}' is not a PVA adapter (format {header.get('format')})")
    if header.get("version") != ADAPTER_VERSION:
        raise AdapterMismatchError(
            f"'{path}' has adapter version {header.get('version')}; this code reads "
            f"{ADAPTER_VERSION}"
        )
    return loaded, header


def config_from_adapter(path: str | os.PathLike | dict[str, Any]) -> PVAConfig:
    """The :class:`PVAConfig` an adapter was saved with (to build a model it fits).

    Args:
        path: The adapter file, or its header (:func:`read_adapter_header`).
    """
    header = path if isinstance(path, dict) else read_adapter_header(path)
    known = {f.name for f in dataclasses.fields(PVAConfig)}
    return PVAConfig(**{k: v for k, v in header["config"].items() if k in known})


def load_adapter(
    model: PVAModel,
    path: str | os.PathLike,
    read: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Load an adapter file into ``model`` (in place), after checking that it fits.

    Face-backbone weights load whenever the file has them. PVA, projection and token weights
    must all be present.

    Args:
        model: The model to load into.
        path: The adapter file (named in errors).
        read: ``read_adapter(path)`` when the caller has already read it (read once).

    Returns:
        The adapter header.

    Raises:
        AdapterMismatchError: Backbone, variant, key or shape mismatch (named in the message).
    """
    tensors, header = read if read is not None else read_adapter(path)
    mine, theirs = backbone_signature(model), dict(header.get("backbone", {}))
    theirs.setdefault("face_encoder", "arcface")  # adapters written before the choice existed
    diffs = [
        f"{k}={theirs.get(k)} (this model: {v})" for k, v in mine.items() if theirs.get(k) != v
    ]
    if diffs:
        raise AdapterMismatchError(
            f"adapter '{path}' does not fit this backbone: it was trained for " + ", ".join(diffs)
        )
    variant = header.get("config", {}).get("variant")
    if variant != model.config.variant:
        raise AdapterMismatchError(
            f"adapter '{path}' holds the '{variant}' attention variant; the model was built with "
            f"'{model.config.variant}'"
        )
    state = model.state_dict()
    for key, value in tensors.items():
        if key not in state:
            raise AdapterMismatchError(
                f"adapter '{path}': tensor '{key}' has no place in the model"
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise AdapterMismatchError(
                f"adapter '{path}': '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(state[key].shape)}"
            )
    required = [
        k
        for k in state
        if model.is_adapter_key(k) and _group_of(k) not in ("face_backbone", "crossqkv")
    ]
    absent = [k for k in required if k not in tensors]
    if absent:
        raise AdapterMismatchError(
            f"adapter '{path}' lacks {len(absent)} tensors the model needs, e.g. '{absent[0]}'"
        )
    model.load_state_dict(tensors, strict=False)
    return header
