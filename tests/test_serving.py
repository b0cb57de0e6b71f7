"""Serving: requests in flight together through one compiled pipeline, and on Ray Serve."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from diffopt.serving import PipelineService, ray_app, reference_service

STEPS = 6
OPTIONS = {"inner": "eager", "cache": {"steps": STEPS, "polish": "none"}}
REQUESTS = [{"label": i % 10, "seed": i} for i in range(16)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Not reset between these tests: a service compiles once and serves, as a server does."""
    yield


@pytest.fixture(scope="module")
def service() -> PipelineService:
    torch.manual_seed(0)
    return reference_service("ref-flux", OPTIONS, steps=STEPS)


@pytest.fixture(scope="module")
def one_by_one(service) -> list[torch.Tensor]:
    return [service.generate(r) for r in REQUESTS]


def same_images(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"request {i} differs from the same request alone"


def test_sixteen_requests_in_flight_give_the_images_they_give_one_by_one(service, one_by_one):
    async def serve_all():
        return await asyncio.gather(*(service.submit(r) for r in REQUESTS))

    same_images(asyncio.run(serve_all()), one_by_one)
    recent = list(service.served)[-16:]
    # the cache reused steps in both guidance branches of every request it served
    assert all(all("reuse" in a for a in r.actions.values()) for r in recent), recent[0]
    assert all(len(r.actions) == 2 for r in recent)


def test_a_request_that_fails_half_way_leaves_the_others_unaffected(service, one_by_one):
    prepare = service.prepare

    def failing_at_step_3(request):
        call = dict(prepare(request))
        if request.get("fail"):

            def stop(pipe, step, timestep, outputs):
                if step == 3:
                    raise RuntimeError("the client went away")
                return outputs

            call["callback_on_step_end"] = stop
        return call

    service.prepare = failing_at_step_3
    try:
        requests = [{**REQUESTS[0], "fail": True}, *REQUESTS[1:4]]

        async def serve_all():
            calls = (service.submit(r) for r in requests)
            return await asyncio.gather(*calls, return_exceptions=True)

        replies = asyncio.run(serve_all())
    finally:
        service.prepare = prepare
    assert isinstance(replies[0], RuntimeError)
    same_images(replies[1:], one_by_one[1:4])
    same_images([service.generate(REQUESTS[0])], one_by_one[:1])  # the failed one, again


def test_requests_that_arrive_before_the_first_compile_wait_for_it():
    torch._dynamo.reset()
    # no warm-up: the first of 16 requests compiles and calibrates (in full) while the others
    # wait; without the wait, each thread compiled once more up to dynamo's recompile limit,
    # calls past it ran eagerly, and the requests calibrated side by side
    cold = reference_service("ref-flux", OPTIONS, steps=STEPS, warmup=False)

    async def serve_all():
        return await asyncio.gather(*(cold.submit(r) for r in REQUESTS))

    replies = asyncio.run(serve_all())
    calibrated = [r for r in cold.served if all(set(a) == {"full"} for a in r.actions.values())]
    assert len(calibrated) == 1
    # against the same service one by one: which request arrives first (and so calibrates) is
    # up to the threads, and another calibration's profile may choose other steps
    again = [cold.generate(r) for r in REQUESTS]
    differ = [i for i, (a, b) in enumerate(zip(replies, again, strict=True)) if a.ne(b).any()]
    assert len(differ) <= 1, differ  # the calibrating request, uncached


def test_a_requests_view_shares_the_components_and_settings_with_its_own_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from diffopt.evaluation import zoo

    model, _ = zoo.build("tiny-wan")
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=model,
        boundary_ratio=0.875,  # Wan 2.2's switch to transformer_2
        expand_timesteps=True,
    )
    view = PipelineService(pipe).view()
    assert view.transformer is pipe.transformer and view.scheduler is not pipe.scheduler
    assert view.scheduler.config.shift == 3.0
    assert (view.config.boundary_ratio, view.config.expand_timesteps) == (0.875, True)


def test_a_bad_request_is_refused_with_the_reason(service):
    with pytest.raises(ValueError, match="label 12 is not a class of ref-flux"):
        service.generate({"label": 12, "seed": 0})


def test_ray_serve_replicas_serve_concurrent_requests_as_one_by_one(one_by_one):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")  # handles only: nothing listens
        build = functools.partial(reference_service, "ref-flux", OPTIONS, steps=STEPS)
        # the replicas run torch on as many threads as `one_by_one` did: the images match bitwise
        app = ray_app(build, replicas=2, threads=torch.get_num_threads())
        handle = serve.run(app, name="digits")
        in_flight = [handle.remote(r) for r in REQUESTS]
        same_images([reply.result(timeout_s=300) for reply in in_flight], one_by_one)
        with pytest.raises(Exception, match="label 12 is not a class"):
            handle.remote({"label": 12, "seed": 0}).result(timeout_s=300)
        same_images([handle.remote(REQUESTS[5]).result(timeout_s=300)], one_by_one[5:6])
    finally:
        serve.shutdown()
        ray.shutdown()
