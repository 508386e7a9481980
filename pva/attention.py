"""Parallel Visual Attention: the attention processors PVA installs in every ``attn2`` (METHOD 3).

For spatial features X, text tokens T and identity tokens F::

    Q_t = X Wq    K_t = T Wk    V_t = T Wv          (pretrained, frozen)
    Q_v = X Wq'   K_v = F Wk'   V_v = F Wv'         (new, initialised as copies of Wq, Wk, Wv)
    P   = softmax([Q_t K_t^T , Q_v K_v^T] / sqrt(d))  one softmax over all |T| + |F| keys
    O   = to_out(P [V_t ; V_v])                       pretrained output projection

Identity tokens reach the layer appended to the text tokens: ``encoder_hidden_states`` is
``[T ; F]`` of length ``num_text_tokens + |F|``. A context of exactly ``num_text_tokens`` tokens
means "no identity" and runs the stock diffusers processor, so the UNet is bit-identical to the
pretrained one. An optional ``identity_mask`` (B,) bool, passed as
``cross_attention_kwargs={"identity_mask": m}``, makes rows with ``False`` ignore their identity
tokens (exactly the no-identity attention up to float rounding), which lets the conditional and
unconditional classifier-free-guidance branches share one UNet call.

Three implementations share the same parameters:

* ``reference``: the equation above, written out (two logit blocks, one softmax).
* ``fused`` [ours, default]: one ``scaled_dot_product_attention`` call. Queries are concatenated
  along the head dimension ``[Q_t, Q_v]`` (width 2d), keys are block-padded (``[K_t, 0]`` for
  text rows, ``[0, K_v]`` for identity rows), values concatenated along the sequence (and
  zero-padded to 2d so all three share one head width, which the flash kernels need), scale
  1/sqrt(d):
  ``[Q_t, Q_v] . [K_t, 0] = Q_t . K_t`` and ``[Q_t, Q_v] . [0, K_v] = Q_v . K_v``.
* :class:`DecoupledAttnProcessor`: the IP-Adapter-style ablation (shared query, two softmaxes,
  ``O = to_out(Attn(Q, K_t, V_t) + scale * Attn(Q, K_ip, V_ip))``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

AttentionImpl = Literal["fused", "reference"]
Variant = Literal["pva", "decoupled"]


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    """A trainable copy of a (frozen) linear layer, same device and dtype."""
    new = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    if layer.weight.device.type != "meta":
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
    return new.requires_grad_(True)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, h*d) -> (B, h, L, d)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, h, L, d) -> (B, L, h*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttnProcessor(AttnProcessor2_0):
    """The stock diffusers processor, accepting (and ignoring) PVA's ``identity_mask`` kwarg.

    Installed on self-attention layers so that ``cross_attention_kwargs`` carrying the identity
    mask reach them silently; the computation is exactly ``AttnProcessor2_0``.
    """

    def __call__(  # noqa: D102
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        identity_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class _IdentityAttnBase(nn.Module):
    """Shared plumbing: split ``[T ; F]``, fall back to the stock processor without identity."""

    def __init__(self, num_text_tokens: int) -> None:
        super().__init__()
        self.num_text_tokens = num_text_tokens
        self._stock = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        identity_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """Run the layer; see the module docstring for the inputs' meaning.

        Args:
            attn: The diffusers ``Attention`` module (its frozen ``to_q/to_k/to_v/to_out``).
            hidden_states: Spatial features X, (B, N, C) or (B, C, H, W).
            encoder_hidden_states: ``[T ; F]``, (B, num_text_tokens + |F|, D).
            attention_mask: Optional encoder attention mask as diffusers passes it.
            temb: Time embedding (only for spatial-norm attention).
            identity_mask: Optional (B,) bool; ``False`` rows ignore the identity tokens.
            **kwargs: Ignored (other processors' kwargs).

        Returns:
            The attention output, same shape as ``hidden_states``.
        """
        t = self.num_text_tokens
        ctx = encoder_hidden_states
        no_identity = ctx is None or ctx.shape[1] <= t
        if not no_identity and identity_mask is not None and not bool(identity_mask.any()):
            no_identity, ctx = True, ctx[:, :t]
        if no_identity:
            return self._stock(attn, hidden_states, ctx, attention_mask, temb)
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("PVA attention supports transformer cross-attention only")
        if attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("PVA attention does not support q/k normalisation")

        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, N, C)
        batch, _, _ = hidden_states.shape
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        text, ident = ctx[:, :t], ctx[:, t:]  # (B, T, D), (B, F, D)
        bias = self._key_bias(attn, attention_mask, identity_mask, batch, ctx.shape[1], ctx)
        out = self.attend(attn, hidden_states, text, ident, bias, identity_mask)  # (B, N, h*d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _key_bias(
        self,
        attn: Attention,
        attention_mask: Tensor | None,
        identity_mask: Tensor | None,
        batch: int,
        num_keys: int,
        ctx: Tensor,
    ) -> Tensor | None:
        """Additive key bias (B, h or 1, 1, T+F): -inf on masked identity keys, 0 elsewhere."""
        bias = None
        if identity_mask is not None and not bool(identity_mask.all()):
            keep = torch.ones(batch, num_keys, dtype=torch.bool, device=ctx.device)
            keep[:, self.num_text_tokens :] = identity_mask.to(ctx.device).view(batch, 1)
            bias = torch.zeros(batch, 1, 1, num_keys, dtype=ctx.dtype, device=ctx.device)
            bias.masked_fill_(~keep.view(batch, 1, 1, num_keys), float("-inf"))
        if attention_mask is not None:
            prepared = attn.prepare_attention_mask(attention_mask, num_keys, batch)
            prepared = prepared.view(batch, attn.heads, -1, prepared.shape[-1])
            bias = prepared if bias is None else bias + prepared
        return bias

    def attend(
        self,
        attn: Attention,
        x: Tensor,
        text: Tensor,
        ident: Tensor,
        bias: Tensor | None,
        identity_mask: Tensor | None,
    ) -> Tensor:
        """Attention of X over text and identity tokens, before ``to_out``: (B, N, h*d).

        ``bias`` is the additive key bias over ``[T ; F]`` (identity mask and encoder mask
        combined); ``identity_mask`` is the raw (B,) mask it was built from.
        """
        raise NotImplementedError


class PVAAttnProcessor(_IdentityAttnBase):
    """PVA's parallel visual attention for one ``attn2`` layer (joint softmax, own query).

    Parameters ``to_q_pva``, ``to_k_pva``, ``to_v_pva`` are copies of the layer's pretrained
    ``to_q``, ``to_k``, ``to_v`` at construction; ``to_out`` is shared and frozen.

    Args:
        attn: The cross-attention layer this processor is installed on.
        num_text_tokens: Text context length (77 for SD2); extra tokens are identity tokens.
        impl: ``"fused"`` (one SDPA call) or ``"reference"`` (the equation written out).
    """

    def __init__(self, attn: Attention, num_text_tokens: int, impl: AttentionImpl = "fused"):
        super().__init__(num_text_tokens)
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        self.impl: AttentionImpl = impl
        self.to_q_pva = _copy_linear(attn.to_q)
        self.to_k_pva = _copy_linear(attn.to_k)
        self.to_v_pva = _copy_linear(attn.to_v)

    def attend(  # noqa: D102
        self,
        attn: Attention,
        x: Tensor,
        text: Tensor,
        ident: Tensor,
        bias: Tensor | None,
        identity_mask: Tensor | None,
    ) -> Tensor:
        h = attn.heads
        k_t, v_t = _heads(attn.to_k(text), h), _heads(attn.to_v(text), h)  # (B, h, T, d)
        k_v, v_v = _heads(self.to_k_pva(ident), h), _heads(self.to_v_pva(ident), h)  # (B,h,F,d)
        if self.impl == "reference":
            q_t, q_v = _heads(attn.to_q(x), h), _heads(self.to_q_pva(x), h)  # (B, h, N, d)
            logits = torch.cat([q_t @ k_t.transpose(-1, -2), q_v @ k_v.transpose(-1, -2)], dim=-1)
            logits = logits * attn.scale  # (B, h, N, T+F)
            if bias is not None:
                logits = logits + bias
            probs = logits.float().softmax(dim=-1).to(q_t.dtype)
            out = probs @ torch.cat([v_t, v_v], dim=2)  # (B, h, N, d)
        else:
            d = k_t.shape[-1]
            q_t, q_v = _heads(attn.to_q(x), h), _heads(self.to_q_pva(x), h)  # (B, h, N, d)
            q = torch.cat([q_t, q_v], dim=-1)  # (B, h, N, 2d)
            k = torch.cat([F.pad(k_t, (0, d)), F.pad(k_v, (d, 0))], dim=2)  # (B,h,T+F,2d)
            # V is zero-padded to 2d so q, k, v share one head width, which the flash /
            # memory-efficient SDPA kernels need; the padded half of the output is dropped.
            v = F.pad(torch.cat([v_t, v_v], dim=2), (0, d))  # (B, h, T+F, 2d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
            out = out[..., :d]  # (B, h, N, d)
        return _merge_heads(out)  # (B, N, h*d)


class DecoupledAttnProcessor(_IdentityAttnBase):
    """IP-Adapter-style decoupled attention, the ablation variant (shared query, two softmaxes).

    ``O = to_out(Attn(Q, K_t, V_t) + scale * Attn(Q, K_ip, V_ip))`` with ``to_k_ip``/``to_v_ip``
    initialised as copies of ``to_k``/``to_v``. ``scale=0`` reproduces the pretrained layer.

    Args:
        attn: The cross-attention layer this processor is installed on.
        num_text_tokens: Text context length; extra tokens are identity tokens.
        scale: Weight of the identity attention.
    """

    def __init__(self, attn: Attention, num_text_tokens: int, scale: float = 1.0):
        super().__init__(num_text_tokens)
        self.scale = scale
        self.to_k_ip = _copy_linear(attn.to_k)
        self.to_v_ip = _copy_linear(attn.to_v)

    def attend(  # noqa: D102
        self,
        attn: Attention,
        x: Tensor,
        text: Tensor,
        ident: Tensor,
        bias: Tensor | None,
        identity_mask: Tensor | None,
    ) -> Tensor:
        h = attn.heads
        t = self.num_text_tokens
        q = _heads(attn.to_q(x), h)  # (B, h, N, d)
        k_t, v_t = _heads(attn.to_k(text), h), _heads(attn.to_v(text), h)  # (B, h, T, d)
        k_i, v_i = _heads(self.to_k_ip(ident), h), _heads(self.to_v_ip(ident), h)  # (B,h,F,d)
        text_bias = None if bias is None else bias[..., :t]  # (B, h or 1, 1, T)
        id_bias = None if bias is None else bias[..., t:]  # (B, h or 1, 1, F)
        out = F.scaled_dot_product_attention(q, k_t, v_t, attn_mask=text_bias, scale=attn.scale)
        if identity_mask is not None:
            # Rows whose identity is masked attend to it with a harmless zero bias, then drop it.
            id_bias = None if id_bias is None else id_bias.nan_to_num(neginf=0.0)
        out_id = F.scaled_dot_product_attention(q, k_i, v_i, attn_mask=id_bias, scale=attn.scale)
        if identity_mask is not None:
            keep = identity_mask.to(out_id.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            out_id = out_id * keep
        return _merge_heads(out + self.scale * out_id)  # (B, N, h*d)


def install_pva(
    unet: nn.Module,
    num_text_tokens: int,
    variant: Variant = "pva",
    impl: AttentionImpl = "fused",
    decoupled_scale: float = 1.0,
) -> dict[str, _IdentityAttnBase]:
    """Install PVA processors on every cross-attention (``attn2``) layer of a UNet.

    Self-attention layers get :class:`SelfAttnProcessor` (the stock computation). The new
    parameters are trainable copies of the frozen ``to_q/to_k/to_v``; they appear in
    ``unet.state_dict()`` under ``...attn2.processor.to_{q,k,v}_pva.*`` (or ``to_{k,v}_ip``).

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        num_text_tokens: Text context length (77 for SD2).
        variant: ``"pva"`` (joint softmax, default) or ``"decoupled"`` (IP-Adapter ablation).
        impl: PVA implementation, ``"fused"`` or ``"reference"``.
        decoupled_scale: Identity weight of the decoupled variant.

    Returns:
        The installed identity processors, keyed by processor name.
    """
    if variant not in ("pva", "decoupled"):
        raise ValueError(f"variant must be 'pva' or 'decoupled', got {variant!r}")
    modules = dict(unet.named_modules())
    processors: dict[str, nn.Module] = {}
    installed: dict[str, _IdentityAttnBase] = {}
    for name in unet.attn_processors:
        layer = modules[name.removesuffix(".processor")]
        if name.endswith("attn2.processor"):
            if variant == "pva":
                proc: nn.Module = PVAAttnProcessor(layer, num_text_tokens, impl)
            else:
                proc = DecoupledAttnProcessor(layer, num_text_tokens, decoupled_scale)
            installed[name] = proc
        else:
            proc = SelfAttnProcessor()
        processors[name] = proc
    if not installed:
        raise ValueError("the UNet has no cross-attention (attn2) layers to install PVA on")
    unet.set_attn_processor(processors)
    return installed


def identity_processors(unet: nn.Module) -> Iterator[tuple[str, _IdentityAttnBase]]:
    """Yield ``(name, processor)`` for every installed PVA/decoupled processor."""
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, _IdentityAttnBase):
            yield name, proc


def set_attention_impl(unet: nn.Module, impl: AttentionImpl) -> None:
    """Switch every installed PVA processor between ``"fused"`` and ``"reference"``."""
    if impl not in ("fused", "reference"):
        raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
    for _, proc in identity_processors(unet):
        if isinstance(proc, PVAAttnProcessor):
            proc.impl = impl
