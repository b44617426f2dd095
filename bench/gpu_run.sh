#!/usr/bin/env bash
# The one script to run on the GPU machine (the repository root is the working directory).
#
# Expects the binaries built elsewhere with --features cuda, xz-compressed:
#   .carry/flare.xz   the `flare` CLI
#   .carry/it.xz      the integration-test binary
# Writes into $OUT (default /tmp/flare-gpu-out): tests.log, flare_ops.json, flare_ops.log,
# torch_ops.json, torch_ops.log, report.md, flare_lora.json/.log, torch_lora.json/.log,
# lora_report.txt, flare_decode.json/.log, hf_decode.json/.log, decode_report.txt. Every step runs even if an earlier one failed; the
# script exits non-zero at the end if any step failed. Target PASS/FAIL lines are information
# and do not fail the script. Time limits per step keep the whole run well inside 10 minutes.
set -uo pipefail

# Everything is written to a work folder and packed into $OUT/results.tgz at the end (the device
# tool brings back at most 8 files); report.md is also copied to $OUT on its own.
FINAL_OUT="${OUT:-/tmp/flare-gpu-out}"
OUT=/tmp/flare-gpu-work
rm -rf "$OUT"
mkdir -p "$OUT" "$FINAL_OUT"
BIN=/tmp/flare-bin
mkdir -p "$BIN"
FAILED=()
T0=$(date +%s)
# STAGES picks what runs (comma-separated): tests, ops, lora, decode, train, profile, sanitizer. One device
# call is limited to 10 minutes, so a full round is two calls, e.g. STAGES=tests,decode,train
# then STAGES=ops,lora,sanitizer.
#   attn       flash attention: its tests, then flare on cuDNN (FLARE_ATTENTION_CUDNN=1), flare on
#              its kernel and PyTorch SDPA
# Issue 13's training stages, each its own device call (each under ~8 minutes on an H100), not in
# the default list:
#   train8b    Llama-3.1-8B shape at 1x4096,4x4096 (SHAPES_8B): flare with --gradient-checkpointing
#              off, on and auto (FLARE_CKPT_8B), then the anchor: eager and liger, each with and
#              without checkpointing (+ torch.compile when ANCHOR_COMPILE_8B=1: minutes of
#              compilation at 8B, so off by default)
#   ctx8b      the longest batch-1 context of the 8B shape: flare --max-context (checkpointing
#              auto), then the anchor's --max-context with liger + checkpointing; the search from
#              CTX_START (8192), to CTX_GRAN (2048) tokens, CTX_BUDGET_S (120) s of search each, then one timed
#              step at the longest that ran.
#              ctx8b_flare / ctx8b_torch run one side only.
#   longctx    Liger's longest batch-1 context (search), then flare one step at twice it and at it
#   long8b     one batch-1 step of the 8B shape at LONG_SHAPE (1x196608) with flare's
#              --gradient-checkpointing LONG_CKPT (offload): whether a length trains at all
#              (a search would repeat a step of minutes), its tokens/s and peak memory.
#   train05b   Qwen2-0.5B shape at 4x512,8x1024: flare, then the anchor's eager, liger and compile
#              (ANCHOR_COMPILE_05B=0 drops compile), no checkpointing
#   graph      the captured training pass (FLARE_STEP_GRAPH): its tests, then flare alone on the
#              Qwen2-0.5B shape at 4x512,8x1024 with the graph on and off (FLARE_STEP_GRAPH=0)
#   mlp8b      the fused LoRA MLP (`--fused-mlp`, the low-rank terms folded into the frozen GEMMs):
#              its tests (lora::swiglu_mlp, checkpointing::grouped_projections*), then flare's
#              1x4096 step of the 8B shape with the fused MLP off and on, alternated three times
#   fold       the low-rank terms folded into the frozen GEMMs (bench/dev/fold_probe.py, PyTorch's
#              cuBLAS): per product flare's sequence against the fold, then both sustained beside
#              the frozen GEMMs alone; then the vendor floor (bench/dev/step_floor.py) and flare's
#              1x4096 step of the 8B shape, for the same card
# ANCHOR_CKPT_8B (default both; off or on) picks the 8B anchor's checkpointing.
# ANCHOR_IMPLS_8B / ANCHOR_IMPLS_05B (default eager,liger) pick the anchor's configurations
# besides compile (e.g. liger alone, to fit a short device budget).
# All of them need the Liger wheel in .whl/ (bench/fetch_wheels.sh; carry [".carry", ".whl"]).
STAGES=${STAGES:-tests,ops,lora,decode,train,profile,sanitizer}
# FLARE_ATTENTION_CUDNN=auto: the stages after `attn` run on cuDNN's attention only if the attn
# stage's cuDNN test passed (off when it failed or did not run).
CUDNN_AUTO=0
if [ "${FLARE_ATTENTION_CUDNN:-}" = auto ]; then
  CUDNN_AUTO=1
  export FLARE_ATTENTION_CUDNN=0
fi
want() { [[ ",$STAGES," == *",$1,"* ]]; }
echo "stages: $STAGES"

step() { # step NAME COMMAND...: runs it, records a failure, never stops the script
  local name=$1 rc
  shift
  echo
  echo "=== [$(($(date +%s) - T0))s] $name"
  "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "=== $name: FAILED (exit $rc)"
    FAILED+=("$name")
  fi
  return 0
}

# ---- CUDA libraries: PyTorch's bundled CUDA 13 (cuBLAS/cuBLASLt, cuRAND, NVRTC) -----------------
TORCH_CU=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
if [ -d "$TORCH_CU" ]; then
  CUDA_LIB=$TORCH_CU
else
  hit=$(find /opt -name 'libcublas.so.13*' -print -quit 2>/dev/null)
  CUDA_LIB=${hit:+$(dirname "$hit")}
fi
if [ -n "${CUDA_LIB:-}" ]; then
  export LD_LIBRARY_PATH="$CUDA_LIB:${LD_LIBRARY_PATH:-}"
  echo "CUDA libraries: $CUDA_LIB"
else
  echo "WARNING: no libcublas.so.13 found under /opt"
fi
# cuDNN 9 (flare opens it at run time for its fused attention): PyTorch's copy.
hit=$(find /opt -name 'libcudnn.so.9*' -print -quit 2>/dev/null)
if [ -n "$hit" ]; then
  export LD_LIBRARY_PATH="$(dirname "$hit"):$LD_LIBRARY_PATH"
  echo "cuDNN: $(dirname "$hit")"
else
  echo "WARNING: no libcudnn.so.9 under /opt: flare's attention runs on its own kernel"
fi

# The Python with PyTorch: the venv's if there is one, else python3 on PATH.
PY=python3
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python

# Wheels carried in .whl/ (bench/fetch_wheels.sh: Liger-Kernel for `anchor_train.py --impl
# liger`; the GPU machine reaches no registry; .whl/ is git-ignored, so a device call names it in
# `carry`) go to /tmp/site on PYTHONPATH. By hand, in a device
# call of its own:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (pure-Python wheels: where no pip is there, unzipping them into /tmp/site does the same).
if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null ||
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null ||
    python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "wheels from .whl/ in /tmp/site: $(ls .whl | tr '\n' ' ')"
  fi
fi

unpack() { # unpack NAME: .carry/NAME.xz -> $BIN/NAME
  local src=".carry/$1.xz" dst="$BIN/$1"
  [ -f "$src" ] || { echo "missing $src"; return 1; }
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$src" >"$dst" || return 1
  else
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
      "$src" "$dst" || return 1
  fi
  chmod +x "$dst"
  echo "$dst: $(stat -c %s "$dst") bytes"
}

check_ldd() { # check_ldd BINARY: fails if a shared library is not found
  local missing
  missing=$(ldd "$1" 2>&1 | grep 'not found')
  if [ -n "$missing" ]; then
    echo "$1: unresolved libraries:"
    echo "$missing"
    return 1
  fi
  echo "$1: all libraries resolve"
}

step "unpack flare" unpack flare
step "unpack it" unpack it
step "ldd flare" check_ldd "$BIN/flare"
step "ldd it" check_ldd "$BIN/it"
step "nvidia-smi" nvidia-smi -L

run_tests() { timeout 200 "$BIN/it" --test-threads=1 2>&1 | tee "$OUT/tests.log"; }
run_bench() {
  timeout 150 "$BIN/flare" bench ops --device cuda --json "$OUT/flare_ops.json" 2>&1 |
    tee "$OUT/flare_ops.log"
}
run_torch() { timeout 120 "$PY" bench/anchor_ops.py --json "$OUT/torch_ops.json" 2>&1 | tee "$OUT/torch_ops.log"; }
# The two case lists must agree, or rows will not merge.
check_lists() { diff <("$BIN/flare" bench ops --device cuda --list) <(python3 bench/anchor_ops.py --list); }
TORCH_JSON=()
run_report() {
  [ -f "$OUT/torch_ops.json" ] && TORCH_JSON=("$OUT/torch_ops.json")
  python3 bench/report.py "$OUT/flare_ops.json" "${TORCH_JSON[@]}" | tee "$OUT/report.md"
}

run_floors() { timeout 90 "$BIN/flare" bench floors 2>&1 | tee "$OUT/floors.log"; }
run_cublaslt_only() {
  FLARE_SMALL_GEMM=0 timeout 60 "$BIN/flare" bench ops --device cuda --filter "matmul 64x64x64,matmul 1024x1024x1024" 2>&1 | tail -4
}
run_sanitizer() {
  local cs
  cs=$(command -v compute-sanitizer || find /usr/local/cuda* /opt -name compute-sanitizer -type f 2>/dev/null | head -1)
  [ -n "$cs" ] || { echo "compute-sanitizer not found"; return 0; }
  timeout 240 "$cs" --tool memcheck --leak-check no --error-exitcode 3 "$BIN/it" --test-threads=1 cuda 2>&1 |
    tail -15 | tee "$OUT/sanitizer.log"
}

if want tests; then
step "integration tests" run_tests
fi
# attn: flare's training attention on cuDNN (FLARE_ATTENTION_CUDNN=1, the default) and on flare's
# own kernel (=0), against PyTorch SDPA, in one call; the
# flash-attention tests first (cuDNN against the float64 reference and against the kernel).
run_attn_tests() {
  timeout 120 "$BIN/it" flash_attention --test-threads=1 2>&1 | tee "$OUT/attn_tests.log" | tail -40
  local rc=${PIPESTATUS[0]}
  # A failure of the cuDNN cases is re-run with cuDNN's API log, its graphs listed beside
  # PyTorch's (bench/dev/cudnn_sdpa_torch_graphs.txt) for the comparison.
  if grep -q "cudnn_cases.*FAILED" "$OUT/attn_tests.log"; then
    CUDNN_LOGLEVEL_DBG=3 CUDNN_LOGDEST_DBG="$OUT/cudnn_dbg.log" timeout 60 "$BIN/it" cudnn_cases \
      --test-threads=1 >/dev/null 2>&1
    python3 bench/dev/cudnn_log_ops.py "$OUT/cudnn_dbg.log" >"$OUT/cudnn_dbg_ops.txt" 2>&1
    grep -m 12 -iE "error|bad_param|not_supported|status" "$OUT/cudnn_dbg.log" | cut -c1-300
    head -60 "$OUT/cudnn_dbg_ops.txt"
    xz -T4 -6 "$OUT/cudnn_dbg.log"
  fi
  return "$rc"
}
run_attn_bench() {
  FLARE_ATTENTION_CUDNN=1 timeout 90 "$BIN/flare" bench ops --device cuda --filter flash_attention \
    --json "$OUT/flare_attn_cudnn.json" 2>&1 | tee "$OUT/flare_attn_cudnn.log"
  FLARE_ATTENTION_CUDNN=0 timeout 90 "$BIN/flare" bench ops --device cuda --filter flash_attention \
    --json "$OUT/flare_attn_kernel.json" 2>&1 | tee "$OUT/flare_attn_kernel.log"
  timeout 90 "$PY" bench/anchor_ops.py --filter flash_attention --json "$OUT/torch_attn.json" 2>&1 |
    tee "$OUT/torch_attn.log"
}
if want attn; then
step "flash-attention tests (cuDNN and kernel)" run_attn_tests
step "flash attention: cuDNN, kernel, SDPA" run_attn_bench
if [ "$CUDNN_AUTO" = 1 ] && grep -qE "^test .*cudnn_cases::cuda \.\.\. ok" "$OUT/attn_tests.log"; then
  export FLARE_ATTENTION_CUDNN=1
fi
echo "FLARE_ATTENTION_CUDNN=${FLARE_ATTENTION_CUDNN:-unset} for the stages that follow"
fi
if want ops; then
step "flare bench ops" run_bench
step "dispatch floors" run_floors
step "matmul through cuBLASLt only (FLARE_SMALL_GEMM=0)" run_cublaslt_only
fi
run_autotune_debug() {
  FLARE_GEMM_DEBUG=1 timeout 60 "$BIN/flare" bench ops --device cuda --filter "matmul 4096x4096x4096 bf16 fwd" 2>&1 | tail -40
}
if want ops; then
step "matmul 4096 bf16 autotune candidates (FLARE_GEMM_DEBUG=1)" run_autotune_debug
step "torch anchor" run_torch
step "case lists agree" check_lists
fi
# LoRA: flare's fused LoRA linear against the plain linear, Candle's unfused composite and
# PyTorch's unfused LoRA (time and peak memory); the comparison re-reads both JSON files.
run_lora_bench() {
  timeout 90 "$BIN/flare" bench lora --device cuda --json "$OUT/flare_lora.json" 2>&1 |
    tee "$OUT/flare_lora.log"
}
run_lora_torch() { timeout 90 "$PY" bench/anchor_lora.py --json "$OUT/torch_lora.json" 2>&1 | tee "$OUT/torch_lora.log"; }
run_lora_compare() {
  local t=()
  [ -f "$OUT/torch_lora.json" ] && t=(--torch-json "$OUT/torch_lora.json")
  timeout 30 "$BIN/flare" bench lora --report "$OUT/flare_lora.json" "${t[@]}" | tee "$OUT/lora_report.txt"
}
if want lora; then
step "flare bench lora" run_lora_bench
step "torch anchor lora" run_lora_torch
step "lora comparison (flare vs torch)" run_lora_compare
fi
# Decode: flare's prefill / greedy decode / generate on the Qwen2-0.5B shape with random
# weights (generate also with an r=16 adapter active, then merged), then HF transformers (eager
# and sdpa) on the same shape, then the comparison with the issue's target line (batch-1 decode
# >= 500 tokens/s).
run_decode_bench() {
  timeout 150 "$BIN/flare" bench decode --device cuda --adapter-rank 16 \
    --json "$OUT/flare_decode.json" 2>&1 |
    tee "$OUT/flare_decode.log"
}
run_decode_anchor() {
  timeout 120 "$PY" bench/anchor_decode.py --new-tokens 64 --json "$OUT/hf_decode.json" 2>&1 |
    tee "$OUT/hf_decode.log"
}
run_decode_compare() {
  local a=()
  [ -f "$OUT/hf_decode.json" ] && a=("$OUT/hf_decode.json")
  python3 bench/compare_decode.py "$OUT/flare_decode.json" "${a[@]}" | tee "$OUT/decode_report.txt"
}
# The decode kernels are on by default; the same tests run with them off (FLARE_GEMV=0: cuBLASLt
# / gemm_small for skinny products; FLARE_ATTENTION_DECODE=0: GEMM + softmax + GEMM attention),
# so the fallback paths stay checked on the GPU, and the bench times them against the default.
run_fallback_tests() {
  FLARE_GEMV=0 FLARE_ATTENTION_DECODE=0 timeout 90 "$BIN/it" --test-threads=1 skinny_matmul decode_ops generate:: 2>&1 | tail -4
}
run_fallback_bench() {
  FLARE_GEMV=0 FLARE_ATTENTION_DECODE=0 timeout 60 "$BIN/flare" bench decode --device cuda --batch 1,8 --new-tokens 64 --repeats 3 2>&1 | tail -5
}
if want decode; then
step "FLARE_GEMV=0 FLARE_ATTENTION_DECODE=0 tests" run_fallback_tests
step "flare bench decode" run_decode_bench
step "flare bench decode with FLARE_GEMV=0 FLARE_ATTENTION_DECODE=0" run_fallback_bench
step "HF anchor decode" run_decode_anchor
step "decode comparison (flare vs HF)" run_decode_compare
fi
# Training: flare's LoRA training step against PyTorch + PEFT on the Qwen2-0.5B shape.
run_train_bench() {
  timeout 240 "$BIN/flare" bench train --device cuda --json "$OUT/flare_train.json" 2>&1 |
    tee "$OUT/flare_train.log"
}
run_train_torch() {
  timeout 240 "$PY" bench/anchor_train.py --json "$OUT/torch_train.json" 2>&1 | tee "$OUT/torch_train.log"
}
# flare merge against PEFT's merge_and_unload on a demo adapter (20 CPU steps), when the
# Python there has transformers and peft.
run_merge_check() {
  "$PY" -c "import peft, transformers" 2>/dev/null || { echo "no peft/transformers: skipped"; return 0; }
  local d=/tmp/flare-merge-check
  rm -rf "$d"
  timeout 120 "$BIN/flare" demo --steps 20 --output-dir "$d/out" >/dev/null &&
    "$BIN/flare" merge --model assets/demo/model --adapter "$d/out/adapter" --out "$d/merged" &&
    timeout 120 "$PY" bench/check_merge.py --model assets/demo/model --adapter "$d/out/adapter" \
      --merged "$d/merged" 2>&1 | grep -v -i warn | tee "$OUT/merge_check.log"
}
if want train; then
step "flare bench train" run_train_bench
step "torch anchor train" run_train_torch
step "flare merge vs PEFT" run_merge_check
fi
# Issue 13: the 8B shape, its longest context, and the 0.5B shape against every PyTorch
# configuration (see STAGES above). Each side's lines go to its own log, printed with a banner.
SHAPES_8B=${SHAPES_8B:-1x4096,4x4096}
FLARE_CKPT_8B=${FLARE_CKPT_8B:-off,on,auto}
CTX_START=${CTX_START:-8192}
CTX_GRAN=${CTX_GRAN:-2048}
CTX_BUDGET_S=${CTX_BUDGET_S:-120}
side() { # side LOG TITLE COMMAND...: runs COMMAND, its output under a banner and into $OUT/LOG
  local log=$1 title=$2
  shift 2
  echo "----- $title"
  "$@" 2>&1 | tee -a "$OUT/$log"
  return "${PIPESTATUS[0]}"
}
run_train8b_flare() {
  local rc=0 mode
  for mode in ${FLARE_CKPT_8B//,/ }; do
    side flare_train8b.log "flare, llama-3.1-8b, --gradient-checkpointing $mode" \
      timeout 100 "$BIN/flare" bench train --device cuda --config llama-3.1-8b --shapes "$SHAPES_8B" \
      --gradient-checkpointing "$mode" --json "$OUT/flare_train8b_$mode.json" || rc=1
  done
  return $rc
}
run_train8b_torch() {
  local impls=${ANCHOR_IMPLS_8B:-eager,liger}
  [ "${ANCHOR_COMPILE_8B:-0}" = 1 ] && impls=$impls,compile
  side torch_train8b.log "PyTorch + PEFT ($impls), llama-3.1-8b, checkpointing off and on" \
    timeout 270 "$PY" bench/anchor_train.py --config llama-3.1-8b --shapes "$SHAPES_8B" \
    --impl "$impls" --gradient-checkpointing "${ANCHOR_CKPT_8B:-both}" --json "$OUT/torch_train8b.json"
}
run_ctx8b_flare() {
  side flare_ctx8b.log "flare, llama-3.1-8b, --max-context (checkpointing auto)" \
    timeout 270 "$BIN/flare" bench train --device cuda --config llama-3.1-8b --max-context \
    --gradient-checkpointing auto --max-context-start "$CTX_START" \
    --max-context-granularity "$CTX_GRAN" --max-context-budget-s "$CTX_BUDGET_S" \
    --warmup 0 --steps 1 --json "$OUT/flare_ctx8b.json"
}
run_ctx8b_torch() {
  side torch_ctx8b.log "PyTorch + PEFT + Liger + checkpointing, llama-3.1-8b, --max-context" \
    timeout 270 "$PY" bench/anchor_train.py --config llama-3.1-8b --max-context --impl liger \
    --gradient-checkpointing on --max-context-start "$CTX_START" \
    --max-context-granularity "$CTX_GRAN" --max-context-budget-s "$CTX_BUDGET_S" \
    --warmup 0 --steps 1 --json "$OUT/torch_ctx8b.json"
}
run_long8b_flare() {
  side flare_long8b.log "flare, llama-3.1-8b, ${LONG_SHAPE:-1x196608}, --gradient-checkpointing ${LONG_CKPT:-offload}" \
    timeout "${LONG_TIMEOUT_S:-560}" "$BIN/flare" bench train --device cuda --config llama-3.1-8b \
    --shapes "${LONG_SHAPE:-1x196608}" --gradient-checkpointing "${LONG_CKPT:-offload}" \
    --warmup 0 --steps 1 --json "$OUT/flare_long8b.json"
}
run_train05b_flare() {
  side flare_train05b.log "flare, qwen2-0.5b" \
    timeout 120 "$BIN/flare" bench train --device cuda --config qwen2-0.5b --shapes 4x512,8x1024 \
    --gradient-checkpointing off --json "$OUT/flare_train05b.json"
}
run_train05b_torch() {
  local impls=${ANCHOR_IMPLS_05B:-eager,liger}
  [ "${ANCHOR_COMPILE_05B:-1}" = 1 ] && impls=$impls,compile
  side torch_train05b.log "PyTorch + PEFT ($impls), qwen2-0.5b" \
    timeout 360 "$PY" bench/anchor_train.py --config qwen2-0.5b --shapes 4x512,8x1024 \
    --impl "$impls" --json "$OUT/torch_train05b.json"
}
if want train8b; then
step "flare bench train, llama-3.1-8b" run_train8b_flare
step "torch anchor train, llama-3.1-8b" run_train8b_torch
fi
# longctx: the long-context target in one call: PEFT + Liger + checkpointing's longest batch-1
# context of the 8B shape (search from LC_START, 65536, to 8192 tokens, 150 s of bisection),
# then flare one step at twice that (offload) and one at that length (auto), for the ratio and
# the speed at a length both reach.
run_longctx() {
  timeout "${LC_TORCH_S:-260}" "$PY" bench/anchor_train.py --config llama-3.1-8b --max-context \
    --impl liger --gradient-checkpointing on --max-context-start "${LC_START:-65536}" \
    --max-context-granularity 8192 --max-context-budget-s 150 --warmup 0 --steps 1 \
    --json "$OUT/torch_longctx.json" 2>&1 | tail -6
  local liger
  liger=$("$PY" -c 'import json,sys
r=[x for x in json.load(open(sys.argv[1])) if x.get("max_context") and x.get("seq")]
print(max(x["seq"] for x in r) if r else 0)' "$OUT/torch_longctx.json" 2>/dev/null || echo 0)
  echo "PEFT + Liger + checkpointing, longest batch-1 context: $liger"
  [ "${liger:-0}" -gt 0 ] || return 1
  timeout "${LC_FLARE_S:-280}" "$BIN/flare" bench train --device cuda --config llama-3.1-8b \
    --shapes "1x$((2 * liger))" --gradient-checkpointing offload --warmup 0 --steps 1 \
    --json "$OUT/flare_longctx_2x.json" 2>&1 | tail -6
  timeout "${LC_FLARE1_S:-150}" "$BIN/flare" bench train --device cuda --config llama-3.1-8b --shapes "1x$liger" \
    --gradient-checkpointing auto --warmup 0 --steps 1 --json "$OUT/flare_longctx_1x.json" 2>&1 |
    tail -6
}
if want longctx; then
step "long context: Liger's longest, flare at twice it and at it" run_longctx
fi
if want long8b; then
step "flare one long step, llama-3.1-8b" run_long8b_flare
fi
if want ctx8b || want ctx8b_flare; then
step "flare max context, llama-3.1-8b" run_ctx8b_flare
fi
if want ctx8b || want ctx8b_torch; then
step "torch anchor max context, llama-3.1-8b" run_ctx8b_torch
fi
run_graph_tests() {
  timeout 120 "$BIN/it" step_graph --test-threads=1 2>&1 | tee "$OUT/graph_tests.log" | tail -15
  return "${PIPESTATUS[0]}"
}
run_graph_bench() {
  local mode
  for mode in 1 0; do
    side flare_graph05b.log "flare, qwen2-0.5b, FLARE_STEP_GRAPH=$mode" \
      env FLARE_STEP_GRAPH=$mode timeout 100 "$BIN/flare" bench train --device cuda --config qwen2-0.5b \
      --shapes 4x512,8x1024 --gradient-checkpointing off --json "$OUT/flare_graph05b_$mode.json" || return 1
  done
}
if want graph; then
step "step-graph tests" run_graph_tests
step "flare bench train, qwen2-0.5b, graph on and off" run_graph_bench
fi
if want train05b; then
step "flare bench train, qwen2-0.5b" run_train05b_flare
step "torch anchor train, qwen2-0.5b" run_train05b_torch
fi
if want ops; then
step "report" run_report
fi
# Profile: per-kernel GPU time of flare's and PyTorch's training steps and of flare's decode,
# recorded by the CUPTI injection library (.carry/libkernel_trace.so, scripts/build-kernel-trace.sh).
TRACE_LIB=$PWD/.carry/libkernel_trace.so
traced() { # traced NAME COMMAND...: runs COMMAND with the kernel trace written to $OUT/NAME.tsv
  local name=$1
  shift
  [ -f "$TRACE_LIB" ] || { echo "missing $TRACE_LIB"; return 1; }
  CUDA_INJECTION64_PATH=$TRACE_LIB FLARE_TRACE_OUT="$OUT/$name.tsv" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -3 "$OUT/$name.log"
  python3 bench/kernel_report.py "$OUT/$name.tsv" --label "$name" --top 22 | tee "$OUT/$name.txt"
  return $rc
}
if want profile; then
  step "profile: flare bench train" traced trace_flare_train timeout 200 "$BIN/flare" bench train --device cuda
  step "profile: torch anchor train" traced trace_torch_train timeout 200 "$PY" bench/anchor_train.py
  step "profile: flare bench decode" traced trace_flare_decode timeout 120 "$BIN/flare" bench decode --device cuda --batch 1
fi
# profile8b: the same trace of the Llama-3.1-8B shape at 1x4096 (no checkpointing) and of the
# Qwen2-0.5B shape at 4x512 and 8x1024, flare only.
if want profile8b; then
  step "profile: flare bench train, llama-3.1-8b 1x4096" traced trace_flare_train8b timeout 150 \
    "$BIN/flare" bench train --device cuda --config llama-3.1-8b --shapes 1x4096 \
    --gradient-checkpointing off
  step "profile: flare bench train, qwen2-0.5b 4x512,8x1024" traced trace_flare_train05b timeout 100 \
    "$BIN/flare" bench train --device cuda --config qwen2-0.5b --shapes 4x512,8x1024 \
    --gradient-checkpointing off
fi
run_mlp_tests() {
  timeout 120 "$BIN/it" --test-threads=1 swiglu_mlp grouped_projections 2>&1 | tee "$OUT/mlp_tests.log" |
    grep -E "^test |panicked|rel err|test result"
  return "${PIPESTATUS[0]}"
}
run_mlp_ab() {
  local f i
  for i in 1 2 3; do
    for f in false true; do
      printf 'fused MLP %-5s ' "$f" | tee -a "$OUT/mlp_ab.log"
      timeout 100 "$BIN/flare" bench train --device cuda --config llama-3.1-8b --shapes 1x4096 \
        --gradient-checkpointing off --fused-mlp "$f" 2>&1 | tail -1 | tee -a "$OUT/mlp_ab.log"
    done
  done
}
if want mlp8b; then
  step "fused MLP tests" run_mlp_tests
  step "flare 1x4096, fused MLP off and on" run_mlp_ab
fi
run_fold_probe() {
  timeout 240 "$PY" bench/dev/fold_probe.py 2>&1 | tee "$OUT/fold_probe.log"
  return "${PIPESTATUS[0]}"
}
run_floor() {
  timeout 120 "$PY" bench/dev/step_floor.py 2>&1 | tee "$OUT/step_floor.log"
  return "${PIPESTATUS[0]}"
}
run_step8b() {
  timeout 100 "$BIN/flare" bench train --device cuda --config llama-3.1-8b --shapes 1x4096 \
    --gradient-checkpointing off 2>&1 | tail -1 | tee "$OUT/step8b.log"
  return "${PIPESTATUS[0]}"
}
if want fold; then
  step "low-rank terms folded into the frozen GEMMs (PyTorch probe)" run_fold_probe
  step "vendor floor of the 8B step" run_floor
  step "flare 1x4096 step of the 8B shape" run_step8b
fi
if want sanitizer; then
step "compute-sanitizer memcheck (cuda tests)" run_sanitizer
fi

echo
echo "=== [$(($(date +%s) - T0))s] summary (full Markdown in $OUT/report.md)"
if [ -f "$OUT/tests.log" ]; then
  grep -E "^test result|^test .* FAILED|^failures:|^    [a-z_:]+$" "$OUT/tests.log" | tail -25
fi
if [ -f "$OUT/flare_ops.json" ]; then
  python3 bench/report.py --short "$OUT/flare_ops.json" "${TORCH_JSON[@]}" || true
fi
for f in flare_train.log torch_train.log flare_train8b.log torch_train8b.log flare_ctx8b.log \
  torch_ctx8b.log flare_long8b.log flare_train05b.log torch_train05b.log fold_probe.log step8b.log; do
  [ -f "$OUT/$f" ] && { echo; echo "--- $f"; cat "$OUT/$f"; }
done
if [ -f "$OUT/lora_report.txt" ]; then
  echo
  cat "$OUT/lora_report.txt"
fi
if [ -f "$OUT/decode_report.txt" ]; then
  echo
  cat "$OUT/decode_report.txt"
fi
tar czf "$FINAL_OUT/results.tgz" -C "$OUT" . && cp "$OUT/report.md" "$FINAL_OUT/" 2>/dev/null
if [ ${#FAILED[@]} -ne 0 ]; then
  echo
  echo "FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo
echo "all steps ok"
