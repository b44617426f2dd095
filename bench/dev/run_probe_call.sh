#!/usr/bin/env bash
# Scratch driver of one device call (not committed).
export PATH=$PATH:/usr/local/cuda/bin
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:$(dirname $(find /opt -name 'libcudnn.so.9*' -print -quit))
xz -dc .carry/flare.xz > /tmp/fl; chmod +x /tmp/fl
xz -dc .carry/it.xz > /tmp/it; chmod +x /tmp/it
nvidia-smi -L
/tmp/it checkpointing 2>&1 | grep -E "^test |test result"
/opt/torch/.venv/bin/python bench/dev/step_floor.py 2>&1 | tail -32
for n in 1 4; do
CUDA_INJECTION64_PATH=$PWD/.carry/libkernel_trace.so FLARE_TRACE_OUT=$OUT/t8b_$n.tsv timeout 200 /tmp/fl bench train --device cuda --config llama-3.1-8b --shapes 1x4096 --gradient-checkpointing off --warmup 1 --steps $n 2>&1 | tail -1
done
