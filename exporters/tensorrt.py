"""TensorRT engines built from an exported engine directory's ONNX files (``diffopt[tensorrt]``).

Written against TensorRT's documented Python API (``tensorrt.Builder``, ``OnnxParser``,
optimization profiles, ``build_serialized_network``). Each region's ONNX file gets a serialized
engine (``<file>.plan``) with one optimization profile around the sizes the region saw at
export, spanning its dynamic axes (batch, resolution) by a factor each way. The plans and their
hashes are added to the manifest. `diffopt.load_engine(DIR, provider="tensorrt")` runs the ONNX
files through onnxruntime's TensorRT execution provider; the plans are for serving with TensorRT
directly.

Registered as the ``tensorrt`` format: ``export(..., format="tensorrt")`` refuses quantized forms
TensorRT cannot build and a missing TensorRT before the export work, then builds the plans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffopt.config import Config, ConfigError

from .formats import ExportError, Format, register_format
from .manifest import read_manifest, sha256, write_manifest

INSTALL_HINT = (
    "TensorRT is not installed: pip install 'diffopt[tensorrt]' on a machine with an NVIDIA GPU "
    "and CUDA (TensorRT has no CPU build); ONNX engines run without it: format='onnx'"
)


def import_tensorrt() -> Any:
    """The tensorrt module, or an ImportError that says how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return tensorrt


@register_format("tensorrt")
class TensorRT(Format):
    """The ONNX engine plus one serialized TensorRT engine per ONNX file (`build_engines`)."""

    def check(self, config: Config, quant_form: str) -> None:
        _check_quant(config, quant_form)
        import_tensorrt()  # fail before the export work, with the install hint

    def build(self, folder: Path) -> None:
        build_engines(folder)


def _check_quant(config: Config, quant_form: str) -> None:
    """TensorRT parses Q/DQ with constant scales, INT8 activations: refuse what it cannot build."""
    if config.quant is None:
        return
    if quant_form != "qdq_static":
        raise ConfigError(
            f"TensorRT cannot build quantized layers in the {quant_form!r} form (integer "
            "matmuls or custom nodes); export with quant_form='qdq_static'"
        )
    if config.quant.act_bits != 8:
        raise ConfigError(
            f"TensorRT has no {config.quant.act_bits}-bit activations (INT4 is weight-only "
            "there); use quant='w8a8' for a TensorRT engine"
        )


def build_engines(
    folder: str | Path, *, fp16: bool = True, workspace_gib: float = 4.0, scale: int = 4
) -> list[Path]:
    """Build one serialized TensorRT engine per ONNX file listed in `folder`'s manifest.

    Each region gets one optimization profile. Its optimum is the size the region saw at export;
    a dynamic axis (``dynamic_batch`` / ``dynamic_resolution``) ranges from 1/`scale` to `scale`
    times that. Token axes of later regions grow with the square of the resolution: to serve
    twice the exported resolution, `scale` must be at least 4.
    """
    trt = import_tensorrt()
    folder = Path(folder)
    manifest = read_manifest(folder, verify=False)
    logger = trt.Logger(trt.Logger.WARNING)
    plans = []
    if any("shapes" not in region for region in manifest["regions"]):
        raise ExportError(
            f"{folder} was exported by a diffopt without per-region shapes (engine format 1); "
            "export it again to build TensorRT engines"
        )
    for region in manifest["regions"]:
        # the region, and the shorter-sequence variants token refreshes run
        for entry in (region, *region.get("token_variants", {}).values()):
            plan = _build(trt, logger, folder, region, entry, fp16, workspace_gib, scale)
            entry["tensorrt"] = plan.name
            manifest["hashes"][plan.name] = sha256(plan)
            plans.append(plan)
    write_manifest(folder, manifest)
    return plans


def _build(
    trt: Any,
    logger: Any,
    folder: Path,
    region: dict[str, Any],
    entry: dict[str, Any],
    fp16: bool,
    workspace_gib: float,
    scale: int,
) -> Path:
    """One serialized engine for `entry` (a region, or one of its token variants)."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / entry["file"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {entry['file']} ({region['name']!r}): {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    exported = dict(zip((f"slot_{s}" for s in region["inputs"]), entry["shapes"], strict=True))
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        opt = exported[tensor.name]
        dynamic = [n == -1 for n in tensor.shape]  # the axes exported as dynamic
        low = [max(1, n // scale) if d else n for n, d in zip(opt, dynamic, strict=True)]
        high = [n * scale if d else n for n, d in zip(opt, dynamic, strict=True)]
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build {entry['file']} ({region['name']!r})")
    plan = folder / (entry["file"] + ".plan")
    plan.write_bytes(bytes(serialized))
    return plan
