"""The learned modifier token ``<new1>`` (METHOD section 5).

Prompts read ``photo of a <new1> person``. The token is added to the tokenizer and the text
encoder's embedding table grows by one (frozen) row, but the value actually used for ``<new1>``
is :attr:`ModifierToken.embedding`, a separate parameter swapped in by a forward hook on the
embedding layer. So only this one vector trains, the frozen table (every other row, and the
optimizer's weight decay) is never touched, and the text encoder stays entirely frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, PreTrainedTokenizerBase


class ModifierToken(nn.Module):
    """A new prompt token whose embedding is one learnable vector.

    Args:
        embedding_dim: Text embedding width (1024 for SD2).
        token: The token string.
    """

    def __init__(self, embedding_dim: int, token: str = "<new1>") -> None:
        super().__init__()
        self.token = token
        self.token_id: int | None = None
        self.embedding = nn.Parameter(torch.zeros(embedding_dim))
        self._hook = None

    def attach(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: CLIPTextModel,
        initializer_token: str | None = "person",
    ) -> int:
        """Add the token to the tokenizer and hook the text encoder's embedding layer.

        Args:
            tokenizer: Tokenizer to extend (in place).
            text_encoder: Text encoder whose embedding table grows by one frozen row.
            initializer_token: Word whose embedding initialises the new vector (a single-token
                word). ``None`` keeps zeros.

        Returns:
            The token id.
        """
        if self._hook is not None:
            raise RuntimeError("ModifierToken is already attached to a text encoder")
        table = text_encoder.get_input_embeddings()
        if table.weight.shape[1] != self.embedding.shape[0]:
            raise ValueError(
                f"token width {self.embedding.shape[0]} != text encoder width "
                f"{table.weight.shape[1]}"
            )
        if self.token not in tokenizer.get_vocab():
            tokenizer.add_tokens([self.token])
        token_id = tokenizer.convert_tokens_to_ids(self.token)
        if token_id >= table.num_embeddings:
            requires_grad = table.weight.requires_grad
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = text_encoder.get_input_embeddings()
            table.weight.requires_grad_(requires_grad)
        if initializer_token is not None:
            ids = tokenizer.encode(initializer_token, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"initializer_token {initializer_token!r} must be one token")
            with torch.no_grad():
                init = table.weight[ids[0]].detach().clone()
                table.weight[token_id] = init
                if self.embedding.device.type != "meta":
                    self.embedding.copy_(init.to(self.embedding))
        self.token_id = token_id
        self._hook = table.register_forward_hook(self._swap)
        return token_id

    def _swap(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Replace the embedding of ``<new1>`` positions by the learnable vector."""
        input_ids = args[0] if args else None
        if input_ids is None:
            return output
        is_token = (input_ids == self.token_id).unsqueeze(-1)  # (B, L, 1)
        if not bool(is_token.any()):
            return output
        return torch.where(is_token, self.embedding.to(output.dtype), output)  # (B, L, D)
