"""Does diffopt work on my model? Every diffusers denoiser family against every pass.

For each tiny family (`diffopt.evaluation.families`: one per installed diffusers denoiser class)
this checks, through the public API only:

- builds: the model builds and runs one eager forward;
- parity: ``torch.compile(backend="diffopt", options={"inner": "eager"})`` matches the model
  (max abs diff <= 1e-4);
- regions: the capture finds more than one repeated block;
- step / block / token guard: the cache-guard passes applied (`diffopt.inspect`'s reports);
- cache reuse: a planned request ``[full, full, reuse, full]`` over decreasing timesteps reuses
  (the reuse call's output differs from the model's, block work < 1) and its full calls match;
- quant: under ``quant="w4a4"`` every linear that runs inside the blocks is rewritten, excluded
  by the config's patterns, or skipped with the reason in the pass report;
- unroll / unroll 1.x: ``diffopt.unroll`` of a 2-step flow-matching schedule matches eagerly and
  compiled (``fullgraph=True``), and a fractional "1.5" schedule runs (skipped with the reason
  where the class's call does not fit unroll's ``denoiser(hidden_states|sample=, timestep=)``);
- export: ``diffopt.export`` + ``diffopt.load_engine`` match the model (<= 1e-4); where torch's
  own attention kernels disagree on the model by more (its attention runs in bfloat16: the
  default flash kernel and the math kernel), the engine matches its run on the math kernel.

Families run in child processes, each check under its own alarm; a family that crashes or
outlives --timeout ends only its child, and the next child resumes after it, so one hang or crash
costs one cell. A failed cell carries its reason: the exception's first line and where it
was raised (the deepest diffopt frame, else the deepest frame), or the pass report's skip reason
with the module path. The table goes to stdout, ``results/coverage.md`` and ``coverage.json``.

    python benchmarks/coverage_matrix.py                       # all families, export included
    python benchmarks/coverage_matrix.py --families tiny-wan tiny-flux --skip-export
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE = 1e-4
PLAN = ["full", "full", "reuse", "full"]
STEADY_STEPS = 20  # issue 17: no recompiles over 20 steps of a cached request

COLUMNS = [
    ("builds", "builds"),
    ("parity", "parity"),
    ("regions", "regions"),
    ("step_guard", "step guard"),
    ("block_guard", "block guard"),
    ("token_guard", "token guard"),
    ("cache_reuse", "cache reuse"),
    ("steady", "20 steps, no recompile"),
    ("quant", "quant"),
    ("unroll", "unroll"),
    ("unroll_partial", "unroll 1.x"),
    ("export", "export"),
]
MARK = {"ok": "✓", "partial": "◐", "fail": "✗", "skip": "–"}


# --- cells and reasons -----------------------------------------------------------------------


def cell(status: str, text: str = "", reason: str | None = None, **detail: Any) -> dict:
    """One matrix cell: ``ok`` / ``partial`` / ``fail`` / ``skip``, a short text, the reason."""
    return {"status": status, "text": text, "reason": reason, **detail}


_OWN = ("/passes/", "/runtime/", "/exporters/", "/kernels/", "/diffopt/")


def reason_of(error: BaseException) -> str:
    """``Type: first line (at file:line)``, taken from the innermost wrapped exception (dynamo
    wraps a backend's error), located at the deepest diffopt frame, else the deepest frame."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            break
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = re.sub(r" at 0x[0-9a-f]+", "", lines[0] if lines else "")  # so reasons group
    text = f"{type(error).__name__}: {first}"[:240]
    from diffopt.backend import model_line

    where = model_line(str(error))  # so a reason names the model's line to change
    text += f"; in the model: {where[0]} ({where[1]})" if where else ""
    frames = traceback.extract_tb(error.__traceback__)
    own = [
        f
        for f in frames
        if any(part in f.filename for part in _OWN) and "/benchmarks/" not in f.filename
    ]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return text
    path = frame.filename
    for anchor in ("site-packages/", str(ROOT) + "/", "/tmp/"):
        if anchor in path:
            path = path.split(anchor, 1)[1]
    return f"{text} (at {path}:{frame.lineno} in {frame.name})"


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Raise `CheckTimeout` in this (main) thread after `seconds`."""

    def fire(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"check timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- tensors ---------------------------------------------------------------------------------


def tensors(value: Any) -> list:
    """The tensors in a nested output (tuples, lists, dicts, diffusers output classes)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors(v)]
    return []


def max_diff(a: Any, b: Any) -> float:
    """Max abs difference over matching tensors (inf when the structures differ)."""
    left, right = tensors(a), tensors(b)
    if not left or len(left) != len(right):
        return float("inf")
    worst = 0.0
    for x, y in zip(left, right, strict=True):
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, (x.float() - y.float()).abs().max().item() if x.numel() else 0.0)
    return worst


# --- the checks of one family ----------------------------------------------------------------


class Family:
    """One family's model, inputs and reference output, and its checks."""

    def __init__(self, name: str) -> None:
        import torch
        from torch import nn

        from diffopt.evaluation import families

        self.spec = families.FAMILIES[name]
        self.model, self.inputs = self.spec.build()
        ran: list[str] = []
        paths = {module: path for path, module in self.model.named_modules()}
        hooks = [
            m.register_forward_hook(lambda mod, args, out: ran.append(paths[mod]))
            for m in self.model.modules()
            if isinstance(m, nn.Linear)
        ]
        try:
            with torch.no_grad():
                self.reference = self.model(**self.fresh())
        finally:
            for hook in hooks:
                hook.remove()
        self.ran_linears = list(dict.fromkeys(ran))

    def fresh(self, **changes: Any) -> dict:
        """A copy of the inputs (some hold state, such as a KV cache), with `changes`."""
        inputs = copy.deepcopy(self.inputs)
        inputs.update(changes)
        return inputs

    def parity(self) -> dict:
        import torch

        import diffopt  # noqa: F401  (the backend registers through the entry point anyway)

        torch._dynamo.reset()
        compiled = torch.compile(self.model, backend="diffopt", options={"inner": "eager"})
        with torch.no_grad():
            out = compiled(**self.fresh())
        diff = max_diff(out, self.reference)
        if diff <= TOLERANCE:
            return cell("ok", f"{diff:.0e}", max_diff=diff)
        return cell("fail", f"{diff:.1e}", f"compiled output differs from the model by {diff:.3g}")

    def inspect(self, config: dict) -> Any:
        import torch

        import diffopt

        torch._dynamo.reset()
        return diffopt.inspect(self.model, self.fresh(), {"inner": "eager", **config})

    def first_break(self) -> str:
        """Where and why dynamo first breaks the graph, in one line."""
        import torch

        torch._dynamo.reset()
        with torch.no_grad():
            found = torch._dynamo.explain(self.model)(**self.fresh())
        torch._dynamo.reset()
        if not found.break_reasons:
            return "no graph break"
        first = found.break_reasons[0]
        where = first.user_stack[-1] if first.user_stack else None
        at = f" at {where.filename.split('site-packages/')[-1]}:{where.lineno}" if where else ""
        reason = " ".join(str(first.reason).split())[:160]
        return f"{found.graph_count} graphs, first break{at}: {reason}"

    def guards(self) -> dict[str, dict]:
        """Cells for regions and the three guards, from one inspect with cache guards on."""
        report = self.inspect({"cache": {"steps": 4}})
        blocks = [b.name for b in report.blocks]
        odd = self.odd_blocks(blocks)
        detail = {"blocks": blocks, "odd_blocks": odd}
        if len(blocks) < 2:
            why = f"only one block ({blocks[0]})" if blocks else "no repeated blocks found"
            if report.graphs > 1:  # graph breaks inside the blocks leave no graph holding two
                why += f" in any graph ({self.first_break()})"
            regions = cell("fail", f"{len(blocks)} blocks", why, **detail)
        elif odd:
            more = f" (and {len(odd) - 3} more)" if len(odd) > 3 else ""
            why = (
                "also taken as blocks: modules outside any ModuleList stack and not between two "
                f"stack blocks (embedders, Sequential members): {', '.join(odd[:3])}{more}"
            )
            regions = cell("partial", f"{len(blocks) - len(odd)}+{len(odd)} blocks", why, **detail)
        else:
            regions = cell("ok", f"{len(blocks)} blocks", **detail)
        cells = {"regions": regions}
        for name in ("step_guard", "block_guard", "token_guard"):
            cells[name] = guard_cell(report, name, len(blocks))
        return cells

    def odd_blocks(self, blocks: list[str]) -> list[str]:
        """Found blocks that are neither an element of a `ModuleList` (the block stacks) nor a
        module called between two such elements (a UNet's mid block): embedders and the members
        of an `nn.Sequential` that region analysis took for repeated blocks."""
        from torch import nn

        modules = dict(self.model.named_modules())

        def in_stack(name: str) -> bool:
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            return isinstance(parent, nn.ModuleList)

        stacked = [in_stack(b) for b in blocks]
        return [
            b
            for i, b in enumerate(blocks)
            if not stacked[i] and not (any(stacked[:i]) and any(stacked[i + 1 :]))
        ]

    def cache_reuse(self, fullgraph: bool = False) -> dict:
        import torch

        import diffopt

        key, scale = self.spec.timestep, self.spec.timestep_scale
        if key is None:
            return cell("skip", "", "no noise-level input: consecutive calls are the same call")
        torch._dynamo.reset()
        options = {"inner": "eager", "cache": {"mode": "plan", "plan": PLAN, "steps": len(PLAN)}}
        compiled = torch.compile(
            self.model, backend="diffopt", options=options, fullgraph=fullgraph
        )
        t0 = self.inputs[key]
        outs, refs = [], []
        with torch.no_grad(), diffopt.request(steps=len(PLAN)) as request:
            for step in range(len(PLAN)):
                value = scale * (0.9 - 0.2 * step)  # decreasing, as in sampling
                t = torch.full_like(t0, round(value) if not t0.is_floating_point() else value)
                outs.append(compiled(**self.fresh(**{key: t})))
                refs.append(self.model(**self.fresh(**{key: t})))
        branches = {str(k): list(v) for k, v in request.actions.items()}
        actions = [a for branch in branches.values() for a in branch]
        work = request.compute()
        full_diff = max(max_diff(outs[i], refs[i]) for i, a in enumerate(PLAN) if a == "full")
        reuse = PLAN.index("reuse")
        reuse_diff = max_diff(outs[reuse], refs[reuse])
        detail = {
            "actions": branches,
            "work": work,
            "full_diff": full_diff,
            "reuse_diff": reuse_diff,
        }
        if not actions and not fullgraph:  # what the reason tells a user to try
            broken = f"no graph took a cache decision ({self.first_break()})"
            try:
                retry = self.cache_reuse(fullgraph=True)
            except Exception as e:
                retry = cell("fail", "", reason_of(e))
            if retry["status"] != "ok":
                return cell("fail", "", f"{broken}; with fullgraph=True: {retry['reason']}")
            why = f"{broken}; torch.compile(..., fullgraph=True) captures one graph and caches"
            detail = {k: v for k, v in retry.items() if k not in ("status", "text", "reason")}
            return cell("partial", f"{retry['text']} with fullgraph=True", why, **detail)
        if not actions:
            return cell("fail", "", "no graph took a cache decision")
        problems = []
        # each guarded graph of a call is a branch of its step (blocks on both sides of a graph
        # break: HunyuanVideo 1.5's token refiner, then its blocks), so each follows the plan
        off = {key: branch for key, branch in branches.items() if branch != PLAN}
        if off:
            problems.append(f"the actions taken {off} (of {len(branches)}) are not the plan {PLAN}")
        if "reuse" not in actions:
            problems.append(f"the plan's reuse step was not taken (actions {actions})")
        if not work < 1:
            problems.append(f"block work {work:.2f} is not below 1")
        if not reuse_diff > 0 or reuse_diff == float("inf"):
            problems.append(f"the reuse call's output equals a full call's (diff {reuse_diff:.2g})")
        if full_diff > TOLERANCE:
            problems.append(f"full calls differ from the model by {full_diff:.3g}")
        if problems:
            return cell("fail", "", "; ".join(problems), **detail)
        return cell("ok", f"work {work:.2f}", **detail)

    def steady(self, cached: dict) -> dict:
        """A cached 20-step request, then a second one, under dynamo's ``fail_on_recompile``
        stance after the first call: a recompile from step to step (a guard on a value that
        changes every step) is an error that names the guard. Run where the cache check ran
        (`cached`, its cell), with ``fullgraph`` where that needed it."""
        import torch

        import diffopt

        if cached["status"] == "skip":
            return cell("skip", "", cached.get("reason"))
        if cached["status"] == "fail":
            return cell("skip", "", "the cache does not run on this family (see cache reuse)")
        fullgraph = "fullgraph=True" in cached.get("text", "")
        key, scale = self.spec.timestep, self.spec.timestep_scale
        torch._dynamo.reset()
        plan = ["full", "full"] + ["reuse", "full"] * ((STEADY_STEPS - 2) // 2)
        options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": len(plan)}}
        compiled = torch.compile(
            self.model, backend="diffopt", options=options, fullgraph=fullgraph
        )
        t0 = self.inputs[key]
        decisions = []
        for request_number in range(2):
            with torch.no_grad(), diffopt.request(steps=len(plan)) as request:
                for step in range(len(plan)):
                    value = scale * (0.95 - 0.9 * step / len(plan))  # decreasing timesteps
                    t = torch.full_like(t0, round(value) if not t0.is_floating_point() else value)
                    first = request_number == 0 and step == 0  # the one call that compiles
                    stance = "default" if first else "fail_on_recompile"
                    with torch.compiler.set_stance(stance):
                        compiled(**self.fresh(**{key: t}))
            # every branch (a graph a break splits off is one) decides once a step
            decisions.append({str(k): len(v) for k, v in request.actions.items()})
        if any(not d or set(d.values()) != {len(plan)} for d in decisions):
            return cell(
                "fail",
                "",
                f"decisions per branch over two {len(plan)}-step requests: {decisions} (each "
                "branch should decide once a step)",
                decisions=decisions,
            )
        how = " with fullgraph=True" if fullgraph else ""
        return cell("ok", f"2×{len(plan)}{how}", decisions=decisions)

    def quant(self, blocks: list[str] | None) -> dict:
        import diffopt

        report = self.inspect({"quant": "w4a4"})
        found = [p for p in report.passes if "quant" in p.name or "w4a4" in p.name]
        if not found:
            return cell("fail", "", "no quantization pass in the inspect report")
        qpass = found[0]
        blocks = blocks if blocks is not None else [b.name for b in report.blocks]
        settings = diffopt.QuantConfig.preset("w4a4")
        rewritten = {e.where for e in qpass.rewritten}
        skipped = {e.where: e.what for e in qpass.skipped}
        inside = [p for p in self.ran_linears if any(p.startswith(b + ".") for b in blocks)]
        excluded, unaccounted, skips = [], [], []
        for path in inside:
            if path in rewritten:
                continue
            if path in skipped:
                skips.append(f"{path}: {skipped[path]}")
            elif not any(fnmatch.fnmatch(path, p) for p in settings.include) or any(
                fnmatch.fnmatch(path, p) for p in settings.exclude
            ):
                excluded.append(path)
            else:
                unaccounted.append(f"{path}{where_read(path, report)}")
        detail = {
            "linears_in_blocks": len(inside),
            "rewritten": len(rewritten),
            "excluded_by_pattern": len(excluded),
            "skipped": skips,
            "unaccounted": unaccounted,
            "pass": qpass.name,
        }
        text = f"{len(rewritten)}/{len(inside)}"
        if unaccounted:
            more = f" (and {len(unaccounted) - 1} more)" if len(unaccounted) > 1 else ""
            why = f"linear not rewritten and not reported by pass {qpass.name}: {unaccounted[0]}"
            return cell("fail", text, why + more, **detail)
        if not rewritten:
            first = skips[0] if skips else "no linear inside the blocks"
            return cell("fail", text, f"nothing rewritten: {first}", **detail)
        if skips:
            more = f" (and {len(skips) - 1} more)" if len(skips) > 1 else ""
            return cell("partial", text, f"skipped {skips[0]}{more}", **detail)
        return cell("ok", text, **detail)

    def unroll_applicable(self) -> str | None:
        """Why `diffopt.unroll` does not fit this class's call, or None when it does."""
        import torch

        spec = self.spec
        latents = self.inputs.get(spec.latents)
        if spec.latents not in ("hidden_states", "sample"):
            return (
                f"unroll passes latents as hidden_states= or sample=; this class takes "
                f"{spec.latents}= ({type(latents).__name__})"
            )
        if not isinstance(latents, torch.Tensor):
            return f"the latents are a {type(latents).__name__}, not a tensor (one per sample)"
        if spec.timestep is None:
            return "the class takes no noise level; unroll passes timestep="
        if spec.timestep != "timestep":
            return f"unroll passes the noise level as timestep=; this class takes {spec.timestep}="
        t = self.inputs[spec.timestep]
        if not isinstance(t, torch.Tensor) or t.shape != (latents.shape[0],):
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"the noise level is {shape}, not one per sample: unroll passes a [B] timestep"
        if isinstance(self.reference, torch.Tensor):
            return (
                "with return_dict=False the forward returns a bare tensor; unroll reads output[0]"
            )
        first = self.reference[0] if isinstance(self.reference, tuple | list) else None
        if not isinstance(first, torch.Tensor):
            kind = type(first).__name__
            return f"output[0] is a {kind} (per-sample tensors), not the batch's prediction"
        return None

    def image_to_video_split(self, latents: Any) -> tuple[Any, Any, int]:
        """(latents, concat, channel axis) for `diffopt.unroll`: where the prediction has fewer
        channels than the input on one axis, the rest are conditioning an image-to-video
        pipeline joins on (HunyuanVideo 1.5, SVD, Kandinsky 6 SR)."""
        out = self.reference[0]
        if out.dim() != latents.dim():
            return latents, None, 1
        differ = [a for a in range(1, latents.dim()) if out.shape[a] != latents.shape[a]]
        if len(differ) != 1 or out.shape[differ[0]] > latents.shape[differ[0]]:
            return latents, None, 1  # same shape, or learned sigma's extra output channels
        axis, kept = differ[0], out.shape[differ[0]]
        rest = latents.shape[axis] - kept
        return latents.narrow(axis, 0, kept), latents.narrow(axis, kept, rest), axis

    def unroll(self, partial: bool) -> dict:
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        import diffopt

        why = self.unroll_applicable()
        if why:
            return cell("skip", "", why)
        spec = self.spec
        latents, concat, axis = self.image_to_video_split(self.inputs[spec.latents])
        cond = {
            k: v
            for k, v in self.fresh().items()
            if k not in (spec.latents, spec.timestep, "return_dict")
        }
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        steps = "1.5" if partial else 2
        sampler = diffopt.unroll(
            self.model,
            scheduler,
            steps,
            timestep_scale=spec.timestep_scale / 1000,
            channel_axis=axis,
        )
        with torch.no_grad():
            eager = sampler(latents.clone(), cond, concat=concat)
        if partial:
            return cell("ok", str(sampler.schedule[-1]))
        torch._dynamo.reset()
        compiled = torch.compile(
            sampler, backend="diffopt", options={"inner": "eager"}, fullgraph=True
        )
        with torch.no_grad():
            out = compiled(latents.clone(), copy.deepcopy(cond), concat=concat)
        diff = max_diff(out, eager)
        if diff <= TOLERANCE:
            return cell("ok", f"{diff:.0e}", max_diff=diff)
        return cell("fail", f"{diff:.1e}", f"compiled sampler differs from eager by {diff:.3g}")

    def export(self) -> dict:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        import diffopt

        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as out:
            diffopt.export(self.model, self.fresh(), {"inner": "eager"}, out=out)
            engine = diffopt.load_engine(out)
            result = engine(**self.fresh())
        diff = max_diff(result, self.reference)
        if diff <= TOLERANCE:
            return cell("ok", f"{diff:.0e}", max_diff=diff)
        # attention in bfloat16 (Sana-WM): torch's own SDPA kernels disagree on the model beyond
        # the tolerance; the engine computes it as the math kernel does (float32 inside)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            on_math = self.model(**self.fresh())
        spread, math_diff = max_diff(on_math, self.reference), max_diff(result, on_math)
        if spread > TOLERANCE and math_diff <= TOLERANCE:
            text = f"{math_diff:.0e} vs math SDPA"
            return cell("ok", text, max_diff=diff, math_sdpa_diff=math_diff, kernel_spread=spread)
        return cell("fail", f"{diff:.1e}", f"engine output differs from the model by {diff:.3g}")


def guard_cell(report: Any, name: str, blocks: int) -> dict:
    found = [p for p in report.passes if name in p.name]
    if not found:
        return cell("fail", "", f"pass {name} did not run (not in the inspect report)")
    guard = found[0]
    rewritten, skipped = guard.rewritten, guard.skipped
    detail = {
        "rewritten": [f"{e.where}: {e.what}" for e in rewritten],
        "skipped": [f"{e.where}: {e.what}" for e in skipped],
    }
    first = f"{skipped[0].where}: {skipped[0].what}" if skipped else None
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    if not rewritten:
        why = first + more if first else f"{name} rewrote nothing and reported no reason"
        return cell("fail", "", why, **detail)
    text = f"{len(rewritten)}/{blocks}" if name == "block_guard" else ""
    if skipped:
        return cell("partial", text, first + more, **detail)
    return cell("ok", text, **detail)


def run_family(name: str, skip_export: bool, check_timeout: int, save: Callable) -> None:
    """Every check of family `name` into its row; `save(row)` after each one, so a process that
    dies or is killed mid-check leaves every finished cell and the name of the one running."""
    import torch

    from diffopt.evaluation import families

    spec = families.FAMILIES[name]
    row: dict[str, Any] = {"family": name, "cells": {}, "seconds": {}, "started": time.time()}

    def check(column: str, fn: Callable[[], Any]) -> Any:
        row["running"] = column
        save(row)
        start = time.perf_counter()
        try:  # with the dynamo settings the class needs (`Family.dynamo`), as a user sets them
            with alarm(check_timeout), torch._dynamo.config.patch(**spec.dynamo):
                value = fn()
        except Exception as error:  # every failure is a cell
            value = cell("fail", "", reason_of(error))
        row["seconds"][column] = round(time.perf_counter() - start, 1)
        if isinstance(value, dict) and "status" not in value:
            row["cells"].update(value)
        else:
            row["cells"][column] = value
        row["running"] = None
        save(row)
        return value

    row["class"] = spec.cls
    family: list[Family] = []

    def build() -> dict:
        family.append(Family(name))
        return cell("ok", f"{sum(p.numel() for p in family[0].model.parameters()):,} params")

    if check("builds", build)["status"] != "ok":
        for column, _ in COLUMNS[1:]:
            row["cells"][column] = cell("skip", "", "does not build")
    else:
        f = family[0]
        check("parity", f.parity)

        def guards() -> dict:
            try:
                return f.guards()
            except Exception as error:  # inspect failed: all four cells say why
                why = reason_of(error)
                columns = ("regions", "step_guard", "block_guard", "token_guard")
                return {c: cell("fail", "", f"inspect failed: {why}") for c in columns}

        check("guards", guards)
        cached = check("cache_reuse", f.cache_reuse)
        check("steady", lambda: f.steady(cached))
        blocks = row["cells"].get("regions", {}).get("blocks")
        check("quant", lambda: f.quant(blocks))
        check("unroll", lambda: f.unroll(partial=False))
        check("unroll_partial", lambda: f.unroll(partial=True))
        if skip_export:
            row["cells"]["export"] = cell("skip", "not run")  # the header says --skip-export
        else:
            check("export", f.export)
    row["done"] = True
    save(row)


def run_children(names: list[str], args: argparse.Namespace) -> None:
    """Child process: the families in turn, all rows in one JSON file (replaced atomically)."""
    rows: dict[str, dict] = {}

    def save(row: dict) -> None:
        rows[row["family"]] = row
        partial = args.result.with_suffix(".tmp")
        partial.write_text(json.dumps(rows, default=str))
        os.replace(partial, args.result)

    for name in names:
        run_family(name, args.skip_export, args.check_timeout, save)


def where_read(path: str, report: Any) -> str:
    """`` (read in region X)``: the region whose code reads this linear's weight, if any."""
    mangled = "_modules_".join(path.split(".")) + "_parameters_weight"
    regions = [name for name, code in report.code_before.items() if mangled in code]
    return f" (its weight is read in region {', '.join(regions)})" if regions else ""


# --- the parent: one process per family, then the table --------------------------------------


def run_worker(names: list[str], args: argparse.Namespace, report: Callable) -> None:
    """Run `names` in child processes: one child takes the families in turn; a family that
    outlives --timeout is killed, a crash ends only its child, and the next child resumes
    after that family."""
    remaining = list(names)
    env = dict(os.environ)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    while remaining:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            result = Path(handle.name)
        command = [sys.executable, __file__, "--child", *remaining, "--result", str(result)]
        command += ["--check-timeout", str(args.check_timeout)]
        command += ["--skip-export"] if args.skip_export else []
        with tempfile.TemporaryFile(mode="w+") as log:
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
            rows, killed = watch(child, result, args, report)
            log.seek(0)
            tail = [line for line in log.read().splitlines() if line.strip()]
        result.unlink(missing_ok=True)
        done = [n for n in remaining if rows.get(n, {}).get("done")]
        unfinished = [n for n in remaining if n not in done]
        if not unfinished:
            return
        # the first unfinished family is the one the child was running when it ended
        name = unfinished[0]
        row = rows.get(name) or {"family": name, "cells": {}, "seconds": {}, "running": "builds"}
        row.setdefault("started", time.time())
        why = (
            f"family timed out after {args.timeout} s during this check"
            if killed
            else "family process crashed during this check"
            + (f": {tail[-1].strip()[:200]}" if tail else "")
        )
        report(finish(row, why, args))
        remaining = unfinished[1:]


def watch(
    child: subprocess.Popen, result: Path, args: argparse.Namespace, report: Callable
) -> tuple[dict[str, dict], bool]:
    """Poll a child's rows until it exits (or, past --timeout on one family, kill it); report
    each finished family once. Returns the last rows read and whether the child was killed."""
    reported: set[str] = set()
    rows: dict[str, dict] = {}
    while True:
        exited = child.poll() is not None
        with contextlib.suppress(OSError, json.JSONDecodeError):
            rows = json.loads(result.read_text())
        for name, row in rows.items():
            if row.get("done") and name not in reported:
                reported.add(name)
                report(finish(row, None, args))
        current = [row for row in rows.values() if not row.get("done")]
        if exited:
            return rows, False
        if current and time.time() - current[0]["started"] > args.timeout:
            child.kill()
            child.wait()
            return rows, True
        time.sleep(1)


def finish(row: dict, why: str | None, args: argparse.Namespace) -> dict:
    """A row with every column filled: the running check gets `why`, the rest 'not reached'."""
    row = copy.deepcopy(row)
    running = row.pop("running", None)
    if why and running:
        targets = ["regions", "step_guard", "block_guard", "token_guard"]
        for column in targets if running == "guards" else [running]:
            row["cells"][column] = cell("fail", "", why)
    for column, _ in COLUMNS:
        row["cells"].setdefault(column, cell("skip", "", f"not reached ({running} ended the run)"))
    row["total_seconds"] = round(sum(row.get("seconds", {}).values()), 1)
    row.pop("started", None)
    row.pop("done", None)
    return row


def render(rows: list[dict], meta: dict) -> str:
    """The markdown page: table (footnote numbers on ✗ / ◐ / – cells), totals, reasons."""
    notes: dict[str, int] = {}
    users: dict[str, list[str]] = {}

    def mark(name: str, column: str, c: dict) -> str:
        text = MARK[c["status"]] + (f" {c['text']}" if c.get("text") else "")
        if c.get("reason") and c["status"] != "ok":
            number = notes.setdefault(c["reason"], len(notes) + 1)
            users.setdefault(c["reason"], []).append(f"{name} ({column})")
            text += f" [{number}]"
        return text.replace("|", "\\|")

    header = ["family", "class", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [mark(row["family"], title, row["cells"][key]) for key, title in COLUMNS]
        lines.append(f"| {row['family']} | {row.get('class', '')} | " + " | ".join(cells) + " |")
    totals = []
    for key, title in COLUMNS:
        counts = {s: sum(r["cells"][key]["status"] == s for r in rows) for s in MARK}
        totals.append(
            f"| {title} | {counts['ok']} | {counts['partial']} | {counts['fail']} | "
            f"{counts['skip']} |"
        )
    reasons = [
        f"{number}. {reason.replace('|', '/')}  \n   {', '.join(users[reason])}"
        for reason, number in notes.items()
    ]
    return "\n".join(
        [
            "# Coverage matrix: every diffusers denoiser family, every pass",
            "",
            f"`python benchmarks/coverage_matrix.py{meta['arguments']}` — {meta['families']} "
            f"families, {meta['seconds']:.0f} s on {meta['machine']}; diffusers "
            f"{meta['diffusers']}, torch {meta['torch']}, diffopt at {meta['commit']}.",
            "",
            *(
                [
                    "Re-run since, with the fixed script or tree: "
                    + "; ".join(
                        f"{', '.join(n for n, h in meta['rerun'].items() if h == how)} "
                        f"(`python benchmarks/coverage_matrix.py{how}`)"
                        for how in dict.fromkeys(meta["rerun"].values())
                    )
                    + ".",
                    "",
                ]
                if meta.get("rerun")
                else []
            ),
            f"Installed diffusers denoiser-package classes: {meta['installed']}; "
            f"{meta['families']} have a tiny family here, "
            f"{len(meta['excluded'])} are not denoisers: "
            + "; ".join(f"{name} ({why})" for name, why in meta["excluded"].items())
            + ".",
            "",
            "✓ works · ◐ works with parts skipped (the reason says which) · ✗ fails · "
            "– not applicable. Numbers in brackets are the reasons listed below the table."
            + (" The export check was not run (--skip-export)." if meta["skip_export"] else ""),
            "",
            *lines,
            "",
            "## Totals",
            "",
            "| column | ✓ | ◐ | ✗ | – |",
            "|---|---|---|---|---|",
            *totals,
            "",
            "## Reasons",
            "",
            *reasons,
            "",
        ]
    )


def metadata(args: argparse.Namespace, names: list[str], seconds: float) -> dict:
    import diffusers
    import torch

    from diffopt.evaluation import families

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    arguments = "".join(f" {a}" for a in sys.argv[1:])
    return {
        "arguments": arguments,
        "families": len(names),
        "seconds": seconds,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, jobs={args.jobs}",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "commit": commit,
        "skip_export": args.skip_export,
        "installed": len(families.denoiser_classes()),
        "excluded": families.EXCLUDED,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", help="family names (default: all)")
    parser.add_argument("--skip-export", action="store_true", help="leave the export check out")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per family process")
    parser.add_argument("--check-timeout", type=int, default=300, help="seconds per check")
    parser.add_argument("--jobs", type=int, default=1, help="families run at once")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where coverage.md/.json go")
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun --families into the existing coverage.json (the other rows stay)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        run_children(args.child, args)
        return

    from diffopt.evaluation import families

    names = args.families or sorted(families.FAMILIES)
    unknown = [n for n in names if n not in families.FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(families.FAMILIES)}")
    start = time.perf_counter()
    rows: dict[str, dict] = {}

    def report(row: dict) -> None:
        rows[row["family"]] = row
        marks = " ".join(MARK[row["cells"][k]["status"]] for k, _ in COLUMNS)
        print(f"{row['family']:34s} {marks}  ({row['total_seconds']:.0f} s)", flush=True)

    shares = [names[i :: args.jobs] for i in range(args.jobs)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda share: run_worker(share, args, report), shares))
    meta = metadata(args, names, time.perf_counter() - start)
    previous = args.out / "coverage.json"
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        rerun = {**old["meta"].get("rerun", {}), **{n: meta["arguments"] for n in names}}
        rows = {**{row["family"]: row for row in old["rows"]}, **rows}
        order = [row["family"] for row in old["rows"]]
        names = order + [n for n in names if n not in order]
        meta = {**meta, **old["meta"], "rerun": rerun}
    ordered = [rows[n] for n in names]
    page = render(ordered, meta)
    print(page)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.md").write_text(page)
    payload = {
        "meta": meta,
        "installed": sorted(families.denoiser_classes()),
        "missing": families.missing(),
        "rows": ordered,
    }
    (args.out / "coverage.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
