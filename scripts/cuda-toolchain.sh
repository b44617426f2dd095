#!/usr/bin/env bash
# Builds a CUDA 13.0 toolchain (nvcc, headers, link-time libraries, and NCCL for the `nccl`
# feature) from PyPI wheels into a cache directory, with no system install, so
# `cargo build --features cuda,nccl` works on a machine without a GPU or a CUDA install. Pinned
# to 13.0: the lent GPU machine's driver is 580. NCCL 2.32 (the wheels of CUDA 13 on PyPI are
# 2.27 and 2.32): cudarc's bindings are of the 2.30 API, which 2.32 keeps.
#
# Usage:  eval "$(scripts/cuda-toolchain.sh)"      # prints the exports to use
# Cache:  $FLARE_CUDA_CACHE (default ~/.cache/flare-cuda); a second run downloads nothing.
set -euo pipefail

CACHE="${FLARE_CUDA_CACHE:-$HOME/.cache/flare-cuda}"
WHEELS="$CACHE/wheels"
ROOT="$CACHE/root"
CU="$ROOT/nvidia/cu13"
PINS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
  nvidia-nccl-cu13==2.32.6
)

# A cache made before NCCL was added lacks libnccl.so: fill it in (pip skips the wheels it has).
if [ ! -f "$CU/.flare-ready" ] || [ ! -e "$CU/lib/libnccl.so" ]; then
  mkdir -p "$WHEELS" "$ROOT"
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PINS[@]}" >&2
  for w in "$WHEELS"/*.whl; do unzip -qo "$w" -d "$ROOT"; done
  chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true
  # The linker wants unversioned names.
  (
    cd "$CU/lib"
    for lib in cublas cublasLt nvrtc cudart; do
      [ -e "lib$lib.so" ] || ln -sf "lib$lib.so.13" "lib$lib.so"
    done
    [ -e libcurand.so ] || ln -sf libcurand.so.10 libcurand.so
    # NCCL's wheel unpacks beside cu13 (nvidia/nccl/lib); link it where the others are.
    [ -e libnccl.so.2 ] || ln -sf ../../nccl/lib/libnccl.so.2 libnccl.so.2
    [ -e libnccl.so ] || ln -sf libnccl.so.2 libnccl.so
  )
  # libcuda.so is the driver and ships in no wheel: link against a stub whose soname makes the
  # binary load the real driver at run time.
  if [ ! -e "$CU/lib/libcuda.so" ]; then
    stub="$CACHE/cuda_stub.c"
    {
      grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CU/include/cuda.h"
    } | sort -u | sed 's/.*/int &(void){return 999;}/' >"$stub"
    gcc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$CU/lib/libcuda.so" "$stub"
  fi
  touch "$CU/.flare-ready"
fi

echo "export PATH=\"$CU/bin:\$PATH\""
echo "export CUDA_ROOT=\"$CU\" CUDA_PATH=\"$CU\" CUDA_TOOLKIT_ROOT_DIR=\"$CU\""
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
echo "export LIBRARY_PATH=\"$CU/lib:\${LIBRARY_PATH:-}\""
echo "export LD_LIBRARY_PATH=\"$CU/lib:\${LD_LIBRARY_PATH:-}\""
