"""benchmarks/cache_sweep.py's comparison at equal quality: each peer against diffopt at the
peer's PSNR, read off diffopt's measured rows."""

from __future__ import annotations

import pytest


@pytest.fixture
def sweep(benchmark_script):
    return benchmark_script("cache_sweep")


def row(name: str, family: str, psnr: float, time: float, flops: float) -> dict:
    return {"name": name, "family": family, "psnr": psnr, "time_ratio": time, "flops_ratio": flops}


ROWS = [
    row("baseline", "baseline", float("inf"), 1.0, 1.0),
    row("torch.compile", "peer", 140.0, 0.9, 1.0),  # saves no compute: not a caching peer
    row("diffopt cache 40dB", "diffopt", 44.0, 0.40, 0.40),
    row("diffopt cache 30dB", "diffopt", 32.0, 0.20, 0.20),
    row("diffopt cache 30dB eager", "diffopt", 32.0, 0.10, 0.20),  # another backend: not read
    row("peer A", "peer", 41.0, 0.50, 0.40),
    row("peer B", "peer", 50.0, 0.60, 0.60),
    row("peer C", "peer", 30.0, 0.25, 0.25),
]


def test_each_caching_peer_is_read_against_diffopt_at_its_psnr(sweep):
    table = {r["peer"]: r for r in sweep.at_peer_quality(ROWS)}
    assert sorted(table) == ["peer A", "peer B", "peer C"]
    a = table["peer A"]  # 41 dB: 3/4 of the way from diffopt's 32 dB row to its 44 dB row
    assert a["diffopt ≥ PSNR"] == "44.0 dB at 0.400"
    assert a["time ratio (measured)"] == pytest.approx(0.8)
    assert a["time ratio (interpolated)"] == pytest.approx(0.35 / 0.5)
    assert a["FLOPs ratio (interpolated)"] == pytest.approx(0.35 / 0.4)
    b = table["peer B"]  # better than diffopt's best cached row: nothing to read
    assert b["diffopt ≥ PSNR"] == "none" and b["time ratio (measured)"] is None
    c = table["peer C"]  # under diffopt's lowest row: only the measured, over-stated side
    assert c["time ratio (measured)"] == pytest.approx(0.8)
    assert c["time ratio (interpolated)"] is None
    assert "| peer A" in sweep.peer_comparison(ROWS)


def test_diffopt_without_a_cache_is_the_point_above_its_best_cached_row(sweep):
    rows = [*ROWS, row("diffopt no cache", "diffopt", float("inf"), 0.55, 1.0)]
    b = {r["peer"]: r for r in sweep.at_peer_quality(rows)}["peer B"]
    assert b["diffopt ≥ PSNR"] == "inf dB at 0.550"
    assert b["time ratio (measured)"] == pytest.approx(0.55 / 0.6, abs=1e-3)  # rounded
    assert b["time ratio (interpolated)"] is None  # nothing to interpolate towards exact
    a = {r["peer"]: r for r in sweep.at_peer_quality(rows)}["peer A"]
    assert a["time ratio (interpolated)"] == pytest.approx(0.35 / 0.5)  # as without it


def test_calibrated_configs_are_saved_then_timed_without_calibrating(sweep, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from diffopt.calibration import Calibration
    from diffopt.config import CacheConfig

    plan = ["full", "full", "reuse", "full"]
    config = CacheConfig(steps=4, mode="plan", plan=plan)
    monkeypatch.setattr(sweep, "calibrations", lambda *a: {30.0: Calibration(config, plan)})
    reference = SimpleNamespace(name="ref-dit", model=None, sample=None)
    first = sweep.variants_for(reference, 4, [30.0], [], calibrated=tmp_path)
    assert (tmp_path / "ref-dit-4-30dB.json").exists()

    def refuse(*args):
        raise AssertionError("calibrated again although every budget's config was saved")

    monkeypatch.setattr(sweep, "calibrations", refuse)
    timed = []
    made = sweep.bench.cached_variant
    monkeypatch.setattr(
        sweep.bench, "cached_variant", lambda name, c, *a: timed.append(c) or made(name, c, *a)
    )
    again = sweep.variants_for(reference, 4, [30.0], [], calibrated=tmp_path)
    assert [v.name for v in again] == [v.name for v in first]
    assert "diffopt cache 30dB" in [v.name for v in again]
    assert timed and all(c == config for c in timed)  # the saved config, read back whole
    with pytest.raises(AssertionError, match="calibrated again"):  # a new budget calibrates
        sweep.variants_for(reference, 4, [30.0, 40.0], [], calibrated=tmp_path)
