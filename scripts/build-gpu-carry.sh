#!/usr/bin/env bash
# Builds the CUDA binaries on this (GPU-less) machine and packs them, xz-compressed, into
# .carry/ (git-ignored) for bench/gpu_run.sh on the GPU machine:
#   .carry/flare.xz  the CLI (`flare bench ops --device cuda`, ...)
#   .carry/it.xz     the integration-test binary (CPU and CUDA tests)
# The binaries are located by cargo's JSON messages (not target/release/flare, which another
# build sharing CARGO_TARGET_DIR may overwrite). Tests find their fixtures through paths fixed at
# build time, so build from the checkout that the GPU machine receives.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolchain.sh)"

executable() { # executable TARGET_NAME < cargo JSON messages: the last artifact's path
  python3 -c 'import sys,json
name=sys.argv[1]; out=""
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==name:
        out=m["executable"]
print(out)' "$1"
}

# Cargo's messages go to files of this run's own (two checkouts may build at once).
msgs=$(mktemp -d)
trap 'rm -rf "$msgs"' EXIT
mkdir -p .carry
rm -f .carry/flare .carry/it .carry/flare.xz .carry/it.xz
cargo build --release --features cuda -p flare-cli --message-format=json-render-diagnostics >"$msgs/cli.json"
cli_bin=$(executable flare <"$msgs/cli.json")
[ -n "$cli_bin" ] || { echo "could not find the flare binary" >&2; exit 1; }
strip -o .carry/flare "$cli_bin"
cargo test --release --features cuda -p flare --test it --no-run --message-format=json-render-diagnostics >"$msgs/test.json"
test_bin=$(executable it <"$msgs/test.json")
[ -n "$test_bin" ] || { echo "could not find the integration-test binary" >&2; exit 1; }
strip -o .carry/it "$test_bin"
xz -T2 -6 .carry/flare .carry/it
ls -la .carry
