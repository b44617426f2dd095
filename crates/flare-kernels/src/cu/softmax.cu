// Softmax over the last dimension, forward and backward, for f32 / f16 / bf16 (f32 math).
//
//   softmax_fwd_<t>(x, y, rows, cols, group):      y = exp(x - max) / sum(exp(x - max))
//   softmax_bwd_<t>(y, dy, dx, rows, cols, group): dx = y * (dy - sum(dy * y))
//
//   softmax_masked_fwd_<t>(x, keep, y, rows, cols, group, heads_s, s): the same over the
//   positions where the u8 mask `keep` [mb, s, cols] is nonzero; masked outputs are 0 and a row
//   with nothing kept (or only -inf kept) is all zeros. x is read as [mb, n, s, cols]
//   (heads_s = n * s rows per mask item): row r reads mask row (r / heads_s) * s + r % s, so
//   the mask is broadcast over batch and heads without being materialised. The backward of the
//   masked softmax is softmax_bwd on its output (0 where masked).
//
// `group` is the number of threads per row chosen by the host (see common.cuh for the paths):
// the register path when the row fits (group * ELEMS >= cols) and 16-byte accesses apply, the
// streaming path otherwise; the loops are common.cuh's row skeletons. The host launcher
// (crates/flare/src/ops/softmax/cuda.rs) reads the constants below through flare_kernels::launch
// (generated from these #defines by build.rs).
//
// The forward's register path takes one group reduction per row, of (max, sum) pairs: each
// thread first reduces its own elements (its max m and the sum of exp(x - m)), so every warp
// does its exps as soon as its own loads land, and the block meets at a single barrier.
#include "common.cuh"

using namespace flare;

// Threads per block at most, and elements per thread in the register path. f16 / bf16 keep
// twice as many elements per thread as f32 (the same 128 bytes of input per thread, so the same
// bytes in flight per resident thread), packed as stored; see softmax_fwd_regs_packed.
#define SOFTMAX_FWD_THREADS 1024
#define SOFTMAX_FWD_ELEMS_F32 32
#define SOFTMAX_FWD_ELEMS_16 64
#define SOFTMAX_BWD_THREADS 512
#define SOFTMAX_BWD_ELEMS 32

template <typename T> struct FwdElems {
  static constexpr int value = sizeof(T) == 4 ? SOFTMAX_FWD_ELEMS_F32 : SOFTMAX_FWD_ELEMS_16;
};

// ---- mask ----------------------------------------------------------------------------------

// Where the masked kernels find each row's mask row (see the top of the file). The unmasked
// kernels pass keep = nullptr and MASK = false, which compiles every mask access away.
struct RowMask {
  const uint8_t *keep;
  long long heads_s;
  int s;
  __device__ __forceinline__ const uint8_t *row(long long r, int cols) const {
    const long long mrow = (r / heads_s) * s + r % s;
    return keep + mrow * (long long)cols;
  }
};

// Sets the masked elements of pack c of a row to -inf (elements at or past cols untouched).
template <bool MASK, typename T, int V>
__device__ __forceinline__ void mask_pack(Pack<T, V> &p, const uint8_t *kr, int c, int cols) {
  if constexpr (MASK) {
    const int e0 = c * V;
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (e0 + j < cols && __ldg(kr + e0 + j) == 0) p.v[j] = from_f<T>(-INFINITY);
  }
}

// Register paths: pack c's V mask bytes in one load (the caller guarantees cols % V == 0 and a
// V-byte aligned mask, so every row's mask is aligned), as a 64-bit word, byte j = element j.
template <int V>
__device__ __forceinline__ unsigned long long load_mask_word(const uint8_t *kr, int c) {
  if constexpr (V == 8) {
    const uint2 w = __ldg(reinterpret_cast<const uint2 *>(kr + c * 8));
    return ((unsigned long long)w.y << 32) | w.x;
  } else {
    static_assert(V == 4, "16-byte packs of 2- or 4-byte elements");
    return __ldg(reinterpret_cast<const unsigned int *>(kr + c * 4));
  }
}

// ---- forward -------------------------------------------------------------------------------

// exp(d) as the register path computes it: expf for f32 outputs; for f16 / bf16 outputs
// ex2.approx(d * log2 e), one FMUL and one MUFU.EX2 (relative error ~1e-5 at worst for
// d >= -88, far below half an output ulp (2.4e-4 for f16, 2e-3 for bf16); results under
// 2^-126 flush to zero; exp(0) = 1 exactly, exp(-inf) = 0, NaN stays NaN).
template <typename T> __device__ __forceinline__ float fwd_exp(float d) {
  if constexpr (sizeof(T) == 4) {
    return expf(d);
  } else {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d * 1.4426950408889634f));
    return r;
  }
}

// The factor exp(m - M) that rescales a sum taken relative to m to one relative to M >= m;
// 0 when m = -inf (that sum is 0, or NaN if the elements behind it were NaN: kept as NaN).
template <typename T> __device__ __forceinline__ float fwd_rescale(float m, float M) {
  return m == -INFINITY ? 0.f : fwd_exp<T>(m - M);
}

// One reduction of (max, sum) pairs over the row's group, with a single barrier for G > 32.
// In: this thread's max m (-inf if it has no finite-or-+inf element) and s, the sum of
// exp(x - m) over its elements (taken relative to 0 when m = -inf, so then 0 or NaN). Out, in
// every thread of the group, bitwise identical: (M, S) with M the row max and S the sum of
// exp(x - M) over the row (each thread's s rescaled by exp(m - M), each warp's likewise).
// `sh` is 32 pairs of shared memory; consecutive rows must alternate buffers (a buffer is
// written again only after the next row's barrier, which every thread reaches after reading).
template <typename T> __device__ __forceinline__ float2 group_max_sum(float m, float s, int G,
                                                                       float2 *sh) {
  float M = m;
  if (G >= 32) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    s *= fwd_rescale<T>(m, M);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  } else {
    for (int o = 1; o < G; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    s *= fwd_rescale<T>(m, M);
    for (int o = 1; o < G; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  if (G <= 32) return make_float2(M, s);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = make_float2(M, s);
  __syncthreads();
  const float2 p = lane < (int)(blockDim.x >> 5) ? sh[lane] : make_float2(-INFINITY, 0.f);
  float R = p.x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) R = fmaxf(R, __shfl_xor_sync(0xffffffffu, R, o));
  float S = p.y * fwd_rescale<T>(p.x, R);
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) S += __shfl_xor_sync(0xffffffffu, S, o);
  return make_float2(R, S);
}

// f32 register path: the row in registers, read once, written once. Each thread takes its own
// max m, replaces its elements by e = exp(x - m) and sums them, before any exchange; one
// (max, sum) reduction gives (M, S); the output is e * (exp(m - M) / S).
template <int E, bool MASK>
__device__ __forceinline__ void softmax_fwd_regs_f32(const float *__restrict__ x,
                                                     float *__restrict__ y, long long rows,
                                                     int cols, int G, RowMask mk) {
  constexpr int V = VecWidth<float>::value;
  constexpr int NV = E / V;
  __shared__ float2 sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = cols / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    const uint8_t *kr = MASK && rs.valid ? mk.row(rs.row, cols) : nullptr;
    float v[NV][V];
    for_reg_packs<NV>(
        rg, nvr, rs.valid,
        [&](int i, int c) {
          Pack<float, V> p = load_pack<float, V>(x + rs.off + c * V);
          if constexpr (MASK) {
            const unsigned long long w = load_mask_word<V>(kr, c);
#pragma unroll
            for (int j = 0; j < V; ++j)
              if (((w >> (8 * j)) & 0xffu) == 0) p.v[j] = -INFINITY;
          }
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = p.v[j];
        },
        [&](int i) {
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = -INFINITY;  // exp(-inf - m) = 0
        });
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) m = fmaxf(m, v[i][j]);
    const float msub = m == -INFINITY ? 0.f : m;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float e = expf(v[i][j] - msub);
        v[i][j] = e;
        s += e;
      }
    const float2 ms = group_max_sum<float>(m, s, G, sh[buf]);
    buf ^= 1;
    // All -inf: 0 / 0 = NaN, as exp(x - M) / S would give; masked: zeros.
    float scale = fwd_rescale<float>(m, ms.x) / ms.y;
    if (MASK && ms.x == -INFINITY) scale = 0.f;
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      Pack<float, V> p;
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = v[i][j] * scale;
      store_pack<float, V>(y + rs.off + c * V, p);
    });
  }
}

// Two f16 / bf16 elements in a 32-bit register (the low half first, as stored).
template <typename T> struct Pair;
template <> struct Pair<__half> {
  static __device__ __forceinline__ float2 to_f2(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&u));
  }
  static __device__ __forceinline__ uint32_t from_f2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t *>(&h);
  }
  static __device__ __forceinline__ uint32_t max2(uint32_t a, uint32_t b) {
    const __half2 h = __hmax2(*reinterpret_cast<const __half2 *>(&a),
                              *reinterpret_cast<const __half2 *>(&b));
    return *reinterpret_cast<const uint32_t *>(&h);
  }
  static constexpr uint32_t NEG_INF2 = 0xfc00fc00u;
};
template <> struct Pair<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_f2(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t from_f2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t *>(&h);
  }
  static __device__ __forceinline__ uint32_t max2(uint32_t a, uint32_t b) {
    const __nv_bfloat162 h = __hmax2(*reinterpret_cast<const __nv_bfloat162 *>(&a),
                                     *reinterpret_cast<const __nv_bfloat162 *>(&b));
    return *reinterpret_cast<const uint32_t *>(&h);
  }
  static constexpr uint32_t NEG_INF2 = 0xff80ff80u;
};

// Hides a register's value from the compiler (no instruction), so that the f32 values
// converted from it in one pass are recomputed in the next instead of kept alive.
__device__ __forceinline__ void opaque(uint32_t &u) { asm volatile("" : "+r"(u)); }

// f16 / bf16 register path: the row stays in registers as loaded (two elements per register,
// so a thread keeps 128 bytes in 32 registers and the kernel fits 64 registers at 1024 threads
// per SM), read once and written once. The max is taken on the packed pairs (exact); each
// thread then sums exp(x - m) relative to its own max m, one (max, sum) reduction gives (M, S),
// and the output pass recomputes exp(x - M) / S from the packed input (two exps per element,
// each one FMUL + MUFU.EX2).
template <typename T, int E, bool MASK>
__device__ __forceinline__ void softmax_fwd_regs_packed(const T *__restrict__ x,
                                                        T *__restrict__ y, long long rows,
                                                        int cols, int G, RowMask mk) {
  using P = Pair<T>;
  constexpr int V = VecWidth<T>::value;
  constexpr int NV = E / V;
  constexpr int H = V / 2;  // registers per pack
  static_assert(H == 4, "16-byte packs of 2-byte elements");
  __shared__ float2 sh[2][32];
  int buf = 0;
  const RowGroups rg(G);
  const int nvr = cols / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    const uint8_t *kr = MASK && rs.valid ? mk.row(rs.row, cols) : nullptr;
    uint32_t h[NV][H];
    for_reg_packs<NV>(
        rg, nvr, rs.valid,
        [&](int i, int c) {
          const uint4 u = __ldg(reinterpret_cast<const uint4 *>(x + rs.off + c * V));
          h[i][0] = u.x;
          h[i][1] = u.y;
          h[i][2] = u.z;
          h[i][3] = u.w;
          if constexpr (MASK) {
            // Masked halves become -inf: byte 2k of the mask word keeps the low half of
            // h[i][k], byte 2k + 1 the high half.
            const unsigned long long w = load_mask_word<V>(kr, c);
#pragma unroll
            for (int k = 0; k < H; ++k) {
              const uint32_t lo = ((w >> (16 * k)) & 0xffu) ? 0x0000ffffu : 0u;
              const uint32_t hi = ((w >> (16 * k + 8)) & 0xffu) ? 0xffff0000u : 0u;
              const uint32_t km = lo | hi;
              h[i][k] = (h[i][k] & km) | (P::NEG_INF2 & ~km);
            }
          }
        },
        [&](int i) {
#pragma unroll
          for (int k = 0; k < H; ++k) h[i][k] = P::NEG_INF2;  // exp(-inf - m) = 0
        });
    // Max over the pairs (NaN is skipped, as fmaxf does), H independent chains.
    uint32_t hm[H];
#pragma unroll
    for (int k = 0; k < H; ++k) hm[k] = h[0][k];
#pragma unroll
    for (int i = 1; i < NV; ++i)
#pragma unroll
      for (int k = 0; k < H; ++k) hm[k] = P::max2(hm[k], h[i][k]);
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < H; ++k) {
      const float2 f = P::to_f2(hm[k]);
      m = fmaxf(m, fmaxf(f.x, f.y));
    }
    const float msub = m == -INFINITY ? 0.f : m;
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int k = 0; k < H; ++k) {
        const float2 f = P::to_f2(h[i][k]);
        s0 += fwd_exp<T>(f.x - msub);
        s1 += fwd_exp<T>(f.y - msub);
      }
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int k = 0; k < H; ++k) opaque(h[i][k]);
    const float2 ms = group_max_sum<T>(m, s0 + s1, G, sh[buf]);
    buf ^= 1;
    float M = ms.x, inv = 1.f / ms.y;
    if (MASK && M == -INFINITY) M = 0.f, inv = 0.f;  // nothing kept: exp(-inf) * 0 = 0
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      uint4 u;
      uint32_t *o = reinterpret_cast<uint32_t *>(&u);
#pragma unroll
      for (int k = 0; k < H; ++k) {
        const float2 f = P::to_f2(h[i][k]);
        o[k] = P::from_f2(fwd_exp<T>(f.x - M) * inv, fwd_exp<T>(f.y - M) * inv);
      }
      *reinterpret_cast<uint4 *>(y + rs.off + c * V) = u;
    });
  }
}

// Streaming: an online max / rescaled-sum pass, then an output pass that re-reads the row
// (from L1/L2 unless the row is very long).
template <typename T, bool VEC, bool MASK>
__device__ __forceinline__ void softmax_fwd_stream(const T *__restrict__ x, T *__restrict__ y,
                                                   long long rows, int cols, int G, RowMask mk) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float sh[2][32];
  const RowGroups rg(G);
  const int nvr = (cols + V - 1) / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    const RowAt rs = rg.at(r0, rows, cols);
    const uint8_t *kr = MASK && rs.valid ? mk.row(rs.row, cols) : nullptr;
    float m = -INFINITY, s = 0.f;
    if (rs.valid) {
      for (int c0 = rg.lane; c0 < nvr; c0 += LONG_UNROLL * G) {
        float f[LONG_UNROLL][V];
#pragma unroll
        for (int u = 0; u < LONG_UNROLL; ++u) {
          const int c = c0 + u * G;
          if (c < nvr) {
            Pack<T, V> p = load_row_pack<T, V, VEC>(x + rs.off, c, cols, -INFINITY);
            mask_pack<MASK>(p, kr, c, cols);
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
    float Mo = M, inv = 1.f / S;
    if (MASK && M == -INFINITY) Mo = 0.f, inv = 0.f;  // nothing kept: exp(-inf) * 0 = 0
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        Pack<T, V> p = load_row_pack<T, V, VEC>(x + rs.off, c, cols, 0.f);
        mask_pack<MASK>(p, kr, c, cols);
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(expf(to_f(p.v[j]) - Mo) * inv);
        store_row_pack<T, V, VEC>(y + rs.off, c, cols, o);
      });
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
    const RowAt rs = rg.at(r0, rows, cols);
    Pack<T, V> py[NV], pg[NV];
    for_reg_packs<NV>(
        rg, nvr, rs.valid,
        [&](int i, int c) {
          py[i] = load_pack<T, V>(y + rs.off + c * V);
          pg[i] = load_pack<T, V>(dy + rs.off + c * V);
        },
        [&](int i) {
          py[i] = zero_pack<T, V>();
          pg[i] = zero_pack<T, V>();
        });
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) s += to_f(py[i].v[j]) * to_f(pg[i].v[j]);
    s = group_reduce<SumOp>(s, G, sh[buf]);
    buf ^= 1;
    for_reg_packs<NV>(rg, nvr, rs.valid, [&](int i, int c) {
      Pack<T, V> p;
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = from_f<T>(to_f(py[i].v[j]) * (to_f(pg[i].v[j]) - s));
      store_pack<T, V>(dx + rs.off + c * V, p);
    });
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
    const RowAt rs = rg.at(r0, rows, cols);
    float s = 0.f;
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> a = load_row_pack<T, V, VEC>(y + rs.off, c, cols, 0.f);
        const Pack<T, V> b = load_row_pack<T, V, VEC>(dy + rs.off, c, cols, 0.f);
#pragma unroll
        for (int j = 0; j < V; ++j) s += to_f(a.v[j]) * to_f(b.v[j]);
      });
    }
    s = group_reduce<SumOp>(s, G, sh[buf]);
    buf ^= 1;
    if (rs.valid) {
      for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
        const Pack<T, V> a = load_row_pack<T, V, VEC>(y + rs.off, c, cols, 0.f);
        const Pack<T, V> b = load_row_pack<T, V, VEC>(dy + rs.off, c, cols, 0.f);
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(to_f(a.v[j]) * (to_f(b.v[j]) - s));
        store_row_pack<T, V, VEC>(dx + rs.off, c, cols, o);
      });
    }
  }
}

// ---- entry points --------------------------------------------------------------------------

template <typename T, bool MASK>
__device__ __forceinline__ void softmax_fwd(const T *__restrict__ x, T *__restrict__ y,
                                            long long rows, int cols, int group, RowMask mk) {
  constexpr int V = VecWidth<T>::value;
  constexpr int E = FwdElems<T>::value;
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(y);
  // The register paths read V mask bytes at once (see load_mask_word).
  const bool mask_vec = !MASK || (reinterpret_cast<uintptr_t>(mk.keep) & (V - 1)) == 0;
  if (vec && mask_vec && (long long)group * E >= cols) {
    if constexpr (sizeof(T) == 4)
      softmax_fwd_regs_f32<E, MASK>(x, y, rows, cols, group, mk);
    else
      softmax_fwd_regs_packed<T, E, MASK>(x, y, rows, cols, group, mk);
  } else if (vec) {
    softmax_fwd_stream<T, true, MASK>(x, y, rows, cols, group, mk);
  } else {
    softmax_fwd_stream<T, false, MASK>(x, y, rows, cols, group, mk);
  }
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
    softmax_fwd<T, false>(x, y, rows, cols, group, RowMask{nullptr, 1, 1});                     \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_FWD_THREADS)                                \
      softmax_masked_fwd_##SUF(const T *__restrict__ x, const uint8_t *__restrict__ keep,          \
                               T *__restrict__ y, long long rows, int cols, int group,             \
                               long long heads_s, int s) {                                         \
    softmax_fwd<T, true>(x, y, rows, cols, group, RowMask{keep, heads_s, s});                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BWD_THREADS)                                \
      softmax_bwd_##SUF(const T *__restrict__ y, const T *__restrict__ dy, T *__restrict__ dx,     \
                        long long rows, int cols, int group) {                                     \
    softmax_bwd<T>(y, dy, dx, rows, cols, group);                                                  \
  }

SOFTMAX_INSTANCES(float, f32)
SOFTMAX_INSTANCES(__half, f16)
SOFTMAX_INSTANCES(__nv_bfloat16, bf16)
