#!/usr/bin/env bash
# Installs torchslim and everything its tests, benchmarks and main job need, with torch held at 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
python3 - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0, found {torch.__version__}"
PY
