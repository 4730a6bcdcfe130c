#!/usr/bin/env bash
# Installs torchslim and everything its tests, benchmarks and main job need, with torch held at 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,bench]"
python3 - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0, found {torch.__version__}"
PY
# The report test opens an HTML report in headless Chromium (Debian's package). Installed where apt-get can run as
# root; elsewhere that one test skips and says why. TORCHSLIM_NO_BROWSER=1 skips this step.
if [ -z "${TORCHSLIM_NO_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! { apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
    echo "setup: chromium could not be installed; the browser test of the HTML report will skip"
  fi
fi
