"""Identity encoder: ArcFace IResNet features projected to identity tokens (METHOD section 4).

``IResNet`` reproduces InsightFace arcface_torch's ``backbones/iresnet.py`` parameter layout, so a
user's ``ms1mv3_arcface_r50.pth`` or ``glint360k_cosface_r100.pth`` loads with ``strict=True``
through :func:`load_iresnet` (``torch.load(..., weights_only=True)``: no pickle code runs).
``IdentityProjection`` is the reference code's ``TransformNetwork``: K reference embeddings plus
10 learnable queries, a 4-layer post-norm transformer, the 10 query outputs plus a zero-initialised
positional embedding. No positional encoding touches the references, so the tokens do not depend
on their order and any K works.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pva.fileio import atomic_path

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
ARCFACE_HINT = (
    "Get arcface_torch weights from InsightFace's model zoo "
    "(github.com/deepinsight/insightface/tree/master/recognition/arcface_torch: "
    "ms1mv3_arcface_r50_fp16/backbone.pth for conditioning, glint360k_cosface_r100_fp16_0.1/"
    "backbone.pth for evaluation) and pass the local file path."
)
FaceCrop = Literal["celebahq", "none"]


class IBasicBlock(nn.Module):
    """IResNet residual block: BN-conv-BN-PReLU-conv(stride)-BN plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """ArcFace IResNet with arcface_torch's state-dict keys; input (N, 3, 112, 112) in [-1, 1].

    Args:
        layers: Blocks per stage, e.g. ``IRESNET_LAYERS["r50"]``.
        widths: Channels per stage (arcface_torch: 64, 128, 256, 512); the stem has ``widths[0]``.
        num_features: Embedding size (512).
        dropout: Dropout before the final linear layer.
    """

    fc_scale = 7 * 7  # spatial size after four stride-2 stages on 112x112

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_features: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers_config = tuple(layers)
        self.widths = tuple(widths)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(inplanes, planes, stride=2)]
            blocks += [IBasicBlock(planes, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # fixed at 1, as in arcface_torch

    @property
    def num_features(self) -> int:
        """Embedding size."""
        return self.fc.out_features

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 112, 112) in [-1, 1] -> (N, num_features) unnormalised embeddings."""
        # Dense NCHW: oneDNN's convolution backward segfaults on channels-last input on some
        # AVX-512 CPUs (torch 2.14.1, AMD EPYC); a no-op for the usual contiguous batch.
        x = x.contiguous()
        x = self.prelu(self.bn1(self.conv1(x)))  # (N, w0, 112, 112)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, w3, 7, 7)
        x = torch.flatten(self.bn2(x), 1)  # (N, w3 * 49)
        return self.features(self.fc(self.dropout(x)))  # (N, num_features)


def iresnet(arch: str, **kwargs) -> IResNet:
    """Build an IResNet by name (``r18``, ``r34``, ``r50``, ``r100``, ``r200``)."""
    if arch not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet arch {arch!r}; choose from {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[arch], **kwargs)


def iresnet_config_from_state_dict(state: Mapping[str, Tensor]) -> dict:
    """Infer ``layers``, ``widths`` and ``num_features`` from an arcface_torch state dict."""
    counts = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"layer([1-4])\.(\d+)\.bn1\.weight$", key)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
    if min(counts) == 0 or "fc.weight" not in state:
        raise ValueError("not an arcface_torch IResNet state dict (no layer1-4 blocks / fc)")
    widths = [int(state[f"layer{i + 1}.0.conv1.weight"].shape[0]) for i in range(4)]
    return {"layers": counts, "widths": widths, "num_features": int(state["fc.weight"].shape[0])}


def arch_name(model: IResNet) -> str:
    """``r50``-style name of a model (``custom`` for non-standard depths or widths)."""
    for name, layers in IRESNET_LAYERS.items():
        if model.layers_config == layers and model.widths == (64, 128, 256, 512):
            return name
    return "custom"


def load_iresnet(path: str | os.PathLike) -> IResNet:
    """Load an arcface_torch IResNet checkpoint (``backbone.pth``) strictly and safely.

    The architecture (depth, widths, embedding size) is inferred from the tensors, so r18-r200
    and custom widths all load. ``torch.load`` runs with ``weights_only=True``.

    Args:
        path: Local ``.pth`` file holding the state dict (optionally under ``"state_dict"``,
            keys optionally prefixed by ``module.``).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: The file does not exist (the message says where to get one).
        ValueError: The file is not a plain tensor state dict of an IResNet.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"face recognition weights '{path}' not found. " + ARCFACE_HINT)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle refusals and corrupt files alike
        raise ValueError(
            f"'{path}' could not be loaded as a plain tensor state dict with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for key in [k for k in state if k.endswith(".running_mean")]:  # older BN checkpoints
        state.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
    try:
        model = IResNet(**iresnet_config_from_state_dict(state))
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"'{path}' is not an arcface_torch IResNet checkpoint: {err}") from None
    return model.eval()


def save_iresnet(model: IResNet, path: str | os.PathLike) -> Path:
    """Save an IResNet state dict as an arcface_torch-style ``.pth`` (written then renamed)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


def preprocess_faces(images: Tensor, crop: FaceCrop = "celebahq") -> Tensor:
    """The reference code's recognizer input: (N, 3, H, W) in [-1, 1] -> (N, 3, 112, 112).

    ``celebahq``: resize to 256, crop rows 35:223 and columns 32:220 (188x188, the face in an
    FFHQ/CelebA-HQ-aligned photo), average-pool to 112. ``none``: the input already is an aligned
    face crop; only resize to 112.
    """
    if crop == "celebahq":
        x = F.interpolate(images, size=(256, 256), mode="bilinear", align_corners=False)
        x = x[:, :, 35:223, 32:220]  # (N, 3, 188, 188)
        return F.adaptive_avg_pool2d(x, (112, 112))
    if crop == "none":
        if images.shape[-2:] == (112, 112):
            return images
        return F.interpolate(images, size=(112, 112), mode="bilinear", align_corners=False)
    raise ValueError(f"crop must be 'celebahq' or 'none', got {crop!r}")


class IdentityProjection(nn.Module):
    """``TransformNetwork``: K face embeddings -> ``num_tokens`` identity tokens of width D.

    Args:
        embed_dim: Face-embedding size (512).
        token_dim: Output width, the UNet's cross-attention width D (1024 for SD2).
        num_tokens: Identity tokens per sample, in total (10).
        num_layers: Transformer encoder layers (4).
        num_heads: Attention heads (8).
        ffn_dim: Feed-forward width (2048).
        dropout: Dropout inside the transformer (0.1).
        query_std: Standard deviation of the learnable queries' normal initialisation.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        token_dim: int = 1024,
        num_tokens: int = 10,
        num_layers: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        query_std: float = 1.0,
    ) -> None:
        super().__init__()
        if query_std < 0:
            raise ValueError(f"query_std (pva.projection_query_std) must be >= 0, got {query_std}")
        self.num_tokens = num_tokens
        self.queries = nn.Parameter(torch.randn(num_tokens, embed_dim) * query_std)
        self.proj_in = nn.Linear(embed_dim, token_dim)
        layer = nn.TransformerEncoderLayer(
            token_dim, num_heads, ffn_dim, dropout, batch_first=True, norm_first=False
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(token_dim), enable_nested_tensor=False
        )
        self.pos_emb = nn.Parameter(torch.zeros(num_tokens, token_dim))

    def forward(self, embeddings: Tensor, reference_mask: Tensor | None = None) -> Tensor:
        """(B, K, embed_dim) embeddings, optional (B, K) bool validity -> (B, num_tokens, D)."""
        b, k, _ = embeddings.shape
        x = torch.cat([self.queries.expand(b, -1, -1), embeddings], dim=1)  # (B, n+K, E)
        x = self.proj_in(x)  # (B, n+K, D)
        pad = None
        if reference_mask is not None:
            queries_valid = torch.ones(b, self.num_tokens, dtype=torch.bool, device=x.device)
            pad = ~torch.cat([queries_valid, reference_mask.to(x.device).bool()], dim=1)
        x = self.transformer(x, src_key_padding_mask=pad)  # (B, n+K, D)
        return x[:, : self.num_tokens] + self.pos_emb  # (B, n, D)


class IdentityEncoder(nn.Module):
    """Reference photos -> identity tokens: preprocessing, IResNet, projection.

    The face backbone is frozen unless ``train_backbone`` (stage 2); either way it stays in eval
    mode so BatchNorm statistics never move.

    Args:
        backbone: Face recognizer (ArcFace IResNet-50 in the paper; any encoder of
            :mod:`pva.face_encoders`).
        projection: The token projection.
        crop: Preprocessing, see :func:`preprocess_faces`.
        train_backbone: Let the backbone's weights train (stage 2).
    """

    def __init__(
        self,
        backbone: nn.Module,
        projection: IdentityProjection,
        crop: FaceCrop = "celebahq",
        train_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.crop: FaceCrop = crop
        self.train_backbone = train_backbone
        self.backbone.requires_grad_(False)
        if train_backbone:
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(name != "features.weight")  # arcface_torch keeps it fixed
        self.backbone.eval()

    def train(self, mode: bool = True) -> IdentityEncoder:
        """Set train mode on the projection; the face backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def embed(self, references: Tensor) -> Tensor:
        """(B, K, 3, H, W) photos in [-1, 1] -> (B, K, E) face embeddings (E = 512: ArcFace)."""
        b, k = references.shape[:2]
        faces = preprocess_faces(references.flatten(0, 1), self.crop)  # (B*K, 3, 112, 112)
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            emb = self.backbone(faces)  # (B*K, 512)
        return emb.view(b, k, -1)

    def forward(self, references: Tensor, reference_mask: Tensor | None = None) -> Tensor:
        """(B, K, 3, H, W) photos in [-1, 1] (+ (B, K) bool validity) -> (B, n_tokens, D)."""
        return self.projection(self.embed(references), reference_mask)
