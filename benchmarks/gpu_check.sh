#!/usr/bin/env bash
# The GPU check as ONE call on a lent GPU machine, whose image has CUDA torch but not SimpleITK,
# batchgenerators or pydicom, and which reaches no package index. Two halves:
#
#   bash benchmarks/gpu_check.sh prepare    # here, with the network: the missing wheels -> .whl/
#                                           # (git-ignored through .git/info/exclude; ~54 MB)
#   bash benchmarks/gpu_check.sh run [ARGS] # there: install the wheels and autoseg into /tmp/site,
#                                           # run benchmarks/gpu_check.py ARGS, JSON -> $OUT
#
# On the device tool: run(command="bash benchmarks/gpu_check.sh run", carry=[".whl"], timeout_s=600).
# ../shared/data does not travel to that machine, so the check uses the bundled 24-case
# Hippocampus example (its plans have smaller batches than the 220-case set; the JSON says so).
# `run --dry-run` works here too (CPU, tiny sizes), to try the installation path before GPU time.
set -euo pipefail
cd "$(dirname "$0")/.."

# The versions this repository's CI installs (pip list in the CI venv, 2026-12-06). The image's
# python3 is 3.12: abi3 / pure-Python wheels that install there without a compiler.
WHEELS=(SimpleITK==2.5.7 batchgenerators==0.25.5 pydicom==3.0.2 future==1.0.0 unittest2==1.1.0
        traceback2==1.4.0 linecache2==1.0.0)

case "${1:-}" in
  prepare)
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    du -sh .whl
    ;;
  run)
    shift
    : "${OUT:=$(mktemp -d)}"
    python=${PYTHON:-python3}
    site=/tmp/site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    # autoseg itself (no build isolation: the image's setuptools builds it offline), so that the
    # planner presets resolve as the package data autoseg.planners.
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
    export PYTHONPATH="$site" PYTHONUNBUFFERED=1
    nvidia-smi -L 2>/dev/null || true
    timeout 580 "$python" benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh prepare | run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
