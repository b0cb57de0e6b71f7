"""The region executor: runs a `RegionProgram`'s regions in order over its value slots.

Decisions that belong between regions (reuse a cached block, skip a step) are made here, in
Python, once per region, never inside a compiled region. Subclasses override `run_region` to
decide per region (run it, or substitute its outputs), or `run` to decide per call which regions
run (the caching executor), with `step` and `outputs` as its building blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from .flops import FlopCounter
from .lowering import LoweredRegion, RegionProgram, Slot


@dataclass
class FlopTally:
    total: int = 0


_TALLIES: list[FlopTally] = []


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopTally]:
    """Count the FLOPs of every region a diffopt executor runs inside this block.

    Why not `FlopCounterMode` around the compiled model: dynamo does not compile a frame while a
    dispatch mode is active, runs it eagerly (so skipped regions would count), and keeps skipping
    that code afterwards. Counting here, inside the executor, sees exactly the regions that ran.
    Exact when regions run eagerly (``inner="eager"``); compiled kernels hide work from the counter.
    """
    tally = FlopTally()
    _TALLIES.append(tally)
    try:
        yield tally
    finally:
        _TALLIES.remove(tally)


_GRAPH_CALLS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "diffopt_graph_calls", default=None
)


@contextlib.contextmanager
def counting_graph_calls() -> Iterator[list[int]]:
    """Count the calls of diffopt graphs (any executor) in this context: ``[count]``.

    A request that counts none ran its denoiser outside diffopt: dynamo compiles a frame with
    the backend only until that code's recompile limit, then runs it eagerly with no error."""
    calls = [0]
    token = _GRAPH_CALLS.set(calls)
    try:
        yield calls
    finally:
        _GRAPH_CALLS.reset(token)


class RegionExecutor:
    """A callable that behaves like the captured graph: flat inputs in, its outputs out."""

    def __init__(self, program: RegionProgram) -> None:
        self.program = program

    def run_region(self, index: int, region: LoweredRegion, inputs: list[Any]) -> Sequence[Any]:
        """Run one region; the hook where runtimes decide compute or reuse."""
        return region(*inputs)

    def __call__(self, *args: Any) -> Any:
        if (calls := _GRAPH_CALLS.get()) is not None:
            calls[0] += 1
        if not _TALLIES:
            return self.run(args)
        with FlopCounter(display=False) as counter:  # around `run`: any override is counted
            outputs = self.run(args)
        for tally in _TALLIES:
            tally.total += counter.get_total_flops()
        return outputs

    def run(self, args: Sequence[Any]) -> Any:
        """One call of the graph on its flat inputs: every region in order, then the outputs."""
        program = self.program
        values: list[Any] = list(args)
        values.extend([None] * (program.num_slots - len(values)))
        for index in range(len(program.regions)):
            self.step(index, values)
        return self.outputs(values)

    def step(self, index: int, values: list[Any]) -> None:
        """Run region `index` over the value slots, then free what no later region reads."""
        region = self.program.regions[index]
        outputs = self.run_region(index, region, [values[s] for s in region.inputs])
        for slot, value in zip(region.outputs, outputs, strict=True):
            values[slot] = value
        for slot in self.program.release[index]:
            values[slot] = None

    def outputs(self, values: list[Any]) -> Any:
        """The graph's output structure filled from the slots."""
        return fx.node.map_aggregate(
            self.program.output, lambda v: values[v.index] if isinstance(v, Slot) else v
        )
