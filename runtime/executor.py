"""The region executor: runs a `RegionProgram`'s regions in order over its value slots.

Decisions that belong between regions (reuse a cached block, skip a step) are made here, in
Python, once per region, never inside a compiled region: subclasses override `run_region`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx

from .lowering import LoweredRegion, RegionProgram, Slot


class RegionExecutor:
    """A callable that behaves like the captured graph: flat inputs in, its outputs out."""

    def __init__(self, program: RegionProgram) -> None:
        self.program = program

    def run_region(self, index: int, region: LoweredRegion, inputs: list[Any]) -> Sequence[Any]:
        """Run one region; the hook where runtimes decide compute or reuse."""
        return region(*inputs)

    def __call__(self, *args: Any) -> Any:
        program = self.program
        values: list[Any] = list(args)
        values.extend([None] * (program.num_slots - len(values)))
        for index, region in enumerate(program.regions):
            outputs = self.run_region(index, region, [values[s] for s in region.inputs])
            for slot, value in zip(region.outputs, outputs, strict=True):
                values[slot] = value
            for slot in program.release[index]:
                values[slot] = None
        return fx.node.map_aggregate(
            program.output, lambda v: values[v.index] if isinstance(v, Slot) else v
        )
