"""The engine directory format: its files, and the manifest that says what an engine records.

An engine directory holds what the torch runtime runs, with the regions swapped for ONNX files:

- ``region_<i>_<name>.onnx``, one per region when the graph has cache guards (the runtime decides
  between regions), or a single ``model.onnx`` when nothing is cached; a region a token refresh
  recomputes also has ``<file>_tokens<count>.onnx``, the same region on that many tokens;
- ``manifest.json``: the config (the calibrated cache schedule included), the regions in order with
  their value slots and chains of additions (``residual_operands``), the guards, the graph's
  inputs (names, shapes, dtypes; a complex input is bound as its ``view_as_real`` pairs,
  ``"bind"``) and output structure, the diffopt and opset versions, and a SHA-256 of every file.

A format (`formats`) may add files, with their hashes (TensorRT's ``<file>.plan``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffopt.config import Config, ConfigError
from diffopt.guards import Guard
from diffopt.runtime.lowering import RegionProgram, Slot

FORMAT = "diffopt-engine"
FORMAT_VERSION = 3
"""3: ``"checks"``, the reads of tensor values an engine was specialized on, which it checks
on every call (`diffopt.specialization`); a diffopt that predates it would skip the checks, so
it refuses format 3.

2: per-region export shapes (TensorRT profiles), per-axis size ranges, token variants.

``"residual_operands"`` (the regions' chains of additions, `RegionProgram.residual_operands`)
came later within format 2, as an optional field: an engine without it loads and pairs a span's
exits with its entries by shape alone, as engines did before (a value is cached where several
entries share an exit's shape: Ernie-Image), and a diffopt that predates it ignores it the same
way, so neither needs refusing."""
MANIFEST = "manifest.json"


def region_file(index: int, name: str, *, single: bool, tokens: int | None = None) -> str:
    """The file of region `index` named `name` (``model.onnx`` when it is the only one), or of its
    variant on `tokens` tokens."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name)
    stem = "model" if single else f"region_{index}_{slug}"
    return f"{stem}.onnx" if tokens is None else f"{stem}_tokens{tokens}.onnx"


def region_entry(lowered: Any, file: str, kept: list[int], examples: list[Any]) -> dict[str, Any]:
    """What the manifest records of a region: its slots, the input positions `kept` (those an
    engine feeds) and the sizes it saw at export, on `examples`; its token variants come later."""
    return {
        "name": lowered.region.name,
        "kind": lowered.region.kind,
        "group": lowered.region.group,
        "file": file,
        "inputs": [lowered.inputs[i] for i in kept],
        "outputs": lowered.outputs,
        # the sizes the region saw at export: TensorRT profiles are built around them
        "shapes": _shapes(kept, examples),
        "token_variants": {},
    }


def variant_entry(file: str, kept: list[int], examples: list[Any]) -> dict[str, Any]:
    """What the manifest records of a region's token variant, exported on `examples`."""
    return {"file": file, "shapes": _shapes(kept, examples)}


def _shapes(kept: list[int], examples: list[Any]) -> list[list[int]]:
    """The shapes an engine binds (`bind`: a complex input's real pairs end in a 2)."""
    return [list(bind(examples[i], binding(examples[i])).shape) for i in kept]


def engine_manifest(
    *,
    model: nn.Module,
    config: Config,
    quant_form: str,
    opset: int,
    inputs: list[dict[str, Any]],
    dynamic_batch: bool,
    dynamic_resolution: bool,
    batch: int | None,
    program: RegionProgram,
    regions: list[dict[str, Any]],
    returned: str | None,
    guards: list[Guard],
    timestep_slot: int | None,
    checks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an engine, less the hashes of its files (`file_hashes`). `inputs`: the
    graph inputs an engine is called with (`describe_input`); `regions`: `region_entry`s."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffopt": _version(),
        "opset": opset,
        "quant_form": quant_form,
        "model": type(model).__name__,
        "config": config.to_dict(),
        "inputs": inputs,
        "dynamic_batch": dynamic_batch,
        "dynamic_resolution": dynamic_resolution,
        "batch": batch,
        "num_inputs": program.num_inputs,
        "num_slots": program.num_slots,
        "regions": regions,
        "release": program.release,
        # slot -> the input slots its chain of additions reaches in its region (JSON keys are
        # strings): where shapes alone cannot pair a cached exit with its stream
        "residual_operands": {str(k): v for k, v in program.residual_operands.items()},
        "output": encode_structure(program.output),
        "returns": returned,
        "guards": [dataclasses.asdict(g) for g in guards],
        "timestep_slot": timestep_slot,
        # a `region_entry` of the specialized reads' conditions, and a message per condition
        "checks": checks,
    }


def file_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file in `folder` but the manifest."""
    return {f.name: sha256(f) for f in sorted(folder.iterdir()) if f.suffix != ".json"}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    """`folder`'s manifest. `verify` refuses a directory that is no diffopt engine, one from a
    newer diffopt format and any file whose hash does not match."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if not verify:
        return manifest
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"{folder} is not a diffopt engine (manifest format {manifest.get('format')!r})"
        )
    if manifest["format_version"] > FORMAT_VERSION:
        raise ConfigError(
            f"{folder} was written by diffopt {manifest['diffopt']} (engine format "
            f"{manifest['format_version']}); this diffopt reads format {FORMAT_VERSION}: upgrade"
        )
    for name, digest in manifest["hashes"].items():
        if not (folder / name).exists() or sha256(folder / name) != digest:
            raise ConfigError(
                f"{folder / name} does not match its hash in manifest.json: the "
                "engine was modified or is incomplete; export it again"
            )
    return manifest


def returned_structure(
    model: nn.Module, example_inputs: Any, graph_outputs: Any
) -> tuple[str | None, list[int] | None]:
    """How the model packs the graph's outputs (a pytree spec), when it is a plain container of
    tensors (None keeps the graph's own tuple); and which of the graph's outputs it returns,
    where the graph has more (None: all). Dynamo returns the tensors a model stores on itself
    too (OmniGen's ``self.inv_freq = …``, Wan-Animate 2's rotary cache) for its glue code to
    store: an engine leaves them out. Each returned tensor is paired with the first unpaired
    graph output equal to it (to rounding: the graph ran diffopt's passes)."""
    from torch.utils import _pytree as pytree

    args, kwargs = (
        ((), example_inputs) if isinstance(example_inputs, dict) else (example_inputs, {})
    )
    leaves, spec = pytree.tree_flatten(model(*args, **kwargs))
    outputs = pytree.tree_leaves(graph_outputs)
    if not all(isinstance(v, torch.Tensor) for v in leaves):
        return None, None
    kept: list[int] | None = None
    if len(leaves) < len(outputs):
        kept = []
        for leaf in leaves:
            kept.append(
                next(
                    (
                        i
                        for i, out in enumerate(outputs)
                        if i not in kept
                        and isinstance(out, torch.Tensor)
                        and out.shape == leaf.shape
                        and out.dtype == leaf.dtype
                        and torch.allclose(out, leaf, rtol=1e-4, atol=1e-5, equal_nan=True)
                    ),
                    -1,
                )
            )
        if -1 in kept:
            return None, None
    elif len(leaves) != len(outputs):
        return None, None
    try:
        return pytree.treespec_dumps(spec), kept
    except (TypeError, NotImplementedError):  # an output class pytree cannot serialize
        return None, kept


_REAL_PAIRS = "view_as_real"
"""An input's ``"bind"`` in the manifest for a complex tensor: the engine binds its real pairs,
``view_as_real`` (ONNX has no complex tensors; Lumina-Next's call passes its rotary table)."""


def binding(value: Any) -> dict[str, str]:
    """How an engine binds `value`, as an input's manifest entry records it: a complex tensor as
    its ``view_as_real`` pairs, ``{"bind": "view_as_real"}``; anything else as it is, ``{}``."""
    return {"bind": _REAL_PAIRS} if isinstance(value, torch.Tensor) and value.is_complex() else {}


def bind(value: Any, entry: dict[str, Any]) -> Any:
    """`value` as an engine binds it, by what `entry` (its manifest entry, or `binding(value)`)
    records; a ``"bind"`` this diffopt does not know is a ConfigError (`_real_pairs`)."""
    return torch.view_as_real(value) if _real_pairs(entry) else value


def unbind(value: Any, entry: dict[str, Any]) -> Any:
    """The inverse of `bind`: the value a region takes, from what the engine bound (a complex
    tensor from its real pairs)."""
    return torch.view_as_complex(value) if _real_pairs(entry) else value


def _real_pairs(entry: dict[str, Any]) -> bool:
    """Whether `entry` binds its value as real pairs; refuses a ``"bind"`` it does not know (an
    engine whose manifest a later diffopt wrote, within the same format version)."""
    rule = entry.get("bind")
    if rule not in (None, _REAL_PAIRS):
        name = ".".join(str(key) for key in entry.get("path", [])) or "an input"
        raise ConfigError(
            f"the engine binds {name} as {rule!r}, which diffopt {_version()} does not know "
            f"(it binds a complex input as {_REAL_PAIRS!r}): re-export the engine with this "
            "diffopt version"
        )
    return rule == _REAL_PAIRS


def describe_input(slot: int, source: str, fake: Any, batch: int | None) -> dict[str, Any]:
    """Where an engine finds graph input `slot` among the call's inputs: a (nested) keyword, or
    the size of one (``L['hidden_states'].size()[0]`` under dynamic shapes)."""
    source, _, size = source.partition(".size()")
    path = [a or b for a, b in re.findall(r"\['([^']*)'\]|\[(\d+)\]", source)]
    if path[:1] == ["kwargs"]:  # a forward wrapped by a decorator taking **kwargs (Flux)
        path = path[1:]
    if size:
        return {"slot": slot, "path": path, "size": int(re.findall(r"\d+", size)[0])}
    tensor = fake if isinstance(fake, torch.Tensor) else None
    return {
        "slot": slot,
        "path": path,
        **binding(tensor),  # the engine binds a complex input's real pairs (`bind`)
        "shape": None
        if tensor is None
        else [n if isinstance(n, int) else None for n in tensor.shape],  # None: a dynamic axis
        "dtype": None if tensor is None else str(tensor.dtype).removeprefix("torch."),
        # no range on the batch axis: the one dynamo finds there comes from fake-tensor layout
        # heuristics (conv picks channels-last below a batch of 16), not from the model
        "ranges": None
        if tensor is None
        else [
            None if d == 0 and _hint(n) == batch else _size_range(n)
            for d, n in enumerate(tensor.shape)
        ],
    }


def _hint(size: int | torch.SymInt) -> int:
    return size if isinstance(size, int) else size.node.hint


def _size_range(size: int | torch.SymInt) -> list[int | None] | None:
    """[low, high] a dynamic axis may take (high None: unbounded), as dynamo's shape analysis of
    the model's code found it; None for a static axis."""
    if isinstance(size, int):
        return None
    bounds = size.node.shape_env.var_to_range.get(size.node.expr)
    if bounds is None:  # an expression of several symbols: no simple range
        return [0, None]
    from torch.utils._sympy.numbers import int_oo

    return [int(bounds.lower), None if bounds.upper == int_oo else int(bounds.upper)]


def encode_structure(structure: Any) -> Any:
    """The output structure as JSON: a slot is {"slot": i}, tuples and lists are lists."""
    if isinstance(structure, Slot):
        return {"slot": structure.index}
    if isinstance(structure, list | tuple):
        return [encode_structure(v) for v in structure]
    if isinstance(structure, dict):
        return {"dict": {k: encode_structure(v) for k, v in structure.items()}}
    return {"constant": structure}


def decode_structure(structure: Any) -> Any:
    """The output structure `encode_structure` wrote, with `Slot`s and tuples."""
    if isinstance(structure, list):
        return tuple(decode_structure(v) for v in structure)
    if "slot" in structure:
        return Slot(structure["slot"])
    if "dict" in structure:
        return {k: decode_structure(v) for k, v in structure["dict"].items()}
    return structure["constant"]


def sha256(path: Path) -> str:
    """The SHA-256 of a file, as the manifest records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version() -> str:
    import diffopt

    return diffopt.__version__
