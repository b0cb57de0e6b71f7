"""The group rotations of the rotated 4-bit matmuls: regular and Sylvester Hadamard blocks.

A rotation multiplies each K-group of a weight row and of an activation row by the same
orthonormal [G, G] matrix, so ``(x H)(W H)^T = x W^T`` while outliers spread over the group.
The *regular* Hadamard (ConvRot) is a Kronecker power of the 4×4 Hadamard whose rows all sum
to one: a token's common offset spreads evenly over the group. Sylvester's first row is all
ones and piles that offset into one coefficient, which then dominates the per-token scale.
"""

from __future__ import annotations

from typing import Literal

import torch

Rotation = Literal["regular", "sylvester", "none"]

GROUP_SIZES = (256, 64, 16)
"""Powers of 4, largest first: the default group is the largest that divides K."""

_REGULAR_4 = torch.tensor(
    [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64
)
_SYLVESTER_2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.float64)


def default_group(k: int) -> int | None:
    """The largest of 256 / 64 / 16 that divides `k`, or None when none does."""
    return next((g for g in GROUP_SIZES if k % g == 0), None)


def hadamard(kind: Rotation, group: int) -> torch.Tensor | None:
    """The orthonormal [group, group] rotation block in float32, or None for ``"none"``.

    Entries are ±2^-j for groups that are powers of 4, so they are exact in any float dtype.
    """
    if kind == "none":
        return None
    if kind == "regular":
        if not _power_of_2(group) or group.bit_length() % 2 == 0 or group < 4:
            raise ValueError(f"a regular Hadamard needs a group that is a power of 4, not {group}")
        base = _REGULAR_4
    elif kind == "sylvester":
        if not _power_of_2(group) or group < 2:
            raise ValueError(f"a Sylvester Hadamard needs a power-of-2 group, not {group}")
        base = _SYLVESTER_2
    else:
        raise ValueError(f"rotation {kind!r} is not one of 'regular', 'sylvester', 'none'")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < group:
        h = torch.kron(h, base)
    return (h / group**0.5).to(torch.float32)  # ±1 entries, scaled to be orthonormal


def rotate(
    x: torch.Tensor, block: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Multiply every `block`-sized group along the last dimension by `block` (in `dtype`)."""
    if block is None:
        return x.to(dtype)
    g = block.shape[0]
    return (x.to(dtype).unflatten(-1, (-1, g)) @ block.to(dtype)).flatten(-2)


def _power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
