// RMSNorm over the last dimension for f32 / f16 / bf16 (f32 math).
//
//   rms_norm_fwd_<t>(x, w, y, rows, cols, group, eps):
//       y = x * rsqrt(mean(x^2) + eps) * w
//   add_rms_norm_fwd_<t>(x, r, w, y, h, rows, cols, group, eps):
//       h = x + r rounded to T; y = rms_norm(h) * w (two separate outputs)
//   rms_norm_bwd_<t>(x, w, dy, dx, partial, rows, cols, group, eps, need_dw):
//       rinv = rsqrt(mean(x^2) + eps), g = dy * w,
//       dx = rinv * g - x * rinv^3 * sum(g * x) / cols
//       and, if need_dw, per-slot partial sums of dy * x * rinv over the slot's rows (f32) into
//       partial[slot][cols], slots = grid * (group <= 32 ? block / 32 : 1)
//   rms_norm_bwd_rows_<t>(x, w, dy, dx, dw, rows, cols, eps):
//       the same dx for a frozen weight, for 16-byte aligned rows of at most
//       RMS_BWD_ROW_MAX_THREADS * RMS_BWD_ROW_PACKS packs (see rms_bwd_rows); dw[cols] is
//       written with zeros (by block 0: no memset launch)
//   rms_norm_dw_<t>(partial, dw, slots, cols):
//       dw[c] = sum over slots of partial[slot][c], in a fixed order (deterministic)
//
// `group` is the number of threads per row chosen by the host (see common.cuh for the paths):
// the register path when the row fits (group * ELEMS >= cols) and 16-byte accesses apply, the
// streaming path otherwise; the loops are common.cuh's row skeletons. The host launcher
// (crates/flare/src/ops/rms_norm/cuda.rs) reads the constants below through
// flare_kernels::launch (generated from these #defines by build.rs).
#include "common.cuh"

using namespace flare;

// Threads per block at most, and elements per thread in the register path.
#define RMS_FWD_THREADS 1024
#define RMS_FWD_ELEMS 32
#define ADD_RMS_THREADS 512
#define ADD_RMS_ELEMS 32
#define RMS_BWD_THREADS 512
#define RMS_BWD_ELEMS 32
#define RMS_DW_THREADS 256
#define RMS_BWD_ROW_PACKS 2
#define RMS_BWD_ROW_MAX_THREADS 1024

__device__ __forceinline__ float inv_rms(float sum_sq, int cols, float eps) {
  return rsqrtf(sum_sq / (float)cols + eps);
}

// ---- forward -------------------------------------------------------------------------------

template <typename T, int E>
__device__ __forceinline__ void rms_fwd_regs(const T *__restrict__ x, const T *__restrict__ w,
                                             T *__restrict__ y, long long rows, int cols, int G,
                                             float eps) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  __shared__ float sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = cols / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    float v[NV][V];
    for_reg_packs<NV>(
        rg, nvr, rs.valid,
        [&](int i, int c) {
          const Pack<T, V> p = load_pack<T, V>(x + rs.off + c * V);
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = to_f(p.v[j]);
        },
        [&](int i) {
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = 0.f;
        });
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) ss += v[i][j] * v[i][j];
    ss = group_reduce<SumOp>(ss, G, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(ss, cols, eps);
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      const Pack<T, V> pw = load_pack_fresh<T, V>(w + c * V);
      Pack<T, V> p;
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = from_f<T>(v[i][j] * rinv * to_f(pw.v[j]));
      store_pack<T, V>(y + rs.off + c * V, p);
    });
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void rms_fwd_stream(const T *__restrict__ x, const T *__restrict__ w,
                                               T *__restrict__ y, long long rows, int cols, int G,
                                               float eps) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = (cols + V - 1) / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    float ss = 0.f;
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> p = load_row_pack<T, V, VEC>(x + rs.off, c, cols, 0.f);
#pragma unroll
        for (int j = 0; j < V; ++j) ss += to_f(p.v[j]) * to_f(p.v[j]);
      });
    }
    ss = group_reduce<SumOp>(ss, G, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(ss, cols, eps);
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> p = load_row_pack<T, V, VEC>(x + rs.off, c, cols, 0.f);
        const Pack<T, V> pw = load_row_pack_fresh<T, V, VEC>(w, c, cols);
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(to_f(p.v[j]) * rinv * to_f(pw.v[j]));
        store_row_pack<T, V, VEC>(y + rs.off, c, cols, o);
      });
    }
  }
}

// ---- fused residual add + forward ----------------------------------------------------------

template <typename T, int E>
__device__ __forceinline__ void add_rms_fwd_regs(const T *__restrict__ x, const T *__restrict__ r,
                                                 const T *__restrict__ w, T *__restrict__ y,
                                                 T *__restrict__ h, long long rows, int cols,
                                                 int G, float eps) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  __shared__ float sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = cols / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    Pack<T, V> px[NV], pr[NV];
    for_reg_packs<NV>(
        rg, nvr, rs.valid,
        [&](int i, int c) {
          px[i] = load_pack<T, V>(x + rs.off + c * V);
          pr[i] = load_pack<T, V>(r + rs.off + c * V);
        },
        [&](int i) {
          px[i] = zero_pack<T, V>();
          pr[i] = zero_pack<T, V>();
        });
    // h rounded to T (and kept as T, which is exact); the norm is computed from the rounded
    // values.
    Pack<T, V> ph[NV];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        ph[i].v[j] = from_f<T>(to_f(px[i].v[j]) + to_f(pr[i].v[j]));
        const float hv = to_f(ph[i].v[j]);
        ss += hv * hv;
      }
      const int c = rg.lane + i * G;
      if (rs.valid && c < nvr) store_pack<T, V>(h + rs.off + c * V, ph[i]);
    }
    ss = group_reduce<SumOp>(ss, G, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(ss, cols, eps);
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      const Pack<T, V> pw = load_pack_fresh<T, V>(w + c * V);
      Pack<T, V> p;
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = from_f<T>(to_f(ph[i].v[j]) * rinv * to_f(pw.v[j]));
      store_pack<T, V>(y + rs.off + c * V, p);
    });
  }
}

// Streaming: pass 1 writes h and sums its squares, pass 2 re-reads h (this thread's own
// writes) and writes y.
template <typename T, bool VEC>
__device__ __forceinline__ void add_rms_fwd_stream(const T *__restrict__ x,
                                                   const T *__restrict__ r,
                                                   const T *__restrict__ w, T *__restrict__ y,
                                                   T *__restrict__ h, long long rows, int cols,
                                                   int G, float eps) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = (cols + V - 1) / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    float ss = 0.f;
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> a = load_row_pack<T, V, VEC>(x + rs.off, c, cols, 0.f);
        const Pack<T, V> b = load_row_pack<T, V, VEC>(r + rs.off, c, cols, 0.f);
        Pack<T, V> ph;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          ph.v[j] = from_f<T>(to_f(a.v[j]) + to_f(b.v[j]));
          const float hv = to_f(ph.v[j]);
          ss += hv * hv;
        }
        store_row_pack<T, V, VEC>(h + rs.off, c, cols, ph);
      });
    }
    ss = group_reduce<SumOp>(ss, G, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(ss, cols, eps);
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> ph = load_row_pack_rw<T, V, VEC>(h + rs.off, c, cols);
        const Pack<T, V> pw = load_row_pack_fresh<T, V, VEC>(w, c, cols);
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(to_f(ph.v[j]) * rinv * to_f(pw.v[j]));
        store_row_pack<T, V, VEC>(y + rs.off, c, cols, o);
      });
    }
  }
}

// ---- backward ------------------------------------------------------------------------------
//
// The dw partial sums of a thread (one f32 per element of its packs, summed over the rows its
// group handles) live in dynamic shared memory, not registers: x and dy already take 2 * E
// registers per thread. Each thread only touches its own entries, so no barrier is needed;
// float4 q of pack i of thread t is at [(i * V/4 + q) * blockDim.x + t] (conflict-free).
// Size: blockDim.x * E floats (the host passes it; 0 without need_dw).

template <int V> struct DwAcc {
  float4 *base;
  __device__ __forceinline__ float4 *at(int i, int q) const {
    return base + (i * (V / 4) + q) * blockDim.x + threadIdx.x;
  }
  __device__ __forceinline__ void zero(int nv) const {
    for (int i = 0; i < nv; ++i)
#pragma unroll
      for (int q = 0; q < V / 4; ++q) *at(i, q) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  // acc[pack i] += d[0 .. V)
  __device__ __forceinline__ void add(int i, const float (&d)[V]) const {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float4 a = *at(i, q);
      a.x += d[4 * q + 0];
      a.y += d[4 * q + 1];
      a.z += d[4 * q + 2];
      a.w += d[4 * q + 3];
      *at(i, q) = a;
    }
  }
};

__device__ __forceinline__ float4 shfl_xor4(float4 a, int o) {
  a.x += __shfl_xor_sync(0xffffffffu, a.x, o);
  a.y += __shfl_xor_sync(0xffffffffu, a.y, o);
  a.z += __shfl_xor_sync(0xffffffffu, a.z, o);
  a.w += __shfl_xor_sync(0xffffffffu, a.w, o);
  return a;
}

// Writes the thread's dw partial sums (columns of packs lane + i*G, i < nv) to its slot's row
// of `partial`. With G <= 32 the groups of a warp share columns and are summed first (fixed
// butterfly), so there is one slot per warp; with G > 32 one slot per block. Every thread of
// the block calls it.
template <int V>
__device__ __forceinline__ void write_dw_partial(const DwAcc<V> &acc, int nv,
                                                 float *__restrict__ partial, int G, int lane,
                                                 int cols) {
  const int nvr = (cols + V - 1) / V;
  const bool sub = G <= 32;
  const bool writer = !sub || (threadIdx.x & 31) < G;
  const long long slot =
      sub ? (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5) : blockIdx.x;
  float *pr = partial + slot * cols;
  for (int i = 0; i < nv; ++i) {
    const int c = lane + i * G;
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float4 a = *acc.at(i, q);
      if (sub)
        for (int o = G; o < 32; o <<= 1) a = shfl_xor4(a, o);
      const int e = c * V + 4 * q;
      if (writer && c < nvr) {
        if (e + 0 < cols) pr[e + 0] = a.x;
        if (e + 1 < cols) pr[e + 1] = a.y;
        if (e + 2 < cols) pr[e + 2] = a.z;
        if (e + 3 < cols) pr[e + 3] = a.w;
      }
    }
  }
}

// x and dy in registers (as stored), read once; w re-read (L1) rather than kept.
template <typename T, int E>
__device__ __forceinline__ void rms_bwd_regs(const T *__restrict__ x, const T *__restrict__ w,
                                             const T *__restrict__ dy, T *__restrict__ dx,
                                             float *__restrict__ partial, long long rows,
                                             int cols, int G, float eps, bool need_dw,
                                             const DwAcc<VecWidth<T>::value> &acc) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  __shared__ float2 sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = cols / V;
  if (need_dw) acc.zero(NV);
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    Pack<T, V> px[NV], pd[NV];
    for_reg_packs<NV>(
        rg, nvr, rs.valid,
        [&](int i, int c) {
          px[i] = load_pack<T, V>(x + rs.off + c * V);
          pd[i] = load_pack<T, V>(dy + rs.off + c * V);
        },
        [&](int i) {
          px[i] = zero_pack<T, V>();
          pd[i] = zero_pack<T, V>();
        });
    float2 s = make_float2(0.f, 0.f);  // (sum x^2, sum dy*w*x)
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      const Pack<T, V> pw = load_pack_fresh<T, V>(w + c * V);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xv = to_f(px[i].v[j]);
        s.x += xv * xv;
        s.y += to_f(pd[i].v[j]) * to_f(pw.v[j]) * xv;
      }
    });
    s = group_sum2(s, G, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(s.x, cols, eps);
    const float k = rinv * rinv * rinv * s.y / (float)cols;
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      const Pack<T, V> pw = load_pack_fresh<T, V>(w + c * V);
      Pack<T, V> o;
      float d[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xv = to_f(px[i].v[j]);
        const float dv = to_f(pd[i].v[j]);
        o.v[j] = from_f<T>(rinv * dv * to_f(pw.v[j]) - xv * k);
        d[j] = dv * xv * rinv;
      }
      store_pack<T, V>(dx + rs.off + c * V, o);
      if (need_dw) acc.add(i, d);
    });
  }
  if (need_dw) write_dw_partial<V>(acc, NV, partial, G, rg.lane, cols);
}

// Streaming: a sums pass, then a pass that re-reads x, dy and w. When the row fits (FITS: the
// scalar fallback for rows the register path would hold) the dw partials are kept as in
// rms_bwd_regs; otherwise (one block per row, G == blockDim.x, no shared memory) each block
// accumulates them in its own row of `partial` (read-modify-write by the thread owning the
// column; the block's first row writes).
template <typename T, bool VEC, bool FITS, int E>
__device__ __forceinline__ void rms_bwd_stream(const T *__restrict__ x, const T *__restrict__ w,
                                               const T *__restrict__ dy, T *__restrict__ dx,
                                               float *__restrict__ partial, long long rows,
                                               int cols, int G, float eps, bool need_dw,
                                               const DwAcc<VecWidth<T>::value> &acc) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  __shared__ float2 sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = (cols + V - 1) / V;
  if (FITS && need_dw) acc.zero(NV);
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    float2 s = make_float2(0.f, 0.f);  // (sum x^2, sum dy*w*x)
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> px = load_row_pack<T, V, VEC>(x + rs.off, c, cols, 0.f);
        const Pack<T, V> pd = load_row_pack<T, V, VEC>(dy + rs.off, c, cols, 0.f);
        const Pack<T, V> pw = load_row_pack_fresh<T, V, VEC>(w, c, cols);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float xv = to_f(px.v[j]);
          s.x += xv * xv;
          s.y += to_f(pd.v[j]) * to_f(pw.v[j]) * xv;
        }
      });
    }
    s = group_sum2(s, G, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(s.x, cols, eps);
    const float k = rinv * rinv * rinv * s.y / (float)cols;
    if (!rs.valid) continue;
    const bool first = rs.row == (long long)blockIdx.x;  // !FITS: one rs.row per block per step
    float *pr = partial + (long long)blockIdx.x * cols;
    for_stream_packs<VEC>(rg, nvr, [&](int c, int i) {
      const Pack<T, V> px = load_row_pack_fresh<T, V, VEC>(x + rs.off, c, cols);
      const Pack<T, V> pd = load_row_pack_fresh<T, V, VEC>(dy + rs.off, c, cols);
      const Pack<T, V> pw = load_row_pack_fresh<T, V, VEC>(w, c, cols);
      Pack<T, V> o;
      float d[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xv = to_f(px.v[j]);
        const float dv = to_f(pd.v[j]);
        o.v[j] = from_f<T>(rinv * dv * to_f(pw.v[j]) - xv * k);
        d[j] = dv * xv * rinv;
      }
      store_row_pack<T, V, VEC>(dx + rs.off, c, cols, o);
      if (need_dw) {
        if constexpr (FITS) {
          acc.add(i, d);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int e = c * V + j;
            if (e < cols) pr[e] = first ? d[j] : pr[e] + d[j];
          }
        }
      }
    });
  }
  if constexpr (FITS) {
    if (need_dw) write_dw_partial<V>(acc, NV, partial, G, rg.lane, cols);
  }
}

// The backward without dw (a frozen weight) on 16-byte aligned rows: one block per row
// (grid-stride over rows), RMS_BWD_ROW_PACKS packs of x and dy per thread in registers, w staged
// in shared memory (nvr packs, dynamic) once per block. The host takes it when need_dw is off,
// cols % V == 0, every pointer is 16-byte aligned and nvr <= blockDim.x * RMS_BWD_ROW_PACKS,
// with blockDim.x a multiple of 32 (one group per block: G = blockDim.x). At [4096, 4096] bf16
// on an H100 it takes 37.2 us where rms_bwd_regs (4 packs per thread, 98 registers, 4 blocks
// per SM) takes 49.8 us; a copy of the same bytes takes 35.5 us (bench/dev/rms_norm_probe.py).
template <typename T>
__device__ __forceinline__ void rms_bwd_rows(const T *__restrict__ x, const T *__restrict__ w,
                                             const T *__restrict__ dy, T *__restrict__ dx,
                                             T *__restrict__ dw, long long rows, int cols,
                                             float eps) {
  constexpr int V = VecWidth<T>::value;
  constexpr int NP = RMS_BWD_ROW_PACKS;
  if (blockIdx.x == 0)
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw[c] = from_f<T>(0.f);
  extern __shared__ float4 rows_smem[];
  Pack<T, V> *ws = reinterpret_cast<Pack<T, V> *>(rows_smem);
  __shared__ float2 sh[2][32];
  int buf = 0;
  const int t = threadIdx.x, nb = blockDim.x, nvr = cols / V;
  for (int c = t; c < nvr; c += nb) ws[c] = load_pack<T, V>(w + c * V);
  __syncthreads();
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {  // block-uniform
    const long long off = row * cols;
    Pack<T, V> px[NP], pd[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int c = t + i * nb;
      if (c < nvr) {
        px[i] = load_pack<T, V>(x + off + c * V);
        pd[i] = load_pack<T, V>(dy + off + c * V);
      }
    }
    float2 s = make_float2(0.f, 0.f);  // (sum x^2, sum dy*w*x)
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int c = t + i * nb;
      if (c < nvr) {
        const Pack<T, V> pw = ws[c];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float xv = to_f(px[i].v[j]);
          s.x += xv * xv;
          s.y += to_f(pd[i].v[j]) * to_f(pw.v[j]) * xv;
        }
      }
    }
    s = group_sum2(s, nb, sh[buf]);
    buf ^= 1;
    const float rinv = inv_rms(s.x, cols, eps);
    const float k = rinv * rinv * rinv * s.y / (float)cols;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      const int c = t + i * nb;
      if (c < nvr) {
        const Pack<T, V> pw = ws[c];
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = from_f<T>(rinv * to_f(pd[i].v[j]) * to_f(pw.v[j]) - to_f(px[i].v[j]) * k);
        store_pack<T, V>(dx + off + c * V, o);
      }
    }
  }
}

// ---- entry points --------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void rms_fwd(const T *__restrict__ x, const T *__restrict__ w,
                                        T *__restrict__ y, long long rows, int cols, int group,
                                        float eps) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(w) && aligned16(y);
  if (vec && (long long)group * RMS_FWD_ELEMS >= cols)
    rms_fwd_regs<T, RMS_FWD_ELEMS>(x, w, y, rows, cols, group, eps);
  else if (vec)
    rms_fwd_stream<T, true>(x, w, y, rows, cols, group, eps);
  else
    rms_fwd_stream<T, false>(x, w, y, rows, cols, group, eps);
}

template <typename T>
__device__ __forceinline__ void add_rms_fwd(const T *__restrict__ x, const T *__restrict__ r,
                                            const T *__restrict__ w, T *__restrict__ y,
                                            T *__restrict__ h, long long rows, int cols,
                                            int group, float eps) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(r) && aligned16(w) &&
                   aligned16(y) && aligned16(h);
  if (vec && (long long)group * ADD_RMS_ELEMS >= cols)
    add_rms_fwd_regs<T, ADD_RMS_ELEMS>(x, r, w, y, h, rows, cols, group, eps);
  else if (vec)
    add_rms_fwd_stream<T, true>(x, r, w, y, h, rows, cols, group, eps);
  else
    add_rms_fwd_stream<T, false>(x, r, w, y, h, rows, cols, group, eps);
}

template <typename T>
__device__ __forceinline__ void rms_bwd(const T *__restrict__ x, const T *__restrict__ w,
                                        const T *__restrict__ dy, T *__restrict__ dx,
                                        float *__restrict__ partial, long long rows, int cols,
                                        int group, float eps, bool need_dw) {
  constexpr int V = VecWidth<T>::value;
  const bool vec =
      cols % V == 0 && aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx);
  const bool fits = (long long)group * RMS_BWD_ELEMS >= cols;
  extern __shared__ float4 dw_smem[];
  const DwAcc<V> acc{dw_smem};
  if (vec && fits)
    rms_bwd_regs<T, RMS_BWD_ELEMS>(x, w, dy, dx, partial, rows, cols, group, eps, need_dw, acc);
  else if (fits)
    rms_bwd_stream<T, false, true, RMS_BWD_ELEMS>(x, w, dy, dx, partial, rows, cols, group, eps,
                                                  need_dw, acc);
  else if (vec)
    rms_bwd_stream<T, true, false, RMS_BWD_ELEMS>(x, w, dy, dx, partial, rows, cols, group, eps,
                                                  need_dw, acc);
  else
    rms_bwd_stream<T, false, false, RMS_BWD_ELEMS>(x, w, dy, dx, partial, rows, cols, group,
                                                   eps, need_dw, acc);
}

// dw[c] = sum_p partial[p][c]: 32 columns per block, 8 warps each summing every 8th slot in
// increasing order, then warp 0 adds the 8 partial sums in order. Fixed order: deterministic.
template <typename T>
__device__ __forceinline__ void rms_dw(const float *__restrict__ partial, T *__restrict__ dw,
                                       int slots, int cols) {
  constexpr int ROWS = RMS_DW_THREADS / 32;
  __shared__ float sh[ROWS][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + tx;
  float acc = 0.f;
  if (c < cols) {
    int p = ty;
    // Four independent loads in flight, added in slot order.
    for (; p + 3 * ROWS < slots; p += 4 * ROWS) {
      const float a0 = partial[(long long)p * cols + c];
      const float a1 = partial[(long long)(p + ROWS) * cols + c];
      const float a2 = partial[(long long)(p + 2 * ROWS) * cols + c];
      const float a3 = partial[(long long)(p + 3 * ROWS) * cols + c];
      acc += a0;
      acc += a1;
      acc += a2;
      acc += a3;
    }
    for (; p < slots; p += ROWS) acc += partial[(long long)p * cols + c];
  }
  sh[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < cols) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) t += sh[k][tx];
    dw[c] = from_f<T>(t);
  }
}

#define RMS_NORM_INSTANCES(T, SUF)                                                                 \
  extern "C" __global__ void __launch_bounds__(RMS_FWD_THREADS)                                    \
      rms_norm_fwd_##SUF(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y,      \
                         long long rows, int cols, int group, float eps) {                         \
    rms_fwd<T>(x, w, y, rows, cols, group, eps);                                                   \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(ADD_RMS_THREADS, 1) add_rms_norm_fwd_##SUF(         \
      const T *__restrict__ x, const T *__restrict__ r, const T *__restrict__ w,                   \
      T *__restrict__ y, T *__restrict__ h, long long rows, int cols, int group, float eps) {     \
    add_rms_fwd<T>(x, r, w, y, h, rows, cols, group, eps);                                         \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(RMS_BWD_THREADS) rms_norm_bwd_##SUF(                \
      const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ dy,                  \
      T *__restrict__ dx, float *__restrict__ partial, long long rows, int cols, int group,        \
      float eps, int need_dw) {                                                                    \
    rms_bwd<T>(x, w, dy, dx, partial, rows, cols, group, eps, need_dw != 0);                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(RMS_BWD_ROW_MAX_THREADS) rms_norm_bwd_rows_##SUF(     \
      const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ dy,                  \
      T *__restrict__ dx, T *__restrict__ dw, long long rows, int cols, float eps) {               \
    rms_bwd_rows<T>(x, w, dy, dx, dw, rows, cols, eps);                                            \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(RMS_DW_THREADS)                                     \
      rms_norm_dw_##SUF(const float *__restrict__ partial, T *__restrict__ dw, int slots,          \
                        int cols) {                                                                \
    rms_dw<T>(partial, dw, slots, cols);                                                           \
  }

RMS_NORM_INSTANCES(float, f32)
RMS_NORM_INSTANCES(__half, f16)
RMS_NORM_INSTANCES(__nv_bfloat16, bf16)
