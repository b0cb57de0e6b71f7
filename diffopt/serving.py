"""Serving a diffusers pipeline whose denoiser diffopt compiled, with requests in flight together.

`PipelineService` runs each request on its own view of the pipeline (the same components, a
scheduler of its own: diffusers' schedulers keep the step index on themselves, as diffusers'
server example does with ``from_pipe``), inside its own `diffopt.request` scope (the cache state
of that request alone), on a thread of the service's pool. So 16 requests through one compiled
transformer give the images they give one by one, and one that fails half-way leaves nothing
behind. `ray_app` puts services on Ray Serve replicas (``pip install 'diffopt[serve]'``).

``reference_service("ref-flux", options)`` serves a bundled reference model this way (the
example, the tests and ``benchmarks/serve_throughput.py`` use it).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from diffopt.runtime.cache import Request
from diffopt.runtime.cache import request as request_scope

Prepare = Callable[[Any], Mapping[str, Any]]
"""A request → the pipeline's keywords for it."""


class PipelineService:
    """Requests to a diffusers pipeline, any number in flight, each with its own cache state.

    `prepare` turns a request into the pipeline's keywords (by default the request is them),
    `finish` the pipeline's output into the reply (by default its ``images``). `warmup`, a
    request run once here, compiles the denoiser and, with ``cache`` options, calibrates its
    profile, so that no client waits for that. `workers` threads run requests; `submit` queues
    one from asyncio (Ray Serve replicas, FastAPI), `generate` runs one on the calling thread.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        prepare: Prepare | None = None,
        finish: Callable[[Any], Any] | None = None,
        warmup: Any = None,
        workers: int = 16,
    ) -> None:
        self.pipeline = pipeline
        self.prepare = prepare or dict
        self.finish = finish or (lambda output: output.images)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="diffopt-request")
        self.served: deque[Request] = deque(maxlen=1000)
        """The last 1,000 finished requests' cache records (actions, work), for metrics."""
        self._first = threading.Lock()
        self._compiled = False
        if warmup is not None:
            self.generate(warmup)

    def view(self) -> Any:
        """The pipeline for one request: the shared components and settings (Wan 2.2's
        ``boundary_ratio``...), a fresh scheduler. Not ``from_pipe``: it casts the shared
        components to float32 unless given a dtype."""
        pipe = self.pipeline
        scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
        accepted = inspect.signature(type(pipe).__init__).parameters
        settings = {k: v for k, v in pipe.config.items() if k in accepted}
        fresh = type(pipe)(**{**settings, **pipe.components, "scheduler": scheduler})
        fresh.set_progress_bar_config(disable=True)
        return fresh

    def generate(self, request: Any) -> Any:
        """Run one request to the end on this thread; safe from many threads at once."""
        call = dict(self.prepare(request))
        if self._compiled:
            return self._run(call)
        # dynamo compiles a frame once per thread that reaches it before the first compile is
        # done, on diffusers' models with guards failing under the other threads' calls: 16
        # requests at once hit its recompile limit (8), and calls past it ran eagerly, outside
        # diffopt (measured on ref-flux). So requests wait for the first one.
        with self._first:
            if not self._compiled:
                reply = self._run(call)
                self._compiled = True
                return reply
        return self._run(call)

    def _run(self, call: dict[str, Any]) -> Any:
        with request_scope(steps=denoiser_calls(call)) as record:
            reply = self.finish(self.view()(**call))
        self.served.append(record)
        return reply

    async def submit(self, request: Any) -> Any:
        """Run one request on the service's pool without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.generate, request)


def denoiser_calls(call: Mapping[str, Any]) -> int | None:
    """The steps a pipeline call takes: its explicit ``sigmas`` or ``timesteps``, else
    ``num_inference_steps`` (None: the compiled ``cache.steps``). img2img's ``strength`` and
    second-order schedulers take other counts; the cache then warns that a request ended
    early, and its last step is not protected."""
    for explicit in ("sigmas", "timesteps"):
        if call.get(explicit) is not None:
            return len(call[explicit])
    return call.get("num_inference_steps")


def reference_service(
    name: str = "ref-flux",
    options: Mapping[str, Any] | None = None,
    *,
    steps: int | None = None,
    workers: int = 16,
    warmup: bool = True,
) -> PipelineService:
    """A bundled reference model's diffusers pipeline (``ref-flux``: `FluxPipeline`, ``ref-wan``:
    `WanPipeline`), its transformer compiled with diffopt's `options`.

    A request is ``{"label": digit, "seed": int}`` (optionally ``"steps"``, default `steps` or the
    model's shipped step count); the reply is its images, [1, C, H, W] (video: [1, F, C, H, W]).
    With `warmup`, the service compiles (and calibrates) on seed 10**6, a seed no benchmark
    draws, before it takes requests.
    """
    from diffopt.evaluation import zoo

    ref = zoo.load(name)
    if not hasattr(ref, "pipeline"):
        raise ValueError(
            f"{name!r} has no diffusers pipeline here; serve 'ref-flux' or 'ref-wan', or build a "
            "PipelineService around your own pipeline"
        )
    default = steps or ref.steps
    transformer = torch.compile(ref.model, backend="diffopt", options=dict(options or {}))

    def prepare(request: Mapping[str, Any]) -> dict[str, Any]:
        label = int(request["label"])
        if not 0 <= label < ref.null_class:  # the null class is the last: unconditional
            raise ValueError(f"label {label} is not a class of {name} (0..{ref.null_class - 1})")
        steps = int(request.get("steps", default))
        return ref.pipeline_inputs(torch.tensor([label]), steps, int(request["seed"]))

    def finish(output: Any) -> torch.Tensor:
        return ref.images(output.frames if hasattr(output, "frames") else output.images)

    return PipelineService(
        ref.pipeline(transformer),
        prepare=prepare,
        finish=finish,
        warmup={"label": 0, "seed": 10**6} if warmup else None,
        workers=workers,
    )


class Replica:
    """One Ray Serve replica: a `PipelineService` built in the replica's own process."""

    def __init__(self, build: Callable[[], PipelineService], threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.service = build()

    async def __call__(self, request: Any) -> Any:
        return await self.service.submit(request)


def ray_app(
    build: Callable[[], PipelineService],
    *,
    replicas: int = 1,
    max_ongoing_requests: int = 16,
    cpus: float = 1.0,
    threads: int | None = 1,
) -> Any:
    """A Ray Serve application of `replicas` replicas, each running ``build()``'s service.

    `build` runs in each replica's process (a compiled model does not pickle; the function
    does: a module-level function or a `functools.partial` of `reference_service`). Each
    replica reserves `cpus` of the cluster and runs torch on `threads` threads; Ray places the
    replicas on any node of the cluster. ``serve.run(ray_app(...))`` returns the handle.
    Keep `max_ongoing_requests` at the service's `workers`: Ray Serve then holds the rest and
    hands each to the first replica free (2 replicas of 1 worker on 2 cores: 1.79× one; with 16
    let in at once the router split them unevenly, 1.41×; `benchmarks/serve_throughput.py`).
    """
    try:
        from ray import serve
    except ImportError as error:
        raise ImportError(
            "ray_app needs Ray Serve: pip install 'diffopt[serve]'  (ray[serve])"
        ) from error
    deployment = serve.deployment(
        Replica,
        name="diffopt",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus},
    )
    return deployment.bind(build, threads)
