"""The tiny catalogue of every diffusers denoiser class (`diffopt.evaluation.families`).

Default run: the catalogue covers every installed class, every family builds and runs one
forward, and backend parity on a handful of families that stress different input shapes. Parity
on all families: ``pytest -m families tests/test_families.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffopt.evaluation import families, zoo

NAMES = sorted(families.FAMILIES)

PARITY_DEFAULT = [
    "tiny-wan",  # video DiT, rotary tables as side inputs
    "tiny-flux2",  # dual-stream blocks, 4-axis position ids, guidance input
    "tiny-ltx",  # packed tokens, integer frame / height / width arguments
    "tiny-z-image",  # lists of per-sample tensors in, a list out
    "tiny-stable-audio",  # 1-D latents, a precomputed rotary table
    "tiny-unet-2d",  # a UNet: down / mid / up blocks that change shape
]
"""Families whose parity runs in the default run (the rest under ``-m families``)."""


def tensors(value) -> list[torch.Tensor]:
    """The tensors in a nested output (tuples, lists, dicts, diffusers output classes)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors(v)]
    return []


def all_families_selected(config: pytest.Config) -> bool:
    expression = config.getoption("markexpr") or ""
    return "families" in expression and "not families" not in expression


def test_every_installed_denoiser_class_has_a_family():
    """Fails when a diffusers release adds a denoiser class: give it a tiny config in
    families.py (or an EXCLUDED entry saying why it is not a denoiser)."""
    installed = families.denoiser_classes()
    assert len(installed) > 50  # the enumeration itself works (diffusers 0.42: 87 classes)
    assert families.missing() == []
    assert set(families.EXCLUDED) <= set(installed), "an exclusion names a class diffusers lacks"
    covered = {f.cls for f in families.FAMILIES.values()}
    assert covered <= set(installed), f"families of uninstalled classes: {covered - set(installed)}"
    assert not covered & set(families.EXCLUDED)
    assert len(covered) == len(families.FAMILIES), "two families of one class"


@pytest.mark.parametrize("name", NAMES)
def test_family_builds_and_runs_one_forward(name):
    spec = families.FAMILIES[name]
    model, inputs = spec.build()
    assert type(model).__name__ == spec.cls
    assert not model.training
    if spec.timestep is not None:
        assert spec.timestep in inputs
    if spec.latents is not None:
        assert spec.latents in inputs
    with torch.no_grad():
        out = tensors(model(**inputs))
    assert out, "the forward returned no tensor"
    assert all(torch.isfinite(t).all() for t in out if t.is_floating_point())


def test_families_are_seeded():
    first, first_inputs = families.build("tiny-wan", seed=3)
    second, second_inputs = families.build("tiny-wan", seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first_inputs["hidden_states"], second_inputs["hidden_states"])
    other, _ = families.build("tiny-wan", seed=4)
    assert not torch.equal(next(first.parameters()), next(other.parameters()))


def test_zoo_knows_the_family_names():
    model, inputs = zoo.build("tiny-wan")
    assert type(model).__name__ == "WanTransformer3DModel"
    assert inputs["hidden_states"].shape == (2, 4, 2, 8, 8)
    resolved, _ = zoo.resolve("tiny-cogvideox")
    assert type(resolved).__name__ == "CogVideoXTransformer3DModel"
    with pytest.raises(KeyError, match="tiny-wan"):
        zoo.build("tiny-nonexistent")
    with pytest.raises(ValueError, match="fixed example inputs"):
        zoo.build("tiny-wan", size=(16, 16))


def check_parity(name: str) -> None:
    model, inputs = families.build(name)
    with torch.no_grad():
        expected = tensors(model(**copy.deepcopy(inputs)))
        compiled = torch.compile(model, backend="diffopt", options={"inner": "eager"})
        got = tensors(compiled(**copy.deepcopy(inputs)))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert (a.float() - b.float()).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", PARITY_DEFAULT)
def test_backend_parity(name):
    check_parity(name)


@pytest.mark.families
@pytest.mark.parametrize("name", NAMES)
def test_backend_parity_every_family(name, request):
    if not all_families_selected(request.config):
        pytest.skip("parity on every family: pytest -m families tests/test_families.py")
    check_parity(name)
