"""Shared fixtures: tiny models built in code, and a fresh dynamo cache per test."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before
# triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from diffopt import zoo

FAMILIES = sorted(zoo.TINY_MODELS)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """(name, model, keyword inputs) for each of the five diffusers families."""
    model, inputs = zoo.build(request.param)
    return request.param, model, inputs


def first_output(out):
    """The sample a denoiser returned: a tensor, a tuple or a diffusers output object."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.sample
