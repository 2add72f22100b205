"""``mpo sweep --command iterate`` as a user runs it: the ``mpo`` console script from the repository
root, the shipped tiny iterate recipe and held-out set at relative paths, a 2-point ``pairs.min_margin``
grid x 2 rounds with ``iterate.eval`` on tiny models (CPU). ``sweep.csv`` holds one row per point and
rounds trained (0: before training) whose numbers are each point's own ``summary.json``; points are
ranked by the last round's held-out accuracy; ``sweep.png`` is drawn. Rerun, in process or launched,
nothing is recomputed; a point stopped after its first round is reported as such and resumed."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpo.cli.sweep_rounds import ROUND_METRICS

REPO = Path(__file__).resolve().parents[2]
ACCURACY = "eval/answers/accuracy"
POINTS = {"min_margin=0": 0.0, "min_margin=0.05": 0.05}
pytestmark = pytest.mark.slow


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # where the `mpo` console script is installed
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _sweep(root: Path, policy: Path, reward: Path, *extra: str) -> subprocess.CompletedProcess:
    command = ["mpo", "sweep", "recipes/tiny/iterate.yaml", "--command", "iterate",
               "--grid", "pairs.min_margin=0,0.05", f"model.policy={policy}", f"model.reward_model={reward}",
               f"run.output_dir={root}", "iterate.rounds=2",
               "iterate.eval.data=tests/fixtures/geometry3k/prompts.jsonl", "iterate.eval.max_tokens=8", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, f"$ {shlex.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _csv(root: Path) -> list[dict]:
    with (root / "sweep.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _files(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _summary(point_dir: Path) -> list[dict]:
    return json.loads((point_dir / "summary.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    root = tmp_path_factory.mktemp("sweep_iterate") / "min_margin"
    return root, _sweep(root, tiny_policy_dir, tiny_reward_dir).stdout


def test_one_row_per_point_and_round_from_each_points_summary(swept):
    root, stdout = swept
    rows = _csv(root)
    assert list(rows[0]) == ["point", "pairs.min_margin", "rank", "rounds_trained", ACCURACY, *ROUND_METRICS,
                             "status", "output_dir"]
    assert {p.name for p in root.iterdir() if p.is_dir()} == set(POINTS)
    finals = {}
    for name, margin in POINTS.items():
        point_dir = root / name
        assert yaml.safe_load((point_dir / "config.yaml").read_text())["pairs"]["min_margin"] == margin
        summary = _summary(point_dir)  # mpo iterate's own record of the point
        mine = [r for r in rows if r["point"] == name]
        assert [r["rounds_trained"] for r in mine] == ["0", "1", "2"]
        assert {r["status"] for r in mine} == {"iterated"} and {r["output_dir"] for r in mine} == {str(point_dir)}
        held_out = [summary[0]["eval_before/answers/accuracy"], summary[0][ACCURACY], summary[1][ACCURACY]]
        assert [float(r[ACCURACY]) for r in mine] == held_out  # written as repr: exact
        assert all(mine[0][m] == "" for m in ROUND_METRICS)  # before training: no round
        for row, round_metrics in zip(mine[1:], summary):
            for metric in ROUND_METRICS:
                expected = round_metrics.get(metric)
                assert row[metric] == ("" if expected is None else str(expected)), (name, metric)
        finals[name] = held_out[-1]
    # the grid reached the pairs: the threshold dropped prompts whose best reward gap was under 0.05
    trained = [r for r in rows if r["rounds_trained"] != "0"]
    kept = {name: sum(int(r["pairs/kept"]) for r in trained if r["point"] == name) for name in POINTS}
    dropped = {name: sum(int(r["pairs/dropped/below_margin"]) for r in trained if r["point"] == name)
               for name in POINTS}
    assert kept["min_margin=0.05"] < kept["min_margin=0"] and dropped["min_margin=0.05"] > dropped["min_margin=0"]
    # ranked by the last round's accuracy, highest first (ties in grid order), one rank per point
    expected = sorted(POINTS, key=lambda name: -finals[name])
    assert list(dict.fromkeys(r["point"] for r in rows)) == expected
    assert {(r["point"], r["rank"]) for r in rows} == {(name, str(i)) for i, name in enumerate(expected, 1)}
    png = (root / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = stdout[stdout.index("rank  point"):].splitlines()
    assert [line.split()[1] for line in table[1:3]] == expected
    assert f"sweep table: {root / 'sweep.csv'}" in stdout


def test_rerun_in_process_or_launched_recomputes_nothing(swept, tiny_policy_dir, tiny_reward_dir):
    root, _ = swept
    points = {name: _files(root / name) for name in POINTS}
    numbers = [{k: v for k, v in r.items() if k != "status"} for r in _csv(root)]
    again = _sweep(root, tiny_policy_dir, tiny_reward_dir).stdout
    assert again.count("every round finished earlier; mpo iterate reads it back") == 2
    assert "rollouts of" not in again and "MPO on" not in again and "held-out answers accuracy" not in again
    launched = _sweep(root, tiny_policy_dir, tiny_reward_dir, "--launch", f"{sys.executable} -m").stdout
    assert launched.count(f"$ {sys.executable} -m mpo iterate recipes/tiny/iterate.yaml ") == 2
    for name in POINTS:
        assert _files(root / name) == points[name], name  # nothing rewritten, not even a timestamp
    rows = _csv(root)
    assert {r["status"] for r in rows} == {"skipped"}
    assert [{k: v for k, v in r.items() if k != "status"} for r in rows] == numbers


def test_a_point_stopped_after_a_round_is_reported_and_resumed(swept, tiny_policy_dir, tiny_reward_dir):
    root, _ = swept
    point = root / "min_margin=0"
    manifest = point / "round_001" / "manifest.json"
    written = json.loads(manifest.read_text())
    manifest.unlink()  # as if killed after round 1's eval, before its manifest
    pending = _sweep(root, tiny_policy_dir, tiny_reward_dir, "--print-commands").stdout.splitlines()
    assert len(pending) == 1 and "mpo iterate recipes/tiny/iterate.yaml" in pending[0]
    assert f"run.output_dir={point}" in shlex.split(pending[0])
    _sweep(root, tiny_policy_dir, tiny_reward_dir, "--report-only")
    mine = [r for r in _csv(root) if r["point"] == point.name]
    assert [r["rounds_trained"] for r in mine] == ["0", "1"] and {r["status"] for r in mine} == {"1/2 rounds"}
    assert {r["rank"] for r in mine} == {""} and _csv(root)[-1]["point"] == point.name  # unranked, last

    stages = {p: p.stat().st_mtime_ns for p in (point / "round_001").rglob("*") if p.is_file()}
    resumed = _sweep(root, tiny_policy_dir, tiny_reward_dir).stdout
    assert f"{point.name}: iterating in {point}" in resumed and "rollouts of" not in resumed
    assert all(p.stat().st_mtime_ns == t for p, t in stages.items())  # every stage and the eval read back
    metrics = json.loads(manifest.read_text())["metrics"]
    assert {k: v for k, v in metrics.items() if not k.startswith("time/")} == \
        {k: v for k, v in written["metrics"].items() if not k.startswith("time/")}
    assert {r["status"] for r in _csv(root) if r["point"] == point.name} == {"iterated"}
