"""Peer adapters: each one really caches on ref-dit, and a reset makes runs repeatable."""

from __future__ import annotations

import copy

import pytest
import torch

from diffopt.evaluation import metrics, peers, zoo

STEPS = 20


@pytest.fixture(scope="module")
def ref():
    return zoo.load("ref-dit")


def _check(ref, variant):
    labels, seeds = torch.arange(4), [0, 1, 2, 3]
    denoiser = variant.build(copy.deepcopy(ref.model), "eager")

    def once():
        variant.reset(denoiser)
        return ref.sample(labels, seeds, denoiser=denoiser, steps=STEPS)

    first, flops = metrics.count_flops(once)
    _, base_flops = metrics.count_flops(lambda: ref.sample(labels, seeds, steps=STEPS))
    assert flops < 0.95 * base_flops, f"{variant.name} skipped no work"
    torch.testing.assert_close(once(), first, rtol=0, atol=0)  # reset: a cold start every run


@pytest.mark.parametrize(
    "make",
    [
        peers.first_block_cache,
        peers.taylorseer_cache,
        peers.faster_cache,
        peers.pyramid_attention_broadcast,
    ],
)
def test_diffusers_hook_peers(ref, make):
    _check(ref, make())


def test_mag_cache_calibrates_itself(ref):
    labels, seeds = torch.arange(4), [0, 1, 2, 3]
    _check(
        ref, peers.mag_cache(lambda d: ref.sample(labels, seeds, denoiser=d, steps=STEPS), STEPS)
    )


def test_cache_dit_dbcache(ref):
    pytest.importorskip("cache_dit")
    _check(ref, peers.db_cache(STEPS, threshold=0.2))


@pytest.mark.parametrize(
    "make",
    [
        lambda select, run: peers.convrot_quant(select),
        lambda select, run: peers.torchao_quant("w8a8", select),
        lambda select, run: peers.torchao_quant("w4a8", select),
        lambda select, run: peers.quanto_quant("w8a8", select, run),
    ],
    ids=["convrot", "torchao-w8a8", "torchao-w4a8", "quanto-w8a8"],
)
def test_quant_peers_quantize_only_the_selected_linears(ref, make):
    inputs = ref.make_inputs(batch=2)
    chosen = {"transformer_blocks.0.attn1.to_q", "transformer_blocks.3.ff.net.2"}
    variant = make(chosen.__contains__, lambda model: model(**inputs))
    model = copy.deepcopy(ref.model)
    denoiser = variant.build(model, "eager")
    changed = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter
    } or {name for name, module in model.named_modules() if type(module).__name__ == "QLinear"}
    assert changed == chosen, variant.name
    with torch.no_grad():
        expected, got = ref.model(**inputs)[0], denoiser(**inputs)[0]
    assert 0 < (expected - got).abs().max() < 0.5 * expected.abs().max()
