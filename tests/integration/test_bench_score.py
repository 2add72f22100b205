"""scripts/bench_score.py runs end to end on CPU and its two sides agree: the batched scorer (shared
prompts included) gives the model card loop's scores. Timings are the benchmark's business, not a
test's: only the report's shape and the score agreement are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_score.py"


def test_bench_score_runs_and_both_sides_agree(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--items", "8", "--repeats", "1", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert list(rows) == ["distinct", "pairs", "rollouts-4", "rollouts-8"]
    for name, per_prompt in [("distinct", 1), ("pairs", 2), ("rollouts-4", 4), ("rollouts-8", 8)]:
        row = rows[name]
        assert row["items"] == 8 and row["prompts"] == 8 // per_prompt
        assert row["max_abs_score_diff"] < 1e-5
        assert row["speedup"] == row["card_loop_s"] / row["batched_s"]
    assert "speedup" in result.stdout and "rollouts-8" in result.stdout
