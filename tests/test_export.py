"""ONNX engines: parity with torch on every family, cached runs that decide alike, bad input."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

import diffopt
from diffopt.config import CacheConfig, ConfigError, QuantConfig
from diffopt.evaluation import zoo
from tests.conftest import first_output

pytest.importorskip("onnxruntime")
from diffopt.exporters import ExportError, export, load_engine


def test_every_family_exports_to_one_file_with_a_dynamic_batch(tiny, tmp_path):
    name, model, inputs = tiny  # PixArt loads only because remove_noops drops its no-op squeeze
    engine = load_engine(
        export(model, inputs, {"inner": "eager"}, out=tmp_path, dynamic_batch=True)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx"]
    for batch in (2, 3):  # exported at 2
        _, call = zoo.build(name, batch=batch)
        with torch.no_grad():
            expected = first_output(model(**call))
        torch.testing.assert_close(first_output(engine(**call)), expected, atol=1e-4, rtol=1e-4)


def test_large_weights_go_to_a_side_file_that_is_hashed_and_loaded(tmp_path, monkeypatch):
    import diffopt.exporters.onnx as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", 0)  # every region counts as large
    model, inputs = zoo.build("tiny-dit")
    out = export(model, inputs, out=tmp_path)
    side = [p.name for p in out.iterdir() if p.suffix not in (".onnx", ".json")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert side and set(side) <= set(manifest["hashes"])
    with torch.no_grad():
        expected = first_output(model(**inputs))
    torch.testing.assert_close(
        first_output(load_engine(out)(**inputs)), expected, atol=1e-4, rtol=1e-4
    )


def test_importing_the_exporters_loads_no_runtime():
    import subprocess

    code = (
        "import sys, diffopt.exporters\n"
        "heavy = {'onnx', 'onnxruntime', 'onnxscript', 'tensorrt'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


FORMAT_FILE = """
from diffopt.exporters.formats import Format, register_format

CHECKED = []


@register_format("listing")
class Listing(Format):
    \"\"\"The ONNX engine plus a list of its files.\"\"\"

    def check(self, config, quant_form):
        CHECKED.append(quant_form)

    def build(self, folder):
        names = sorted(p.name for p in folder.iterdir())
        (folder / "files.txt").write_text("\\n".join(names))
"""


def test_a_format_from_a_new_file_is_found_and_unknown_ones_are_listed(tmp_path, monkeypatch):
    import importlib

    from diffopt.exporters import formats

    class Double(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 2

    inputs = {"hidden_states": torch.randn(2, 4)}
    with pytest.raises(ConfigError, match=r"format must be one of \['onnx', 'tensorrt'\], not 'x'"):
        export(Double(), inputs, out=tmp_path / "x", format="x")
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))  # forget it afterwards
    (tmp_path / "listing_format.py").write_text(FORMAT_FILE)
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "listing_format", raising=False)
    listing = importlib.import_module("listing_format")
    assert formats.registered() == ["listing", "onnx", "tensorrt"]
    out = export(Double(), inputs, out=tmp_path / "engine", format="listing")
    assert listing.CHECKED == ["integer"]
    assert (out / "files.txt").read_text().split() == ["manifest.json", "model.onnx"]
    torch.testing.assert_close(load_engine(out)(**inputs), inputs["hidden_states"] * 2)
    with pytest.raises(ValueError, match="format 'onnx' is already registered"):
        formats.register_format("onnx")(type("Other", (formats.Format,), {}))


def test_a_dynamic_resolution_needs_spatial_or_token_latents(tmp_path):
    class Flat(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 2

    with pytest.raises(ValueError, match=r"dynamic resolution needs latents of shape"):
        export(Flat(), {"hidden_states": torch.randn(2, 4)}, out=tmp_path, dynamic_resolution=True)


def test_an_onnxruntime_value_without_dlpack_comes_back_through_numpy():
    import numpy as np
    import onnxruntime as ort

    from diffopt.exporters.engine import _as_tensor

    value = ort.OrtValue.ortvalue_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))

    class Older:  # an onnxruntime whose OrtValue has no __dlpack__
        def numpy(self):
            return value.numpy()

    for v in (value, Older()):
        torch.testing.assert_close(_as_tensor(v), torch.arange(6.0).reshape(2, 3))


def test_the_custom_form_refuses_when_it_finds_no_op_nodes(tmp_path, monkeypatch):
    import diffopt.exporters.quant_onnx as quant_onnx

    monkeypatch.setattr(quant_onnx, "as_custom_nodes", lambda model: 0)  # metadata gone
    model, inputs = zoo.build("tiny-dit")
    quant = {**QuantConfig.preset("w4a4").__dict__, "min_sqnr": 0}
    with pytest.raises(ExportError, match="no ONNX nodes of its quant_linear ops"):
        export(model, inputs, {"quant": quant}, out=tmp_path, quant_form="custom")


def test_a_model_that_fixes_its_batch_says_so(tmp_path):
    class Fixed(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states.reshape(2, -1) * 2  # the batch size is baked in

    with pytest.raises(ValueError, match="does not allow a dynamic batch"):
        export(Fixed(), {"hidden_states": torch.randn(2, 4)}, out=tmp_path, dynamic_batch=True)


def test_latents_as_a_list_of_samples_refuse_a_dynamic_batch_saying_why(tmp_path):
    """Z-Image takes x as one tensor per sample: its batch is the list's length, and dim 0 of
    each item is channels (the error used to say the model fixed that size)."""

    class PerSample(torch.nn.Module):
        def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
            return [item * 2 for item in x]

    with pytest.raises(ValueError, match="list of per-sample tensors"):
        export(PerSample(), {"x": [torch.randn(4, 3)] * 2}, out=tmp_path, dynamic_batch=True)
    assert export(PerSample(), {"x": [torch.randn(4, 3)] * 2}, out=tmp_path).exists()


FIXED_POSITIONS = {"tiny-dit", "tiny-pixart"}  # a position embedding built for one size


def test_a_dynamic_resolution_serves_other_sizes_or_is_refused(tiny, tmp_path):
    name, model, inputs = tiny
    side = 4 if name == "tiny-flux" else 8  # exported at (side, side)
    if name in FIXED_POSITIONS:
        with pytest.raises(ValueError, match=r"does not allow a dynamic resolution.*holds only"):
            export(model, inputs, out=tmp_path, dynamic_resolution=True)
        return
    engine = load_engine(export(model, inputs, out=tmp_path, dynamic_resolution=True))
    key = "sample" if name == "tiny-unet" else "hidden_states"
    latents = next(i for i in engine.manifest["inputs"] if i["path"] == [key] and "shape" in i)
    assert latents["shape"][0] == 2 and None in latents["shape"]  # the batch stays static
    for size in ((side, side), (2 * side, 2 * side), (side, 2 * side)):
        _, call = zoo.build(name, size=size)
        with torch.no_grad():
            expected = first_output(model(**call))
        torch.testing.assert_close(first_output(engine(**call)), expected, atol=1e-4, rtol=1e-4)


def test_a_size_outside_the_traced_range_is_refused(tmp_path):
    # SD3 crops a position embedding of at most 193 patches; exported at more than half of it,
    # the doubled-size guard check must leave that bound to the engine's range check
    model, inputs = zoo.build("tiny-sd3", size=(100, 100))
    engine = load_engine(export(model, inputs, out=tmp_path, dynamic_resolution=True))
    _, call = zoo.build("tiny-sd3", size=(8, 12))
    with torch.no_grad():
        expected = first_output(model(**call))
    torch.testing.assert_close(first_output(engine(**call)), expected, atol=1e-4, rtol=1e-4)
    _, call = zoo.build("tiny-sd3", size=(8, 400))
    with pytest.raises(ValueError, match=r"size 400 in dim 3; the model's code accepts 4..193"):
        engine(**call)


LABELS = torch.arange(4) % 10


@pytest.fixture(scope="module")
def cached_engine(tmp_path_factory):
    """ref-dit with calibrated step and block guards, one ONNX file per region."""
    reference = zoo.load("ref-dit")
    settings = CacheConfig(early=0.1, critical=0.3, polish="block")

    def run(denoiser):
        return reference.sample(LABELS, range(100, 104), denoiser=denoiser)

    cache = diffopt.calibrate(reference.model, run, steps=50, cache=settings).config
    out = tmp_path_factory.mktemp("engine")
    export(
        reference.model,
        reference.make_inputs(batch=8),
        {"cache": cache},
        out=out,
        dynamic_batch=True,
    )
    return reference, cache, out


@pytest.mark.parametrize("images", [4, 6])  # a batch of 8 as exported, and of 12
def test_a_cached_fifty_step_run_decides_and_samples_like_torch(cached_engine, images):
    reference, cache, out = cached_engine
    compiled = torch.compile(
        reference.model, backend="diffopt", options={"inner": "eager", "cache": cache}
    )
    labels = torch.arange(images) % 10
    runs = {}
    for name, denoiser in (("torch", compiled), ("onnx", load_engine(out))):
        with diffopt.request(steps=50) as req:
            images = reference.sample(labels, range(len(labels)), denoiser=denoiser)
        runs[name] = (images, req.actions)
    (torch_images, torch_actions), (onnx_images, onnx_actions) = runs["torch"], runs["onnx"]
    assert onnx_actions == torch_actions
    assert {"reuse", "full"} <= {a for steps in torch_actions.values() for a in steps}
    torch.testing.assert_close(onnx_images, torch_images, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-qwenimage", "tiny-z-image", "tiny-lumina-next"])
def test_complex_rotary_families_export_with_a_cache_and_run_like_torch(name, tmp_path):
    """Their rotary tables are complex (ONNX has none): `real_rotary` writes them in real pairs,
    in every region of a cached engine. Lumina-Next's call passes its table: the engine binds
    its real pairs."""
    from diffopt.evaluation import families
    from tests.test_families import tensors

    model, inputs = zoo.build(name)
    key = families.FAMILIES[name].timestep
    plan = ["full", "full", "reuse", "full"]
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": len(plan)}}
    with torch.no_grad():
        model(**inputs)  # Z-Image builds its rotary table on the first call
    export(model, dict(inputs), options, out=tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) > 1  # one file per region
    torch._dynamo.reset()
    runs = {}
    for kind, denoiser in (
        ("torch", torch.compile(model, backend="diffopt", options=options)),
        ("onnx", load_engine(tmp_path)),
    ):
        outs = []
        with torch.no_grad(), diffopt.request(steps=len(plan)) as req:
            for step in range(len(plan)):
                t = torch.full_like(inputs[key], 0.9 - 0.2 * step)
                outs.append(tensors(denoiser(**{**inputs, key: t})))
        runs[kind] = (outs, [a for branch in req.actions.values() for a in branch])
    assert runs["onnx"][1] == runs["torch"][1] == plan
    for got, want in zip(runs["onnx"][0], runs["torch"][0], strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_hunyuan_video15_exports_its_text_reordering_and_checks_its_t2v_branch(tmp_path):
    """HunyuanVideo 1.5 branches on `torch.all(image_embeds == 0)` and moves each sample's valid
    text tokens first (sizes from the mask). The engine takes the branch the example took and
    refuses the other; the text sizes stay sizes known at run time, so another mask runs."""
    from tests.test_families import tensors

    model, inputs = zoo.build("tiny-hunyuan-video15")
    export(model, dict(inputs), {}, out=tmp_path)
    engine = load_engine(tmp_path)
    shorter = inputs["encoder_attention_mask"].clone()
    shorter[0, -2:] = 0  # two prompts of other lengths than the example's
    shorter[1, -4:] = 0
    for call in (inputs, {**inputs, "encoder_attention_mask": shorter}):
        with torch.no_grad():
            want = tensors(model(**call))
        torch.testing.assert_close(tensors(engine(**call)), want, atol=1e-4, rtol=1e-4)
    image = {**inputs, "image_embeds": torch.ones_like(inputs["image_embeds"])}
    with pytest.raises(ValueError, match=r"`if is_t2v:` being True .*go another way"):
        engine(**image)


def test_token_refreshes_run_in_an_engine_as_in_torch(tmp_path):
    from tests.caching import build, denoise

    model, inputs = build()
    cache = {"steps": 12, "early": 0.0, "critical": 100.0, "max_reuse": 100, "token_ratio": 0.25}
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager", "cache": cache})
    with warnings.catch_warnings(record=True) as caught:  # its own runs warn the user of nothing
        warnings.simplefilter("always")
        out = export(model, inputs, {"cache": cache}, out=tmp_path)
    assert not [w for w in caught if "request ended" in str(w.message)]
    manifest = json.loads((out / "manifest.json").read_text())
    variants = [r["token_variants"] for r in manifest["regions"] if r["token_variants"]]
    assert variants and all(list(v) == ["4"] for v in variants)  # 25% of 16 tokens
    runs = {}
    for name, denoiser in (("torch", compiled), ("onnx", load_engine(out))):
        denoise(denoiser, inputs, 12)  # the first request calibrates
        with diffopt.request(steps=12) as req:
            runs[name] = (denoise(denoiser, inputs, 12), req.actions[0])
    assert runs["onnx"][1] == runs["torch"][1] and runs["torch"][1].count("token") == 9
    torch.testing.assert_close(runs["onnx"][0], runs["torch"][0], atol=1e-4, rtol=1e-4)
    blocks_only = load_engine(
        export(model, inputs, {"cache": {**cache, "polish": "block"}}, out=tmp_path / "blocks")
    )
    denoise(blocks_only, inputs, 12)
    asked = CacheConfig(**{**cache, "polish": "token"})
    with (
        pytest.raises(ConfigError, match="exported for token refreshes of no tokens, not 4"),
        diffopt.request(steps=12, cache=asked),
    ):
        denoise(blocks_only, inputs, 12)


def test_an_engine_pairs_a_gated_blocks_exits_with_its_stream_as_torch_does(tmp_path):
    """Blocks fed per-token gates of the stream's shape (Ernie-Image): the manifest carries the
    regions' chains of additions, so an engine's reuse step re-adds the residual to the stream
    as the torch runtime does. An engine without them (written before they were recorded) still
    loads and pairs by shape alone: it caches the value, which differs."""
    from tests.models import gated_model

    model, inputs = gated_model()
    plan = ["full", "full", "reuse", "full"]
    cache = {"mode": "plan", "plan": plan, "steps": len(plan), "extrapolate": False}
    options = {"inner": "eager", "cache": cache}
    export(model, dict(inputs), options, out=tmp_path / "engine")
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["residual_operands"]
    old = tmp_path / "old"
    old.mkdir()
    for file in (tmp_path / "engine").iterdir():
        old.joinpath(file.name).write_bytes(file.read_bytes())
    del manifest["residual_operands"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    generator = torch.Generator().manual_seed(1)
    drift = torch.randn(inputs["hidden_states"].shape, generator=generator)
    calls = [
        {
            "hidden_states": inputs["hidden_states"] + 0.1 * step * drift,
            "timestep": inputs["timestep"] * (1 - 0.05 * step),
        }
        for step in range(len(plan))
    ]
    runs = {}
    for kind, denoiser in (
        ("torch", torch.compile(model, backend="diffopt", options=options)),
        ("onnx", load_engine(tmp_path / "engine")),
        ("shapes", load_engine(old)),
    ):
        with torch.no_grad(), diffopt.request(steps=len(plan)) as req:
            runs[kind] = [first_output(denoiser(**call)) for call in calls]
        assert req.actions[0] == plan, kind
    for got, want in zip(runs["onnx"], runs["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for step, (got, want) in enumerate(zip(runs["shapes"], runs["torch"], strict=True)):
        if plan[step] == "full":
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # the stale output of step 1, not its residual on step 2's stream
            assert (got - want).abs().max() > 1e-2


def test_a_cached_engine_keeps_one_file_per_region_and_a_manifest(cached_engine):
    *_, out = cached_engine
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p.name for p in out.glob("*.onnx"))
    assert len(files) == len(manifest["regions"]) == 10  # prologue, 8 blocks, epilogue
    assert {g["kind"] for g in manifest["guards"]} >= {"step", "block"}
    assert set(manifest["hashes"]) == set(files)
    tensors = [i["path"] for i in manifest["inputs"] if "size" not in i]
    assert tensors == [["hidden_states"], ["timestep"], ["class_labels"]]
    assert manifest["dynamic_batch"] and manifest["batch"] == 8
    assert all(i["shape"][0] is None for i in manifest["inputs"] if "size" not in i)


def test_a_tampered_or_newer_engine_is_refused(cached_engine, tmp_path):
    *_, out = cached_engine
    import shutil

    copy = shutil.copytree(out, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="upgrade"):
        load_engine(copy)
    manifest["format_version"] -= 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    region = next(copy.glob("region_1_*.onnx"))
    region.write_bytes(region.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="does not match its hash"):
        load_engine(copy)
    with pytest.raises(ConfigError, match="provider must be one of"):
        load_engine(out, provider="metal")
    engine, wrong = load_engine(out), zoo.load("ref-dit").make_inputs(batch=3)
    wrong["hidden_states"] = wrong["hidden_states"][..., :8]  # the batch may change, not the size
    with pytest.raises(ValueError, match=r"shape \[3, 1, 16, 8\]; this engine was exported for"):
        engine(**wrong)


@torch.library.custom_op("diffopt_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_kernel_onnxruntime_lacks_is_named_with_its_types_and_code(tmp_path):
    """onnxruntime names only the ONNX node; the error adds its input types and the line of the
    exported graph (found on HunyuanVideo: Where on booleans; Sana-WM: Mul in bfloat16)."""
    import onnx
    from onnx import TensorProto, helper

    from diffopt.exporters.engine import missing_kernel

    node = helper.make_node("Where", ["m", "a", "b"], ["y"], name="node_masked_fill")
    node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="x = mask.masked_fill(m, 0)")
    inputs = [helper.make_tensor_value_info(n, TensorProto.BOOL, [2]) for n in "mab"]
    output = helper.make_tensor_value_info("y", TensorProto.BOOL, [2])
    onnx.save(
        helper.make_model(helper.make_graph([node], "g", inputs, [output])), tmp_path / "r.onnx"
    )
    said = missing_kernel(
        tmp_path / "r.onnx",
        "cpu",
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
        "Where(16) node with name 'node_masked_fill'",
    )
    assert "no Where kernel for BOOL inputs" in said
    assert "x = mask.masked_fill(m, 0)" in said and "cpu provider" in said


class MaskedFills(torch.nn.Module):
    """masked_fill on floats and on booleans (onnxruntime's CPU provider has no boolean Where:
    found on HunyuanVideo's attention mask)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = hidden_states > 0
        keep = torch.ones_like(mask).masked_fill(hidden_states < -0.5, False)
        keep = keep.masked_fill(hidden_states > 1.0, True)
        return hidden_states.masked_fill(mask, -1.5) * keep


def test_masked_fill_on_floats_and_booleans_runs_in_onnxruntime(tmp_path):
    model, inputs = MaskedFills(), {"hidden_states": torch.randn(2, 64)}
    engine = load_engine(export(model, inputs, out=tmp_path))
    torch.testing.assert_close(engine(**inputs), model(**inputs), atol=0, rtol=0)


class Sorts(torch.nn.Module):
    """``sort`` and ``argsort`` as Kandinsky 6 SR's NABLA mask uses them: a float sort, an argsort
    of its indices, a descending argsort of booleans (ties everywhere), a stable int sort."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values, indices = hidden_states.sort(-1)
        keep = (values.cumsum(-1) >= 0) | (hidden_states.round() == 0)
        ints = hidden_states.round().int()
        return (
            values,
            indices.argsort(-1),
            keep.argsort(dim=-1, descending=True),
            *ints.sort(dim=0, descending=True, stable=True),
        )


def test_sorts_and_argsorts_run_in_onnxruntime_as_stable_sorts(tmp_path):
    """TopK over the whole axis; ties keep their order (torch's unstable sort may reorder them,
    so the boolean argsort is compared with torch's stable one)."""
    model, inputs = Sorts(), {"hidden_states": torch.randn(2, 40)}
    got = load_engine(export(model, inputs, out=tmp_path))(**inputs)
    want = list(model(**inputs))
    keep = (want[0].cumsum(-1) >= 0) | (inputs["hidden_states"].round() == 0)
    want[2] = keep.sort(dim=-1, descending=True, stable=True)[1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class FlexAttend(torch.nn.Module):
    """flex_attention with a score_mod and a block mask built in the graph (as Kandinsky 6 SR
    does): `drop` lists key block 0 only, as full, with no mask_mod; else a causal mask_mod over
    the blocks it keeps."""

    def __init__(self, drop: bool) -> None:
        super().__init__()
        self.drop = drop

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        b, h, s, _ = hidden_states.shape
        rows = s // 128
        if self.drop:
            num = torch.ones(b, h, rows, dtype=torch.int32, device=hidden_states.device)
            listed = torch.zeros(b, h, rows, rows, dtype=torch.int32, device=hidden_states.device)
            mask = BlockMask.from_kv_blocks(
                torch.zeros_like(num), listed, num, listed, BLOCK_SIZE=128, mask_mod=None
            )
        else:
            steps = torch.arange(rows, dtype=torch.int32, device=hidden_states.device)
            num = (steps + 1).expand(b, h, rows)
            listed = steps.expand(b, h, rows, rows)
            mask = BlockMask.from_kv_blocks(
                num, listed, BLOCK_SIZE=128, mask_mod=lambda b, h, q, kv: q >= kv
            )
        return flex_attention(
            hidden_states,
            hidden_states.flip(-1),
            hidden_states * 2,
            score_mod=lambda score, b, h, q, kv: score + (q - kv) * 0.01,
            block_mask=mask,
        )


@pytest.mark.parametrize("drop", [False, True])
def test_flex_attention_exports_as_dense_attention_under_its_block_mask(drop, tmp_path):
    """Causal blocks agree with torch's eager flex_attention; blocks the block mask leaves out
    are left out (as the compiled kernels do; torch's eager fallback reads mask_mod only)."""
    import torch.nn.functional as F

    model, x = FlexAttend(drop), torch.randn(2, 2, 256, 16)
    got = load_engine(export(model, {"hidden_states": x}, out=tmp_path))(hidden_states=x)
    q, kv = torch.arange(256)[:, None], torch.arange(256)
    allowed = kv < 128 if drop else q >= kv
    bias = (q - kv) * 0.01
    want = F.scaled_dot_product_attention(
        x, x.flip(-1), x * 2, attn_mask=torch.where(allowed, bias, -float("inf"))
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if not drop:
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name", ["tiny-kandinsky6-sr", "tiny-lumina-next", "tiny-sana-wm", "tiny-anyflow-far"]
)
def test_families_the_coverage_matrix_found_failing_export_and_match(name, tmp_path):
    """Kandinsky 6 SR: its NABLA mask sorts, its attention is flex_attention. Lumina-Next: the
    call passes a complex rotary table. Sana-WM: its attention runs in bfloat16, which the
    engine computes as torch's math kernel does (torch's default flash kernel rounds otherwise:
    the two kernels' outputs are 1.5e-4 apart here), so it is compared with that kernel's run.
    AnyFlow-FAR: its block mask's tables are built with a vmap of constants, and its complex
    rotary is rewritten, whose cleanup erased the vmap's level changes."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, inputs = zoo.build(name)
    kernel = sdpa_kernel(SDPBackend.MATH) if name == "tiny-sana-wm" else contextlib.nullcontext()
    with torch.no_grad(), kernel:
        expected = first_output(model(**inputs))
    engine = load_engine(export(model, dict(inputs), out=tmp_path))
    torch.testing.assert_close(first_output(engine(**inputs)), expected, atol=1e-4, rtol=1e-4)


class Bfloat16Attention(torch.nn.Module):
    """Attention in bfloat16 inside a float32 model, as Sana-WM casts for FlashAttention, with
    an additive bfloat16 mask."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        q, k, v = (t.bfloat16() for t in (hidden_states, hidden_states.flip(-1), hidden_states * 2))
        s = hidden_states.shape[-2]
        bias = torch.where(torch.arange(s) < s - 3, 0.0, -1e9).to(torch.bfloat16).expand(s, s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float()


def test_bfloat16_attention_runs_on_the_cpu_provider_as_torchs_math_kernel(tmp_path):
    """onnxruntime's CPU provider has no bfloat16 MatMul / Mul / Softmax: the attention runs in
    float32, its output rounded to bfloat16, as torch's math kernel computes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x = Bfloat16Attention(), torch.randn(2, 2, 64, 16)
    got = load_engine(export(model, {"hidden_states": x}, out=tmp_path))(hidden_states=x)
    with sdpa_kernel(SDPBackend.MATH):
        want = model(x)
    assert (got != want).float().mean() < 0.01  # a rounding flip at most, here and there
    torch.testing.assert_close(got, want, atol=2**-6, rtol=0)


def test_an_op_without_an_onnx_form_is_named_with_its_region(tmp_path):
    class Odd(torch.nn.Module):
        def forward(self, hidden_states):
            return mystery(hidden_states) + 1

    with pytest.raises(ExportError, match=r"(?s)region 'model'.*diffopt_test.mystery"):
        export(Odd(), {"hidden_states": torch.randn(2, 4)}, out=tmp_path)


@pytest.fixture(scope="module")
def quantized_dit():
    model, inputs = zoo.build("tiny-dit")
    return model, inputs, {}


@pytest.mark.parametrize("form", ["integer", "qdq", "qdq_static", "custom"])
@pytest.mark.parametrize("preset", ["w4a4", "w4a8", "w8a8"])
def test_quantized_layers_export_in_each_form(preset, form, quantized_dit, tmp_path):
    import onnx

    model, inputs, expected = quantized_dit
    quant = {**QuantConfig.preset(preset).__dict__, "min_sqnr": 0}
    if preset not in expected:
        with torch.no_grad():
            compiled = torch.compile(
                model, backend="diffopt", options={"inner": "eager", "quant": quant}
            )
            expected[preset] = compiled(**inputs)[0]
    out = export(model, inputs, {"quant": quant}, out=tmp_path, quant_form=form)
    got = load_engine(out)(**inputs)[0]
    proto = onnx.load(out / "model.onnx")
    if form == "qdq_static":  # other numbers by design: one calibrated scale per layer
        with torch.no_grad():
            exact = model(**inputs)[0]
        noise = (got - exact).pow(2).sum() / exact.pow(2).sum()
        assert -10 * noise.log10() > (45 if preset == "w8a8" else 20)  # SQNR in dB
        constant = {i.name for i in proto.graph.initializer} | {
            o for n in proto.graph.node if n.op_type == "Constant" for o in n.output
        }
        quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        assert quantize and all(n.input[1] in constant for n in quantize)  # TensorRT needs that
        return
    # Q/DQ rounds a value within float error of halfway between two levels the other way; the
    # integer forms compute each layer as the op does, yet a last-bit difference in a float
    # product (ONNX multiplies the two scales in another order) can move a later activation
    # across such a tie (w8a8 here: 29 of 1024 values, 1.3e-4)
    gap = (got - expected[preset]).abs()
    if form == "qdq":
        assert gap.max() <= 1e-3
    else:
        assert gap.max() <= 1e-3 and (gap > 1e-5).float().mean() < 0.05, float(gap.max())
    ops = [n.op_type for n in proto.graph.node]
    types = [onnx.TensorProto.DataType.Name(i.data_type) for i in proto.graph.initializer]
    weight_type = "UINT8" if preset.startswith("w4") else "INT8"  # packed int4: two a byte
    if form == "integer":  # 6 linears × 2 blocks
        assert ops.count("MatMulInteger") == 12 and types.count(weight_type) == 12
    elif form == "qdq":
        assert "MatMulInteger" not in ops and "QuantizeLinear" in ops
        assert types.count("INT4" if preset.startswith("w4") else "INT8") == 12
        assert {o.version for o in proto.opset_import if o.domain == ""} == {21}
    else:
        calls = [n for n in proto.graph.node if n.domain == "ai.diffopt"]
        assert len(calls) == 12 and {n.op_type for n in calls} == {"W4A4Linear"}
        assert [(f.name, f.overload) for f in proto.functions] == [
            ("W4A4Linear", f"a{preset[3]}w{preset[1]}_bias_rotation")
        ]
        assert "MatMulInteger" not in ops and types.count(weight_type) == 12


@pytest.mark.parametrize(
    ("quant", "marker"),
    [
        ({"scale_group": 32, "rank": 4}, "ReduceSum"),  # one integer GEMM per group, summed
        # 8-bit group scales: uint8 constants times a float32 scale per row, as the op's
        ({"scale_group": 32, "scale_bits": 8, "rank": 4, "branch_bits": 8}, "ReduceSum"),
        ({"smooth_alpha": 0.5, "gptq": True}, "Mul"),  # smoothing: a Mul by constant factors
        ({"format": "nvfp4", "rank": 4, "smooth_alpha": 0.5}, "Gather"),  # FP4: lookups
        ({"rank": 4, "branch_bits": 8}, "MatMulInteger"),  # int8 branch: checked within 1e-4
        ({"format": "nvfp4", "rank": 4, "smooth_alpha": 0.5, "branch_bits": 8}, "Gather"),
        ({"format": "mxfp4"}, "Pow"),  # power-of-two block scales
    ],
)
def test_group_scales_branch_smoothing_and_fp4_export_in_the_integer_form(quant, marker, tmp_path):
    import onnx

    model, inputs = zoo.build("tiny-sd3")  # K = 32 in its blocks
    quant = {**quant, "min_sqnr": 0}
    with torch.no_grad():
        compiled = torch.compile(
            model, backend="diffopt", options={"inner": "eager", "quant": quant}
        )
        expected = first_output(compiled(**inputs))
    out = export(model, inputs, {"quant": quant}, out=tmp_path / "integer")
    torch.testing.assert_close(
        first_output(load_engine(out)(**inputs)), expected, atol=1e-4, rtol=0
    )
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert marker in ops and ("MatMulInteger" in ops) == ("format" not in quant)
    for form in ("qdq", "qdq_static", "custom"):
        with pytest.raises(ExportError, match="only the integer ONNX form"):
            export(model, inputs, {"quant": quant}, out=tmp_path / form, quant_form=form)


def test_pixart_loads_only_with_the_noop_cleanup(tmp_path):
    model, inputs = zoo.build("tiny-pixart")
    out = export(model, inputs, {"inner": "eager", "cleanup": None}, out=tmp_path)
    with pytest.raises(Exception, match="Squeeze"):  # onnxruntime's own error
        load_engine(out)


def test_tensorrt_engines_or_the_install_hint(cached_engine, tmp_path):
    reference, *_ = cached_engine
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'diffopt\[tensorrt\]'"):
            export(reference.model, reference.make_inputs(), format="tensorrt", out=tmp_path)
        return
    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports but there is no GPU to build on")
    out = export(reference.model, reference.make_inputs(), format="tensorrt", out=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all((out / r["tensorrt"]).stat().st_size > 0 for r in manifest["regions"])


def test_tensorrt_refuses_quantized_forms_it_cannot_build(tmp_path):
    model, inputs = zoo.build("tiny-dit")
    with pytest.raises(ConfigError, match="export with quant_form='qdq_static'"):
        export(model, inputs, {"quant": "w8a8"}, out=tmp_path, format="tensorrt")
    with pytest.raises(ConfigError, match="no 4-bit activations"):
        export(
            model,
            inputs,
            {"quant": "w4a4"},
            out=tmp_path,
            format="tensorrt",
            quant_form="qdq_static",
        )


def test_tensorrt_profiles_span_the_dynamic_axes(tmp_path, monkeypatch):
    """build_engines against a stand-in for the tensorrt module (its documented calls only):
    each region's profile is built around the sizes it saw at export."""
    import sys
    import types

    import onnx

    profiles = {}

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            for value in onnx.load(path).graph.input:  # TensorRT marks dynamic axes -1
                dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims))
            return True

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = (list(low), list(opt), list(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return types.SimpleNamespace(
                set_memory_pool_limit=lambda *a: None,
                set_flag=lambda *a: None,
                add_optimization_profile=profiles.update,
            )

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan"

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    fake = types.SimpleNamespace(
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
        BuilderFlag=types.SimpleNamespace(FP16=0),
    )
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    model, inputs = zoo.build("tiny-sd3")
    out = export(model, inputs, out=tmp_path, format="tensorrt", dynamic_resolution=True)
    latents = next(
        i
        for i in json.loads((out / "manifest.json").read_text())["inputs"]
        if i["path"] == ["hidden_states"] and "shape" in i
    )
    low, opt, high = profiles[f"slot_{latents['slot']}"]
    assert opt == [2, 4, 8, 8] and low == [2, 4, 2, 2] and high == [2, 4, 32, 32]
    assert (out / "model.onnx.plan").read_bytes() == b"plan"


def test_cli_export_writes_an_engine(tmp_path, capsys):
    from diffopt.cli import main

    assert main(["export", "tiny-dit", "--out", str(tmp_path / "engine"), "--dynamic-batch"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    out = tmp_path / "sd3"
    assert main(["export", "tiny-sd3", "--out", str(out), "--dynamic-resolution"]) == 0
    assert json.loads((out / "manifest.json").read_text())["dynamic_resolution"]
    assert main(["export", "no-such-model", "--out", str(tmp_path / "x")]) == 2
