#!/usr/bin/env bash
# Downloads the Python wheels that the GPU machine lacks into .whl/ (git-ignored), to travel with
# the working tree to a device call (the GPU machine reaches no package registry).
#
# Today: Liger-Kernel 0.8.5 for `bench/anchor_train.py --impl liger` -- pure Python, one
# py3-none-any wheel (~0.9 MB). Its Requires-Dist: torch>=2.1.2 and triton>=2.3.1 (both in the
# GPU machine's PyTorch venv); everything else is behind extras (cutile, cutedsl, lck, dev), so
# --no-deps is complete.
#
# A device call carries the folder (it is git-ignored: carry [".whl"]). On the device, before the anchor (bench/gpu_run.sh does it itself when .whl/ has wheels):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# (with /opt/torch/.venv/bin/python in place of python3 where that venv is the one with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
ls -l .whl
