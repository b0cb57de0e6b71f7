"""The Triton kernels, run by Triton's interpreter on CPU, against the PyTorch reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Integer parts must agree
exactly; the dequantized output within float32 rounding (it is in fact bit-identical here).
With ``DIFFOPT_TEST_DEVICE=cuda`` (benchmarks/gpu_session.sh) the same tests run the compiled
kernels on the GPU, still against the reference on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

from diffopt.kernels import hadamard, pack_int4, quantize_weight
from diffopt.kernels import reference as ref
from diffopt.kernels import triton_quant as tk

DEVICE = os.environ.get("DIFFOPT_TEST_DEVICE", "cpu")
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs DIFFOPT_TEST_DEVICE=cuda and a GPU")


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """Float outputs of the same integer parts. Interpreted, the rotation sums in the same order
    as the reference: 1e-5 (observed: identical). Compiled, the dot's order differs, so a value
    within rounding of a quantization tie may take the next code (one step of one term);
    wrong scales, packing or indexing move the output by O(1) and still fail."""
    got, want = got.cpu().float(), want.cpu().float()
    if DEVICE == "cpu":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        error = ((got - want).norm() / want.norm()).item()
        assert error < 2e-2, error


def on(*tensors):
    """The tensors on the kernels' test device (None stays None)."""
    moved = [None if t is None else t.to(DEVICE) for t in tensors]
    return moved[0] if len(moved) == 1 else moved


SHAPES = [  # (M, K, N): odd M and N, K not a multiple of the kernels' K tile, K < tile
    (33, 64, 24),
    (70, 320, 40),
    (5, 48, 17),
    (1, 256, 7),
]
CASES = [
    (4, 4, "regular"),
    (4, 4, "sylvester"),
    (4, 4, "none"),
    (8, 4, "regular"),
    (4, 8, "regular"),
    (8, 8, "none"),
]


def rotation_for(kind: str, k: int):
    return hadamard(kind, 64 if k % 64 == 0 else 16)


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize(("act_bits", "weight_bits", "kind"), CASES)
def test_rotate_quantize_matches_the_reference_exactly(m, k, n, act_bits, weight_bits, kind):
    torch.manual_seed(m + k)
    # Small integers: every rotated value is an exact dyadic float, so the comparison is exact
    # whatever order the dot sums in (and exact ties exercise the rounding rule).
    x = torch.randint(-3, 4, (m, k)).float()
    h = rotation_for(kind, k)
    values, scale = (t.cpu() for t in tk.rotate_quantize(on(x), act_bits, on(h))[:2])
    expected, expected_scale = ref.quantize_activation(x, act_bits, h)
    if act_bits == 4:
        expected = pack_int4(expected)
    assert torch.equal(values, expected)
    assert torch.equal(scale, expected_scale)


@pytest.mark.parametrize(("m", "k", "n"), [*SHAPES, (9, 41, 10)])
@pytest.mark.parametrize(("a_bits", "b_bits"), [(4, 4), (8, 4), (4, 8), (8, 8)])
def test_int_gemm_accumulates_exactly(m, k, n, a_bits, b_bits):
    if k % 2 and 4 in (a_bits, b_bits):
        pytest.skip("int4 packing needs an even K")
    torch.manual_seed(k)

    def low(bits, rows):
        return torch.randint(
            -(2 ** (bits - 1)),
            2 ** (bits - 1),
            (rows, k),
            dtype=torch.int8,
        )

    a, b = low(a_bits, m), low(b_bits, n)
    stored = lambda v, bits: pack_int4(v) if bits == 4 else v  # noqa: E731
    ones_m, ones_n = torch.ones(m), torch.ones(n, dtype=torch.float16)
    out = tk.int_gemm(
        on(stored(a, a_bits)),
        a_bits,
        on(ones_m),
        on(stored(b, b_bits)),
        b_bits,
        on(ones_n),
        None,
        k,
        torch.float32,
    )
    assert torch.equal(out.cpu(), ref.int_matmul(a, b).float())  # |acc| < 2^24: exact in float32


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize(("act_bits", "weight_bits", "kind"), CASES)
def test_fused_linear_matches_the_reference(m, k, n, act_bits, weight_bits, kind):
    torch.manual_seed(m * n)
    x, w, b = torch.randn(m, k) + 0.3, torch.randn(n, k) / k**0.5, torch.randn(n)
    h = rotation_for(kind, k)
    stored, scale = quantize_weight(w, weight_bits, h)
    got = tk.rotated_linear(*on(x, stored, scale, b, h), act_bits, weight_bits).cpu()
    want = ref.rotated_linear(x, stored, scale, b, h, act_bits, weight_bits)
    assert_matches(got, want)


@pytest.mark.parametrize(("m", "k", "n", "scale_group"), [(33, 64, 24, 32), (70, 320, 40, 64)])
@pytest.mark.parametrize(("act_bits", "weight_bits"), [(4, 4), (8, 4)])
def test_group_scales_are_applied_group_by_group_in_the_gemm(
    m, k, n, scale_group, act_bits, weight_bits
):
    """Per-group dequantization inside the K loop: each tile's int32 sum scaled by its two
    group scales, in the reference's order."""
    torch.manual_seed(m + k)
    x, w, b = torch.randn(m, k) + 0.3, torch.randn(n, k) / k**0.5, torch.randn(n)
    x[:, : k // 4] *= 20  # a loud group
    h = rotation_for("regular", k)
    stored, scale = quantize_weight(w, weight_bits, h, scale_group=scale_group)
    assert scale.shape == (n, k // scale_group)
    got = tk.rotated_linear(*on(x, stored, scale, b, h), act_bits, weight_bits).cpu()
    want = ref.rotated_linear(x, stored, scale, b, h, act_bits, weight_bits)
    assert_matches(got, want)
    # 8-bit group scales (quant.scale_bits=8): uint8 multipliers folded with the row's float32
    # scale as the kernel loads them, the same product as the reference's
    w[: n // 3] *= 1e-3  # small rows: their scales stay normal float32
    stored, q, row = quantize_weight(w, weight_bits, h, True, scale_group, scale_bits=8)
    assert q.dtype == torch.uint8 and row.shape == (n,)
    got = tk.rotated_linear(
        *on(x, stored, q, b, h), act_bits, weight_bits, weight_scale_row=on(row)
    )
    want = ref.rotated_linear(x, stored, ref.group_scales(q, row), b, h, act_bits, weight_bits)
    assert_matches(got, want)
    assert DEVICE != "cpu" or torch.equal(got.cpu(), want)  # interpreted: bit for bit


@pytest.mark.parametrize(("k", "scale_group"), [(64, 32), (320, 64), (768, 128)])
@pytest.mark.parametrize("act_bits", [4, 8])
def test_group_quantization_in_the_kernel_matches_the_reference_exactly(k, scale_group, act_bits):
    """With group scales the kernel quantizes each chunk of column pairs as one group, in its
    single pass over K: codes and scales as `reference.quantize_activation`'s, bit for bit."""
    torch.manual_seed(k)
    x = torch.randint(-3, 4, (37, k)).float()
    x[:, :scale_group] *= 8  # a loud group
    h = rotation_for("regular", k)
    values, scale, _ = tk.rotate_quantize(on(x), act_bits, on(h), scale_group=scale_group)
    expected, expected_scale = ref.quantize_activation(x, act_bits, h, scale_group)
    assert torch.equal(values.cpu(), pack_int4(expected) if act_bits == 4 else expected)
    assert torch.equal(scale.cpu(), expected_scale)


@pytest.mark.parametrize(("rank", "scale_group"), [(32, 64), (5, None), (20, 32)])
def test_the_low_rank_branch_is_fused_into_both_kernels(rank, scale_group):
    """The down projection comes out of the rotate-quantize pass, the up projection goes into
    the GEMM epilogue: the op equals the reference's linear plus its branch (ranks that are
    not a dot's size are padded and masked)."""
    torch.manual_seed(rank)
    m, k, n = 45, 320, 40
    x, w, b = torch.randn(m, k) + 0.3, torch.randn(n, k) / k**0.5, torch.randn(n)
    h = rotation_for("regular", k)
    down, up, _, residual = ref.low_rank_split(w, rank)
    stored, scale = quantize_weight(residual, 4, h, scale_group=scale_group)
    _, _, branch = tk.rotate_quantize(on(x), 4, on(h), scale_group=scale_group, down=on(down))
    torch.testing.assert_close(branch.cpu(), x @ down.float(), rtol=1e-5, atol=1e-4)
    got = tk.rotated_linear(*on(x, stored, scale, b, h), 4, 4, *on(down, up))
    want = ref.rotated_linear(x, stored, scale, b, h, 4, 4) + ref.low_rank_branch(x, down, up)
    assert_matches(got, want)
    # the int8 branch (quant.branch_bits=8) reaches the kernels as the op passes it: folded
    down8, up8, scale8, residual8 = ref.low_rank_split(w, rank, bits=8)
    stored8, wscale8 = quantize_weight(residual8, 4, h, scale_group=scale_group)
    folded = ref.dequantized_branch(down8, up8, scale8, torch.float32)
    got = tk.rotated_linear(*on(x, stored8, wscale8, b, h), 4, 4, *on(*folded))
    want = ref.rotated_linear(x, stored8, wscale8, b, h, 4, 4)
    assert_matches(got, want + ref.low_rank_branch(x, down8, up8, scale8))


@pytest.mark.parametrize(
    "tiles",
    [
        tk.Tiles(
            block_m=32,
            block_n=32,
            block_kh=32,
            quant_block_m=16,
            block_k=32,
            chunk=16,
            num_warps=8,
            num_stages=4,
        ),
        tk.Tiles(block_m=16, block_n=64, block_kh=128, quant_block_m=32, block_k=256, chunk=32),
        tk.Tiles(block_m=32, block_n=32, block_kh=32, join_k=True),
    ],
)
def test_other_tiles_give_the_same_result(tiles):
    """The tiles `benchmarks/w4a4_gpu.py --sweep` tries change speed, never the numbers."""
    torch.manual_seed(0)
    x, w, b = torch.randn(70, 320) + 0.3, torch.randn(40, 320) / 320**0.5, torch.randn(40)
    h = hadamard("regular", 64)
    stored, scale = quantize_weight(w, 4, h)
    assert_matches(
        tk.rotated_linear(*on(x, stored, scale, b, h), 4, 4, tiles=tiles),
        ref.rotated_linear(x, stored, scale, b, h, 4, 4),
    )


@pytest.mark.parametrize("kind", ["regular", "sylvester"])
@pytest.mark.parametrize("act_bits", [4, 8])
# one chunk of a 256-group (128 column pairs) in fp32 needs 546 KiB of shared memory compiled,
# more than Hopper's 227 KiB (benchmarks/kernel_resources.py): the interpreter alone takes it
@pytest.mark.parametrize("chunk", [16, 128] if DEVICE == "cpu" else [16, 32])
def test_256_groups_rotate_in_column_chunks_exactly(kind, act_bits, chunk):
    """FLUX's K = 3072 takes 256-groups: the kernel rotates them `chunk` column pairs at a time."""
    torch.manual_seed(chunk + act_bits)
    x, h = torch.randint(-3, 4, (37, 768)).float(), hadamard(kind, 256)
    tiles = tk.Tiles(quant_block_m=16, block_k=64, chunk=chunk)
    values, scale = (t.cpu() for t in tk.rotate_quantize(on(x), act_bits, on(h), tiles)[:2])
    expected, expected_scale = ref.quantize_activation(x, act_bits, h)
    assert torch.equal(values, pack_int4(expected) if act_bits == 4 else expected)
    assert torch.equal(scale, expected_scale)


@pytest.mark.parametrize(("act_bits", "weight_bits"), [(4, 8), (8, 8)])
def test_odd_k_packs_a_half_byte_for_4_bit_activations(act_bits, weight_bits):
    """K = 33 without rotation (8-bit weights allow an odd K): the last packed activation byte
    holds one value, and the GEMM must read it."""
    torch.manual_seed(33)
    x, w, b = torch.randn(5, 33), torch.randn(17, 33), torch.randn(17)
    stored, scale = quantize_weight(w, weight_bits, None)
    got = tk.rotated_linear(*on(x, stored, scale, b), None, act_bits, weight_bits)
    assert_matches(got, ref.rotated_linear(x, stored, scale, b, None, act_bits, weight_bits))


def test_gpu_benchmark_script_runs_end_to_end_as_a_dry_run(tmp_path):
    """A lent GPU gives minutes: the script must not fail there for a reason the CPU shows."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "w4a4_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--sweep", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "w4a4-gpu.json").read_text())
    for result in report["results"]:
        assert result["checks"]["vs reference"] < 1e-5
        for entries in result["sweep"].values():
            assert all("ms" in e for e in entries), entries


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_op_runs_the_kernels_on_cuda(dtype):
    """On a CUDA tensor `diffopt::quant_linear` dispatches to Triton: same numbers as the
    reference up to the rotation's float order (bf16 / fp16 inputs are rotated by tensor cores)."""
    torch.manual_seed(1)
    x, w, b = torch.randn(300, 3072), torch.randn(1024, 3072) / 3072**0.5, torch.randn(1024)
    h = hadamard("regular", 256)
    stored, scale = quantize_weight(w, 4, h)
    x, b = x.to(dtype), b.to(dtype)
    got = torch.ops.diffopt.quant_linear(*on(x, stored, scale, b, h), 4, 4)
    assert got.is_cuda and got.dtype == dtype
    want = ref.rotated_linear(x.float(), stored, scale, b.float(), h, 4, 4)
    assert_matches(got, want)


def test_default_tiles_fit_hopper_shared_memory():
    """Compiled for sm_90 here (no GPU): the default tiles at FLUX's K = 3072 (256-groups) must
    not ask for more shared memory than an H100 / H200 has, or the op fails at launch there."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "kernel_resources.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]  # 1: a default does not fit


def test_hadamard_columns_are_built_once_per_rotation_and_rebuilt_after_a_change():
    h = hadamard("regular", 16)
    first = tk.hadamard_columns(h, 64, torch.float32, torch.device("cpu"))
    again = tk.hadamard_columns(h, 64, torch.float32, "cpu")
    assert again[0] is first[0] and again[1] is first[1]
    tile = torch.block_diag(*[h] * 4)
    assert torch.equal(first[0], tile[:, 0::2]) and torch.equal(first[1], tile[:, 1::2])
    h.mul_(-1)  # an in-place change must not serve stale columns
    flipped = tk.hadamard_columns(h, 64, torch.float32, torch.device("cpu"))
    assert torch.equal(flipped[0], -first[0])
    with torch.inference_mode():  # no version counter: built afresh, never served stale
        made_there = hadamard("sylvester", 16)
        before = tk.hadamard_columns(made_there, 16, torch.float32, "cpu")[0].clone()
        made_there.mul_(-1)
        assert torch.equal(tk.hadamard_columns(made_there, 16, torch.float32, "cpu")[0], -before)


def test_gpu_benchmark_records_a_failing_kernel_runs_the_rest_and_exits_1(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "w4a4_gpu.py"
    spec = importlib.util.spec_from_file_location("w4a4_gpu_under_test", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources (simulated)")

    monkeypatch.setattr(bench.tk, "int_gemm", broken)
    monkeypatch.setattr(sys, "argv", ["w4a4_gpu.py", "--dry-run", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 1
    results = json.loads((tmp_path / "w4a4-gpu.json").read_text())["results"]
    assert len(results) == 2  # both shapes, though each one's GEMM failed
    for result in results:
        assert "simulated" in result["errors"]["int4 GEMM"]
        assert {"bf16 F.linear", "W4A4 op", "rotate+quantize"} <= set(result["ms"])


def test_tiles_refuse_sizes_triton_cannot_compile():
    with pytest.raises(ValueError, match=r"powers of two of at least 16.*chunk=24"):
        tk.Tiles(chunk=24)
    with pytest.raises(ValueError, match="block_m=8"):
        tk.Tiles(block_m=8)
