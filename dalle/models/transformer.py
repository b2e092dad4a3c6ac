"""The transformer of stage two: a decoder over [text tokens ; image codes].

Sequence layout (T = text_seq_len, N = grid * grid image codes):

    input   BOS  t_0 ... t_{T-1}  c_0 ... c_{N-2}          (length T + N)
    target  t_0  t_1 ... c_0      c_1 ... c_{N-1}

The first T positions predict text and the last N predict image codes, each with its
own head, so a text position can never put probability on an image code or the other
way round (and no compute is spent on logits that would be masked anyway). Text
padding (token 0) is replaced by a padding token of its own for every position, as in
the paper. Text positions have learned position embeddings; image codes have learned
row and column embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle.config import TransformerConfig

TEXT_PAD = 0  # the tokenizer's padding id; replaced by a per-position padding token


def attention_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """Boolean (L, L) mask, True where a query may attend a key; L = text_len + grid^2 - 1.

    `text_len` counts every text-type input (BOS and the text tokens). Text attends causally;
    every image position attends all text positions. Among image codes, in raster order,
    with i the query's and j the key's index, (r, c) their row and column:
      full:   j <= i
      row:    0 <= i - j <= grid        (itself and the previous grid codes, as in the Sparse Transformer)
      column: j <= i and (i - j) % grid == 0
      conv:   j <= i, 0 <= r_i - r_j <= conv_kernel // 2 and |c_i - c_j| <= conv_kernel // 2
    """
    num_image = grid * grid - 1  # the last code is predicted, never an input
    length = text_len + num_image
    pos = torch.arange(length)
    mask = pos[:, None] >= pos[None, :]
    if kind == "full":
        return mask
    i = torch.arange(num_image)[:, None]
    j = torch.arange(num_image)[None, :]
    before = j <= i
    if kind == "row":
        image_part = before & (i - j <= grid)
    elif kind == "column":
        image_part = before & ((i - j) % grid == 0)
    elif kind == "conv":
        half = conv_kernel // 2
        row_gap = i // grid - j // grid
        image_part = before & (row_gap <= half) & ((i % grid - j % grid).abs() <= half)
    else:
        raise ValueError(f"unknown attention kind {kind!r}")
    mask[text_len:, text_len:] = image_part
    return mask


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated to the full sequence
    on first use, in the dtype the layer computes in (bf16 under autocast)."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self._layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int):
        """Store keys/values (B, heads, L, head_dim) at positions [start, start + L); return all up to there."""
        if self._layers[layer] is None:
            shape = (*keys.shape[:2], self.max_len, keys.shape[3])
            self._layers[layer] = (keys.new_empty(shape), values.new_empty(shape))
        cache_k, cache_v = self._layers[layer]
        end = start + keys.shape[2]
        cache_k[:, :, start:end] = keys
        cache_v[:, :, start:end] = values
        return cache_k[:, :, :end], cache_v[:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.attention_dropout

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        end = start + length
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # full causal attention over a prefix starting at 0, or a single new query
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=length > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[start:end, :end], dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attention = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        x = x + self.drop(self.attention(self.norm1(x), mask, cache, layer, start))
        return x + self.drop(self.mlp(self.norm2(x)))


@dataclass
class TransformerLoss:
    loss: torch.Tensor
    # Detached tensors, not floats: reading a value waits for the device and, inside torch.compile,
    # splits the graph; the training loop reads them once per step, after the backward pass is queued.
    text_loss: torch.Tensor
    image_loss: torch.Tensor


class DalleTransformer(nn.Module):
    """Decoder-only transformer over text tokens and image codes, with separate output heads."""

    def __init__(self, cfg: TransformerConfig, text_vocab_size: int, image_vocab_size: int, image_grid: int):
        """The vocabulary sizes and the grid come from the tokenizer and the dVAE the model is trained with."""
        super().__init__()
        self.cfg = cfg
        self.text_vocab_size = text_vocab_size
        self.image_vocab_size = image_vocab_size
        self.grid = image_grid
        self.text_len = cfg.text_seq_len
        self.num_codes = image_grid * image_grid
        self.seq_len = self.text_len + self.num_codes
        width = cfg.width
        # Text inputs: the vocabulary, one padding token per position, and BOS.
        self.text_embedding = nn.Embedding(text_vocab_size + self.text_len + 1, width)
        self.text_position = nn.Embedding(self.text_len + 1, width)
        self.image_embedding = nn.Embedding(image_vocab_size, width)
        self.image_row = nn.Embedding(image_grid, width)
        self.image_column = nn.Embedding(image_grid, width)
        self.layer_kinds = cfg.layer_attention()
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in self.layer_kinds)
        self.final_norm = nn.LayerNorm(width)
        # Text targets include the per-position padding tokens; image targets are codes only.
        self.text_head = nn.Linear(width, text_vocab_size + self.text_len, bias=False)
        self.image_head = nn.Linear(width, image_vocab_size, bias=False)
        for kind in set(self.layer_kinds):
            mask = attention_mask(kind, self.text_len + 1, image_grid, cfg.conv_kernel)
            self.register_buffer(f"mask_{kind}", mask, persistent=False)
        self.register_buffer("image_rows", torch.arange(self.num_codes) // image_grid, persistent=False)
        self.register_buffer("image_columns", torch.arange(self.num_codes) % image_grid, persistent=False)
        self.register_buffer("pad_tokens", text_vocab_size + torch.arange(self.text_len), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Residual branches that add into the stream start smaller, so depth does not grow the activations.
        for block in self.blocks:
            nn.init.normal_(block.attention.proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * len(self.blocks)))

    # ----- inputs

    def prepare_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Check text tokens (B, T) and give each padding position its own padding token."""
        if text_tokens.ndim != 2 or text_tokens.shape[1] != self.text_len:
            raise ValueError(
                f"text tokens must have shape (batch, {self.text_len}), got {tuple(text_tokens.shape)}"
            )
        if text_tokens.min() < 0 or text_tokens.max() >= self.text_vocab_size:
            raise ValueError(
                f"text tokens must lie in [0, {self.text_vocab_size}) (0 is padding), "
                f"got [{int(text_tokens.min())}, {int(text_tokens.max())}]; was the model built for this tokenizer?"
            )
        return torch.where(text_tokens == TEXT_PAD, self.pad_tokens, text_tokens)

    def embed_text(self, prepared_text: torch.Tensor) -> torch.Tensor:
        """BOS plus the prepared text: (B, T + 1, width)."""
        bos = torch.full_like(prepared_text[:, :1], self.text_vocab_size + self.text_len)
        tokens = torch.cat([bos, prepared_text], dim=1)
        return self.text_embedding(tokens) + self.text_position.weight

    def embed_codes(self, codes: torch.Tensor, first_index: int = 0) -> torch.Tensor:
        """Image codes at raster indices first_index, first_index + 1, ...: (B, n, width)."""
        index = slice(first_index, first_index + codes.shape[1])
        return (
            self.image_embedding(codes)
            + self.image_row(self.image_rows[index])
            + self.image_column(self.image_columns[index])
        )

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] > self.num_codes:
            raise ValueError(
                f"image codes must have shape (batch, <= {self.num_codes}), got {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.image_vocab_size):
            raise ValueError(
                f"image codes must lie in [0, {self.image_vocab_size}), got [{int(codes.min())}, {int(codes.max())}]; "
                "were they made by a dVAE with another codebook size?"
            )

    # ----- the network

    def backbone(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Run the layers over positions [start, start + L) and apply the final norm."""
        for layer, block in enumerate(self.blocks):
            mask = getattr(self, f"mask_{block.kind}")
            if block.kind == "full" and (start == 0 or x.shape[1] == 1):
                # The fast paths: is_causal over a prefix, or one new query that sees every cached key.
                mask = None
            if self.cfg.checkpoint_activations and self.training and cache is None:
                x = checkpoint(block, x, mask, None, layer, start, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        return self.final_norm(x)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text_head(hidden)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.image_head(hidden)

    def logits(
        self, text_tokens: torch.Tensor, image_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text logits (B, T, text_vocab + T) and image logits (B, N, image_vocab) for full sequences."""
        return self._logits(self.prepare_text(text_tokens), image_codes)

    def _logits(self, prepared_text: torch.Tensor, image_codes: torch.Tensor):
        image_codes = image_codes.flatten(1) if image_codes.ndim == 3 else image_codes  # (B, grid, grid) too
        self.check_codes(image_codes)
        if image_codes.shape[1] != self.num_codes:
            raise ValueError(f"expected {self.num_codes} image codes per sample, got {image_codes.shape[1]}")
        x = torch.cat([self.embed_text(prepared_text), self.embed_codes(image_codes[:, :-1])], dim=1)
        hidden = self.backbone(x)
        return self.text_logits(hidden[:, : self.text_len]), self.image_logits(hidden[:, self.text_len :])

    def forward(self, text_tokens: torch.Tensor, image_codes: torch.Tensor) -> TransformerLoss:
        """Weighted cross-entropy of the next token; drops the text of a share of samples when configured."""
        if self.training and self.cfg.cond_drop_prob > 0:
            dropped = torch.rand(text_tokens.shape[0], device=text_tokens.device) < self.cfg.cond_drop_prob
            text_tokens = torch.where(dropped[:, None], torch.zeros_like(text_tokens), text_tokens)
        image_codes = image_codes.flatten(1) if image_codes.ndim == 3 else image_codes
        text_target = self.prepare_text(text_tokens)  # the targets are the prepared inputs, shifted
        text_logits, image_logits = self._logits(text_target, image_codes)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text_target.flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), image_codes.flatten().long())
        weight = self.cfg.text_loss_weight
        return TransformerLoss(
            loss=weight * text_loss + (1 - weight) * image_loss,
            text_loss=text_loss.detach(),
            image_loss=image_loss.detach(),
        )

    # ----- sampling support

    def new_cache(self) -> KVCache:
        """An empty key-value cache for sampling."""
        return KVCache(len(self.blocks), self.seq_len)

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample, forward and backward (3x the forward), counted the usual
        way (as in PaLM's MFU): every matrix product of the layers and heads, and attention over the whole
        sequence whatever its mask; embeddings, norms and elementwise work are left out."""
        width, length = self.cfg.width, self.seq_len
        block = 2 * (4 + 2 * self.cfg.mlp_ratio) * width * width  # qkv, proj and the MLP, per position
        attention = 2 * 2 * length * width  # scores and weighted values, per position
        heads = (
            2 * width * (self.text_len * self.text_head.out_features + self.num_codes * self.image_vocab_size)
        )
        return 3.0 * (len(self.blocks) * length * (block + attention) + heads)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for AdamW: decay on the weights of linear layers only, never on
        embeddings, biases or layer-norm gains."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
