"""The cache contract: guard kinds, cache actions, and what passes, runtime and exporters share.

A guard pass marks where the runtime *may* skip work (a `Guard`, plain data the manifest carries);
the runtime's controller picks one `CacheAction` per step, and an action runs only where the guard
it needs applied (`ACTION_GUARD`). Adding an action: its name in `CacheAction` and `ACTION_GUARD`,
and one strategy registered in ``runtime/cache.py``.

This module imports nothing from diffopt, so every layer (``diffopt.config`` included) can
import it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

_Value = TypeVar("_Value")

GuardKind = Literal["step", "block", "token"]
"""``step``: skip the whole guarded span of blocks; ``block``: skip single blocks; ``token``:
run the span on the most-changed tokens only."""

GUARD_KINDS: tuple[GuardKind, ...] = get_args(GuardKind)

CacheAction = Literal["full", "block", "token", "reuse"]
"""What one denoiser call does under cache guards, from most to least compute."""

ACTIONS: tuple[CacheAction, ...] = get_args(CacheAction)
"""From most to least compute: full, block, token, reuse."""

ACTION_GUARD: dict[CacheAction, GuardKind | None] = {
    "full": None,
    "block": "block",
    "token": "token",
    "reuse": "step",
}
"""The guard each action needs applied (a full step needs none)."""


def action_applies(action: CacheAction, kinds: Collection[str]) -> bool:
    """Whether `action` can run where guards of `kinds` applied (a full step always can)."""
    guard = ACTION_GUARD[action]
    return guard is None or guard in kinds


def polish_action(polish: str) -> CacheAction:
    """The action that ``cache.polish`` runs between the two lines (``"none"``: they reuse)."""
    return "reuse" if polish == "none" else polish  # type: ignore[return-value]


@dataclass(frozen=True)
class Guard:
    """A place where the runtime may reuse cached results instead of running regions.

    Guards are data, not code: the runtime reads them to know what it may skip, `inspect` lists
    them, and exporters carry them into the engine manifest.
    """

    kind: GuardKind
    regions: tuple[str, ...]
    """The regions the guard can skip (step and token guards: a contiguous span of blocks)."""
    why: str
    """What is cached and how it is re-added, in words."""
    joint: tuple[int, int] = (0, 0)
    """Token guard: the other streams' tokens before and after the refreshed stream where the
    blocks concatenate them into one sequence (Flux: text then image, ``(512, 0)``), so inputs
    indexed by that joint sequence keep the other streams' rows; ``(0, 0)``: no joint sequence."""
    tokens: int = 0
    """Token guard: how many tokens the refreshed stream holds (0: not recorded, an engine
    written before it was). The runtime scores the exit of that length (or of the joint
    sequence's); an exit of another stream's length passes whole (LTX-2's audio)."""


def residual_bases(
    outputs: Sequence[tuple[int, ...] | None],
    inputs: Sequence[tuple[int, ...] | None],
    paths: Sequence[Collection[int]] | None = None,
) -> list[int | None]:
    """For each output shape, the index of the input it is a residual of, if there is one.

    The base is the one input of the output's shape; where several inputs share that shape (a
    block fed per-token shift, scale and gate tensors beside its stream: Ernie-Image), the one
    among them on the output's residual path: ``paths[i]`` holds the indices of the inputs
    reached from output i by walking back through additions only (`residual_path`), so
    ``out = x + gate * f(x)`` reaches ``x`` and not ``gate``, which sits behind a product.

    A cached region output is stored as a residual against that input (re-added to the fresh
    input on reuse, which tracks the step far better than the stale value); an output with no
    such partner is cached as a value.
    """
    bases: list[int | None] = []
    for i, shape in enumerate(outputs):
        matches = [k for k, s in enumerate(inputs) if shape is not None and s == shape]
        if len(matches) > 1 and paths is not None:
            matches = [k for k in matches if k in paths[i]]
        bases.append(matches[0] if len(matches) == 1 else None)
    return bases


def residual_path(
    starts: Sequence[_Value],
    operands: Callable[[_Value], Iterable[_Value]],
    ends: Collection[_Value],
) -> list[list[_Value]]:
    """For each of `starts`, the `ends` reached by walking back through `operands`, in the
    order found.

    `operands` gives the values a residual passes through at a value (the summands of an
    addition, the input of a cast) and nothing elsewhere; the walk stops at `ends` (a region's
    inputs). The passes walk graph nodes, the runtime walks value slots (`RegionProgram
    .residual_operands`): both pair outputs with inputs through `residual_bases`.
    """
    found: list[list[_Value]] = []
    for start in starts:
        reached: dict[_Value, None] = {}
        seen: set[_Value] = set()
        todo = [start]
        while todo:
            value = todo.pop()
            if value in seen:
                continue
            seen.add(value)
            if value in ends:
                reached[value] = None
            else:
                todo.extend(operands(value))
        found.append(list(reached))
    return found


def pair_residuals(
    outputs: Sequence[_Value],
    inputs: Sequence[_Value],
    output_shapes: Sequence[tuple[int, ...] | None],
    input_shapes: Sequence[tuple[int, ...] | None],
    operands: Callable[[_Value], Iterable[_Value]],
) -> list[int | None]:
    """`residual_bases` of `outputs` among `inputs`, each output's residual path walked back
    through `operands` (`residual_path`): the passes pair graph nodes, the runtime value slots."""
    index = {value: i for i, value in enumerate(inputs)}
    paths = residual_path(outputs, operands, index)
    found = [{index[value] for value in path} for path in paths]
    return residual_bases(output_shapes, input_shapes, found)


def refresh_count(token_ratio: float, tokens: int) -> int:
    """How many of `tokens` tokens a token refresh recomputes (``cache.token_ratio`` of them)."""
    return max(1, round(token_ratio * tokens))


def per_sample(shape: tuple[int, ...], batch: int) -> bool:
    """Whether a token-indexed input has a leading batch axis, so each sample gathers its own
    tokens; one without (a rotary table shared by the batch) is indexed once, and then every
    sample of the batch refreshes the same tokens."""
    return len(shape) >= 2 and shape[0] == batch


def token_axes(
    shape: tuple[int, ...] | None,
    batch: int,
    tokens: int,
    joint: tuple[int, int] = (0, 0),
    *,
    mask: bool = False,
) -> list[int]:
    """The axes along which an input of `shape` runs over the refreshed stream's `tokens`
    tokens, or over the joint sequence that holds them with the other streams' (`Guard.joint`).

    A leading batch axis does not count, nor the last axis (channels) unless the input is a
    boolean `mask` (keys, [B, 1, 1, N]). A token refresh gathers an input along its one token
    axis and passes an input with none whole; the token guard refuses an input with two (an
    attention mask over token pairs).
    """
    if shape is None:
        return []
    lengths = {tokens, joint[0] + tokens + joint[1]}
    first = 1 if per_sample(shape, batch) else 0
    last = len(shape) if mask else len(shape) - 1
    return [axis for axis in range(first, last) if shape[axis] in lengths]
