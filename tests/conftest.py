"""Shared fixtures: tiny models built in code, and a fresh dynamo cache per test."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before
# triton is first imported. DIFFOPT_TEST_DEVICE=cuda runs them compiled, on a GPU.
if os.environ.get("DIFFOPT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Split the cores between xdist workers (and the example subprocesses they start): two workers
# each spinning two OpenMP threads on a 2-core machine ran some tests 10x slower.
os.environ["OMP_NUM_THREADS"] = str(
    max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
)

import pytest
import torch

from diffopt.evaluation import zoo

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


@pytest.fixture
def benchmark_script(monkeypatch):
    """Import a script of benchmarks/ by name, afresh, with that folder on sys.path for the test
    (the scripts import each other)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))

    def load(name: str) -> Any:
        monkeypatch.delitem(sys.modules, name, raising=False)
        return importlib.import_module(name)

    return load
