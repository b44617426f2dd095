#!/usr/bin/env bash
# Builds the CUDA binaries on this (GPU-less) machine and packs them, xz-compressed, into
# .carry/ (git-ignored) for bench/gpu_run.sh on the GPU machine:
#   .carry/flare.xz  the CLI (`flare bench ops --device cuda`, ...)
#   .carry/it.xz     the integration-test binary (CPU and CUDA tests)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolchain.sh)"
cargo build --release --features cuda -p flare-cli
test_bin=$(cargo test --release --features cuda -p flare --test it --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="it":
        print(m["executable"])' | tail -1)
[ -n "$test_bin" ] || { echo "could not find the integration-test binary" >&2; exit 1; }
mkdir -p .carry
strip -o .carry/flare "${CARGO_TARGET_DIR:-target}/release/flare"
strip -o .carry/it "$test_bin"
rm -f .carry/flare.xz .carry/it.xz
xz -T2 -6 .carry/flare .carry/it
ls -la .carry
