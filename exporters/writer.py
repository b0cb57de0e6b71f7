"""`export`: a model captured and optimized, written as an engine directory in a format.

The steps, each in its own file: capture and diffopt's passes (`diffopt.backend`); one eager run
recording each region's inputs (`regions`), and the token-refresh variants (`variants`); each
region written to ONNX (`onnx`); the manifest (`manifest`); then the format's own files
(`formats`: TensorRT builds its plans).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffopt.backend import capture, input_slots
from diffopt.config import Config, ConfigError, FoldConfig, RealRotaryConfig
from diffopt.passes.graph import example_value

from .formats import ExportError, get_format
from .manifest import (
    describe_input,
    engine_manifest,
    file_hashes,
    region_entry,
    region_file,
    returned_structure,
    variant_entry,
    write_manifest,
)
from .onnx import QUANT_FORMS, write_region
from .regions import RecordingExecutor, checks_region, plan_inputs, single_region
from .variants import token_refresh_runs

CHECKS_FILE = "checks.onnx"


def export(
    model: nn.Module,
    example_inputs: dict[str, Any] | tuple[Any, ...],
    config: Config | dict[str, Any] | None = None,
    *,
    out: str | Path,
    format: str = "onnx",
    dynamic_batch: bool = False,
    dynamic_resolution: bool = False,
    quant_form: str = "integer",
) -> Path:
    """Capture `model` on `example_inputs`, run diffopt's passes with `config`, and write an
    engine directory to `out` (see `manifest`). `format` names a registered format (`formats`):
    ``"tensorrt"`` also builds TensorRT engines from the ONNX files (the ``diffopt[tensorrt]``
    extra). `dynamic_batch` exports the batch dimension as a dynamic axis, `dynamic_resolution`
    the latents' spatial (or token) axes; either is a clear error if the model's code fixes that
    size. Sizes a model accepts only in a range (SD3's largest position embedding) are recorded
    and checked by the loaded engine.

    `quant_form`: how quantized linears are written (`QUANT_FORMS`)."""
    engine_format = get_format(format)
    if quant_form not in QUANT_FORMS:
        raise ConfigError(f"quant_form must be one of {sorted(QUANT_FORMS)}, not {quant_form!r}")
    config = Config.coerce(config)
    # ONNX has no QR or complex tensors: a weight's QR is folded, complex rotary is real pairs
    config = dataclasses.replace(
        config,
        inner="eager",
        fold=config.fold or FoldConfig(),
        rotary=config.rotary or RealRotaryConfig(),
    )
    engine_format.check(config, quant_form)  # before the export work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    captured = capture(
        model,
        example_inputs,
        config,
        dynamic_batch=dynamic_batch,
        dynamic_resolution=dynamic_resolution,
    )
    result, flat = captured.result, captured.inputs
    for report in result.reports:  # else the exporter fails on the op, with no reason
        if report.name in ("fold_constants", "real_rotary") and report.skipped:
            first = report.skipped[0]
            raise ExportError(
                f"pass {report.name!r} could not make the graph exportable at {first.where}: "
                f"{first.what}"
            )
    graph = result.graph
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    timestep_slot, weights = input_slots(graph)
    if not graph.guards:  # nothing for a runtime to decide between regions: one file
        program = single_region(result.program, graph.gm, len(placeholders))
    else:
        program = result.program
    recorder = RecordingExecutor(program)
    with torch.no_grad():
        graph_outputs = recorder(*flat)
        returned, kept = returned_structure(model, example_inputs, graph_outputs)
    if kept is not None:  # the graph also returns what the model stores on itself: left out
        slots = torch.utils._pytree.tree_leaves(program.output)
        program = dataclasses.replace(program, output=tuple(slots[i] for i in kept))

    shorts = token_refresh_runs(program, config, graph.guards, timestep_slot, weights, flat)
    single = len(program.regions) == 1
    regions = []
    for index, lowered in enumerate(program.regions):
        name = region_file(index, lowered.region.name, single=single)
        plan = plan_inputs(lowered, weights)
        examples = recorder.examples[index]
        write_region(lowered, examples, plan, out / name, quant_form)
        regions.append(region_entry(lowered, name, plan.kept, examples))
        if index in shorts:  # the same region on the tokens a token refresh recomputes
            count, short_examples = shorts[index]
            short = region_file(index, lowered.region.name, single=single, tokens=count)
            write_region(
                lowered, short_examples, plan, out / short, quant_form, calibration=examples
            )
            regions[-1]["token_variants"][str(count)] = variant_entry(
                short, plan.kept, short_examples
            )
    checks = None
    if captured.checks is not None:  # reads of data taken as the example's: checked per call
        lowered = checks_region(captured.checks, program.num_slots)
        plan = plan_inputs(lowered, weights)
        examples = [flat[i] for i in lowered.inputs]
        try:
            write_region(lowered, examples, plan, out / CHECKS_FILE, quant_form)
        except ExportError as e:
            if not (dynamic_batch or dynamic_resolution):
                raise
            raise ExportError(
                "the engine is specialized on values the model reads from its inputs ("
                + "; ".join(captured.checks.messages)
                + "), and checking them fixes those inputs' sizes: export with "
                "dynamic_batch=False and dynamic_resolution=False"
            ) from e
        checks = region_entry(lowered, CHECKS_FILE, plan.kept, examples)
        checks["messages"] = captured.checks.messages
    batch = next(
        (
            v.shape[0]
            for i, v in enumerate(flat)
            if isinstance(v, torch.Tensor) and v.ndim and i not in weights
        ),
        None,
    )
    manifest = engine_manifest(
        model=model,
        config=config,
        quant_form=quant_form,
        opset=QUANT_FORMS[quant_form],
        inputs=[
            describe_input(i, captured.sources[i], example_value(placeholders[i]), batch)
            for i in range(len(placeholders))
            if i not in weights
        ],
        dynamic_batch=dynamic_batch,
        dynamic_resolution=dynamic_resolution,
        batch=batch,
        program=program,
        regions=regions,
        returned=returned,
        guards=graph.guards,
        timestep_slot=timestep_slot,
        checks=checks,
    )
    manifest["hashes"] = file_hashes(out)
    write_manifest(out, manifest)
    engine_format.build(out)
    return out
