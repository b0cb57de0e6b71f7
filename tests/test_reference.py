"""ref-dit: shipped, the right size, and it has learned the digits."""

from __future__ import annotations

import pytest
import torch

from diffopt.cli import main
from diffopt.evaluation import metrics, zoo


@pytest.fixture(scope="module")
def ref():
    return zoo.load("ref-dit")


def test_ref_dit_is_a_diffusers_dit_of_the_promised_size(ref):
    from diffusers import DiTTransformer2DModel

    assert isinstance(ref.model, DiTTransformer2DModel)
    config = ref.model.config
    assert config.num_layers >= 8
    assert (config.sample_size // config.patch_size) ** 2 >= 64
    weights = zoo.ASSETS / "ref-dit" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    inputs = ref.make_inputs(batch=3)
    assert ref.model(**inputs)[0].shape == (3, 1, 16, 16)


def test_fifty_step_samples_show_their_class(ref):
    labels = torch.arange(30) % 10
    images = ref.sample(labels, seeds=range(1000, 1030))
    assert metrics.class_accuracy(images, labels) >= 0.8


def test_inspect_ref_dit(capsys):
    assert main(["inspect", "ref-dit", "--inner", "eager"]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.7" in out


def test_dit_s2_is_dit_s2_sized():
    model = zoo.load("dit-s2").model
    config = model.config
    assert config.num_layers == 12
    assert config.num_attention_heads * config.attention_head_dim == 384
    assert (config.sample_size // config.patch_size) ** 2 == 256
    assert zoo.load("dit-s2").null_class == 1000 and zoo.load("ref-dit").null_class == 10


def test_dit_s2_has_no_folder_to_read(tmp_path):
    from diffopt.config import ConfigError

    with pytest.raises(ConfigError, match="dit-s2 has no weights to read"):
        zoo.load("dit-s2", tmp_path)


def test_latents_from_given_noise_are_the_seeds_latents(ref):
    labels, seeds = torch.tensor([3, 7]), [11, 12]
    from_seeds = ref.latents(labels, seeds, steps=2)
    torch.testing.assert_close(ref.latents(labels, noise=ref.noise(seeds), steps=2), from_seeds)
    with pytest.raises(TypeError, match="seeds or noise"):
        ref.latents(labels, seeds, noise=ref.noise(seeds))


def test_unknown_reference_is_a_clear_error():
    with pytest.raises(KeyError, match=r"choose one of \[.ref-dit"):
        zoo.load("ref-unet")


@pytest.mark.parametrize(
    "name, steps",
    [("ref-dit-1step", 1), ("ref-dit-2step", 2), ("ref-flux-1step", 1), ("ref-flux-2step", 2)],
)
def test_few_step_students_ship_and_draw_their_class_in_their_steps(name, steps):
    student = zoo.load(name)
    assert student.guidance == 1.0 and len(student.steps) == steps  # guidance-distilled
    labels = torch.arange(30) % 10
    calls = []
    student.model.register_forward_hook(lambda *_: calls.append(1))
    images = student.sample(labels, seeds=range(1000, 1030))
    assert len(calls) == steps  # one call per step: no unconditional batch
    assert metrics.class_accuracy(images, labels) >= 0.8
