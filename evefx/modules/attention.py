"""Attention that torch.fx traces through: explicit q/k/v/out ``nn.Linear`` layers and plain tensor ops.

``nn.MultiheadAttention`` keeps its input projection in one ``in_proj_weight`` parameter and runs
as one opaque call, so no pass can reach its projections. :class:`DecomposedMultiheadAttention`
computes the same thing from four ``nn.Linear`` layers::

    q = q_proj(query).reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)   # same for k, v
    scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5 (+ masks)
    out = out_proj((softmax(scores) @ v).transpose(1, 2).reshape(batch, tokens, embed_dim))

so a ``select: {types: [Linear]}`` section quantizes, spikes or prunes the projections like any
other Linear, and the scores, softmax and masks stay float ops between them.

State dict mapping from ``nn.MultiheadAttention`` (``E = embed_dim``)::

    in_proj_weight[0:E]     -> q_proj.weight      in_proj_bias[0:E]     -> q_proj.bias
    in_proj_weight[E:2E]    -> k_proj.weight      in_proj_bias[E:2E]    -> k_proj.bias
    in_proj_weight[2E:3E]   -> v_proj.weight      in_proj_bias[2E:3E]   -> v_proj.bias
    q_proj_weight / k_proj_weight / v_proj_weight (kdim or vdim != E) -> {q,k,v}_proj.weight
    out_proj.weight / out_proj.bias               -> out_proj.weight / out_proj.bias

:class:`TraceableTransformerEncoderLayer` and :class:`TraceableTransformerEncoder` are
``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` with only the reference ("slow") path
as their forward: no fast path, no nested tensors, no data-dependent checks, so fx traces
through them. Masks are applied as in that path (``bool``: True means "may not attend", float:
added to the scores); ``is_causal`` is a hint that the given mask is causal, as in PyTorch.
Inputs are batched (3-d); the unbatched 2-d form of ``nn.MultiheadAttention`` is not supported
(fx cannot branch on a traced tensor's rank).

Example:
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
    >>> dec = DecomposedMultiheadAttention.from_float(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(dec(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.errors import OptionError

__all__ = [
    "DecomposedMultiheadAttention",
    "TraceableTransformerEncoderLayer",
    "TraceableTransformerEncoder",
    "attention_bias",
]


def attention_bias(scores: torch.Tensor, attn_mask: torch.Tensor | None,
                   key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``scores`` ``[B, H, L, S]`` with ``attn_mask`` (``[L, S]`` or ``[B*H, L, S]``) and
    ``key_padding_mask`` (``[B, S]``) applied: a bool mask puts ``-inf`` where it is True, a
    float mask is added. fx records this as one call (it branches on dtype and rank).

    Example:
        >>> attention_bias(torch.zeros(1, 1, 1, 2), None, torch.tensor([[False, True]])).tolist()
        [[[[0.0, -inf]]]]
    """
    batch, heads = scores.shape[0], scores.shape[1]
    for mask, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, scores.shape[-1]))):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(mask, float("-inf"))
        elif not torch.is_floating_point(mask):
            raise OptionError(f"attention masks must be bool or float (got {mask.dtype})")
        if shape is None and mask.dim() == 3:  # [B*H, L, S], batch-major as nn.MultiheadAttention takes it
            shape = (batch, heads, mask.shape[-2], mask.shape[-1])
        scores = scores + (mask.reshape(shape) if shape is not None else mask.to(scores.dtype))
    return scores


fx.wrap("attention_bias")


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as four ``nn.Linear`` layers and plain tensor ops (see the module docstring).

    Same constructor arguments and forward as ``nn.MultiheadAttention`` (batched inputs;
    ``add_bias_kv``/``add_zero_attn`` are not supported). ``from_float`` converts an existing one.

    Example:
        >>> attn = DecomposedMultiheadAttention(64, 4, batch_first=True)
        >>> out, weights = attn(x, x, x, need_weights=True)   # weights averaged over heads
    """

    evefx_trace_through = True
    """evefx's tracer traces through this module (other evefx modules are leaves)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise OptionError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "DecomposedMultiheadAttention":
        """The same attention with the weights of ``mha`` split into the four projections
        (mapping in the module docstring); the training flag is kept.

        Example:
            >>> DecomposedMultiheadAttention.from_float(nn.MultiheadAttention(8, 2)).q_proj
            Linear(in_features=8, out_features=8, bias=True)
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise OptionError("DecomposedMultiheadAttention does not support add_bias_kv or add_zero_attn")
        E = mha.embed_dim
        new = cls(E, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim, mha.batch_first)
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                weights = mha.in_proj_weight.split(E, dim=0)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.split(E) if mha.in_proj_bias is not None else (None,) * 3
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)
        return new.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, E] -> [B, H, N, head_dim]``: the reshape that splits the features into heads."""
        batch, tokens = x.shape[0], x.shape[1]
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise OptionError("is_causal=True needs attn_mask (the causal mask), as in nn.MultiheadAttention")
        if not self.batch_first:  # [N, B, E] -> [B, N, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tokens = query.shape[0], query.shape[1]
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if attn_mask is not None or key_padding_mask is not None:
            scores = attention_bias(scores, attn_mask, key_padding_mask)
        attn = F.softmax(scores, dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, tokens, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class TraceableTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose forward is the reference path only (fx traces it).

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 2, batch_first=True)
        >>> layer.__class__ = TraceableTransformerEncoderLayer   # what evefx's tracer does on its copy
    """

    evefx_trace_through = True

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TraceableTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without the nested-tensor fast path: each layer in turn, then ``norm``.

    In eval mode with a key padding mask, PyTorch's fast path returns zeros at padded positions;
    this forward returns what the layers compute there (the reference path's values).
    """

    evefx_trace_through = True

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        if self.norm is not None:
            out = self.norm(out)
        return out

