"""Region lowering and the executor: same outputs as the unsplit graph, activations released."""

from __future__ import annotations

import torch

from diffopt.backend import optimize
from diffopt.config import Config
from diffopt.evaluation import zoo
from diffopt.runtime import RegionExecutor


def capture(model, inputs, config: Config, executor=RegionExecutor):
    """Run diffopt's pipeline through dynamo; keep what it built and its output."""
    built = []

    def backend(gm, example_inputs):
        optimized = optimize(gm, example_inputs, config)
        built.append((optimized, executor(optimized.program)))
        return built[-1][1]

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    return (*built[0], out)


def test_split_regions_match_the_unsplit_graph():
    model, inputs = zoo.build("tiny-flux")
    config = Config(inner="aot_eager", cleanup=None)  # no passes: the same graph, cut up
    optimized, _, out = capture(model, inputs, config)
    assert optimized.program.regions[0].region.name == "prologue"
    assert len(optimized.program.regions) == 2 + 4
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(**inputs)[0], rtol=0, atol=0)


class Recording(RegionExecutor):
    """Records the regions it runs."""

    def __init__(self, program):
        super().__init__(program)
        self.calls: list[str] = []

    def run_region(self, index, region, inputs):
        self.calls.append(region.region.name)
        return super().run_region(index, region, inputs)


def test_executor_runs_regions_in_order_and_releases_dead_values():
    model, inputs = zoo.build("tiny-dit")
    optimized, executor, _ = capture(model, inputs, Config(inner="eager"), Recording)
    program = optimized.program
    # every slot read by a region and not part of the output is released exactly once
    released = [s for slots in program.release for s in slots]
    assert len(released) == len(set(released))
    read = {s for r in program.regions for s in r.inputs}
    assert set(released) <= read
    assert program.release[-1] or program.release[-2]  # the stream is freed as it moves on
    for i in range(len(program.regions) - 1):
        later = {s for r in program.regions[i + 1 :] for s in r.inputs}
        assert not set(program.release[i]) & later

    assert executor.calls == [
        "prologue",
        "transformer_blocks.0",
        "transformer_blocks.1",
        "epilogue",
    ]


def test_counting_flops_sees_compiled_regions_and_leaves_dynamo_compiling():
    from torch.utils.flop_counter import FlopCounterMode

    from diffopt.runtime import counting_flops

    model, inputs = zoo.build("tiny-dit")
    with torch.no_grad(), FlopCounterMode(display=False) as eager:
        model(**inputs)
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager"})
    with torch.no_grad(), counting_flops() as tally:
        compiled(**inputs)
        compiled(**inputs)
    assert tally.total == 2 * eager.get_total_flops()

    calls = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, ex: calls.append(gm) or gm)(**inputs)
    assert calls, "dynamo still compiles the model after counting"


def test_dynamo_restarts_pass_through_region_compilation(monkeypatch):
    """A float that turns symbolic makes inductor ask dynamo to restart its analysis; wrapping
    that in a LoweringError broke the third unrolled sampler compiled from the same code."""
    import pytest

    from diffopt.runtime.lowering import LoweringError, compile_region

    def restarting(gm, examples):
        raise torch._dynamo.exc.TensorifyScalarRestartAnalysis

    def failing(gm, examples):
        raise RuntimeError("boom")

    lowered = type("Lowered", (), {"module": torch.nn.Identity(), "region": None})()
    for backend, error in (
        (restarting, torch._dynamo.exc.RestartAnalysis),
        (failing, LoweringError),
    ):
        monkeypatch.setattr(torch._dynamo, "lookup_backend", lambda name, b=backend: b)
        lowered.region = type("Region", (), {"name": "epilogue"})()
        with pytest.raises(error):
            compile_region(lowered, [], "inductor")
