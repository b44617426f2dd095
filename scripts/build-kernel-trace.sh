#!/usr/bin/env bash
# Builds bench/cupti/kernel_trace.c (a CUPTI injection library: per-kernel GPU time of any CUDA
# program) into .carry/libkernel_trace.so for bench/gpu_run.sh. CUPTI's headers and library come
# from NVIDIA's PyPI wheel, cached in ~/.cache/flare-cuda like the rest of the toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${FLARE_CUDA_CACHE:-$HOME/.cache/flare-cuda}
whl_dir=$cache/wheels
root=$cache/cupti
if [ ! -f "$root/nvidia/cu13/include/cupti.h" ]; then
  mkdir -p "$whl_dir" "$root"
  python3 -m pip download --quiet --no-deps nvidia-cuda-cupti==13.0.85 -d "$whl_dir"
  python3 -m zipfile -e "$whl_dir"/nvidia_cuda_cupti-13.0.85-*.whl "$root"
fi
inc=$root/nvidia/cu13/include
lib=$root/nvidia/cu13/lib
# The CUDA runtime headers (cuda.h for CUcontext) come with the toolchain's cuda_runtime wheel.
cuda_inc=$(find "$cache/root/nvidia" -name cuda.h -path '*include*' -printf '%h\n' | head -1)
mkdir -p .carry
ln -sf "$lib/libcupti.so.13" "$lib/libcupti.so"
gcc -O2 -shared -fPIC -Wall -Wextra -I"$inc" -I"$cuda_inc" bench/cupti/kernel_trace.c \
  -L"$lib" -lcupti -o .carry/libkernel_trace.so
ls -la .carry/libkernel_trace.so
