"""diffopt under diffusers' context parallelism (Ulysses 2) and tensor parallelism (2 shards), on
two CPU processes (gloo).

One module fixture starts two ranks once (imports cost ~20 s a process on a 2-core machine) and
runs every check in them; the tests read what each rank measured. Each rank also runs the same
model, compiled the same way, as one process: that is the parity reference.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

FAMILIES = ("tiny-flux", "tiny-wan")
"""Checked in depth: every request kind, W4A4, the unrolled sampler, the refusals."""
BREADTH = ("tiny-qwenimage", "tiny-flux2", "tiny-ltx")
"""Checked for parity: compiled, cached requests and calibrated W4A4 under Ulysses 2.

Not here, because diffusers 0.42's own context-parallel forward fails on them before diffopt
runs: LTX-2 (its rotary table is not split with the tokens), Helios (its plan names blocks 0–39
one by one, and the toy has 2). LTX-Video runs without its text mask: with one, diffusers' Ulysses
attention hands SDPA a mask over half the text tokens."""
TENSOR_PARALLEL = ("tiny-flux", "tiny-qwenimage")
"""Classes with a tensor-parallel plan (`_tp_plan`) in diffusers 0.42, checked under 2 shards."""
STEPS = 6
BASE = {"steps": STEPS, "polish": "none"}
REQUESTS = {
    "calibrate": None,  # the first request runs in full and calibrates the profile
    "reuse": None,  # the compiled settings: reuse between full steps
    "thresholds": {**BASE, "early": 0.1, "critical": 0.3},
    "block": {**BASE, "polish": "block"},
    "check": {**BASE, "check": "stack", "check_tolerance": 1.0},
}
"""The requests each model runs, in order, with per-request cache settings (no recompiles)."""
TIMEOUT_S = 600  # a hang detector: on 2 loaded cores (CI beside a benchmark) the ranks took > 240 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_for_ulysses(family: str, inputs: dict) -> dict:
    """The family's example call as its pipeline makes it for context parallelism."""
    if family == "tiny-flux2":  # Flux2Pipeline passes batched ids, which the plan splits
        for key in ("img_ids", "txt_ids"):
            inputs[key] = inputs[key].unsqueeze(0).expand(2, -1, -1)
    if family == "tiny-ltx":
        inputs["encoder_attention_mask"] = None  # see BREADTH
    inputs["return_dict"] = False
    return inputs


def _denoise(model, inputs: dict, top: float) -> torch.Tensor:
    """`STEPS` Euler steps over decreasing timesteps; the final latents."""
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for t in torch.linspace(top, top / STEPS, STEPS):
            call = {**inputs, "hidden_states": x, "timestep": t.expand(x.shape[0])}
            x = x - model(**call)[0] / STEPS
    return x


def _requests(model, inputs: dict, top: float) -> dict:
    import diffopt
    from diffopt.config import CacheConfig

    runs = {}
    for name, settings in REQUESTS.items():
        cache = CacheConfig(**settings) if settings else None
        with diffopt.request(steps=STEPS, cache=cache) as req:
            x = _denoise(model, inputs, top)
        recorded = {k: req.recorded[k] for k in ("stack", "curvature") if k in req.recorded}
        runs[name] = {
            "x": x,
            "actions": dict(req.actions),
            "vetoes": dict(req.vetoes),
            "recorded": recorded,
        }
    return runs


def _error(call) -> str:
    try:
        call()
    except Exception as e:  # the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return ""


def _compiled_cold() -> list[str]:
    """The warnings of a context-parallel Wan compiled before its first call."""
    import warnings

    from diffusers import ContextParallelConfig

    import diffopt
    from diffopt.evaluation import zoo

    torch._dynamo.reset()  # trace the forward anew, as in a fresh process
    model, inputs = zoo.build("tiny-wan")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager", "cache": BASE})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with diffopt.request(steps=STEPS) as req:
            compiled(**inputs)
    assert not req.actions, "compiled cold, the forward is expected to run uncached"
    return [str(w.message) for w in caught]


QUANT = {"rank": 2, "smooth_alpha": 0.5, "gptq": True}
"""W4A4 with the settings that calibrate on the capture's inputs (the branch, smoothing, GPTQ)."""


def _quantized(single, model, inputs: dict) -> dict:
    """`QUANT` compiled on one process and on the parallel model: the outputs, a digest of each
    layer's stored tensors as the parallel rank prepared them, and the shape of each weight the
    format was handed in either run."""
    import hashlib

    from diffopt.kernels import formats

    digests: list[str] = []
    shapes: dict[str, list[tuple[int, ...]]] = {"one": [], "cp": []}
    plain = formats.quant_format("int")

    def recording(run: str):
        def prepare(weight, config, layer_inputs):
            prepared = plain.prepare(weight, config, layer_inputs)
            stored = [a.value for a in prepared.args if isinstance(a, formats.Constant)]
            data = b"".join(v.numpy().tobytes() for v in stored if v is not None)
            if run == "cp":
                digests.append(hashlib.sha1(data).hexdigest())
            shapes[run].append(tuple(weight.shape))
            return prepared

        return formats.QuantFormat("int", prepare)

    options = {"inner": "eager", "quant": QUANT}
    outputs = {}
    with torch.no_grad():
        try:
            for run, denoiser in (("one", single), ("cp", model)):
                formats._FORMATS["int"] = recording(run)
                compiled = torch.compile(denoiser, backend="diffopt", options=options)
                outputs[run] = compiled(**inputs)[0]
        finally:
            formats._FORMATS["int"] = plain
    return {**outputs, "digests": digests, "shapes": shapes}


def _unrolled(single, model, inputs: dict, timestep_scale: float, blocks: str | None) -> dict:
    """Unrolled on one process and on the context-parallel model, eager and compiled: two whole
    steps with guidance (cond and uncond as one batch), and a 1.5-step schedule (a partial step
    of one block) before and after its compensation is fit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import diffopt

    x = inputs["hidden_states"]
    skip = ("hidden_states", "timestep", "return_dict")
    cond = {k: v for k, v in inputs.items() if k not in skip}
    uncond = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    kw = {"sigmas": [1.0, 0.5], "timestep_scale": timestep_scale}
    schedules = {
        "whole": ([2], {"guidance": 2.0}, (cond, uncond)),
        "partial": ([[diffopt.full, diffopt.partial(1)]], {"blocks": blocks}, (cond,)),
    }
    found = {}
    for kind, ([steps], extra, given) in schedules.items():
        for name, denoiser in (("one", single), ("cp", model)):
            sampler = diffopt.unroll(
                denoiser, FlowMatchEulerDiscreteScheduler(), steps, **kw, **extra
            )
            with torch.no_grad():
                found[f"{kind} {name}"] = sampler(x, *given)
                torch._dynamo.reset()  # each sampler compiled as in a fresh process
                compiled = torch.compile(sampler, backend="diffopt", options={"inner": "eager"})
                found[f"{kind} {name} compiled"] = compiled(x, *given)
            if kind == "partial":
                diffopt.fit_compensation(sampler, x, cond)
                with torch.no_grad():
                    found[f"fitted {name}"] = sampler(x, cond)
                found[f"fit {name}"] = torch.cat(
                    [p.flatten() for p in sampler.compensation.parameters()]
                )
    return found


def _token_refresh(single, model, inputs: dict, top: float) -> dict:
    """A request that refreshes tokens, on one process and on the parallel model (tensor
    parallelism only: under context parallelism a rank holds a slice of the tokens)."""
    import diffopt

    token = diffopt.CacheConfig(steps=STEPS, polish="token", early=0.05, critical=0.6)
    options = {"inner": "eager", "cache": {"steps": STEPS}}
    found = {}
    for run, denoiser in (("one", single), ("cp", model)):
        compiled = torch.compile(denoiser, backend="diffopt", options=options)
        with diffopt.request(steps=STEPS):  # the first request calibrates
            _denoise(compiled, inputs, top)
        with diffopt.request(steps=STEPS, cache=token) as req:
            found[run] = {"x": _denoise(compiled, inputs, top), "actions": req.actions}
    return found


def _parity(family: str, parallel: Callable[[], Any]) -> tuple:
    """One process and the `parallel()` config (Ulysses 2, or 2 tensor-parallel shards) side by
    side: eager, compiled, cached requests, calibrated W4A4. Returns the one-process model, the
    parallel one, the call, the top noise level and what was measured."""
    from diffopt.evaluation import families, zoo

    found: dict = {}
    single, inputs = zoo.build(family)
    model, _ = zoo.build(family)  # the same weights (seeded), its own tensors
    inputs = _toy_for_ulysses(family, inputs)
    # tiny-flux is the zoo's own model, with sigmas for timesteps
    top = families.FAMILIES[family].timestep_scale if family in families.FAMILIES else 1.0
    options = {"inner": "eager", "cache": BASE}
    with torch.no_grad():
        found["eager"] = single(**inputs)[0]
        found["plain"] = torch.compile(single, backend="diffopt", options={"inner": "eager"})(
            **inputs
        )[0]
    found["one"] = _requests(torch.compile(single, backend="diffopt", options=options), inputs, top)
    model.enable_parallelism(config=parallel())
    with torch.no_grad():
        # diffusers' context-parallel hook on Wan's blocks.0 looks its forward's signature up on
        # its first call, which dynamo cannot trace: compiled first, the whole forward would
        # fall back to per-block frames for good, uncached
        found["cp_eager"] = model(**inputs)[0]
        found["cp_plain"] = torch.compile(model, backend="diffopt", options={"inner": "eager"})(
            **inputs
        )[0]
    found["quant"] = _quantized(single, model, inputs)
    found["cp"] = _requests(torch.compile(model, backend="diffopt", options=options), inputs, top)
    return single, model, inputs, top, found


def _in_depth(family: str, single, model, inputs: dict, top: float) -> dict:
    """`FAMILIES` only: the unrolled sampler, and the refusals of token refresh."""
    import diffopt

    found: dict = {}
    scale = 1e-3 if family == "tiny-flux" else 1.0  # Flux takes sigmas
    stack = "single_transformer_blocks" if family == "tiny-flux" else None
    found["unroll"] = _unrolled(single, model, inputs, scale, stack)
    token = diffopt.CacheConfig(steps=STEPS)  # polish="token", the default
    cached = torch.compile(model, backend="diffopt", options={"inner": "eager", "cache": BASE})

    def refresh_tokens():
        with diffopt.request(steps=STEPS, cache=token):
            _denoise(cached, inputs, top)

    found["token_request"] = _error(refresh_tokens)
    compiled = torch.compile(
        model, backend="diffopt", options={"inner": "eager", "cache": {"steps": STEPS}}
    )
    found["token_compile"] = _error(lambda: _denoise(compiled, inputs, top))
    return found


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=TIMEOUT_S // 2)  # a mismatched collective fails
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    if torch.accelerator.device_count() == 0:
        # diffusers places each rank on device `rank % torch.accelerator.device_count()`, a
        # division by zero without an accelerator; on CPU, gloo's one "device" is the CPU
        torch.accelerator.device_count = lambda: 1
    import diffusers.hooks.tensor_parallel
    from diffusers import ContextParallelConfig, TensorParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    # diffusers lists the accelerators it tested tensor parallelism on; its DTensor sharding
    # runs on CPU with gloo as well
    diffusers.hooks.tensor_parallel._SUPPORTED_TP_DEVICES += ("cpu",)
    results: dict = {}
    try:
        for family in FAMILIES + BREADTH:
            # diffusers wraps most forwards in one decorator (`apply_lora_scale`): dynamo counts
            # every model's compile against that one code object, and past its recompile limit
            # (8) it runs the forward uncompiled, with only a log line
            torch._dynamo.reset()
            ulysses = partial(ContextParallelConfig, ulysses_degree=2)
            single, model, inputs, top, found = _parity(family, ulysses)
            if family in FAMILIES:
                found.update(_in_depth(family, single, model, inputs, top))
            results[family] = found
        for family in TENSOR_PARALLEL:
            torch._dynamo.reset()
            shards = lambda: TensorParallelConfig(mesh=init_device_mesh("cpu", (world,)))  # noqa: E731
            single, model, inputs, top, found = _parity(family, shards)
            found["token"] = _token_refresh(single, model, inputs, top)
            results[f"tp {family}"] = found
        results["cold"] = _compiled_cold()
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks measured: ``[rank0, rank1]``, and the wall time."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "ContextParallelConfig"):
        pytest.skip(f"diffusers {diffusers.__version__} has no ContextParallelConfig")
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("context_parallel")
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        try:
            context = mp.start_processes(
                _worker,
                args=(2, _free_port(), str(out)),
                nprocs=2,
                join=False,
                start_method="spawn",
            )
        except (OSError, RuntimeError) as e:
            pytest.skip(f"cannot start two processes here: {e}")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish in {TIMEOUT_S} s (a collective hung?)")
    found = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for rank, result in enumerate(found):
        assert "error" not in result, f"rank {rank} failed:\n{result.get('error')}"
    return found, time.perf_counter() - start


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", FAMILIES + BREADTH)
def test_ulysses_matches_one_process_eager_and_compiled(ranks, family):
    (rank0, rank1), _ = ranks
    for result in (rank0, rank1):
        found = result[family]
        assert _gap(found["plain"], found["eager"]) <= 1e-5
        assert _gap(found["cp_eager"], found["eager"]) <= 1e-4  # diffusers' own parity
        assert _gap(found["cp_plain"], found["eager"]) <= 1e-4  # diffopt on top of it


@pytest.mark.parametrize("family", FAMILIES + BREADTH)
def test_cache_decisions_are_the_same_on_every_rank_and_as_one_process(ranks, family):
    (rank0, rank1), _ = ranks
    one, cp0, cp1 = rank0[family]["one"], rank0[family]["cp"], rank1[family]["cp"]
    for name in REQUESTS:
        assert cp0[name]["actions"] == cp1[name]["actions"], name
        assert cp0[name]["actions"] == one[name]["actions"], name
        assert cp0[name]["vetoes"] == cp1[name]["vetoes"], name
    assert set(one["calibrate"]["actions"][0]) == {"full"}
    assert "reuse" in one["reuse"]["actions"][0]  # the cache does something to compare
    if family in FAMILIES:  # the breadth toys' residuals stay under the block polish's bar
        assert "block" in one["block"]["actions"][0]


@pytest.mark.parametrize("family", FAMILIES + BREADTH)
def test_the_calibrated_profile_is_the_whole_sequences_on_every_rank(ranks, family):
    """The profile is reduced over the ranks: bit-identical on both, and one process's value
    (each rank's own shard measured up to 12 % apart, enough to split decisions)."""
    (rank0, rank1), _ = ranks
    one = rank0[family]["one"]["calibrate"]["recorded"]
    cp0, cp1 = (result[family]["cp"]["calibrate"]["recorded"] for result in (rank0, rank1))
    assert set(cp0) == {"stack", "curvature"}
    assert cp0 == cp1
    for key in cp0:
        measured, expected = torch.tensor(cp0[key]), torch.tensor(one[key])
        torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES + BREADTH)
def test_cached_requests_match_one_process(ranks, family):
    (rank0, rank1), _ = ranks
    for result in (rank0, rank1):
        one, cp = result[family]["one"], result[family]["cp"]
        for name in REQUESTS:
            assert _gap(cp[name]["x"], one[name]["x"]) <= 1e-4, name


@pytest.mark.parametrize("family", FAMILIES + BREADTH)
def test_calibrated_w4a4_prepares_the_same_weights_on_every_rank(ranks, family):
    """Smoothing, GPTQ and the SQNR fallback read each layer's inputs, of which a rank holds a
    shard: their statistics are reduced over the group, so both ranks store the same weights
    (each from its own shard they differ: the output then moved 1–1.2× the quantization error
    away from one process's). Against one process the output stays within half the
    quantization error: the ranks' activations differ from one process's by float rounding,
    which can move a weight across a rounding tie (exactly equal on tiny Wan here)."""
    (rank0, rank1), _ = ranks
    digests = [result[family]["quant"]["digests"] for result in (rank0, rank1)]
    assert digests[0] and digests[0] == digests[1]
    for result in (rank0, rank1):
        found = result[family]
        error = _gap(found["quant"]["one"], found["eager"])
        assert _gap(found["quant"]["cp"], found["quant"]["one"]) <= 0.5 * error


@pytest.mark.parametrize("family", TENSOR_PARALLEL)
def test_tensor_parallel_matches_one_process_compiled_and_cached(ranks, family):
    """Each rank holds half of every planned weight (a DTensor): diffopt compiles the model
    diffusers sharded, and its cached requests take one process's actions, a token refresh
    included (every rank holds every token)."""
    (rank0, rank1), _ = ranks
    for result in (rank0, rank1):
        found = result[f"tp {family}"]
        assert _gap(found["cp_eager"], found["eager"]) <= 1e-4  # diffusers' own parity
        assert _gap(found["cp_plain"], found["eager"]) <= 1e-4
        for name in REQUESTS:
            assert found["cp"][name]["actions"] == found["one"][name]["actions"], name
            assert _gap(found["cp"][name]["x"], found["one"][name]["x"]) <= 1e-4, name
    assert "reuse" in rank0[f"tp {family}"]["one"]["reuse"]["actions"][0]
    for result in (rank0, rank1):
        token = result[f"tp {family}"]["token"]
        assert token["cp"]["actions"] == token["one"]["actions"]
        assert _gap(token["cp"]["x"], token["one"]["x"]) <= 1e-4
    assert "token" in rank0[f"tp {family}"]["token"]["one"]["actions"][0]


@pytest.mark.parametrize("family", TENSOR_PARALLEL)
def test_w4a4_under_tensor_parallelism_quantizes_each_shard_with_its_own_scales(ranks, family):
    """`QUANT` (branch, smoothing, GPTQ) on 2 shards: each rank stores its own half of every
    layer, calibrated on the rows its half sees (a rowwise shard scales its own slice of K), and
    runs the op on its local tensors; the partial sums of rowwise layers are reduced before the
    bias. Both ranks end with the same output, about as far from float as one process's W4A4."""
    (rank0, rank1), _ = ranks
    digests = [result[f"tp {family}"]["quant"]["digests"] for result in (rank0, rank1)]
    shapes = rank0[f"tp {family}"]["quant"]["shapes"]
    assert len(shapes["cp"]) == len(shapes["one"]) == len(digests[0]) == len(digests[1])
    sharded = 0
    for one, shard, first, second in zip(shapes["one"], shapes["cp"], *digests, strict=True):
        if shard == one:  # a layer the plan leaves whole: the same weights on both ranks
            assert first == second
            continue
        sharded += 1  # half of N (colwise) or of K (rowwise), with its own scales
        assert shard in ((one[0] // 2, one[1]), (one[0], one[1] // 2)) and first != second
    assert sharded >= 8
    outputs = [result[f"tp {family}"]["quant"]["cp"] for result in (rank0, rank1)]
    assert torch.equal(*outputs)
    found = rank0[f"tp {family}"]
    one_error = _relative_error(found["quant"]["one"], found["eager"])
    shard_error = _relative_error(found["quant"]["cp"], found["eager"])
    assert 0 < shard_error <= 1.5 * one_error


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_unrolled_sampler_matches_one_process(ranks, family):
    """Whole steps with guidance batched, and a 1.5-step schedule whose partial step runs one
    block through the hooks diffusers put on the model's forward (a copied view would have run
    every block), its compensation fit over both ranks' tokens: one process's, on every rank."""
    (rank0, rank1), _ = ranks
    for result in (rank0, rank1):
        found = result[family]["unroll"]
        for kind in ("whole", "partial"):
            assert _gap(found[f"{kind} cp"], found[f"{kind} one"]) <= 1e-4, kind
            assert _gap(found[f"{kind} cp compiled"], found[f"{kind} one"]) <= 1e-4, kind
            assert _gap(found[f"{kind} one compiled"], found[f"{kind} one"]) <= 1e-5, kind
        assert _gap(found["fit cp"], found["fit one"]) <= 1e-4
        assert _gap(found["fitted cp"], found["fitted one"]) <= 1e-4
        assert _gap(found["fitted one"], found["partial one"]) > 1e-4  # the fit changed it


@pytest.mark.parametrize("family", FAMILIES)
def test_token_refresh_is_refused_with_the_reason_and_the_fix(ranks, family):
    (rank0, _), _ = ranks
    for where in ("token_request", "token_compile"):
        message = rank0[family][where]
        assert "ConfigError" in message and "context parallelism" in message, where
        assert "polish='block'" in message and "all-to-all" in message, where


def test_a_forward_split_by_diffusers_hooks_is_warned_about_with_the_fix(ranks):
    (rank0, rank1), _ = ranks
    for result in (rank0, rank1):
        said = [w for w in result["cold"] if "exchanges tensors between ranks" in w]
        assert said and "call the model once before torch.compile" in said[0]


def test_wan_block0_indicator_and_check_run_in_one_process():
    """Found on the way: the executor took Wan's rotary table ([1, N, 1, d]) for the token
    stream, so its batch of 1 broke the per-sample check and the block-0 indicator."""
    import diffopt
    from diffopt.evaluation import zoo

    model, inputs = zoo.build("tiny-wan")
    inputs["return_dict"] = False
    for cache in ({"indicator": "block0"}, {"check": "stack", "check_tolerance": 1.0}):
        options = {"inner": "eager", "cache": {**BASE, **cache}}
        compiled = torch.compile(model, backend="diffopt", options=options)
        for _ in range(2):  # calibrate, then decide per sample
            with diffopt.request(steps=STEPS) as req:
                _denoise(compiled, inputs, 999.0)
        assert "reuse" in req.actions[0], cache
        diffopt.runtime.profiles.forget(model)
