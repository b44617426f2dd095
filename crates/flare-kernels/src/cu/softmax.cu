// Softmax over the last dimension, forward and backward, for f32 / f16 / bf16 (f32 math).
//
//   softmax_fwd_<t>(x, y, rows, cols, group):      y = exp(x - max) / sum(exp(x - max))
//   softmax_bwd_<t>(y, dy, dx, rows, cols, group): dx = y * (dy - sum(dy * y))
//
// `group` is the number of threads per row chosen by the host (see common.cuh for the paths):
// the register path when the row fits (group * ELEMS >= cols) and 16-byte accesses apply, the
// streaming path otherwise. The host launcher (crates/flare/src/ops/cuda/softmax.rs) mirrors the
// constants below.
#include "common.cuh"

using namespace flare;

// Threads per block at most, and elements per thread in the register path.
#define SOFTMAX_FWD_THREADS 1024
#define SOFTMAX_FWD_ELEMS 32
#define SOFTMAX_BWD_THREADS 512
#define SOFTMAX_BWD_ELEMS 32

// ---- forward -------------------------------------------------------------------------------

// The row in registers (as f32): read once, max, exp and sum, scale, write once.
template <typename T, int E>
__device__ __forceinline__ void softmax_fwd_regs(const T *__restrict__ x, T *__restrict__ y,
                                                 long long rows, int cols, int G) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  __shared__ float sh[2][32];
  const RowGroups rg(G);
  const int nvr = cols / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const long long row = r0 + rg.slot;
    const bool valid = row < rows;
    const long long off = (valid ? row : 0) * (long long)cols;
    float v[NV][V];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = rg.lane + i * G;
      if (valid && c < nvr) {
        const Pack<T, V> p = load_pack<T, V>(x + off + c * V);
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = to_f(p.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = -INFINITY;
      }
    }
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) m = fmaxf(m, v[i][j]);
    m = group_reduce<MaxOp>(m, G, sh[0]);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        // Padding is -inf and contributes exp(-inf) = 0.
        const float e = expf(v[i][j] - m);
        v[i][j] = e;
        s += e;
      }
    s = group_reduce<SumOp>(s, G, sh[1]);
    const float inv = 1.f / s;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = rg.lane + i * G;
      if (valid && c < nvr) {
        Pack<T, V> p;
#pragma unroll
        for (int j = 0; j < V; ++j) p.v[j] = from_f<T>(v[i][j] * inv);
        store_pack<T, V>(y + off + c * V, p);
      }
    }
  }
}

// Streaming: an online max / rescaled-sum pass, then an output pass that re-reads the row
// (from L1/L2 unless the row is very long).
template <typename T, bool VEC>
__device__ __forceinline__ void softmax_fwd_stream(const T *__restrict__ x, T *__restrict__ y,
                                                   long long rows, int cols, int G) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float sh[2][32];
  const RowGroups rg(G);
  const int nvr = (cols + V - 1) / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const long long row = r0 + rg.slot;
    const bool valid = row < rows;
    const long long off = (valid ? row : 0) * (long long)cols;
    float m = -INFINITY, s = 0.f;
    if (valid) {
      for (int c0 = rg.lane; c0 < nvr; c0 += LONG_UNROLL * G) {
        float f[LONG_UNROLL][V];
#pragma unroll
        for (int u = 0; u < LONG_UNROLL; ++u) {
          const int c = c0 + u * G;
          if (c < nvr) {
            const Pack<T, V> p = load_row_pack<T, V, VEC>(x + off, c, cols, -INFINITY);
#pragma unroll
            for (int j = 0; j < V; ++j) f[u][j] = to_f(p.v[j]);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) f[u][j] = -INFINITY;
          }
        }
        float pm = -INFINITY;
#pragma unroll
        for (int u = 0; u < LONG_UNROLL; ++u)
#pragma unroll
          for (int j = 0; j < V; ++j) pm = fmaxf(pm, f[u][j]);
        const float nm = fmaxf(m, pm);
        if (nm != -INFINITY) {  // otherwise everything so far is -inf and s stays 0
          s *= expf(m - nm);
#pragma unroll
          for (int u = 0; u < LONG_UNROLL; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j) s += expf(f[u][j] - nm);
          m = nm;
        }
      }
    }
    const float M = group_reduce<MaxOp>(m, G, sh[0]);
    const float scaled = m == -INFINITY ? 0.f : s * expf(m - M);
    const float S = group_reduce<SumOp>(scaled, G, sh[1]);
    const float inv = 1.f / S;
    if (valid) {
#pragma unroll stream_unroll<VEC>()
      for (int c = rg.lane; c < nvr; c += G) {
        const Pack<T, V> p = load_row_pack<T, V, VEC>(x + off, c, cols, 0.f);
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(expf(to_f(p.v[j]) - M) * inv);
        store_row_pack<T, V, VEC>(y + off, c, cols, o);
      }
    }
  }
}

// ---- backward ------------------------------------------------------------------------------

// y and dy in registers (as stored): read once, dot, write dx once.
template <typename T, int E>
__device__ __forceinline__ void softmax_bwd_regs(const T *__restrict__ y, const T *__restrict__ dy,
                                                 T *__restrict__ dx, long long rows, int cols,
                                                 int G) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  __shared__ float sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = cols / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const long long row = r0 + rg.slot;
    const bool valid = row < rows;
    const long long off = (valid ? row : 0) * (long long)cols;
    Pack<T, V> py[NV], pg[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = rg.lane + i * G;
      if (valid && c < nvr) {
        py[i] = load_pack<T, V>(y + off + c * V);
        pg[i] = load_pack<T, V>(dy + off + c * V);
      } else {
        py[i] = zero_pack<T, V>();
        pg[i] = zero_pack<T, V>();
      }
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) s += to_f(py[i].v[j]) * to_f(pg[i].v[j]);
    s = group_reduce<SumOp>(s, G, sh[buf]);
    buf ^= 1;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = rg.lane + i * G;
      if (valid && c < nvr) {
        Pack<T, V> p;
#pragma unroll
        for (int j = 0; j < V; ++j)
          p.v[j] = from_f<T>(to_f(py[i].v[j]) * (to_f(pg[i].v[j]) - s));
        store_pack<T, V>(dx + off + c * V, p);
      }
    }
  }
}

// Streaming: a dot pass, then an output pass that re-reads y and dy.
template <typename T, bool VEC>
__device__ __forceinline__ void softmax_bwd_stream(const T *__restrict__ y,
                                                   const T *__restrict__ dy, T *__restrict__ dx,
                                                   long long rows, int cols, int G) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = (cols + V - 1) / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const long long row = r0 + rg.slot;
    const bool valid = row < rows;
    const long long off = (valid ? row : 0) * (long long)cols;
    float s = 0.f;
    if (valid) {
#pragma unroll stream_unroll<VEC>()
      for (int c = rg.lane; c < nvr; c += G) {
        const Pack<T, V> a = load_row_pack<T, V, VEC>(y + off, c, cols, 0.f);
        const Pack<T, V> b = load_row_pack<T, V, VEC>(dy + off, c, cols, 0.f);
#pragma unroll
        for (int j = 0; j < V; ++j) s += to_f(a.v[j]) * to_f(b.v[j]);
      }
    }
    s = group_reduce<SumOp>(s, G, sh[buf]);
    buf ^= 1;
    if (valid) {
#pragma unroll stream_unroll<VEC>()
      for (int c = rg.lane; c < nvr; c += G) {
        const Pack<T, V> a = load_row_pack<T, V, VEC>(y + off, c, cols, 0.f);
        const Pack<T, V> b = load_row_pack<T, V, VEC>(dy + off, c, cols, 0.f);
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(to_f(a.v[j]) * (to_f(b.v[j]) - s));
        store_row_pack<T, V, VEC>(dx + off, c, cols, o);
      }
    }
  }
}

// ---- entry points --------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void softmax_fwd(const T *__restrict__ x, T *__restrict__ y,
                                            long long rows, int cols, int group) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(y);
  if (vec && (long long)group * SOFTMAX_FWD_ELEMS >= cols)
    softmax_fwd_regs<T, SOFTMAX_FWD_ELEMS>(x, y, rows, cols, group);
  else if (vec)
    softmax_fwd_stream<T, true>(x, y, rows, cols, group);
  else
    softmax_fwd_stream<T, false>(x, y, rows, cols, group);
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(const T *__restrict__ y, const T *__restrict__ dy,
                                            T *__restrict__ dx, long long rows, int cols,
                                            int group) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = cols % V == 0 && aligned16(y) && aligned16(dy) && aligned16(dx);
  if (vec && (long long)group * SOFTMAX_BWD_ELEMS >= cols)
    softmax_bwd_regs<T, SOFTMAX_BWD_ELEMS>(y, dy, dx, rows, cols, group);
  else if (vec)
    softmax_bwd_stream<T, true>(y, dy, dx, rows, cols, group);
  else
    softmax_bwd_stream<T, false>(y, dy, dx, rows, cols, group);
}

#define SOFTMAX_INSTANCES(T, SUF)                                                                  \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_FWD_THREADS)                                \
      softmax_fwd_##SUF(const T *__restrict__ x, T *__restrict__ y, long long rows, int cols,      \
                        int group) {                                                               \
    softmax_fwd<T>(x, y, rows, cols, group);                                                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BWD_THREADS)                                \
      softmax_bwd_##SUF(const T *__restrict__ y, const T *__restrict__ dy, T *__restrict__ dx,     \
                        long long rows, int cols, int group) {                                     \
    softmax_bwd<T>(y, dy, dx, rows, cols, group);                                                  \
  }

SOFTMAX_INSTANCES(float, f32)
SOFTMAX_INSTANCES(__half, f16)
SOFTMAX_INSTANCES(__nv_bfloat16, bf16)
