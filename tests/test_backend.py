"""torch.compile(model, backend="diffopt"): parity with eager, no recompiles, options, bad input."""

from __future__ import annotations

import pytest
import torch

import diffopt
from diffopt import ConfigError
from diffopt.evaluation import zoo
from diffopt.passes import PassError

from .conftest import first_output
from .models import NoBlocks, user_model


def compile_and_compare(model, inputs: dict | tuple, options, tol: float) -> None:
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
    compiled = torch.compile(model, backend="diffopt", options=options, fullgraph=True)
    with torch.no_grad():
        expected, actual = model(*args, **kwargs), compiled(*args, **kwargs)
    if isinstance(expected, dict):
        expected, actual = expected["sample"], actual["sample"]
    else:
        expected, actual = first_output(expected), first_output(actual)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= tol


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_matches_eager_on_every_family(tiny, inner):
    _, model, inputs = tiny
    compile_and_compare(model, inputs, {"inner": inner}, tol=1e-5)


def test_backend_is_found_without_importing_diffopt(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import list_backends, lookup_backend\n"
        "fn = lookup_backend('diffopt')\n"
        "assert 'diffopt' in list_backends(exclude_tags=()), list_backends(exclude_tags=())\n"
        "print(fn.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "diffopt.backend"


def test_return_dict_true_returns_the_diffusers_output_object():
    model, inputs = zoo.build("tiny-dit")
    inputs = {**inputs, "return_dict": True}
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager"})
    with torch.no_grad():
        out, expected = compiled(**inputs), model(**inputs)
    assert type(out) is type(expected)
    torch.testing.assert_close(out.sample, expected.sample, rtol=0, atol=1e-5)


def test_user_model_positional_inputs_none_argument_and_dict_output():
    model, (x, t) = user_model()
    compile_and_compare(model, (x, t), {"inner": "aot_eager"}, tol=1e-5)
    compile_and_compare(model, (x, t, None), {"inner": "eager"}, tol=1e-5)
    compile_and_compare(model, {"x": x, "t": t, "cond": torch.randn(2, 16)}, None, tol=1e-4)


def test_no_recompiles_across_timesteps(tiny):
    _, model, inputs = tiny
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager"}, fullgraph=True)
    key = "timestep"
    with torch.no_grad():
        compiled(**inputs)  # warm-up
        with torch.compiler.set_stance("fail_on_recompile"):
            for i in range(20):
                inputs[key] = torch.full_like(inputs[key], 0.05 * (i + 1)) * (
                    1 if inputs[key].max() <= 1 else 900
                )
                actual, expected = compiled(**inputs), model(**inputs)
                assert (first_output(actual) - first_output(expected)).abs().max() <= 1e-5


def test_options_accepts_config_and_rejects_unknown_keys():
    model, inputs = zoo.build("tiny-sd3")
    compile_and_compare(model, inputs, diffopt.Config(inner="eager", cleanup=None), tol=1e-5)

    valid = r"valid keys are: \['cache', 'cleanup', 'fold', 'inner', 'quant', 'rotary', 'strict'"
    with pytest.raises(Exception, match=valid):
        torch.compile(model, backend="diffopt", options={"innr": "eager"})(**inputs)


def test_strict_mode_turns_no_blocks_into_an_error():
    model, x = NoBlocks().eval(), torch.randn(3, 4)
    compile_and_compare(model, (x,), {"inner": "eager"}, tol=1e-6)  # lenient: runs as one region
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager", "strict": True})
    with pytest.raises(Exception, match="no repeated blocks found") as info:
        compiled(x)
    assert isinstance(getattr(info.value, "inner_exception", info.value), PassError)


def test_unknown_inner_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="use one of"):
        diffopt.Config(inner="tvm")


@pytest.mark.inductor
@pytest.mark.parametrize("name", ["tiny-dit", "tiny-unet"])
def test_inductor_matches_eager_and_does_not_recompile(name):
    model, inputs = zoo.build(name)
    compiled = torch.compile(model, backend="diffopt", fullgraph=True)  # default inner: inductor
    with torch.no_grad():
        compiled(**inputs)
        with torch.compiler.set_stance("fail_on_recompile"):
            for i in range(20):
                inputs["timestep"] = torch.full_like(inputs["timestep"], 45.0 * i)
                actual, expected = compiled(**inputs), model(**inputs)
                assert (first_output(actual) - first_output(expected)).abs().max() <= 1e-4


def test_a_graph_handed_over_again_gets_the_same_executor():
    """Dynamo compiles a frame once more per thread that reached it before the first compile
    finished; each such graph must run on the one executor, or a request's calls split their
    cache state between executors."""
    from diffopt.backend import diffopt_backend

    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    model, inputs = zoo.build("tiny-dit")
    with torch.no_grad():
        torch.compile(model, backend=keep, fullgraph=True)(**inputs)
        torch._dynamo.reset()
        torch.compile(model, backend=keep, fullgraph=True)(**inputs)
    (first, first_inputs), (again, again_inputs) = graphs
    assert first is not again
    cached = {"inner": "eager", "cache": {"steps": 4}}
    built = diffopt_backend(first, first_inputs, cached)  # grad mode on
    assert diffopt_backend(again, again_inputs, cached) is built
    assert diffopt_backend(again, again_inputs, {**cached, "cache": {"steps": 5}}) is not built
    # another grad mode or autocast is another program (inductor regions keep no grad otherwise)
    with torch.no_grad():
        assert diffopt_backend(again, again_inputs, cached) is not built
    with torch.autocast("cpu", torch.bfloat16):
        assert diffopt_backend(again, again_inputs, cached) is not built


def test_two_models_of_one_class_each_run_their_own_quantized_weights():
    """Dynamo compiles one graph for every instance of a class, with the weights as inputs; the
    quantize pass bakes them in, so each model needs its own build (the second ran the first's
    quantized weights: 0.29 off, against a quantization error of 0.12)."""
    options = {"inner": "eager", "quant": "w4a4"}
    first, inputs = zoo.build("tiny-dit")
    second, _ = zoo.build("tiny-dit")
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * torch.randn_like(p))
        torch.compile(first, backend="diffopt", options=options)(**inputs)
        shared = torch.compile(second, backend="diffopt", options=options)(**inputs)[0]
        torch._dynamo.reset()
        alone = torch.compile(second, backend="diffopt", options=options)
        expected = alone(**inputs)[0]
        assert torch.equal(shared, expected)
        second.load_state_dict(first.state_dict())  # new weights in place: quantized again
        assert torch.equal(
            alone(**inputs)[0],
            torch.compile(first, backend="diffopt", options=options)(**inputs)[0],
        )
