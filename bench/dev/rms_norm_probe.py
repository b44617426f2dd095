#!/usr/bin/env python3
"""RMSNorm backward (dx only, frozen weight) at the Llama-3.1-8B hidden shape against variants
(a development probe, GPU machine).

    python3 bench/dev/rms_norm_probe.py [--rows 4096 16384] [--cols 4096] [--reps 30]

Compiles `crates/flare-kernels/src/cu/rms_norm.cu` with a launcher (nvcc, into a shared library
called through ctypes on torch tensors) and times `rms_norm_bwd_bf16` with need_dw = 0 (x, w, dy
in, dx out, bf16, eps 1e-5) as flare launches it (`ops/rms_norm/cuda.rs` with `RowPlan`: group
128 and 128-thread blocks at 4096 columns, a persistent grid of min(rows, SMs * 512 / block)
blocks, no dynamic shared memory, partial = null), with a grid over all rows, and with groups
256 / 512 over all rows, against variants written in the launcher below:

  a   a warp per row (16 packs of 8 per lane at 4096 columns, held in registers), warp-shuffle
      reductions only; blocks of 2, 4 or 8 warps, one row per warp, grid = rows / warps;
  b   a block per row (256 / 512 / 128 threads: 2 / 1 / 4 packs per thread), the two sums
      reduced through shared memory (one barrier), grid = rows;
  c1  persistent warps per row (grid = SMs * resident blocks): pack i of the next row's x / dy
      is loaded into pack i's registers as soon as the current row's dx pack i is written, so
      the next row is in flight during this row's output pass (no extra registers: a full
      second row of registers, 16 more packs per lane at 4096 columns, does not fit in 255);
  c2  persistent warps per row, the next 1, 2 or 3 rows' x / dy copied by cp.async into
      per-warp shared-memory stages (2, 3 or 4 stages) while the current row is reduced and
      written straight from shared memory (about 80 registers).

Every variant keeps w in shared memory (copied once per block) and re-widens x / dy from bf16 in
its output pass (the launcher's comment on `opaque` says why). Plus, for scale, the fused forward
`add_rms_norm_fwd_bf16` as flare launches it (reads 2, writes 2 tensors) and device-to-device
copies (torch copy_): one that moves the same bytes as the backward (1.5 tensors, read and
written: the target time) and one of 3 tensors (twice the bytes).

Timing: CUDA graphs of 10 calls, median of --reps replays; TB/s counts x + dy read and dx written
(3 * rows * cols * 2 bytes = 100.7 MB at 4096 x 4096; w's 2 * cols bytes left out), %copy is
against the same-bytes copy. Each row of the table also gives the block size and grid, the
registers per thread, the local (spill) bytes and the resident blocks per SM. Before it is
timed, every variant's dx (NaN-filled first) is compared with a float64 reference of
dx = rinv * (dy * w) - x * rinv^3 * sum(dy * w * x) / cols, rinv = rsqrt(mean(x^2) + eps), on x
with a per-row scale and dy correlated with x (so that the second term matters): FAIL when a
value is not finite or the max abs error exceeds 2e-2 * max|ref|.

The variants assume 16-byte packs: cols a multiple of 8 and 16-byte aligned tensors (torch's
allocations are). A lane / thread owns packs lane + i * (threads per row), i < NP, with
branch-free bounds (loads clamped to the row's last pack and zeroed past it, stores predicated),
so any such cols up to NP * threads per row packs is correct, and a multiple of 8 * 32 = 256
(8 * threads per row for b) leaves no lane idle. The warp-per-row variants (a, c1, c2) have
NP = 4, 8 or 16, so cols <= 4096; b has NP <= 8. A shape a variant does not cover prints
"skipped".
"""
import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

from graph_timing import timed

HERE = os.path.dirname(os.path.abspath(__file__))
CU = os.path.normpath(os.path.join(HERE, "..", "..", "crates", "flare-kernels", "src", "cu"))
EPS = 1e-5
ERR_SHAPE = 10001  # the launcher's "shape not covered by this variant"

LAUNCHER = r"""
#include "rms_norm.cu"
#include <cuda_runtime.h>

// Every variant: packs of 8 bf16 (16 bytes, one uint4: element 2q in the low half of word q,
// 2q + 1 in the high half), kept packed in registers and widened to f32 where used. A thread
// owns packs lane + i * stride (i < NP) of its row, stride = the threads per row. Branch-free
// bounds: loads are clamped to the row's last pack (always in bounds) and zeroed past it (zeros
// add nothing to the sums), stores are predicated; so any cols that is a multiple of 8 is
// correct up to NP * stride packs, and a multiple of 8 * stride leaves no thread idle.
// The weight row is copied once per block into shared memory (cols * 2 bytes) and read from
// there in both passes.
namespace probe {
using bf = __nv_bfloat16;
constexpr int V = 8;  // bf16 elements per 16-byte pack

__device__ __forceinline__ float lo_f(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi_f(unsigned u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // round to nearest even, as from_f
  return *reinterpret_cast<unsigned *>(&h);
}
__device__ __forceinline__ uint4 ldg16(const bf *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }
__device__ __forceinline__ uint4 zero_if(bool in, uint4 u) {
  return in ? u : make_uint4(0u, 0u, 0u, 0u);
}
__device__ __forceinline__ unsigned word(const uint4 &u, int q) {
  return q == 0 ? u.x : q == 1 ? u.y : q == 2 ? u.z : u.w;
}

__device__ __forceinline__ float2 warp_sum2(float2 s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s.x += __shfl_xor_sync(0xffffffffu, s.x, o);
    s.y += __shfl_xor_sync(0xffffffffu, s.y, o);
  }
  return s;
}

// Copies w (cols elements, cols % 8 == 0) into shared memory ws; every thread of the block
// calls it (one barrier).
__device__ __forceinline__ void stage_w(const bf *__restrict__ w, uint4 *ws, int nvr) {
  for (int c = threadIdx.x; c < nvr; c += blockDim.x) ws[c] = ldg16(w + c * V);
  __syncthreads();
}

// Packs lane + i * stride of a row of x and dy (zeros past the row's nvr packs).
template <int NP>
__device__ __forceinline__ void load_packs(const bf *__restrict__ xr, const bf *__restrict__ dr,
                                           uint4 (&px)[NP], uint4 (&pd)[NP], int lane,
                                           int stride, int nvr) {
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    const int c = lane + i * stride, cc = min(c, nvr - 1);
    px[i] = zero_if(c < nvr, ldg16(xr + cc * V));
    pd[i] = zero_if(c < nvr, ldg16(dr + cc * V));
  }
}

// This thread's (sum x^2, sum dy * w * x) over its packs (zero packs add nothing).
template <int NP>
__device__ __forceinline__ float2 row_sums(const uint4 (&px)[NP], const uint4 (&pd)[NP],
                                           const uint4 *ws, int lane, int stride, int nvr) {
  float2 s = make_float2(0.f, 0.f);
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    const uint4 pw = ws[min(lane + i * stride, nvr - 1)];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const unsigned ux = word(px[i], q), ud = word(pd[i], q), uw = word(pw, q);
      const float xl = lo_f(ux), xh = hi_f(ux);
      s.x += xl * xl;
      s.x += xh * xh;
      s.y += lo_f(ud) * lo_f(uw) * xl;
      s.y += hi_f(ud) * hi_f(uw) * xh;
    }
  }
  return s;
}

// rinv = rsqrt(mean(x^2) + eps) and k = rinv^3 * sum(dy w x) / cols, from the row's sums.
__device__ __forceinline__ void row_scale(float2 s, float inv_cols, float eps, float &rinv,
                                          float &k) {
  rinv = rsqrtf(s.x * inv_cols + eps);
  k = rinv * rinv * rinv * s.y * inv_cols;
}

// Zero, read at run time (ptxas cannot fold it). The packs are xor-ed with it between the two
// passes, so the output pass must widen them from bf16 again: otherwise the compiler keeps
// pass 1's f32 values of x and dy alive across the reduction (twice the registers of the
// packs; an empty asm does not stop ptxas from doing that).
__device__ unsigned probe_zero;
__device__ __forceinline__ unsigned runtime_zero() {
  return *reinterpret_cast<volatile unsigned *>(&probe_zero);
}
template <int NP> __device__ __forceinline__ void opaque(uint4 (&p)[NP], unsigned z) {
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    p[i].x ^= z;
    p[i].y ^= z;
    p[i].z ^= z;
    p[i].w ^= z;
  }
}

// dx of one pack, the same expression as flare's kernel: rinv * dy * w - x * k.
__device__ __forceinline__ uint4 dx_pack(const uint4 &px, const uint4 &pd, const uint4 &pw,
                                         float rinv, float k) {
  unsigned o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const unsigned ux = word(px, q), ud = word(pd, q), uw = word(pw, q);
    o[q] = pack2(rinv * lo_f(ud) * lo_f(uw) - lo_f(ux) * k,
                 rinv * hi_f(ud) * hi_f(uw) - hi_f(ux) * k);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

template <int NP>
__device__ __forceinline__ void store_dx(const uint4 (&px)[NP], const uint4 (&pd)[NP],
                                         const uint4 *ws, bf *__restrict__ dxr, int lane,
                                         int stride, int nvr, float rinv, float k) {
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    const int c = lane + i * stride;
    const uint4 o = dx_pack(px[i], pd[i], ws[min(c, nvr - 1)], rinv, k);
    if (c < nvr) *reinterpret_cast<uint4 *>(dxr + c * V) = o;
  }
}

extern __shared__ __align__(16) uint4 probe_smem[];  // w (nvr packs), then c2's stages

// (a) One warp per row, NP packs per lane in registers, no barrier after w is staged; one row
// per warp.
template <int NP>
__global__ void __launch_bounds__(256)
    warp_row(const bf *__restrict__ x, const bf *__restrict__ w, const bf *__restrict__ dy,
             bf *__restrict__ dx, long long rows, int cols, float eps) {
  const int lane = threadIdx.x & 31, nvr = cols / V;
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const long long off = (row < rows ? row : 0) * cols;
  uint4 px[NP], pd[NP];
  load_packs<NP>(x + off, dy + off, px, pd, lane, 32, nvr);  // before staging w: overlap
  uint4 *ws = probe_smem;
  stage_w(w, ws, nvr);
  if (row >= rows) return;  // warp-uniform
  const float inv_cols = __fdividef(1.f, (float)cols);
  const unsigned z = runtime_zero();
  const float2 s = warp_sum2(row_sums<NP>(px, pd, ws, lane, 32, nvr));
  float rinv, k;
  row_scale(s, inv_cols, eps, rinv, k);
  opaque<NP>(px, z);
  opaque<NP>(pd, z);
  __syncwarp();
  store_dx<NP>(px, pd, ws, dx + off, lane, 32, nvr, rinv, k);
}

// (b) One block per row (blockDim.x threads, a multiple of 32, NP packs each), the two sums
// through shared memory (flare's group_sum2: one barrier, double-buffered); grid-stride rows.
template <int NP>
__global__ void __launch_bounds__(512)
    block_row(const bf *__restrict__ x, const bf *__restrict__ w, const bf *__restrict__ dy,
              bf *__restrict__ dx, long long rows, int cols, float eps) {
  __shared__ float2 sh[2][32];
  int buf = 0;
  const int t = threadIdx.x, T = blockDim.x, nvr = cols / V;
  const float inv_cols = __fdividef(1.f, (float)cols);
  const unsigned z = runtime_zero();
  uint4 *ws = probe_smem;
  stage_w(w, ws, nvr);
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {  // block-uniform
    const long long off = row * cols;
    uint4 px[NP], pd[NP];
    load_packs<NP>(x + off, dy + off, px, pd, t, T, nvr);
    const float2 s = group_sum2(row_sums<NP>(px, pd, ws, t, T, nvr), T, sh[buf]);
    buf ^= 1;
    float rinv, k;
    row_scale(s, inv_cols, eps, rinv, k);
    opaque<NP>(px, z);
    opaque<NP>(pd, z);
    store_dx<NP>(px, pd, ws, dx + off, t, T, nvr, rinv, k);
  }
}

// (c1) Persistent warps per row (rows gw, gw + nw, ...): as soon as pack i of the current row's
// dx is written, pack i of the next row is loaded into the same registers, so the next row's
// loads are in flight while the rest of this row is written and until its own reduction.
template <int NP>
__global__ void __launch_bounds__(256)
    warp_ring(const bf *__restrict__ x, const bf *__restrict__ w, const bf *__restrict__ dy,
              bf *__restrict__ dx, long long rows, int cols, float eps) {
  const int lane = threadIdx.x & 31, nvr = cols / V;
  const long long nw = (long long)gridDim.x * (blockDim.x >> 5);
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const long long off0 = (row < rows ? row : 0) * cols;
  uint4 px[NP], pd[NP];
  load_packs<NP>(x + off0, dy + off0, px, pd, lane, 32, nvr);  // before staging w: overlap
  uint4 *ws = probe_smem;
  stage_w(w, ws, nvr);
  if (row >= rows) return;  // warp-uniform
  const float inv_cols = __fdividef(1.f, (float)cols);
  const unsigned z = runtime_zero();
  for (;;) {
    const long long off = row * cols;
    const float2 s = warp_sum2(row_sums<NP>(px, pd, ws, lane, 32, nvr));
    float rinv, k;
    row_scale(s, inv_cols, eps, rinv, k);
    const long long next = row + nw;
    const bool more = next < rows;  // warp-uniform
    const long long noff = (more ? next : row) * cols;
    opaque<NP>(px, z);
    opaque<NP>(pd, z);
    __syncwarp();
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int c = lane + i * 32, cc = min(c, nvr - 1);
      const uint4 o = dx_pack(px[i], pd[i], ws[cc], rinv, k);
      if (c < nvr) *reinterpret_cast<uint4 *>(dx + off + c * V) = o;
      if (more) {
        px[i] = zero_if(c < nvr, ldg16(x + noff + cc * V));
        pd[i] = zero_if(c < nvr, ldg16(dy + noff + cc * V));
      }
    }
    if (!more) break;
    row = next;
  }
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// (c2) Persistent warps per row with an S-stage cp.async pipeline in shared memory: each warp
// has S stages of (x row, dy row), NP * 32 packs each; stage s holds rows gw + (j*S + s) * nw.
// Each lane copies, and later reads, only its own packs (lane + 32 i), so the lane's own
// wait_group is the only synchronisation. The row is reduced and written straight from shared
// memory (read twice, nothing held in registers across the reduction); the stage is refilled
// (row + S * nw) once the output pass has read it (__syncwarp: the lanes' reads are done).
// Dynamic shared memory: round_up(nvr, 2) * 16 (w) + warps * S * 2 * NP * 32 * 16 bytes.
template <int NP, int S>
__global__ void __launch_bounds__(256)
    warp_async(const bf *__restrict__ x, const bf *__restrict__ w, const bf *__restrict__ dy,
               bf *__restrict__ dx, long long rows, int cols, float eps) {
  const int lane = threadIdx.x & 31, nvr = cols / V;
  const long long nw = (long long)gridDim.x * (blockDim.x >> 5);
  const long long first = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  uint4 *ws = probe_smem;
  uint4 *my = probe_smem + ((nvr + 1) & ~1) + (size_t)(threadIdx.x >> 5) * (S * 2 * NP * 32) + lane;
  // Commits one group per call (empty past the last row), so that "group j done" is always
  // wait_group(S - 1) at the top of iteration j.
  auto issue = [&](int st, long long r) {
    if (r < rows) {  // warp-uniform
      const bf *xr = x + r * cols;
      const bf *dr = dy + r * cols;
#pragma unroll
      for (int i = 0; i < NP; ++i) {
        const int cc = min(lane + i * 32, nvr - 1);
        cp_async16(my + ((st * 2 + 0) * NP + i) * 32, xr + cc * V);
        cp_async16(my + ((st * 2 + 1) * NP + i) * 32, dr + cc * V);
      }
    }
    cp_commit();
  };
#pragma unroll
  for (int st = 0; st < S; ++st) issue(st, first + st * nw);
  stage_w(w, ws, nvr);
  const float inv_cols = __fdividef(1.f, (float)cols);
  int st = 0;
  for (long long row = first; row < rows; row += nw) {  // warp-uniform
    cp_wait<S - 1>();
    const uint4 *sx = my + (st * 2 + 0) * NP * 32, *sd = my + (st * 2 + 1) * NP * 32;
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int c = lane + i * 32;
      const bool in = c < nvr;
      const uint4 px = zero_if(in, sx[i * 32]), pd = zero_if(in, sd[i * 32]);
      const uint4 pw = ws[min(c, nvr - 1)];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const unsigned ux = word(px, q), ud = word(pd, q), uw = word(pw, q);
        const float xl = lo_f(ux), xh = hi_f(ux);
        s.x += xl * xl;
        s.x += xh * xh;
        s.y += lo_f(ud) * lo_f(uw) * xl;
        s.y += hi_f(ud) * hi_f(uw) * xh;
      }
    }
    s = warp_sum2(s);
    float rinv, k;
    row_scale(s, inv_cols, eps, rinv, k);
    __syncwarp();
    bf *dxr = dx + row * cols;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int c = lane + i * 32;
      const uint4 o = dx_pack(sx[i * 32], sd[i * 32], ws[min(c, nvr - 1)], rinv, k);
      if (c < nvr) *reinterpret_cast<uint4 *>(dxr + c * V) = o;
    }
    __syncwarp();
    issue(st, row + S * nw);
    st = st + 1 == S ? 0 : st + 1;
  }
  cp_wait<0>();
}

template <class T> struct id_ { using type = T; };
constexpr int ERR_SHAPE = 10001;

// Launches kernel k, or with `info` fills {registers, local (spill) bytes, resident blocks per
// SM, block, dynamic shared memory} instead (and raises the kernel's dynamic shared memory limit
// when over 48 KiB: call it once before any launch of such a kernel, outside graph capture).
template <typename... P>
static int go(void (*k)(P...), long long grid, int block, size_t smem, void *stream, int *info,
              typename id_<P>::type... a) {
  if (info) {
    cudaError_t e;
    if (smem > 48 * 1024) {
      e = cudaFuncSetAttribute((const void *)k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)smem);
      if (e != cudaSuccess) return (int)e;
    }
    cudaFuncAttributes fa;
    e = cudaFuncGetAttributes(&fa, (const void *)k);
    if (e != cudaSuccess) return (int)e;
    int nb = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, (const void *)k, block, smem);
    if (e != cudaSuccess) return (int)e;
    info[0] = fa.numRegs;
    info[1] = (int)fa.localSizeBytes;
    info[2] = nb;
    info[3] = block;
    info[4] = (int)smem;
    return 0;
  }
  if (grid < 1 || grid > 0x7fffffffLL) return ERR_SHAPE;
  void *args[] = {(void *)&a...};
  cudaError_t e = cudaLaunchKernel((const void *)k, dim3((unsigned)grid), dim3(block), args, smem,
                                   (cudaStream_t)stream);
  if (e != cudaSuccess) return (int)e;
  return (int)cudaGetLastError();
}

// Packs per lane of the warp-per-row variants: the fewest of 4, 8, 16 that cover the row.
static int warp_np(int nvr) {
  for (int np = 4; np <= 16; np *= 2)
    if (np * 32 >= nvr) return np;
  return 0;
}
}  // namespace probe

#define PROBE_CASE(N, ...) case N: { constexpr int NP = N; return __VA_ARGS__; }
// Packs per lane of the warp-per-row variants (a, c1, c2): 4, 8 or 16.
#define PROBE_NP_WARP(NPV, ...)                                                                    \
  switch (NPV) {                                                                                   \
    PROBE_CASE(4, __VA_ARGS__) PROBE_CASE(8, __VA_ARGS__) PROBE_CASE(16, __VA_ARGS__)              \
  default: return probe::ERR_SHAPE;                                                                \
  }
// Packs per thread of the block-per-row variant (b): 1, 2, 4 or 8.
#define PROBE_NP_BLOCK(NPV, ...)                                                                   \
  switch (NPV) {                                                                                   \
    PROBE_CASE(1, __VA_ARGS__) PROBE_CASE(2, __VA_ARGS__) PROBE_CASE(4, __VA_ARGS__)               \
    PROBE_CASE(8, __VA_ARGS__)                                                                     \
  default: return probe::ERR_SHAPE;                                                                \
  }

// variant 0: flare's rms_norm_bwd_bf16, a = group (block = group, or 128 for group <= 32)
// variant 1: (a) warp_row, a = warps per block
// variant 2: (b) block_row, a = threads per block (multiple of 32, <= 512)
// variant 3: (c1) warp_ring, a = warps per block
// variant 4: (c2) warp_async, a = warps per block, b = stages (2, 3 or 4)
extern "C" int probe_bwd(int variant, int a, int b, long long grid, const void *x, const void *w,
                         const void *dy, void *dx, long long rows, int cols, float eps,
                         void *stream, int *info) {
  using namespace probe;
  const bf *X = (const bf *)x, *W = (const bf *)w, *D = (const bf *)dy;
  bf *DX = (bf *)dx;
  if (cols <= 0 || rows <= 0) return ERR_SHAPE;
  if (variant == 0) {
    const int block = a <= 32 ? 128 : a;
    return go(rms_norm_bwd_bf16, grid, block, 0, stream, info, X, W, D, DX, (float *)nullptr,
              rows, cols, a, eps, 0);
  }
  if (cols % V) return ERR_SHAPE;
  const int nvr = cols / V;
  const size_t wbytes = (size_t)((nvr + 1) & ~1) * 16;  // w in shared memory
  if (variant == 1 || variant == 3 || variant == 4) {
    if (a < 1 || a > 8) return ERR_SHAPE;
    const int np = warp_np(nvr), block = 32 * a;
    if (variant == 1) { PROBE_NP_WARP(np, go(warp_row<NP>, grid, block, wbytes, stream, info, X, W, D, DX, rows, cols, eps)) }
    if (variant == 3) { PROBE_NP_WARP(np, go(warp_ring<NP>, grid, block, wbytes, stream, info, X, W, D, DX, rows, cols, eps)) }
    const size_t smem = wbytes + (size_t)a * b * 2 * np * 32 * 16;
    if (smem > 227 * 1024) return ERR_SHAPE;
    if (b == 2) { PROBE_NP_WARP(np, go(warp_async<NP, 2>, grid, block, smem, stream, info, X, W, D, DX, rows, cols, eps)) }
    if (b == 3) { PROBE_NP_WARP(np, go(warp_async<NP, 3>, grid, block, smem, stream, info, X, W, D, DX, rows, cols, eps)) }
    if (b == 4) { PROBE_NP_WARP(np, go(warp_async<NP, 4>, grid, block, smem, stream, info, X, W, D, DX, rows, cols, eps)) }
    return ERR_SHAPE;
  }
  if (variant == 2) {
    if (a < 32 || a > 512 || a % 32) return ERR_SHAPE;
    const int need = (nvr + a - 1) / a;
    int np = 1;
    while (np < need) np *= 2;
    if (np > 8) return ERR_SHAPE;
    PROBE_NP_BLOCK(np, go(block_row<NP>, grid, a, wbytes, stream, info, X, W, D, DX, rows, cols, eps))
  }
  return ERR_SHAPE;
}

// flare's add_rms_norm_fwd_bf16 (block = group, or 128 for group <= 32), for scale.
extern "C" int probe_fwd(int group, long long grid, const void *x, const void *r, const void *w,
                         void *y, void *h, long long rows, int cols, float eps, void *stream,
                         int *info) {
  using bf = __nv_bfloat16;
  const int block = group <= 32 ? 128 : group;
  return probe::go(add_rms_norm_fwd_bf16, grid, block, 0, stream, info, (const bf *)x,
                   (const bf *)r, (const bf *)w, (bf *)y, (bf *)h, rows, cols, group, eps);
}
"""


def find_nvcc():
    """nvcc from PATH, else $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda."""
    cands = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("nvcc not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin)")


def build(arch):
    tmp = tempfile.mkdtemp(prefix="rms_norm_probe_")
    src = os.path.join(tmp, "launch.cu")
    with open(src, "w") as f:
        f.write(LAUNCHER)
    so = os.path.join(tmp, "libprobe.so")
    cmd = [find_nvcc(), "-O3", "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC",
           "-I", CU, "-o", so, src]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(so)
    vp, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
    ip = ctypes.POINTER(ctypes.c_int)
    lib.probe_bwd.argtypes = [i32, i32, i32, i64, vp, vp, vp, vp, i64, i32, f32, vp, ip]
    lib.probe_bwd.restype = i32
    lib.probe_fwd.argtypes = [i32, i64, vp, vp, vp, vp, vp, i64, i32, f32, vp, ip]
    lib.probe_fwd.restype = i32
    return lib


def kernel_consts():
    """The #defines of rms_norm.cu flare's host launcher reads (RMS_BWD_ELEMS, ...)."""
    with open(os.path.join(CU, "rms_norm.cu")) as f:
        text = f.read()
    return {k: int(v) for k, v in re.findall(r"#define\s+(\w+)\s+(\d+)\b", text)}


def row_plan(elems, max_threads, rows, cols, cap=None):
    """crates/flare/src/ops/cuda/rows.rs RowPlan::new: (group, block, grid)."""
    threads = max(-(-cols // elems), 1)
    if threads <= 32:
        g = 1 << (threads - 1).bit_length()
        group, block, rpb = g, 128, 128 // g
    elif threads <= max_threads:
        g = -(-threads // 32) * 32
        group, block, rpb = g, g, 1
    else:
        group, block, rpb = max_threads, max_threads, 1
    grid = -(-rows // rpb)
    if cap is not None:
        grid = min(grid, cap)
    return group, block, max(1, grid)


def stream():
    return torch.cuda.current_stream().cuda_stream


def cdiv(a, b):
    return -(-a // b)


def run_shape(lib, rows, cols, reps, sms, K):
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(rows * 7919 + cols)
    # x with a per-row scale (rinv varies by row); dy correlated with x so that the second term
    # of dx (x * rinv^3 * sum(dy w x) / cols) is not negligible and is checked too.
    scale = torch.exp(0.5 * torch.randn(rows, 1, device=dev, generator=gen))
    xf = torch.randn(rows, cols, device=dev, generator=gen) * scale
    x = xf.bfloat16()
    w = (1 + 0.1 * torch.randn(cols, device=dev, generator=gen)).bfloat16()
    dy = (torch.randn(rows, cols, device=dev, generator=gen) + 0.5 * xf / scale).bfloat16()
    del xf, scale
    dx = torch.empty_like(x)
    xd, gd = x.double(), dy.double() * w.double()
    rinv = torch.rsqrt((xd * xd).mean(-1, keepdim=True) + EPS)
    ref = rinv * gd - xd * rinv**3 * (gd * xd).sum(-1, keepdim=True) / cols
    del xd, gd
    ref_max = ref.abs().max().item()
    tol = 2e-2 * ref_max

    nbytes = 3 * rows * cols * 2  # x, dy read; dx written
    print(f"\n=== rows {rows}, cols {cols}, bf16, need_dw 0: x + dy + dx = {nbytes / 1e6:.1f} MB;"
          f" max|ref dx| {ref_max:.3g}, tolerance {tol:.3g} ===")
    hdr = (f"{'variant':58s} {'block x grid':>14s} {'regs':>4s} {'spill':>5s} {'blk/SM':>6s}"
           f" {'us':>8s} {'TB/s':>6s} {'%copy':>6s} {'max abs err':>11s}  check")
    print(hdr)
    print("-" * len(hdr))

    # Copies (bandwidth reference): the same bytes moved as the backward, and a 3-tensor copy.
    half = nbytes // 2
    src = torch.empty(half, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), reps)
    copy_bw = nbytes / (t_copy * 1e-6)
    del src, dst
    print(f"{f'copy_ of {half / 1e6:.1f} MB (same {nbytes / 1e6:.1f} MB moved)':58s} {'':14s} "
          f"{'':4s} {'':5s} {'':6s} {t_copy:8.1f} {copy_bw / 1e12:6.2f} {100.0:6.0f}")
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps)
    del src, dst
    print(f"{f'copy_ of {nbytes / 1e6:.1f} MB ({2 * nbytes / 1e6:.1f} MB moved)':58s} {'':14s} "
          f"{'':4s} {'':5s} {'':6s} {t:8.1f} {2 * nbytes / (t * 1e-6) / 1e12:6.2f} "
          f"{100 * (2 * nbytes / t) / (nbytes / t_copy):6.0f}")

    E, TH = K["RMS_BWD_ELEMS"], K["RMS_BWD_THREADS"]
    g_all, blk0, grid_all = row_plan(E, TH, rows, cols)
    cap = sms * max(TH // blk0, 1)  # ops/rms_norm/cuda.rs: sm_count * (512 / block)
    g_cur, _, grid_cur = row_plan(E, TH, rows, cols, cap)
    persistent = lambda w_: (lambda info: min(cdiv(rows, w_), sms * info[2]))
    V = []  # (label, variant, a, b, grid from info)
    V.append((f"flare bwd as launched (group {g_cur}, persistent)", 0, g_cur, 0, lambda i: grid_cur))
    V.append((f"flare bwd, group {g_all}, grid = all rows", 0, g_all, 0, lambda i: grid_all))
    for g in (256, 512):
        if g != g_all and g <= TH:
            V.append((f"flare bwd, group {g}, grid = rows", 0, g, 0, lambda i: rows))
    for wpb in (2, 4, 8):
        V.append((f"a: warp/row, {wpb} warps/block", 1, wpb, 0, (lambda w_: lambda i: cdiv(rows, w_))(wpb)))
    for t in (256, 512, 128):
        V.append((f"b: block/row, {t} threads", 2, t, 0, lambda i: rows))
    for wpb in (2, 4):
        V.append((f"c1: warp/row persistent, register ring, {wpb} warps/blk", 3, wpb, 0, persistent(wpb)))
    for wpb, st in ((1, 2), (2, 2), (1, 3), (2, 3), (1, 4)):
        V.append((f"c2: warp/row persistent, cp.async {st} stages, {wpb} warps/blk", 4, wpb, st, persistent(wpb)))

    results = []
    for label, var, a, b, grid_of in V:
        print(f"{label:58s} ", end="", flush=True)  # a crash below names its variant
        info = (ctypes.c_int * 5)()
        rc = lib.probe_bwd(var, a, b, 0, None, None, None, None, rows, cols, EPS, None, info)
        if rc != 0 or info[2] == 0:
            why = "shape not covered" if rc == ERR_SHAPE else (f"cuda error {rc}" if rc else "0 blocks/SM")
            print(f"skipped ({why})")
            continue
        grid = grid_of(info)
        run = (lambda var_, a_, b_, g_: lambda: lib.probe_bwd(
            var_, a_, b_, g_, x.data_ptr(), w.data_ptr(), dy.data_ptr(), dx.data_ptr(), rows, cols,
            EPS, stream(), None))(var, a, b, grid)
        dx.fill_(float("nan"))
        rc = run()
        torch.cuda.synchronize()
        if rc != 0:
            print(f"launch failed (cuda error {rc})")
            continue
        finite = bool(torch.isfinite(dx).all().item())
        err = (dx.double() - ref).abs().max().item()
        ok = finite and err <= tol
        t = timed(run, reps)
        bw = nbytes / (t * 1e-6)
        results.append((t, label, ok))
        print(f"{f'{info[3]} x {grid}':>14s} {info[0]:4d} {info[1]:5d} {info[2]:6d} "
              f"{t:8.1f} {bw / 1e12:6.2f} {100 * bw / copy_bw:6.0f} {err:11.3e}  "
              f"{'PASS' if ok else 'FAIL'}{'' if finite else ' (non-finite)'}", flush=True)

    # The forward, for scale: add_rms_norm_fwd_bf16 as flare launches it (2 read, 2 written).
    g_f, _, grid_f = row_plan(K["ADD_RMS_ELEMS"], K["ADD_RMS_THREADS"], rows, cols)
    info = (ctypes.c_int * 5)()
    label = f"(fwd) flare add_rms_norm_fwd, group {g_f}, grid = rows"
    print(f"{label:58s} ", end="", flush=True)
    if lib.probe_fwd(g_f, 0, None, None, None, None, None, rows, cols, EPS, None, info) == 0:
        y, h = torch.empty_like(x), torch.empty_like(x)
        run = lambda: lib.probe_fwd(g_f, grid_f, x.data_ptr(), dy.data_ptr(), w.data_ptr(),
                                    y.data_ptr(), h.data_ptr(), rows, cols, EPS, stream(), None)
        y.fill_(float("nan"))
        rc = run()
        torch.cuda.synchronize()
        hr = (x.float() + dy.float()).bfloat16()
        hd = hr.double()
        yr = hd * torch.rsqrt((hd * hd).mean(-1, keepdim=True) + EPS) * w.double()
        err = (y.double() - yr).abs().max().item()
        ok = rc == 0 and torch.equal(h, hr) and bool(torch.isfinite(y).all().item()) \
            and err <= 2e-2 * yr.abs().max().item()
        del hd, yr, hr
        t = timed(run, reps)
        bw = 4 * rows * cols * 2 / (t * 1e-6)
        print(f"{f'{info[3]} x {grid_f}':>14s} {info[0]:4d} {info[1]:5d} {info[2]:6d} "
              f"{t:8.1f} {bw / 1e12:6.2f} {100 * bw / copy_bw:6.0f} {err:11.3e}  "
              f"{'PASS' if ok else 'FAIL'}  (4 tensors)")
    else:
        print("skipped")

    cur = next((r[0] for r in results if r[1] == V[0][0]), None)
    best = min((r for r in results if r[2]), default=None)
    if best:
        vs = f", {cur / best[0]:.2f}x flare as launched ({cur:.1f} us)" if cur else ""
        print(f"best passing: {best[1]}: {best[0]:.1f} us{vs}; the copy of the same bytes "
              f"{t_copy:.1f} us")
    if not all(r[2] for r in results):
        print("FAIL: " + ", ".join(r[1] for r in results if not r[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=30, help="graph replays (median) per timing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    sms = props.multi_processor_count
    print(f"{props.name}, {sms} SMs, torch {torch.__version__}")
    lib = build(f"sm_{major}{minor}")
    K = kernel_consts()
    for rows in a.rows:
        run_shape(lib, rows, a.cols, a.reps, sms, K)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
