"""The group rotations: orthonormal, the regular one's rows sum to 1, exact in low precision."""

from __future__ import annotations

import pytest
import torch

from diffopt.kernels import default_group, hadamard, rotate


@pytest.mark.parametrize("kind", ["regular", "sylvester"])
@pytest.mark.parametrize("group", [16, 64, 256])
def test_rotations_are_orthonormal(kind, group):
    h = hadamard(kind, group)
    assert torch.equal(h @ h.T, torch.eye(group))  # exact: entries are ±2^-j


@pytest.mark.parametrize("group", [16, 64, 256])
def test_regular_rows_all_sum_to_one_and_sylvester_piles_the_offset(group):
    regular, sylvester = hadamard("regular", group), hadamard("sylvester", group)
    assert torch.equal(regular.sum(dim=1), torch.ones(group))
    offset = torch.ones(1, group)  # a token's common offset
    assert torch.allclose(rotate(offset, regular), torch.ones(1, group))  # spread evenly
    piled = rotate(offset, sylvester)
    assert piled[0, 0] == pytest.approx(group**0.5) and piled[0, 1:].abs().max() < 1e-6
    assert torch.equal(hadamard("regular", group).bfloat16().float(), regular)


def test_rotation_preserves_the_product():
    x, w, h = torch.randn(5, 128), torch.randn(7, 128), hadamard("regular", 64)
    assert torch.allclose(rotate(x, h) @ rotate(w, h).T, x @ w.T, atol=1e-4)


def test_default_group_and_bad_groups():
    assert [default_group(k) for k in (3072, 320, 48, 40)] == [256, 64, 16, None]
    with pytest.raises(ValueError, match="power of 4"):
        hadamard("regular", 32)
    with pytest.raises(ValueError, match="not one of"):
        hadamard("walsh", 16)
    assert hadamard("none", 16) is None
