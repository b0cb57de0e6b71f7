"""Shared memory of the W4A4 Triton kernels on Hopper (sm_90), without a GPU.

Compiles both kernels for sm_90 down to LLVM IR with Triton's own compiler (no ptxas or driver
needed) and reads the shared memory each tile setting asks for, against the H100 / H200 limit.
A setting over it fails at launch with OutOfResources; this finds that on any machine, before a
GPU lease is spent on it. Exits 1 if a default setting does not fit.

    python benchmarks/kernel_resources.py            # default tiles, FLUX's K = 3072
    python benchmarks/kernel_resources.py --grids    # also every sweep setting (minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, never interpret
os.environ.setdefault("TRITON_MOCK_PTX_VERSION", "12.8")  # no ptxas here to ask for its version

import torch
from tabulate import tabulate
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend

from diffopt.kernels import triton_quant as tk

SM90 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232_448
"""Bytes of shared memory one program may use on sm_90 (227 KB)."""


LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def shared_bytes(kernel, signature: dict, settings: dict) -> int:
    """Shared memory of `kernel` compiled for sm_90 with one launch's `settings` (its
    compile-time constants and launch options, as the kernels' wrappers build them)."""
    from triton._C.libtriton import ir

    backend = make_backend(SM90)
    constants = {k: v for k, v in settings.items() if k not in LAUNCH_OPTIONS}
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    # every runtime argument as divisible by 16, as FLUX's shapes and torch's allocations are
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, v in enumerate(signature.values())
        if v != "constexpr"
    }
    source = ASTSource(kernel, signature, constants, attrs)
    opts = backend.parse_options({k: v for k, v in settings.items() if k in LAUNCH_OPTIONS})
    stages: dict = {}
    backend.add_stages(stages, opts, source.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(
        SM90, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context
    )
    metadata: dict = {}
    for stage in ("ttir", "ttgir", "llir"):
        module = stages[stage](module, metadata)
    return metadata["shared"]


def rotate_quantize_bytes(
    tiles: tk.Tiles, group: int, dtype: torch.dtype, scale_group: int | None = None, rank: int = 0
) -> int:
    """The 4-bit rotate-quantize launch with `group`-sized rotations (and SVDQuant's layout:
    `scale_group` values a scale, a rank-`rank` branch)."""
    pointer = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    signature = dict(
        x_ptr=pointer,
        h_even_ptr=pointer,
        h_odd_ptr=pointer,
        out_ptr="*i8",
        scale_ptr="*fp32",
        down_ptr=pointer,
        branch_ptr="*fp32",
        M="i32",
        K="i32",
        KH="i32",
        R="i32",
        stride_xm="i32",
        stride_om="i32",
    )
    settings = tk.rotate_quantize_settings(4, group, dtype, tiles, scale_group, rank)
    return shared_bytes(tk._rotate_quantize_kernel, signature, settings)


def gemm_bytes(
    tiles: tk.Tiles,
    groups: int = 0,
    scale_group: int | None = None,
    rank: int = 0,
    row_scaled: bool = False,
) -> int:
    """The W4A4 GEMM launch with a bias and bf16 output (and `groups` scale groups of
    `scale_group`, in 8 bits times a scale per row with `row_scaled`, a rank-`rank` branch)."""
    signature = dict(
        a_ptr="*i8",
        b_ptr="*i8",
        a_scale_ptr="*fp32",
        b_scale_ptr="*u8" if row_scaled else "*fp16",
        b_row_ptr="*fp32",
        bias_ptr="*bf16",
        branch_ptr="*fp32",
        up_ptr="*bf16",
        out_ptr="*bf16",
        M="i32",
        N="i32",
        K="i32",
        KH="i32",
        R="i32",
        stride_am="i32",
        stride_bn="i32",
        stride_om="i32",
    )
    settings = tk.int_gemm_settings(4, 4, True, tiles, groups, scale_group, rank, row_scaled)
    return shared_bytes(tk._int_gemm_kernel, signature, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", action="store_true", help="also every sweep setting")
    args = parser.parse_args()
    cases = [
        ("default", "rotate+quantize", tk.Tiles(), dtype)
        for dtype in (torch.bfloat16, torch.float32)
    ]
    cases.append(("default", "int4 GEMM", tk.Tiles(), torch.bfloat16))
    # SVDQuant's layout at K = 3072: scales per 64 along K, a rank-32 branch fused in
    cases.append(("default", "rotate+quantize g64 r32", tk.Tiles(), torch.bfloat16))
    cases.append(("default", "int4 GEMM g64 r32", tk.Tiles(), torch.bfloat16))
    cases.append(("default", "int4 GEMM g64q8 r32", tk.Tiles(), torch.bfloat16))  # 8-bit scales
    if args.grids:
        sys.path.insert(0, str(Path(__file__).parent))
        from w4a4_gpu import GEMM_GRID, QUANT_GRID

        cases += [("sweep", "rotate+quantize", t, torch.bfloat16) for t in QUANT_GRID]
        cases += [("sweep", "int4 GEMM", t, torch.bfloat16) for t in GEMM_GRID]
    rows, defaults_fit = [], True
    for origin, kernel, tiles, dtype in cases:
        svdquant = kernel.endswith(" r32")
        if kernel.startswith("int4 GEMM"):
            row_scaled = "g64q8" in kernel
            used = gemm_bytes(tiles, 48, 64, 32, row_scaled) if svdquant else gemm_bytes(tiles)
            shown = (
                tiles.block_m,
                tiles.block_n,
                tiles.block_kh,
                "join" if tiles.join_k else "2 dots",
            )
        else:  # FLUX's K = 3072 takes 256-groups
            used = rotate_quantize_bytes(tiles, 256, dtype, *((64, 32) if svdquant else ()))
            shown = (tiles.quant_block_m, tiles.chunk)
        fits = used <= SHARED_LIMIT
        defaults_fit &= fits or origin != "default"
        rows.append(
            [
                origin,
                kernel,
                str(dtype).removeprefix("torch."),
                shown,
                tiles.num_warps,
                tiles.num_stages,
                used,
                "yes" if fits else "NO",
            ]
        )
    headers = [
        "tiles",
        "kernel",
        "dtype",
        "blocks",
        "warps",
        "stages",
        "shared bytes",
        f"fits {SHARED_LIMIT}",
    ]
    print(tabulate(rows, headers, tablefmt="github"))
    sys.exit(0 if defaults_fit else 1)


if __name__ == "__main__":
    main()
