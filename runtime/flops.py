"""`FlopCounter`: torch's `FlopCounterMode`, which also runs the higher-order ops it has a FLOP
formula for but does not run itself.

torch's counter (2.13) passes every higher-order op but ``cond`` on as ``NotImplemented``.
Under it, a captured graph's ``torch.ops.higher_order.flex_attention`` node (Kandinsky 6 SR's
NABLA attention, AnyFlow-FAR's) fails: "no implementation found for
'torch.ops.higher_order.flex_attention' … nor in mode TransformGetItemToIndex" (the mode is the
one flex attention's autograd kernel enters; the ``NotImplemented`` comes back through it). Here
such an op runs as it would with no counter, and its registered formula counts it
(``flop_registry``: flex attention's counts the dense attention, as `sdpa_flop_count` does).
"""

from __future__ import annotations

from typing import Any

from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode


class _Mode(_FlopCounterMode):
    def _handle_higher_order_ops(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        out = super()._handle_higher_order_ops(func, types, args, kwargs)
        if out is not NotImplemented or func not in self.counter.flop_registry:
            return out
        # the dispatcher popped this mode before calling it: the op runs as it would uncounted
        out = func(*args, **kwargs)
        return self.counter._count_flops(func, out, args, kwargs)


class FlopCounter(FlopCounterMode):
    """`FlopCounterMode` that also counts higher-order ops with a registered FLOP formula."""

    def __enter__(self) -> FlopCounter:
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _Mode(self)
        self.mode.__enter__()
        return self
