"""The bench harness and `diffopt demo`: same seeds, honest ratios, table, plot and grids."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffopt.cli import main
from diffopt.evaluation import bench, peers, zoo


@pytest.fixture(scope="module")
def result():
    reference = zoo.load("ref-dit")
    variants = [bench.baseline(), *bench.diffopt_variants(), peers.first_block_cache(0.2)]
    return bench.run(reference, variants, images=10, repeats=2, steps=6, inner="eager")


def test_baseline_row_is_the_unit(result):
    base = result.rows[0]
    assert base.name == "baseline"
    assert base.time_ratio == 1.0 and base.flops_ratio == 1.0
    assert base.psnr == math.inf and base.ssim == pytest.approx(1.0)
    assert base.flops > 0 and base.peak_mb > 0


def test_variants_are_scored_against_the_baseline(result):
    capture = result.rows[1]  # no caching yet: the same images and FLOPs as the baseline
    assert capture.psnr > 60 and capture.flops_ratio == pytest.approx(1.0)
    fbcache = next(r for r in result.rows if r.family == "peer")
    assert fbcache.flops_ratio < 1.0, "threshold 0.2 must skip some steps' blocks"
    assert fbcache.psnr < capture.psnr
    w4a4 = next(r for r in result.rows if "W4A4" in r.name)  # rotated 4-bit: close, not equal
    assert 20 < w4a4.psnr < 60 and w4a4.flops_ratio == pytest.approx(1.0)


def test_table_and_plot(result, tmp_path):
    table = result.markdown()
    for header in ("time / base", "FLOPs / base", "PSNR dB", "SSIM", "ref-FID", "accuracy"):
        assert header in table
    assert table.count("\n|") == 2 + len(result.rows)  # header, separator, one line per variant
    assert result.plot(tmp_path / "p.png").stat().st_size > 1000


def test_baseline_must_come_first():
    with pytest.raises(ValueError, match="first variant must be the baseline"):
        bench.run(zoo.load("ref-dit"), bench.diffopt_variants(), images=2)


def test_demo_writes_table_and_grids(tmp_path, capsys):
    args = ["demo", "--images", "10", "--steps", "12", "--repeats", "1", "--inner", "eager"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| baseline" in out and "| diffopt cache (auto, 30 dB)" in out
    assert "| diffopt W4A4 (rotated)" in out
    assert len(list(tmp_path.glob("grid_*.png"))) == 4  # baseline, capture, cache, w4a4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["name"] == "baseline"


def test_a_grid_of_clips_lays_each_clips_frames_side_by_side(tmp_path):
    import matplotlib.image

    clips = torch.linspace(-1, 1, 3).reshape(3, 1, 1, 1, 1).expand(3, 1, 4, 6, 5)  # [N, C, T, H, W]
    clips = clips.clone()
    clips[:, :, -1] = 1.0  # the last frame of every clip is white
    path = bench.save_grid(clips, tmp_path / "clips.png", columns=2)
    grid = matplotlib.image.imread(path)[..., 0]
    assert grid.shape == (2 * (6 + 2), 2 * (4 * 5 + 2))  # two rows of tiles, T * W wide each
    first = grid[1:7, 1:21]  # clip 0's tile inside its border
    assert first[:, :15].max() == 0.0 and first[:, 15:].min() == 1.0  # frames 0-2 black, 3 white
