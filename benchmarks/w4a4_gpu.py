"""The fused W4A4 linear against bf16 ``F.linear`` at FLUX shapes, on a CUDA GPU.

Times the whole op (rotation and activation quantization included: two kernel launches) and
each kernel alone against cuBLAS bf16, and the op with SVDQuant's layout (scales per 64 along K
and a rank-32 branch: the group-scaled GEMM kernel, the rest PyTorch ops for now), after
checking the op against the PyTorch reference and against a float64 linear (each kernel alone
is checked by the sweep and by tests/kernels), and reports achieved int8 TOPS against the
card's dense int8 peak (H100 / H200 SXM: 1979 TOPS; pass --peak for another card). Inputs
rotate among several buffers so that repeated runs do not just measure the L2 cache.

``--sweep`` also times a grid of tile sizes for each kernel (`kernels.triton_quant.Tiles`),
checks each against the reference's output, and prints the fastest: one run on a lent GPU
gives the tiles to make the default. Full numbers go to ``$OUT/w4a4-gpu.json`` (or --out).

    python benchmarks/w4a4_gpu.py                    # M=4096; K=N=3072 and K=3072, N=12288
    python benchmarks/w4a4_gpu.py --sweep --tokens 1024 4096
    python benchmarks/w4a4_gpu.py --dry-run          # CPU, Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # before triton is imported: kernels run on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from tabulate import tabulate

import diffopt.kernels  # noqa: F401  (registers diffopt::quant_linear)
from diffopt.kernels import default_group, hadamard, quantize_weight
from diffopt.kernels import triton_quant as tk
from diffopt.kernels.reference import (
    dequantize,
    group_scales,
    int_matmul,
    low_rank_branch,
    low_rank_split,
    pack_int4,
    quantize_activation,
    rotated_linear,
    unpack_int4,
)

BUFFERS = 4
"""Input sets the timed calls cycle through (4096×3072 bf16 is 24 MiB: L2-sized alone)."""

GEMM_GRID = [  # 128×256 int32 accumulators over 4 warps would spill: 8 warps there
    tk.Tiles(block_m=bm, block_n=bn, block_kh=bk, num_warps=w, num_stages=s, join_k=join)
    for bm, bn, bk, (w, s), join in itertools.product(
        (64, 128), (128, 256), (64, 128), ((4, 3), (8, 3), (8, 4)), (False, True)
    )
    if not (bm == 128 and bn == 256 and w == 4)
]
QUANT_GRID = [  # K = 3072 takes 256-groups: the K tile is 256 whatever block_k says
    tk.Tiles(quant_block_m=bm, chunk=c, num_warps=w, num_stages=s)
    for bm, c, (w, s) in itertools.product(
        (16, 32, 64, 128), (16, 32, 64), ((4, 1), (4, 3), (8, 3))
    )
]
"""benchmarks/kernel_resources.py --grids: with 3 stages, 64×64 and 128×64 need more than sm_90's
shared memory (they are kept: the sweep records OutOfResources like any failed setting)."""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN anywhere gives NaN."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def cycling(fn, inputs):
    """A no-argument callable that calls `fn` on the next input set each time."""
    state = itertools.cycle(inputs)
    return lambda: fn(*next(state))


def make_timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        # `rep`: milliseconds of repeated calls; the sweep uses less (its settings are many)
        return lambda fn, rep=200: do_bench(fn, warmup=rep // 8, rep=rep, return_mode="median")

    def wall_ms(fn, rep=None, repeats: int = 3) -> float:  # --dry-run: checks the script only
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall_ms


def measure(m: int, k: int, n: int, device: str, dtype: torch.dtype, grids: dict | None, timer):
    """One shape: checks, then times (and sweeps `grids` of tiles). Every number in a dict; a
    kernel that fails is recorded under "errors" and the rest still runs."""
    gen = torch.Generator(device=device).manual_seed(m + k + n)
    xs = [torch.randn(m, k, device=device, dtype=dtype, generator=gen) for _ in range(BUFFERS)]
    w = (torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, device=device, dtype=dtype, generator=gen)
    h = hadamard("regular", default_group(k)).to(device)
    stored, scale = quantize_weight(w, 4, h)
    op = torch.ops.diffopt.quant_linear.default
    x = xs[0]
    result: dict = {"shape": [m, k, n], "checks": {}, "ms": {}, "errors": {}}

    def attempt(name: str, work) -> None:
        try:
            work()
        except Exception as e:  # recorded with its reason, never hidden
            result["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    def check_op() -> None:
        fused = op(x, stored, scale, bias, h, 4, 4)
        result["checks"] = {
            # the same integer parts; float order differs in the rotation's dot (bf16 inputs)
            "vs reference": relative_error(fused, product),
            # what 4 bits cost: against the unquantized linear in float64
            "vs float64 linear": relative_error(
                fused, F.linear(x.double(), w.double(), bias.double())
            ),
            "all finite": bool(torch.isfinite(fused).all()),
        }
        if not result["checks"]["all finite"] or result["checks"]["vs reference"] > 1e-2:
            raise RuntimeError(f"the fused op disagrees with the reference: {result['checks']}")

    # the kernels' inputs and outputs from the PyTorch reference, so that each kernel is checked
    # and timed on its own even when the other fails
    codes, act_scale = quantize_activation(x, 4, h)
    packed = pack_int4(codes)
    product = dequantize(int_matmul(codes, unpack_int4(stored)), act_scale, scale, bias, dtype)
    per_input = [(xi,) for xi in xs]
    # SVDQuant's layout: scales per 64 along K and a rank-32 branch, fused: the rotate-quantize
    # kernel quantizes per group and computes x·down, the GEMM scales group by group and adds
    # the up projection in its epilogue
    down, up, _, residual = low_rank_split(w, 32)
    g_stored, g_scale = quantize_weight(residual, 4, h, scale_group=64)
    down, up = down.to(dtype), up.to(dtype)
    # the same with the branch in int8 (quant.branch_bits=8): the op upcasts it per call
    down8, up8, scale8, residual8 = low_rank_split(w, 32, bits=8)
    g8_stored, g8_scale = quantize_weight(residual8, 4, h, scale_group=64)
    # and the group scales in 8 bits (quant.scale_bits=8): the GEMM folds q · s_row at load
    q8 = quantize_weight(residual8, 4, h, scale_group=64, scale_bits=8)

    def check_group_op() -> None:
        got = op(x, g_stored, g_scale, bias, h, 4, 4, down, up)
        want = rotated_linear(x, g_stored, g_scale, bias, h, 4, 4) + low_rank_branch(
            x, down, up
        ).to(dtype)
        result["checks"]["g64 r32 vs reference"] = relative_error(got, want)
        result["checks"]["g64 r32 vs float64 linear"] = relative_error(
            got, F.linear(x.double(), w.double(), bias.double())
        )
        got8 = op(x, *q8[:2], bias, h, 4, 4, down8, up8, None, scale8, q8[2])
        want8 = rotated_linear(x, q8[0], group_scales(*q8[1:]), bias, h, 4, 4)
        want8 = want8 + low_rank_branch(x, down8, up8, scale8).to(dtype)
        result["checks"]["g64q8 r32 b8 vs reference"] = relative_error(got8, want8)
        if max(result["checks"][f"{c} vs reference"] for c in ("g64 r32", "g64q8 r32 b8")) > 1e-2:
            raise RuntimeError(f"the group-scale op disagrees with the reference: {result}")

    timed = {
        "bf16 F.linear": cycling(lambda xi: F.linear(xi, w, bias), per_input),
        "W4A4 op": cycling(lambda xi: op(xi, stored, scale, bias, h, 4, 4), per_input),
        "W4A4 g64 r32 op": cycling(
            lambda xi: op(xi, g_stored, g_scale, bias, h, 4, 4, down, up), per_input
        ),
        "W4A4 g64 r32 int8-branch op": cycling(
            lambda xi: op(xi, g8_stored, g8_scale, bias, h, 4, 4, down8, up8, None, scale8),
            per_input,
        ),
        "W4A4 g64q8 r32 int8-branch op": cycling(
            lambda xi: op(xi, *q8[:2], bias, h, 4, 4, down8, up8, None, scale8, q8[2]),
            per_input,
        ),
        "rotate+quantize": cycling(lambda xi: tk.rotate_quantize(xi, 4, h), per_input),
        "int4 GEMM": lambda: tk.int_gemm(packed, 4, act_scale, stored, 4, scale, bias, k, dtype),
    }
    attempt("op check", check_op)
    attempt("g64 r32 op check", check_group_op)
    for name, fn in timed.items():
        if name == "W4A4 op" and "op check" in result["errors"]:
            continue
        if name.startswith("W4A4 g64") and "g64 r32 op check" in result["errors"]:
            continue
        attempt(name, lambda name=name, fn=fn: result["ms"].__setitem__(name, timer(fn)))
    if grids:
        result["sweep"] = {
            "rotate+quantize": _sweep(
                grids["rotate+quantize"],
                lambda t: tk.rotate_quantize(x, 4, h, t)[0],
                packed,
                timer,
                max_differing=1e-3,  # a code at a rounding tie may flip (dot order)
            ),
            "int4 GEMM": _sweep(
                grids["int4 GEMM"],
                lambda t: tk.int_gemm(packed, 4, act_scale, stored, 4, scale, bias, k, dtype, t),
                product,
                timer,
                max_differing=1e-3,
            ),
        }
    return result


def _sweep(grid, run, want: torch.Tensor, timer, max_differing: float) -> list[dict]:
    """Time each tile setting whose output matches the reference's `want`; a setting that fails
    to compile or differs is kept in the list with the reason, never silently dropped."""
    out = []
    for tiles in grid:
        entry = {"tiles": vars(tiles)}
        try:
            differ = (run(tiles) != want).float().mean().item()
            if differ > max_differing:
                entry["error"] = f"{differ:.1e} of the outputs differ from the reference"
            else:
                entry["ms"] = timer(lambda t=tiles: run(t), rep=50)
        except Exception as e:  # a tile too large for shared memory, etc.: recorded
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out.append(entry)
    return sorted(out, key=lambda e: e.get("ms", float("inf")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--peak", type=float, default=1979.0, help="dense int8 TOPS of the card")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes"
    )
    args = parser.parse_args()
    if args.dry_run:
        device, dtype, shapes = "cpu", torch.float32, [(48, 64, 32), (48, 64, 80)]
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
        shapes = [(m, k, n) for m in args.tokens for k, n in ((3072, 3072), (3072, 12288))]
    else:
        raise SystemExit(
            "this benchmark needs a CUDA GPU (on CPU the op runs its reference); "
            "--dry-run checks the script on CPU"
        )
    timer = make_timer(device)
    grids = None
    if args.sweep:  # a dry run tries two settings of each grid
        grids = {"rotate+quantize": QUANT_GRID, "int4 GEMM": GEMM_GRID}
        grids = {kernel: grid[:2] if args.dry_run else grid for kernel, grid in grids.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(device_name, f"(peak {args.peak:.0f} int8 TOPS)", flush=True)
    results, table = [], []
    for m, k, n in shapes:  # written and printed shape by shape: a cut-off run keeps the rest
        try:
            result = measure(m, k, n, device, dtype, grids, timer)
        except Exception as e:  # the reference set-up itself failed: recorded
            result = {
                "shape": [m, k, n],
                "checks": {},
                "ms": {},
                "errors": {"set-up": f"{type(e).__name__}: {e}"},
            }
        results.append(result)
        table.append(table_row(result, args.peak))
        report = {"device": device_name, "torch": torch.__version__, "results": results}
        (args.out / "w4a4-gpu.json").write_text(json.dumps(report, indent=2) + "\n")
        for kernel, tiles in result.get("best tiles", {}).items():
            print(f"{result['shape']} fastest {kernel}: {tiles}")
        for name, error in result["errors"].items():
            print(f"{result['shape']} {name} FAILED: {error}")
        print(
            tabulate(
                table, HEADERS + (["speedup, best tiles"] if grids else []), tablefmt="github"
            ),
            flush=True,
        )
    if any(r["errors"] for r in results):
        sys.exit(1)


HEADERS = [
    "M×K×N",
    "bf16 µs",
    "W4A4 µs",
    "quant µs",
    "GEMM µs",
    "speedup",
    "op TOPS",
    "GEMM of peak",
    "err vs ref",
    "err vs fp64",
    "g64 r32 µs",
    "g64 r32 speedup",
    "g64 r32 err vs fp64",
    "int8 branch speedup",
    "+ 8-bit scales speedup",
]


def table_row(result: dict, peak: float) -> list[str]:
    """One shape's line of the table (nan where a kernel failed); notes its best tiles."""
    nan = float("nan")
    m, k, n = result["shape"]
    names = ["bf16 F.linear", "W4A4 op", "rotate+quantize", "int4 GEMM", "W4A4 g64 r32 op"]
    names += ["W4A4 g64 r32 int8-branch op", "W4A4 g64q8 r32 int8-branch op"]
    ms = {name: result["ms"].get(name, nan) for name in names}
    tera_ops = 2 * m * n * k / 1e12
    checks = result["checks"]
    row = [
        f"{m}×{k}×{n}",
        f"{ms['bf16 F.linear'] * 1e3:.1f}",
        f"{ms['W4A4 op'] * 1e3:.1f}",
        f"{ms['rotate+quantize'] * 1e3:.1f}",
        f"{ms['int4 GEMM'] * 1e3:.1f}",
        f"{ms['bf16 F.linear'] / ms['W4A4 op']:.2f}×",
        f"{tera_ops / (ms['W4A4 op'] * 1e-3):.0f}",
        f"{tera_ops / (ms['int4 GEMM'] * 1e-3) / peak:.1%}",
        f"{checks.get('vs reference', nan):.1e}",
        f"{checks.get('vs float64 linear', nan):.1e}",
        f"{ms['W4A4 g64 r32 op'] * 1e3:.1f}",
        f"{ms['bf16 F.linear'] / ms['W4A4 g64 r32 op']:.2f}×",
        f"{checks.get('g64 r32 vs float64 linear', nan):.1e}",
        f"{ms['bf16 F.linear'] / ms['W4A4 g64 r32 int8-branch op']:.2f}×",
        f"{ms['bf16 F.linear'] / ms['W4A4 g64q8 r32 int8-branch op']:.2f}×",
    ]
    if "sweep" in result:
        best = {kernel: entries[0] for kernel, entries in result["sweep"].items()}
        row.append(f"{ms['bf16 F.linear'] / sum(e.get('ms', nan) for e in best.values()):.2f}×")
        result["best tiles"] = {kernel: e["tiles"] for kernel, e in best.items() if "ms" in e}
    return row


if __name__ == "__main__":
    main()
