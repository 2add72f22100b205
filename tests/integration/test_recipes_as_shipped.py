"""Every recipe runs as its header says: the repository laid out in a temporary folder, and from its
root the header's own command through the `mpo` console script, with the recipe's relative paths.

The tiny recipes run exactly as their first line says. A recipe written for GPUs names, in a
``# CPU check`` header line, what this test appends to its command: tiny models at relative paths
and sizes turned down (for a launcher command, the test runs the `mpo` command without the
launcher, as that line says). The data a real recipe points at (``data/...``) is put where the
recipe expects it, from the repository's own fixtures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if "accelerate" not in p.parts and "sweeps" not in p.parts)
# dependencies first: tiny models, then each reward stage before the one that starts from it
ORDER = ["tiny/iterate.yaml", "tiny/mpo_offline.yaml", "tiny/grpo.yaml", "tiny/reward_stage1.yaml",
         "tiny/reward_stage2.yaml", "r1v_mpo.yaml", "r1v2_hybrid.yaml",
         "qwen2_5_vl_7b_mpo.yaml", "internvl_mpo_offline.yaml", "reward_stage1.yaml",
         "reward_stage2.yaml"]


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        return [line for line in out.splitlines() if (REPO / line).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the source folders
        return [str(p.relative_to(REPO)) for top in ("mpo", "reward", "recipes", "scripts", "tests")
                for p in (REPO / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The repository's files in a fresh folder, the data the real recipes name, and tiny models."""
    root = tmp_path_factory.mktemp("checkout") / "mpo-vl"
    for name in _tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    fixtures, demo = root / "tests" / "fixtures", root / "mpo" / "assets" / "demo"
    for target in ("data/r1v", "data", "data/geometry3k"):
        shutil.copytree(fixtures / "geometry3k", root / target, dirs_exist_ok=True)
    shutil.copytree(fixtures / "mmpr", root / "data" / "MMPR-v1.1")
    shutil.copytree(demo / "images", root / "data" / "reward" / "images")
    for name in ("llava_critic_113k", "rlaif_v", "reasoning_pairs", "skywork_reward_preference_80k_v0.2"):
        shutil.copy2(demo / "reward_pairs.jsonl", root / "data" / "reward" / f"{name}.jsonl")
    return root


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def header_command(path: Path) -> str:
    """The recipe's first line as a shell command, with its CPU check appended where it has one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    command = re.sub(r"\s+\(.*\)\s*$", "", lines[0].removeprefix("#").strip())
    check = []
    for line in lines[1:]:
        if check and not line.startswith("#   "):
            break
        if line.startswith("# CPU check") or check:
            check.append(line.removeprefix("#").strip())
    if not check:
        return command
    text = " ".join(check)
    overrides = text.split("): ", 1)[1]
    if "-m mpo " in command:  # a launcher command: its `mpo` command, without the launcher
        command = "mpo " + command.split("-m mpo ", 1)[1]
    return f"{command} {overrides}"


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, env=_env(),
                          timeout=900)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_recipe_is_covered():
    assert sorted(str(p.relative_to(REPO / "recipes")) for p in RECIPES) == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_recipe_runs_as_its_header_says(checkout, name):
    path = checkout / "recipes" / name
    command = header_command(path)
    assert str(Path("recipes") / name) in command and "/" + str(checkout) not in command
    if not command.startswith("mpo tiny") and not (checkout / "runs" / "tiny" / "policy").exists():
        assert _run("mpo tiny policy runs/tiny/policy && mpo tiny reward runs/tiny/reward", checkout).returncode == 0
    result = _run(command, checkout)
    assert result.returncode == 0, f"$ {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    last = command.split("&&")[-1].split()
    recipe_at = next(i for i, a in enumerate(last) if a.endswith(".yaml"))
    printed = _run(shlex.join(["mpo", "config", *last[recipe_at:]]), checkout)
    assert printed.returncode == 0, printed.stderr
    out = Path(yaml.safe_load(printed.stdout)["run"]["output_dir"])
    assert out.is_relative_to(checkout), out  # relative paths mean what they mean from the root
    kind = last[1] if last[1] != "reward" else "reward train"
    if kind == "iterate":
        manifest = json.loads((out / "round_000" / "manifest.json").read_text())
        assert manifest["trained"], manifest["metrics"]
        assert (Path(manifest["policy_out"]) / "model.safetensors").is_file()
        assert (out / "summary.json").is_file()
        if yaml.safe_load(printed.stdout)["iterate"]["then"] == "grpo":  # then GRPO from the round's policy
            assert (out / "grpo" / "policy" / "model.safetensors").is_file()
            assert json.loads((out / "summary.json").read_text())["grpo"]["steps"] >= 1
        before = _snapshot(out)
        again = _run(command.split("&&")[-1], checkout)  # a finished run started again changes nothing
        assert again.returncode == 0, again.stderr[-2000:]
        assert _snapshot(out) == before
    elif kind in ("train", "grpo"):
        assert (out / "policy" / "model.safetensors").is_file()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows and rows[0]["step"] == 1
        assert kind == "train" or {"reward/rule", "reward/model", "reward/format", "ssb/buffer_size"} <= set(rows[0])
    else:
        assert (out / "final" / "value_head.safetensors").is_file()
        assert (out / "final" / "done.json").is_file()
