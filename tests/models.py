"""User models with no diffusers adapter: what generic region analysis must handle."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mod = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class UserDenoiser(nn.Module):
    """embed → ModuleList of blocks → head, called as model(x, t, cond=None)."""

    def __init__(self, channels: int = 4, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None):
        temb = self.time(timestep_embedding(t, self.dim))
        if cond is not None:
            temb = temb + cond
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb)
        return {"sample": self.head(h)}


class GatedBlock(nn.Module):
    """Ernie-Image's block in small: per-token shift, scale and gates, each the stream's shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, shift, scale, gate, gate_mlp):
        h = self.norm(x) * (1 + scale) + shift
        x = x + gate * self.attn(h, h, h, need_weights=False)[0]
        return x + gate_mlp * self.mlp(self.norm(x))


class GatedDenoiser(nn.Module):
    """Blocks fed four [B, N, D] modulation tensors beside the [B, N, D] stream (Ernie-Image
    expands its adaLN outputs over the tokens): shapes alone cannot tell which input a block's
    output is a residual of."""

    def __init__(self, channels: int = 4, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Linear(dim, dim)
        self.modulation = nn.Linear(dim, 4 * dim)
        self.blocks = nn.ModuleList(GatedBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def modulations(self, t: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
        temb = self.time(timestep_embedding(t, self.dim))
        parts = self.modulation(torch.nn.functional.silu(temb)).chunk(4, dim=-1)
        return [p[:, None].expand_as(like).contiguous() for p in parts]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor):
        h = self.embed(hidden_states)
        modulations = self.modulations(timestep, h)
        for block in self.blocks:
            h = block(h, *modulations)
        return self.head(h)


def gated_model():
    """(model, keyword inputs) of `GatedDenoiser`, seeded."""
    torch.manual_seed(0)
    model = GatedDenoiser().eval()
    return model, {"hidden_states": torch.randn(2, 10, 4), "timestep": torch.tensor([700.0, 3.0])}


class NoBlocks(nn.Module):
    """No ModuleList anywhere: region analysis must say so."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def user_model(depth: int = 3):
    """A factory for `diffopt inspect tests.models:user_model`: (model, positional inputs)."""
    torch.manual_seed(0)
    model = UserDenoiser(depth=depth).eval()
    return model, (torch.randn(2, 10, 4), torch.tensor([3.0, 700.0]))


class SparseAttentionBlock(nn.Module):
    """Kandinsky 6 SR's NABLA attention in small: the block builds its own `BlockMask` from its
    queries and keys (`BlockMask.from_kv_blocks`, which runs a ``vmap`` inside the block) and
    calls flex attention with it."""

    BLOCK = 64

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mod = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        blocks = q.shape[2] // self.BLOCK
        qa = q.unflatten(2, (blocks, self.BLOCK)).mean(-2)
        ka = k.unflatten(2, (blocks, self.BLOCK)).mean(-2)
        scores = qa @ ka.transpose(-2, -1)
        keep = (scores >= scores.mean(-1, keepdim=True)) | torch.eye(blocks, dtype=torch.bool)
        kv_nb = keep.sum(-1).to(torch.int32)
        kv_inds = keep.int().argsort(dim=-1, descending=True).to(torch.int32)
        mask = BlockMask.from_kv_blocks(
            torch.zeros_like(kv_nb), kv_inds, kv_nb, kv_inds, BLOCK_SIZE=self.BLOCK, mask_mod=None
        )
        attn = flex_attention(q, k, v, block_mask=mask)
        return x + self.out(attn.transpose(1, 2).flatten(2))


class SparseAttentionDenoiser(nn.Module):
    """embed → blocks of `SparseAttentionBlock` → head, over 128 tokens (two mask blocks)."""

    def __init__(self, channels: int = 4, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(SparseAttentionBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.dim))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h)


def sparse_attention_model():
    """(model, positional inputs) of `SparseAttentionDenoiser`, seeded."""
    torch.manual_seed(0)
    model = SparseAttentionDenoiser().eval()
    return model, (torch.randn(2, 128, 4), torch.tensor([700.0, 3.0]))
