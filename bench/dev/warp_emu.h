// The CUDA execution model on CPU threads, shared by the kernel emulations in bench/dev
// (flash_attention_emu.cpp): a kernel file compiled as host C++, every
// CUDA thread a std::thread, __syncthreads a barrier of the block, one block at a time, and the
// warp-level instructions emulated from their PTX ISA definitions by an exchange among the 32
// lanes of a warp. Defines FLARE_WARP_EMULATE, which makes crates/flare-kernels/src/cu/mma.cuh
// take the emulated flare::mma16816 below. It checks index math and fragment layouts; it says
// nothing about speed, and mma rounding is only approximated (f32 sums in a fixed order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

// ---- the CUDA execution model on threads ------------------------------------------------------

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  // one block runs at a time, so a static is the block's memory
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define FLARE_WARP_EMULATE 1

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;
using std::max;
using std::min;

struct WarpCtx {
  std::barrier<> bar{32};
  alignas(16) unsigned char slot[32][64];
};
static std::barrier<> *g_block_bar;
static WarpCtx *g_warps;
thread_local int t_warp, t_lane;

static void __syncthreads() { g_block_bar->arrive_and_wait(); }

// Every lane contributes `in`; f(all 32 inputs, lane) gives this lane's result.
template <typename In, typename F> static auto warp_exchange(const In &in, F f) {
  static_assert(sizeof(In) <= 64 && std::is_trivially_copyable_v<In>);
  WarpCtx &w = g_warps[t_warp];
  std::memcpy(w.slot[t_lane], &in, sizeof(In));
  w.bar.arrive_and_wait();
  In all[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], w.slot[l], sizeof(In));
  auto out = f(all, t_lane);
  w.bar.arrive_and_wait();
  return out;
}

template <typename V> static V __shfl_xor_sync(unsigned, V v, int m) {
  return warp_exchange(v, [m](const V *all, int lane) { return all[lane ^ m]; });
}
template <typename P> static P __ldg(const P *p) { return *p; }
static float atomicAdd(float *p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// ---- mma.sync (the contract of crates/flare-kernels/src/cu/mma.cuh) ----------------------------

namespace flare {

template <typename T> inline float half_of(unsigned w, int h) {
  const uint16_t u = (uint16_t)(h ? w >> 16 : w & 0xffff);
  T x;
  std::memcpy(&x, &u, 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(x);
  else
    return __half2float(x);
}

// mma.sync.m16n8k16.row.col.f32: g = lane/4, t = lane%4.
// A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)   [row, k]
// B: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
// C: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
template <typename T>
inline void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  struct In {
    unsigned a[4], b[2];
    float c[4];
  };
  struct Out {
    float c[4];
  };
  In in;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = c[i];
  in.b[0] = b0;
  in.b[1] = b1;
  const Out o = warp_exchange(in, [](const In *all, int lane) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = half_of<T>(all[l].a[0], h);
        A[g + 8][2 * t + h] = half_of<T>(all[l].a[1], h);
        A[g][2 * t + 8 + h] = half_of<T>(all[l].a[2], h);
        A[g + 8][2 * t + 8 + h] = half_of<T>(all[l].a[3], h);
        B[2 * t + h][g] = half_of<T>(all[l].b[0], h);
        B[2 * t + 8 + h][g] = half_of<T>(all[l].b[1], h);
        C[g][2 * t + h] = all[l].c[h];
        C[g + 8][2 * t + h] = all[l].c[2 + h];
      }
    }
    const int g = lane / 4, t = lane % 4;
    Out o;
    for (int e = 0; e < 4; ++e) {
      const int r = g + (e >> 1) * 8, n = 2 * t + (e & 1);
      float s = C[r][n];
      for (int kk = 0; kk < 16; ++kk) s += A[r][kk] * B[kk][n];
      o.c[e] = s;
    }
    return o;
  });
  for (int e = 0; e < 4; ++e) c[e] = o.c[e];
}

}  // namespace flare

// The dynamic shared memory of the running block.
static std::vector<unsigned char> g_emu_dyn_smem;

// Runs body() as every thread of every block of the grid, one block at a time; at_exit() runs in
// each thread after body() (a check of what the caller emulates, e.g. pending async copies).
template <typename F, typename Exit>
static void emu_launch(dim3 grid, dim3 block, size_t dyn_smem, F body, Exit at_exit) {
  const int nt = block.x * block.y * block.z;
  g_emu_dyn_smem.assign(dyn_smem, 0xA5);  // garbage, as real shared memory
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(nt);
        std::unique_ptr<WarpCtx[]> warps(new WarpCtx[(nt + 31) / 32]);
        g_block_bar = &bar;
        g_warps = warps.get();
        std::vector<std::thread> th;
        th.reserve(nt);
        for (int i = 0; i < nt; ++i)
          th.emplace_back([&, i] {
            threadIdx = make_uint3(i, 0, 0);
            blockIdx = make_uint3(x, y, z);
            blockDim = block;
            gridDim = grid;
            t_warp = i / 32;
            t_lane = i % 32;
            body();
            at_exit();
          });
        for (auto &t : th) t.join();
      }
}

template <typename F> static void emu_launch(dim3 grid, dim3 block, size_t dyn_smem, F body) {
  emu_launch(grid, block, dyn_smem, body, [] {});
}

// ---- host-side values ------------------------------------------------------------------------

using bf16 = __nv_bfloat16;
using f16 = __half;

template <typename T> static float tof(T x) {
  if constexpr (std::is_same_v<T, bf16>)
    return __bfloat162float(x);
  else
    return __half2float(x);
}
template <typename T> static T fromf(float x) {
  if constexpr (std::is_same_v<T, bf16>)
    return __float2bfloat16_rn(x);
  else
    return __float2half_rn(x);
}
// n values drawn from N(0, sd²) by `rng`, rounded to T.
template <typename T> static std::vector<T> emu_rand_vec(size_t n, float sd, std::mt19937_64 &rng) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<T> v(n);
  for (auto &x : v) x = fromf<T>(nd(rng));
  return v;
}
