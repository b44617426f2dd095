// Shared helpers of flare's row kernels (softmax, RMSNorm): dtype conversion, packed 16-byte
// loads and stores, reductions over a thread group that owns one row, and the row skeletons
// (the loops over rows and packs of the register and streaming paths, see "row skeletons").
//
// Execution model shared by every row kernel
// ------------------------------------------
// A row of `cols` elements is owned by a group of G threads (the `group` kernel argument, chosen
// by the host as ceil(cols / E) rounded up as below, E = the kernel's elements per thread):
//   * G <= 32, a power of two: several rows per warp, 128-thread blocks; reductions are
//     butterfly shuffles inside the group. Short rows (the dispatch-bound case included).
//   * 32 < G <= the kernel's block limit, a multiple of 32, blockDim.x == G: one row per block;
//     reductions are warp shuffles and one exchange through shared memory.
//   * rows longer than block limit * E: G = blockDim.x = the block limit.
// Blocks loop over rows with a grid stride. Packs are V = 16 / sizeof(T) consecutive elements;
// pack k of a row belongs to lane k % G of its group.
//
// Two paths, picked by the kernel itself (uniformly for the whole grid):
//   * register path, when the row fits (G * E >= cols) and 16-byte accesses apply (cols % V == 0
//     and every pointer 16-byte aligned): each thread keeps its <= E elements in registers, so
//     every element is read once and written once.
//   * streaming path otherwise: a reduction pass, then an output pass that reads the row again
//     (from L1/L2 unless the row is very long). With 16-byte accesses when they apply, else
//     element accesses with a bound check (the same packs, the last one partial).
// Every reduction is a fixed butterfly / fixed-order sum, so results are bitwise deterministic
// and identical in every lane of a group. All arithmetic and accumulation is in f32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace flare {

// Packs per thread per iteration of the streaming loops: 4 with 16-byte accesses; 2 with
// element accesses, whose packs are already V independent loads each.
constexpr int LONG_UNROLL = 4;
template <bool VEC> __host__ __device__ constexpr int stream_unroll() {
  return VEC ? LONG_UNROLL : 2;
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T> __device__ __forceinline__ T from_bits(unsigned short u);
template <> __device__ __forceinline__ __half from_bits<__half>(unsigned short u) {
  return __ushort_as_half(u);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short u) {
  return __ushort_as_bfloat16(u);
}

// Elements per 16-byte access.
template <typename T> struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

// V consecutive elements, aligned to their size.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Read-only (non-coherent) load of a pack; p must be aligned to sizeof(Pack<T, V>).
template <typename T, int V> __device__ __forceinline__ Pack<T, V> load_pack(const T *p) {
  Pack<T, V> r;
  if constexpr (sizeof(Pack<T, V>) == 16) {
    *reinterpret_cast<uint4 *>(&r) = __ldg(reinterpret_cast<const uint4 *>(p));
  } else {
    static_assert(V == 1, "packs are either 16 bytes or one element");
    r.v[0] = __ldg(p);
  }
  return r;
}

// The same load through volatile asm: never merged with another load of the same address nor
// hoisted out of a loop. Used for the weight vector, which is re-read (from L1/L2) where keeping
// it in registers would cost more registers than the kernel can spare.
template <typename T, int V> __device__ __forceinline__ Pack<T, V> load_pack_fresh(const T *p) {
  Pack<T, V> r;
  if constexpr (sizeof(Pack<T, V>) == 16) {
    uint4 u;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
                 : "l"(p));
    *reinterpret_cast<uint4 *>(&r) = u;
  } else if constexpr (sizeof(T) == 4) {
    static_assert(V == 1, "packs are either 16 bytes or one element");
    float u;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(u) : "l"(p));
    r.v[0] = u;
  } else {
    static_assert(V == 1 && sizeof(T) == 2, "packs are either 16 bytes or one element");
    unsigned short u;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(u) : "l"(p));
    r.v[0] = from_bits<T>(u);
  }
  return r;
}

// Coherent load (for data this kernel wrote itself earlier).
template <typename T, int V> __device__ __forceinline__ Pack<T, V> load_pack_rw(const T *p) {
  return *reinterpret_cast<const Pack<T, V> *>(p);
}

template <typename T, int V> __device__ __forceinline__ void store_pack(T *p, const Pack<T, V> &v) {
  *reinterpret_cast<Pack<T, V> *>(p) = v;
}

// Pack `c` of a row (elements c*V .. c*V+V-1). With VEC the pack is one 16-byte access (the
// caller guarantees c < cols / V and alignment); without, the elements are read one by one and
// those at or past `cols` are `pad`. Contiguous elements per thread keep the address arithmetic
// to one register pair per pack in both cases; the scalar accesses of a warp still cover whole
// sectors (merged in L1 for loads and in L2 for stores).
template <typename T, int V, bool VEC>
__device__ __forceinline__ Pack<T, V> load_row_pack(const T *row, int c, int cols, float pad) {
  if constexpr (VEC) {
    return load_pack<T, V>(row + c * V);
  } else {
    Pack<T, V> r;
    const int e0 = c * V;
    if (e0 + V <= cols) {  // only the last pack of a row can be partial
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = __ldg(row + e0 + j);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = e0 + j < cols ? __ldg(row + e0 + j) : from_f<T>(pad);
    }
    return r;
  }
}

// As load_row_pack, through load_pack_fresh (see there).
template <typename T, int V, bool VEC>
__device__ __forceinline__ Pack<T, V> load_row_pack_fresh(const T *row, int c, int cols) {
  if constexpr (VEC) {
    return load_pack_fresh<T, V>(row + c * V);
  } else {
    Pack<T, V> r;
    const int e0 = c * V;
#pragma unroll
    for (int j = 0; j < V; ++j)
      r.v[j] = e0 + j < cols ? load_pack_fresh<T, 1>(row + e0 + j).v[0] : from_f<T>(0.f);
    return r;
  }
}

// As load_row_pack, with coherent loads (data this kernel wrote earlier).
template <typename T, int V, bool VEC>
__device__ __forceinline__ Pack<T, V> load_row_pack_rw(const T *row, int c, int cols) {
  if constexpr (VEC) {
    return load_pack_rw<T, V>(row + c * V);
  } else {
    Pack<T, V> r;
    const int e0 = c * V;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = e0 + j < cols ? row[e0 + j] : from_f<T>(0.f);
    return r;
  }
}

// Stores pack `c` of a row; without VEC only the elements before `cols`.
template <typename T, int V, bool VEC>
__device__ __forceinline__ void store_row_pack(T *row, int c, int cols, const Pack<T, V> &p) {
  if constexpr (VEC) {
    store_pack<T, V>(row + c * V, p);
  } else {
    const int e0 = c * V;
    if (e0 + V <= cols) {
#pragma unroll
      for (int j = 0; j < V; ++j) row[e0 + j] = p.v[j];
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (e0 + j < cols) row[e0 + j] = p.v[j];
    }
  }
}

template <typename T, int V> __device__ __forceinline__ Pack<T, V> zero_pack() {
  Pack<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = from_f<T>(0.f);
  return r;
}

__device__ __forceinline__ bool aligned16(const void *p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  static __device__ __forceinline__ float identity() { return 0.f; }
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  static __device__ __forceinline__ float identity() { return -INFINITY; }
};

// Butterfly over the aligned lane groups of `width` lanes (a power of two <= 32).
template <typename Op> __device__ __forceinline__ float lanes_reduce(float v, int width) {
  for (int o = 1; o < width; o <<= 1) v = Op()(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename Op> __device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) v = Op()(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduces `v` over the thread group owning a row (see the execution model above) and returns
// the result in every thread of the group. For G > 32 every thread of the block must call it
// (it synchronises once). `sh` is 32 floats of shared memory; two consecutive reductions must
// use different buffers (a buffer is reused only after the next reduction's barrier, which
// every thread reaches after it finished reading the previous one).
template <typename Op> __device__ __forceinline__ float group_reduce(float v, int G, float *sh) {
  if (G <= 32) return lanes_reduce<Op>(v, G);
  v = warp_reduce<Op>(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? sh[lane] : Op::identity();
  return warp_reduce<Op>(v);
}

// Two sums at once (one barrier).
__device__ __forceinline__ float2 group_sum2(float2 v, int G, float2 *sh) {
  const int width = G <= 32 ? G : 32;
  for (int o = 1; o < width; o <<= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  if (G <= 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? sh[lane] : make_float2(0.f, 0.f);
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// This thread's row at one step of the loop over rows: `valid` is false for a group past the
// last row (it still takes part in the group's reductions), `off` is the row's first element
// (0 when not valid).
struct RowAt {
  long long row;
  bool valid;
  long long off;
};

// Row indexing: which row of the block's step and which lane of its group this thread is, and
// how rows advance (a grid stride of whole steps, uniform across the block).
struct RowGroups {
  int G;          // threads per row
  int lane;       // this thread's index inside its group
  int per_block;  // rows per block per step
  int slot;       // this thread's row inside the block's step
  __device__ __forceinline__ explicit RowGroups(int g) : G(g) {
    if (g <= 32) {
      lane = threadIdx.x & (g - 1);
      per_block = blockDim.x / g;
      slot = threadIdx.x / g;
    } else {
      lane = threadIdx.x;
      per_block = 1;
      slot = 0;
    }
  }
  __device__ __forceinline__ long long first() const {
    return (long long)blockIdx.x * per_block;
  }
  __device__ __forceinline__ long long step() const { return (long long)gridDim.x * per_block; }
  // This thread's row at step r0 of the loop over rows.
  __device__ __forceinline__ RowAt at(long long r0, long long rows, int cols) const {
    const long long row = r0 + slot;
    const bool valid = row < rows;
    return RowAt{row, valid, (valid ? row : 0) * (long long)cols};
  }
};

// ---- row skeletons --------------------------------------------------------------------------
// The loops every row kernel is made of, written once. A row kernel is
//
//   const RowGroups rg(G);
//   for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
//     const RowAt rs = rg.at(r0, rows, cols);
//     ... load the row's packs, reduce over the group, write the row's packs ...
//   }
//
// with the pack loops below, to which the kernel passes what it does per pack as a lambda. They
// are inlined, so the code is what the loops would be if written out (the same loads, vector
// widths, unrolling and registers: the SASS of the softmax and RMSNorm kernels has the same
// instructions and register counts as the hand-written loops had).
//   Register path (the row held in registers, NV = E / V packs per thread, pack i of a thread is
//   pack c = lane + i * G of the row, nvr = cols / V packs in the row):
//     for_reg_packs<NV>(rg, nvr, valid, f):      f(i, c) for the packs that hold row data;
//     for_reg_packs<NV>(rg, nvr, valid, f, pad): and pad(i) for the others (register padding
//                                                that must not change the reduction).
//   Streaming path (the row read once per pass, nvr = ceil(cols / V) packs, the last one partial
//   without VEC):
//     for_stream_packs<VEC>(rg, nvr, f): f(c, i) for packs c = lane, lane + G, ... (the i-th of
//                                        this thread), unrolled by stream_unroll<VEC>().

template <int NV, typename F, typename Pad>
__device__ __forceinline__ void for_reg_packs(const RowGroups &rg, int nvr, bool valid, F f,
                                              Pad pad) {
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = rg.lane + i * rg.G;
    if (valid && c < nvr)
      f(i, c);
    else
      pad(i);
  }
}

template <int NV, typename F>
__device__ __forceinline__ void for_reg_packs(const RowGroups &rg, int nvr, bool valid, F f) {
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = rg.lane + i * rg.G;
    if (valid && c < nvr) f(i, c);
  }
}

template <bool VEC, typename F>
__device__ __forceinline__ void for_stream_packs(const RowGroups &rg, int nvr, F f) {
#pragma unroll stream_unroll<VEC>()
  for (int c = rg.lane, i = 0; c < nvr; c += rg.G, ++i) f(c, i);
}

// ---- argmax pairs ---------------------------------------------------------------------------
// (value, index) pairs ordered by larger value, then smaller index (the first maximum, as
// torch.argmax); NaN compares false both ways, so it never wins.
__device__ __forceinline__ bool better(float v, unsigned int i, float bv, unsigned int bi) {
  return v > bv || (v == bv && i < bi);
}

// Butterfly over the warp: afterwards every lane holds the warp's best pair.
__device__ __forceinline__ void warp_best(float &bv, unsigned int &bi) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xFFFFFFFFu, bv, off);
    const unsigned int oi = __shfl_xor_sync(0xFFFFFFFFu, bi, off);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// The block's best pair, in thread 0's (bv, bi) (and every lane of warp 0's): warp shuffles,
// then one exchange of the warps' pairs through `sv` / `si` (32 slots each). Ends with a
// barrier, so the slots may be reused at once.
__device__ __forceinline__ void block_best(float &bv, unsigned int &bi, float *sv,
                                           unsigned int *si) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  warp_best(bv, bi);
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < warps ? sv[lane] : -INFINITY;
    bi = lane < warps ? si[lane] : 0xFFFFFFFFu;
    warp_best(bv, bi);
  }
  __syncthreads();
}

// ---- flash-decoding chunk ---------------------------------------------------------------------
// The part of a flash-decoding split block shared by attention.cu and decode.cu, once q is in
// `qs` ([G][d], f32) and the chunk's `cnt` keys in `ks` ([chunk][d + 1], f32, staged and
// synchronised by the caller): the G x cnt scores into `ps` ([G][chunk]), then per query row
// g the chunk's maximum m and sum of exponentials l into ml[g * 2], ml[g * 2 + 1], with `ps`
// turned into the unnormalised probabilities e^(s - m). Ends with a barrier: `ps` is ready for
// the caller's probabilities-times-values loop.
__device__ __forceinline__ void chunk_softmax_stats(const float *qs, const float *ks, float *ps,
                                                    float *ml, int G, int d, int cnt,
                                                    int chunk) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, warps = nt >> 5;
  const int dp = d + 1;
  for (int i = tid; i < G * cnt; i += nt) {
    const int g = i / cnt, j = i - g * cnt;
    const float *qr = qs + g * d;
    const float *kr = ks + j * dp;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s = fmaf(qr[c], kr[c], s);
    ps[g * chunk + j] = s;
  }
  __syncthreads();
  for (int g = warp; g < G; g += warps) {
    float *pr = ps + g * chunk;
    float m = -INFINITY;
    for (int j = lane; j < cnt; j += 32) m = fmaxf(m, pr[j]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
    float l = 0.0f;
    for (int j = lane; j < cnt; j += 32) {
      const float e = __expf(pr[j] - m);
      pr[j] = e;
      l += e;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xFFFFFFFFu, l, off);
    if (lane == 0) {
      ml[g * 2] = m;
      ml[g * 2 + 1] = l;
    }
  }
  __syncthreads();
}

}  // namespace flare
