"""Small hand-written transformer pieces for the channel tests: attention with separate q/k/v/out
projections (the form of evefx's traceable attention), attention with one fused qkv projection (Swin's
form, ``(B, N, 3, H, D)``), a pre-norm block with an MLP, a ViT (conv stem, class token, positional
embedding) and a conv model with channels-last LayerNorm and GroupNorm."""
from __future__ import annotations

import torch
from torch import nn

TOKENS = torch.zeros(1, 5, 16)
IMAGE = torch.zeros(1, 3, 16, 16)


def randomise(model, seed=0):
    """Non-trivial norm affines, so that a wrong slice shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


class Attention(nn.Module):
    """q/k/v/out projections; ``reshape(b, n, heads, head_dim) -> transpose -> matmul -> softmax -> matmul``."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.out_proj(out)


class FusedAttention(nn.Module):
    """One qkv projection reshaped to ``(b, n, 3, heads, head_dim)`` and permuted, as Swin writes it."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, ``x + mlp(norm(x))`` with ``Linear -> GELU -> Linear``."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 32, fused: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = FusedAttention(dim, heads) if fused else Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Tokens(nn.Module):
    """Embedding, two blocks, mean over tokens, classifier."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.blocks = nn.Sequential(Block(fused=fused), Block(fused=fused))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class TinyViT(nn.Module):
    """Patch conv -> flatten(2).transpose(1, 2) -> class token (expand, cat) -> + positional embedding
    -> block -> LayerNorm -> class token -> head."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.block = Block(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.block(x))[:, 0])


class ChannelsLast(nn.Module):
    """Conv stem -> permute to channels last -> Linear (reads the stem's channels on the last axis)
    -> LayerNorm -> Linear -> permute back -> GroupNorm(2 groups) -> conv -> pool -> head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x)).permute(0, 2, 3, 1)
        x = self.fc2(torch.relu(self.norm(self.fc1(x)))).permute(0, 3, 1, 2)
        return self.head(self.conv(torch.relu(self.gn(x))).mean((2, 3)))


class EinsumAttention(Attention):
    """The same attention written with ``torch.einsum`` (as torchvision's MaxViT does)."""

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        q, k, v = (p(x).reshape(b, n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * self.scale, dim=-1)
        return self.out_proj(torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, -1))
