"""Smoke test of benchmarks/bench_cpu_training.py (slow tier): its --quick run trains on real PBMC cells in both
precisions and at one thread count beside a competing process, and writes the JSON it promises. No timing is
asserted (timed tests are flaky on shared machines); the two precisions' first losses are compared (one model
initialisation, one batch, the same dropout masks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two tiny models, 3 steps each, plus a competing process: ~10 s on a loaded 2-core machine
def test_quick_run_writes_both_measurements(tmp_path, shared_data):
    pbmc = shared_data / "pbmc" / "pbmc68k_reduced_counts.h5ad"
    if not pbmc.is_file():
        pytest.skip(f"{pbmc} is absent")
    out = tmp_path / "cpu_training.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_training.py"), "--quick",
                             "--data", str(pbmc), "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["quick"] is True and payload["settings"]["cells_in_file"] == 700
    precision = payload["precision"]
    fp32, bf16 = precision["fp32"]["losses"], precision["bf16"]["losses"]
    assert len(fp32) == len(bf16) == 3 and all(math.isfinite(v) and v > 0 for v in fp32 + bf16)
    # Same seed, same batches, same dropout masks: the two precisions start from the same loss up to bf16 rounding.
    assert abs(fp32[0] - bf16[0]) < 0.05 * fp32[0]
    assert precision["agreement"]["max_abs_loss_diff"] == max(abs(a - b) for a, b in zip(fp32, bf16))
    assert isinstance(precision["bf16_recommended_as_cpu_default"], bool)
    rows = payload["threads"]["rows"]
    assert [(row["threads"], row["competitor"]) for row in rows] == [(1, False), (1, True)]
    assert rows[0]["competitor_cpu_share"] is None and rows[1]["competitor_cpu_share"] >= 0
    assert all(row["step_s_median"] > 0 for row in rows)
    assert "slowdown_by_competitor_at_1_threads" in payload["threads"]["ratios"]
    assert "(b) fp32 training step" in result.stdout and "competitor CPU share" in result.stdout
