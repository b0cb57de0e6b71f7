"""TensorRT engines built from an exported engine directory's ONNX files (``diffopt[tensorrt]``).

Written against TensorRT's documented Python API (``tensorrt.Builder``, ``OnnxParser``,
optimization profiles, ``build_serialized_network``). Each region's ONNX file gets a serialized
engine (``<file>.plan``) with one optimization profile; with a dynamic batch the profile spans
1…``max_batch`` around the exported batch. The plans and their hashes are added to the
manifest. `diffopt.load(DIR, provider="tensorrt")` runs the ONNX files through onnxruntime's
TensorRT execution provider; the plans are for serving with TensorRT directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def build_engines(
    folder: str | Path, *, fp16: bool = True, workspace_gib: float = 4.0, max_batch: int = 0
) -> list[Path]:
    """Build one serialized TensorRT engine per ONNX file listed in `folder`'s manifest.

    `max_batch`: for an engine exported with ``dynamic_batch=True``, the profile's largest batch
    (0: four times the exported batch); the profile's optimum is the exported batch.
    """
    from .onnx import ExportError, sha256

    trt = import_tensorrt()
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    plans = []
    for region in manifest["regions"]:
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / region["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse region {region['name']!r}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if manifest["dynamic_batch"] and shape and shape[0] == -1:  # the batch axis
                exported = manifest["batch"]
                high = max_batch or 4 * exported
                profile.set_shape(tensor.name, [1, *shape[1:]], [exported, *shape[1:]],
                                  [high, *shape[1:]])  # fmt: skip
            else:
                profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT could not build region {region['name']!r} (see its log)")
        plan = folder / (region["file"] + ".plan")
        plan.write_bytes(bytes(serialized))
        region["tensorrt"] = plan.name
        manifest["hashes"][plan.name] = sha256(plan)
        plans.append(plan)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return plans
