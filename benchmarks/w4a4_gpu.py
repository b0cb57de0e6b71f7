"""The fused W4A4 linear against bf16 ``F.linear`` at FLUX shapes, on a CUDA GPU.

Times the whole op (rotation and activation quantization included: two kernel launches)
against cuBLAS bf16, checks it against the PyTorch reference first, and reports achieved int8
TOPS against the card's dense int8 peak (H100 SXM: 1979 TOPS; pass --peak for another card).

    python benchmarks/w4a4_gpu.py              # M=4096; K=N=3072 and K=3072, N=12288
    python benchmarks/w4a4_gpu.py --tokens 1024 4096
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from tabulate import tabulate

import diffopt.kernels  # noqa: F401  (registers diffopt::w4a4_linear)
from diffopt.kernels import default_group, hadamard, quantize_weight
from diffopt.kernels.reference import rotated_linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--peak", type=float, default=1979.0, help="dense int8 TOPS of the card")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; on CPU the op runs its reference")
    from triton.testing import do_bench

    rows = []
    for m in args.tokens:
        for k, n in ((3072, 3072), (3072, 12288)):
            torch.manual_seed(0)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            h = hadamard("regular", default_group(k)).cuda()
            stored, scale = quantize_weight(w, 4, h)
            op = torch.ops.diffopt.w4a4_linear.default
            fused = op(x, stored, scale, bias, h, 4, 4)
            expected = rotated_linear(x, stored, scale, bias, h, 4, 4)
            error = ((fused.float() - expected.float()).abs().max() / expected.abs().max()).item()
            t_bf16 = do_bench(partial(F.linear, x, w, bias))
            t_w4a4 = do_bench(partial(op, x, stored, scale, bias, h, 4, 4))
            tops = 2 * m * n * k / (t_w4a4 * 1e-3) / 1e12
            rows.append([
                f"{m}×{k}×{n}", f"{t_bf16 * 1e3:.1f}", f"{t_w4a4 * 1e3:.1f}",
                f"{t_bf16 / t_w4a4:.2f}×", f"{tops:.0f}", f"{tops / args.peak:.1%}", f"{error:.1e}",
            ])  # fmt: skip
    print(torch.cuda.get_device_name())
    headers = ["M×K×N", "bf16 µs", "W4A4 µs", "speedup", "int8 TOPS", "of peak", "rel. error"]
    print(tabulate(rows, headers, tablefmt="github"))


if __name__ == "__main__":
    main()
