"""bench/bench_overhead.py's interleaved measure runs the engine's own iteration on the same rows
as the floor, round after round (a smoke test: benchmarks are not timed in the suite)."""

import math
import sys
from pathlib import Path

from fixtures import small_batch, small_model

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from bench_overhead import interleaved  # noqa: E402


def test_interleaved_measures_each_configuration_against_the_floor():
    model = small_model()
    x, t, _ = small_batch(model)
    figures = interleaved(model, x, t, rounds=3, per_round=2)
    assert set(figures) == {"floor", "advfast, record on", "advfast, record off",
                            "floor + loss_head", "floor + loss_head + perturb_step_"}
    assert figures["floor"]["loop_vs_floor"] == 1.0
    for f in figures.values():
        lo, hi = f["loop_vs_floor_ci95"]
        assert f["loop_ms"] > 0 and math.isfinite(f["loop_vs_floor"]) and lo <= hi
