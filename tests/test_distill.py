"""benchmarks/distill_ref_dit.py on ref-flux: its students train and their samplers build,
through the Reference's own hooks (the same code that distills ref-dit)."""

from __future__ import annotations

import copy
import math
import re
import sys

import pytest
import torch

import diffopt
from diffopt.evaluation import metrics, zoo
from diffopt.fewstep.compensation import load_compensation, save_compensation


@pytest.fixture
def script(benchmark_script):
    return benchmark_script("distill_ref_dit")


@pytest.fixture
def few_step(benchmark_script):
    return benchmark_script("few_step")


@pytest.fixture(scope="module")
def flux():
    return zoo.load("ref-flux")


def pairs(flux, count: int = 4) -> tuple[torch.Tensor, ...]:
    """Tiny teacher pairs: one guided step from seeded noise (packed latents)."""
    labels = torch.arange(count) % 10
    seeds = range(100_000, 100_000 + count)
    return flux.noise(seeds), labels, flux.latents(labels, seeds, steps=1)


def test_a_ref_flux_student_trains_a_step_of_reflow_and_of_its_own_trajectory(script, flux):
    """The 2-step specialization (σ ∈ {1, 0.5}, half the σ = 0.5 inputs from the student's own
    first step) on packed Flux latents: the returned EMA student moved, the teacher did not."""
    teacher = {k: v.clone() for k, v in flux.model.state_dict().items()}
    student = script.train(
        flux,
        copy.deepcopy(flux.model),
        pairs(flux),
        steps=1,
        sigmas=[1.0, 0.5],
        lr=1e-4,
        batch=4,
        seed=0,
        desc="test",
    )
    moved = [not torch.equal(p, teacher[n]) for n, p in student.state_dict().items()]
    assert any(moved) and not any(p.requires_grad for p in student.parameters())
    assert all(torch.equal(p, teacher[n]) for n, p in flux.model.state_dict().items())


def test_the_unrolled_ref_flux_student_is_its_sampling_loop(flux):
    """`FluxReference.unroll` calls Flux as `calling` does (σ as the timestep, the ids added)."""
    labels, seeds = torch.tensor([3, 8]), [5, 6]
    sampler = flux.unroll(flux.model, 2, sigmas=[1.0, 0.5])
    with torch.no_grad():
        unrolled = sampler(flux.noise(seeds), flux.unrolled_condition(labels))
    loop = flux.latents(labels, seeds, steps=[1.0, 0.5], guidance=1.0)
    torch.testing.assert_close(unrolled, loop, atol=1e-5, rtol=1e-5)


def test_the_ref_flux_joint_schedule_fits_trains_saves_and_loads(script, flux, tmp_path):
    """``--joint`` on ref-flux: the 1.5-step schedule cuts the single-stream stack (3 of 7
    after the dual-stream block: 1.5 NFE), fits, trains a step (4 pairs: as many as Flux's text
    ids have rows, which `shared` keeps whole) and loads back as few_step.py loads it."""
    model = copy.deepcopy(flux.model)
    sampler = script.joint_sampler(flux, "affine", "1.5", model=model)
    assert sampler.stack == "single_transformer_blocks" and sampler.schedule[1].blocks == 3
    noise, labels, latents = pairs(flux)
    cond = flux.unrolled_condition(labels)
    assert sampler.effective_nfe(noise, cond) == pytest.approx(1.5, abs=0.02)
    diffopt.fit_compensation(sampler, noise, cond)
    scale = sampler.compensation["1"].scale.clone()
    losses = diffopt.train_schedule(
        sampler,
        noise,
        flux.condition(labels),
        latents,
        steps=1,
        batch=2,
        progress=False,
        shared=flux.shared_condition(),
    )
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert not torch.equal(sampler.compensation["1"].scale, scale)

    folder = tmp_path / "ref-flux-1.5step-affine"
    flux.save(model, folder)
    save_compensation(sampler, folder / "compensation.safetensors")
    loaded = zoo.load("ref-flux-2step", folder)
    assert loaded.name == "ref-flux-2step" and loaded.guidance == 1.0
    again = script.joint_sampler(loaded, "affine", "1.5")
    load_compensation(again, folder / "compensation.safetensors")
    with torch.no_grad():  # fp16 on disk, as ref-flux ships
        torch.testing.assert_close(again(noise, cond), sampler(noise, cond), atol=5e-3, rtol=0)


def test_a_missing_ref_flux_student_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"distill_ref_dit\.py --model ref-flux"):
        zoo.load("ref-flux-1step", tmp_path / "ref-flux-1step")


def test_few_step_prints_each_joint_schedule_a_missing_folder_leaves_out(
    few_step, tmp_path, capsys
):
    """A jointly trained 1.x schedule whose folder is missing leaves its row out, printed with
    the folder and the distill_ref_dit.py command that writes it there."""
    (tmp_path / "ref-flux-1.5step-affine").mkdir()
    found = few_step.joint_folders("ref-flux", tmp_path)
    assert found == [("1.5", "affine", tmp_path / "ref-flux-1.5step-affine")]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the three other --joint schedules
    command = "python benchmarks/distill_ref_dit.py --model ref-flux"
    lowrank = f"{command} --joint --joint-fraction 1.67 --compensation lowrank --out {tmp_path}"
    assert lines[-1] == (
        f"left out ({tmp_path / 'ref-flux-1.67step-lowrank'} is missing; {lowrank} writes it): "
        "1.x: jointly trained (lowrank), 1.67 steps"
    )


@pytest.mark.parametrize("model", ["ref-dit", "ref-flux"])
def test_few_step_refuses_a_missing_shipped_student(few_step, tmp_path, model):
    with pytest.raises(FileNotFoundError, match=rf"ships with diffopt.*--model {model} --out"):
        few_step.load_student(model, "1step", tmp_path)


def test_the_shipped_ref_flux_schedules_are_what_few_step_measures(few_step, script):
    """The shipped ref-flux students, as few_step.py loads them with the default --assets: the
    jointly trained 1.5-step schedule (compensation included) lands nearer the 2-step student's
    images than the same student's partial step does with no compensation."""
    ((fraction, kind, folder),) = few_step.joint_folders("ref-flux", zoo.ASSETS)
    assert (fraction, kind) == ("1.5", "affine")
    teacher = zoo.load("ref-flux")
    two = few_step.load_student("ref-flux", "2step", zoo.ASSETS)
    labels = torch.arange(10)
    noise, cond = teacher.noise(range(500, 510)), teacher.unrolled_condition(labels)
    trained = zoo.load("ref-flux-2step", folder)
    joint = script.joint_sampler(trained, kind, fraction)
    load_compensation(joint, folder / "compensation.safetensors")
    uncompensated = two.unroll(two.model, fraction, sigmas=[1.0, 0.5])
    with torch.no_grad():
        reference = teacher.images(two.unroll(two.model, 2, sigmas=[1.0, 0.5])(noise, cond))
        near = metrics.psnr(teacher.images(joint(noise, cond)), reference)
        far = metrics.psnr(teacher.images(uncompensated(noise, cond)), reference)
    assert near > far + 6.0  # 37.8 against 25.2 dB at 100 images (few-step-ref-flux.json)


def distill(script, monkeypatch, *options: str) -> None:
    """distill_ref_dit.py's main with `options` (cheap ones: it must stop before training)."""
    argv = ["distill_ref_dit.py", "--pairs", "1", "--teacher-steps", "1", *options]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()


def test_distill_resume_without_joint_is_an_error(script, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        distill(script, monkeypatch, "--resume")
    assert "--resume continues a --joint run" in capsys.readouterr().err


def test_distill_resume_names_the_joint_run_that_writes_what_it_reads(
    script, monkeypatch, tmp_path
):
    folder = re.escape(str(tmp_path / "ref-dit-1.67step-affine"))
    run = re.escape(f"--joint --joint-fraction 1.67 --compensation affine --out {tmp_path}")
    with pytest.raises(FileNotFoundError, match=rf"{folder}/diffusion_pytorch_model.*{run}"):
        distill(
            script,
            monkeypatch,
            *("--joint", "--resume", "--joint-fraction", "1.67", "--compensation", "affine"),
            *("--out", str(tmp_path)),
        )


def test_distill_joint_names_both_folders_its_two_step_student_may_be_in(
    script, monkeypatch, tmp_path
):
    monkeypatch.setattr(zoo, "ASSETS", tmp_path / "assets")  # as if it were not shipped
    both = f"neither {tmp_path / 'ref-flux-2step'} nor {zoo.ASSETS / 'ref-flux-2step'}"
    out = f"--model ref-flux --out {tmp_path}"
    match = rf"{re.escape(both)}: pass the --out .*{re.escape(out)}"
    with pytest.raises(FileNotFoundError, match=match):
        distill(script, monkeypatch, "--model", "ref-flux", "--joint", "--out", str(tmp_path))
