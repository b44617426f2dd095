#!/usr/bin/env bash
# Before/after check of a change that must not slow anything down (a refactor, a renovation):
# two builds of the `flare` CLI side by side on the GPU machine, in one call, alternating
# A, B, A, B so that a drift of the machine shows up as a difference between the two runs of
# the same build rather than between the builds.
#
#   .carry-base/flare.xz   the build before (scripts/build-gpu-carry.sh at the old commit, then
#                          `mv .carry .carry-base`)
#   .carry/flare.xz        the build after
#
# Rows: the memory-bound ops of `flare bench ops` (softmax, softmax_masked is inside attention,
# rms_norm, add_rms_norm; fwd and fwd+bwd) and batch-1/8 greedy decode (`flare bench decode`,
# graph, kernels and per-op paths; DECODE_BATCH, default 1, e.g. 1,8). Writes $OUT/compare_{ops,decode}_{a,b}{1,2}.log and prints
# a short table last. ROUNDS (default 2) sets the number of A/B rounds.
set -uo pipefail
FINAL_OUT="${OUT:-/tmp/flare-compare-out}"
mkdir -p "$FINAL_OUT"
ROUNDS=${ROUNDS:-2}
FILTER=${FILTER:-softmax 8192x8192,rms_norm 8192x8192,add_rms_norm 8192x8192,softmax 4096x4096,rms_norm 4096x4096,add_rms_norm 4096x4096,softmax 64x64,rms_norm 64x64}

TORCH_CU=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
[ -d "$TORCH_CU" ] || TORCH_CU=$(dirname "$(find /opt -name 'libcublas.so.13*' -print -quit 2>/dev/null)")
export LD_LIBRARY_PATH="$TORCH_CU:${LD_LIBRARY_PATH:-}"

unpack() { # unpack SRC.xz DST
  if command -v xz >/dev/null 2>&1; then xz -dc "$1" >"$2"; else
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"
  fi && chmod +x "$2"
}
mkdir -p /tmp/cmp-a /tmp/cmp-b
unpack .carry-base/flare.xz /tmp/cmp-a/flare || { echo "missing .carry-base/flare.xz"; exit 1; }
unpack .carry/flare.xz /tmp/cmp-b/flare || { echo "missing .carry/flare.xz"; exit 1; }
nvidia-smi -L

for r in $(seq 1 "$ROUNDS"); do
  for side in a b; do
    echo "=== round $r, build $side: bench ops"
    timeout 150 "/tmp/cmp-$side/flare" bench ops --device cuda --filter "$FILTER" \
      --json "$FINAL_OUT/compare_ops_$side$r.json" >"$FINAL_OUT/compare_ops_$side$r.log" 2>&1 ||
      echo "bench ops ($side, round $r) failed: $(tail -3 "$FINAL_OUT/compare_ops_$side$r.log")"
    echo "=== round $r, build $side: bench decode"
    timeout 150 "/tmp/cmp-$side/flare" bench decode --device cuda --batch "${DECODE_BATCH:-1}" --new-tokens 128 \
      --json "$FINAL_OUT/compare_decode_$side$r.json" >"$FINAL_OUT/compare_decode_$side$r.log" 2>&1 ||
      echo "bench decode ($side, round $r) failed: $(tail -3 "$FINAL_OUT/compare_decode_$side$r.log")"
  done
done

python3 - "$FINAL_OUT" "$ROUNDS" <<'EOF'
import json, os, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(kind, side, r):
    p = os.path.join(out, f"compare_{kind}_{side}{r}.json")
    try:
        with open(p) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return []
    return d if isinstance(d, list) else []
def key_ops(row):
    return " ".join(str(row.get(k, "")) for k in ("op", "shape", "dtype", "pass")).strip()
def key_dec(row):
    return f"{row.get('name')} b{row.get('batch')} {row.get('path')}"
for kind, key, val, unit in (("ops", key_ops, "flare_us", "us"), ("ops", key_ops, "flare_rate", "GB/s or TFLOP/s"),
                             ("decode", key_dec, "tokens_per_s", "tok/s")):
    table = {}
    for side in "ab":
        for r in range(1, rounds + 1):
            for row in load(kind, side, r):
                v = row.get(val)
                if v is None:
                    continue
                table.setdefault(key(row), {}).setdefault(side, []).append(v)
    print(f"\n{kind}: {val} ({unit}), build A (before) runs | build B (after) runs | B/A of the means")
    for k, d in table.items():
        a, b = d.get("a", []), d.get("b", [])
        ratio = (sum(b) / len(b)) / (sum(a) / len(a)) if a and b and sum(a) else float("nan")
        fa = " ".join(f"{x:.4g}" for x in a)
        fb = " ".join(f"{x:.4g}" for x in b)
        print(f"  {k:48s} | {fa:24s} | {fb:24s} | {ratio:.3f}")
EOF
