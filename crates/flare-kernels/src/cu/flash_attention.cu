// Flash attention for training and prefill (FlashAttention-2 algorithm), forward and backward,
// bf16 / f16 inputs, f32 accumulation on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async:
// sm_80 or newer). The s x s score matrix is never in memory.
//
// Math (per sequence b, query head h, kv head hk = h / (Hq / Hkv)):
//   forward:   S = scale * Q K^T + mask,  L = logsumexp_row(S),  P = exp(S - L),  O = P V
//   backward:  D  = rowsum(dO * O)                       (= rowsum(P * dP))
//              P  = exp(scale * Q K^T + mask - L)        (recomputed from the saved L)
//              dP = dO V^T,  dS = P * (dP - D)
//              dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO
//   With GQA the dK, dV of a kv head are the sums over its Hq / Hkv query heads.
//   mask: key j of a sequence is visible to its query i iff
//     causal:        j <= i + (sk - sq)           (bottom-right aligned, as FlashAttention-2)
//     window w >= 0: j >= i + (sk - sq) - w       (left window, Mistral; w = -1: none)
//   A query row that sees no key (sk = 0, or causal with sq > sk for its first sq - sk rows,
//   or a window without causal when sq > sk) gets O = 0, L = -inf, and zero gradients.
//
// Layout ("varlen", packed, as FlashAttention's varlen API): q, o, dq [total_q, Hq, D];
// k, v, dk, dv [total_k, Hkv, D], all contiguous; sequence b holds rows cu_q[b] .. cu_q[b+1]
// of q and cu_k[b] .. cu_k[b+1] of k (int32 offsets, [batch + 1]). A padded [B, S, H, D] batch
// is the case cu = 0, S, 2S, .... L and D are f32 [Hq, total_q]. dq_acc is an f32
// [total_q, Hq, D] workspace. Pointers 16-byte aligned (D is a multiple of 8, so every row is).
// Conventions: every output is written with `=` (nothing accumulates into caller memory);
// dq_acc is zeroed by flash_attn_bwd_pre and accumulated with atomics by flash_attn_bwd.
//
// Kernels (T = bf16 | f16, D = 64 | 128):
//   flash_attn_fwd_d{D}_{T}(o, lse, q, k, v, cu_q, cu_k, hq, hkv, total_q, scale, causal,
//       window)                              grid (ceil(max_sq / FA_FWD_BM(D)), Hq, batch),
//                                            block FA_THREADS = 128, static smem
//                                            (FA_FWD_BM = 128 for D = 64, 64 for 128)
//   flash_attn_bwd_pre_d{D}_{T}(delta, dq_acc, o, dout, total_q, hq)
//                                            grid ceil(total_q * Hq / 8), block 256 (a warp/row)
//   flash_attn_bwd_d{D}_{T}(dk, dv, dq_acc, q, k, v, dout, lse, delta, cu_q, cu_k, hq, hkv,
//       total_q, scale, causal, window, dk_acc, dv_acc, split)
//                                            grid (ceil(max_sk / FA_BWD_BN(D)), Hkv * split,
//                                            batch), split dividing Hq / Hkv,
//                                            FA_BWD_BN = 128, block FA_BWD_THREADS(D) = 128
//                                            for D = 64, 256 for D = 128, dynamic smem
//                                            FA_BWD_SMEM(D) bytes (76,288 for D = 64, 125,440
//                                            for D = 128: both over 48 KiB, so
//                                            cudaFuncAttributeMaxDynamicSharedMemorySize first)
//   flash_attn_bwd_convert_d{D}_{T}(dq, dq_acc, n)   n = total_q * Hq * D, any 1-D grid
//                                            (also dK, dV from dk_acc, dv_acc when split > 1)
// split: with split = 1 the bwd kernel writes dk and dv (T) and ignores dk_acc / dv_acc (may
// be null). With split > 1 each block takes Hq / Hkv / split query heads of its kv head's
// group, and adds its partial dK, dV to the f32 [total_k, Hkv, D] buffers dk_acc, dv_acc
// (zeroed by the caller) with atomics; dk and dv are not written (the caller converts).
//
// Design
//   forward: a block owns FA_FWD_BM query rows of one (sequence, head); each warp owns a quarter
//     of them (32 rows for D = 64, as FlashAttention-2's 128 x 4-warp blocks, so every K / V
//     fragment read from shared memory feeds two mma; 16 for D = 128, which has no registers
//     for two) and keeps their Q fragments in registers (staged through the K / V buffers and
//     ldmatrix'd once). It walks the 64-key tiles the mask allows (causal / window bound the
//     range; only the tiles that cross a boundary evaluate the mask per element). K and V
//     tiles are single-buffered in shared memory (rows padded to D + 8 elements:
//     conflict-free ldmatrix) and loaded with cp.async so that V(j) lands while
//     S = Q K(j)^T computes and K(j+1) while P V(j) computes. Out-of-range
//     rows are zero-filled by cp.async (no garbage times zero). The online softmax keeps the
//     row max in log2 units (scores times scale * log2 e, exp2f); P goes from the S
//     accumulators straight into the A fragments of the P V mma (the C layout of two n8 tiles
//     is the A layout of one k16 step). The grid is walked query tile slowest, from the last
//     tile: under causal the heaviest tiles of every head start first (a short tail).
//   backward: a block owns 128 keys of one (sequence, kv head); warp w owns 16 KM of them (KM
//     m16 key tiles: 2 for D = 64 with 4 warps, 1 for D = 128 with 8 warps) and accumulates
//     their dK, dV in registers over every query head of the GQA group and every 32-query tile
//     the mask allows, so dK / dV need no atomics and no reduction kernel: the sum over the
//     group happens in registers and dK / dV are written once, in the output dtype. Per query
//     tile it computes S^T = K Q^T and dP^T = V dO^T (keys as rows, queries as columns; every
//     Q / dO fragment read from shared memory feeds KM key tiles), P^T, dS^T, then
//     dV += P^T dO and dK += dS^T Q from registers; dS^T also goes (as T) to shared memory,
//     from which the warps compute dQ += dS K in 16 x 32 pieces (one each) and add them to
//     dq_acc with f32 atomics (FlashAttention-2; 128 keys per block halve the atomic traffic
//     of 64, and on an H100 the atomics cost ~5% of the kernel against plain stores). Q / dO
//     tiles, L / D and dS^T are double-buffered, so one barrier per iteration suffices:
//     iteration it fetches the tiles of it + 1 (cp.async, L and D through registers) and
//     computes the dQ of it - 1 (whose dS^T the barrier completed) before its own math; the
//     last dQ follows the loop. Only the tiles that cross a mask boundary (per warp) evaluate
//     the mask per element. The grid is walked key block slowest: under causal the low key
//     blocks see the most queries, so every head's heaviest blocks start first. Launching
//     over kv heads divides the number of blocks by the group size: B1 H32/KV8 T8192 still has
//     64 key blocks x 8 = 512, but a 0.5B-model shape (B4 H14/KV2 T512) only 4 x 2 x 4 = 32
//     for 132 multiprocessors. There the launcher splits each group's query heads over
//     `split` blocks, which add their partial dK, dV into f32 buffers with atomics. Registers
//     (sm_90, no spills): 255 for D = 64 (2 blocks of 4 warps per SM), 246 for D = 128
//     (1 block of 8 warps).
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

using namespace flare;

#define FA_THREADS 128
// Forward queries per block (4 warps): 32 rows per warp (two m16 tiles: every K / V fragment
// read from shared memory serves two mma) for D = 64; 16 for D = 128, where two tiles'
// accumulators do not fit in registers.
#define FA_FWD_BM(D) ((D) == 128 ? 64 : 128)
#define FA_BN 64  // keys per tile (forward)
// Forward blocks per SM asked of the register allocator: 3 caps D = 128 at 168 registers (its
// natural ~171 would allow only 2; 4 bytes of spill stores since the heaviest-first grid
// order, which still measured faster); D = 64 (two m16 tiles per warp) needs 249.
#define FA_FWD_MIN_BLOCKS(D) ((D) == 128 ? 3 : 2)
// Backward: 128 keys per block, 32 queries per tile; D = 64: 4 warps of 32 keys (two m16 key
// tiles per warp, FA_BWD_KM = 2), D = 128: 8 warps of 16 keys (one; two would need 256
// accumulator registers for dK / dV). FA_BWD_BN = 16 KM warps. The #ifndef lets
// bench/dev/flash_attention_check.cu time other shapes (-D'FA_BWD_KM(D)=...').
#ifndef FA_BWD_THREADS
#define FA_BWD_THREADS(D) ((D) == 64 ? 128 : 256)
#endif
#ifndef FA_BWD_BN
#define FA_BWD_BN(D) 128
#endif
#ifndef FA_BWD_BM
#define FA_BWD_BM(D) 32
#endif
#ifndef FA_BWD_KM
#define FA_BWD_KM(D) ((D) == 64 ? 2 : 1)
#endif
// Backward dynamic shared memory: K, V tiles, two Q and two dO tiles (rows padded to D + 8),
// two dS^T [128][BM + 8], two L and two D vectors of the query tile.
#define FA_BWD_SMEM(D)                                                                          \
  ((2 * FA_BWD_BN(D) * ((D) + 8) + 4 * FA_BWD_BM(D) * ((D) + 8) +                              \
    2 * FA_BWD_BN(D) * (FA_BWD_BM(D) + 8)) * 2 +                                                \
   4 * FA_BWD_BM(D) * 4)

namespace fa {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ---- PTX wrappers --------------------------------------------------------------------------
// bench/dev/flash_attention_emu.cpp defines FLASH_ATTN_EMULATE and brings its own versions of
// these (a CPU emulation of the warp-level instructions, to execute this file without a GPU).
#ifndef FLASH_ATTN_EMULATE

__device__ __forceinline__ unsigned smem_addr(const void *p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled when !pred (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The block's dynamic shared memory.
__device__ __forceinline__ unsigned char *dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fa_smem[];
  return fa_smem;
}
#endif  // FLASH_ATTN_EMULATE

// Two floats as one T x 2 register, lo in the low half (the lower column / k index).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned *>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned *>(&v);
  }
}

// Loads rows [0, ROWS) of a tile (row r at g + r * stride, D elements) into shared memory
// s[r * (D + 8) ..]; rows >= valid are zero-filled. All NTH threads of the block take part.
template <typename T, int D, int ROWS, int NTH = FA_THREADS>
__device__ __forceinline__ void load_tile(T *s, const T *g, long long stride, int valid) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * CPR; c += NTH) {
    const int r = c / CPR, cc = c % CPR;
    const bool ok = r < valid;
    const T *src = ok ? g + (long long)r * stride + cc * 8 : g;
    cp_async16(s + r * (D + 8) + cc * 8, src, ok);
  }
}

// Is key j visible to query i (both sequence-relative)? off = sk - sq.
__device__ __forceinline__ bool visible(int i, int j, int sk, int off, int causal, int window) {
  return j < sk && (!causal || j <= i + off) && (window < 0 || j >= i + off - window);
}
// The same, bitwise (no branch per element). On an H100 the backward and the D = 64 forward
// run faster with it, the D = 128 forward slower (2.25 against 2.10 ms at T8192).
__device__ __forceinline__ bool visible_bits(int i, int j, int sk, int off, int causal,
                                             int window) {
  return (j < sk) & (!causal | (j <= i + off)) & ((window < 0) | (j >= i + off - window));
}

// ---- forward -------------------------------------------------------------------------------


template <typename T, int D>
__device__ __forceinline__ void fwd(T *__restrict__ o, float *__restrict__ lse,
                                    const T *__restrict__ q, const T *__restrict__ k,
                                    const T *__restrict__ v, const int *__restrict__ cu_q,
                                    const int *__restrict__ cu_k, int hq, int hkv, int total_q,
                                    float scale, int causal, int window) {
  constexpr int MW = FA_FWD_BM(D) / 64;
  constexpr int BM = FA_FWD_BM(D), BN = FA_BN, LD = D + 8;
  static_assert(BM == 64 * MW && BM <= 2 * BN, "Q is staged through the K and V buffers");
  constexpr int KD = D / 16;  // k16 steps over the head dim
  constexpr int NT = BN / 8;  // n8 tiles of scores per m16 tile
  constexpr int DT = D / 8;   // n8 tiles of output per m16 tile
  __shared__ __align__(16) T sKV[2 * BN * LD];
  T *sK = sKV, *sV = sKV + BN * LD;

  // Query tiles in the order (tile from the last, head, sequence), tile slowest: under causal
  // the last tiles see the most keys, so the heaviest blocks of every head start first.
  const int nblk = gridDim.y * gridDim.z;
  const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int h = (lin % nblk) % gridDim.y, b = (lin % nblk) / gridDim.y;
  const int q0 = cu_q[b], sq = cu_q[b + 1] - q0;
  const int k0 = cu_k[b], sk = cu_k[b + 1] - k0;
  const int m0 = (gridDim.x - 1 - lin / nblk) * BM;
  if (m0 >= sq) return;
  const int hk = h / (hq / hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const long long qs = (long long)hq * D, ks = (long long)hkv * D;
  const T *qb = q + ((long long)(q0 + m0) * hq + h) * D;
  const T *kb = k + ((long long)k0 * hkv + hk) * D;
  const T *vb = v + ((long long)k0 * hkv + hk) * D;
  const int off = sk - sq;

  // Keys [n_lo, n_hi) can be visible to some row of the block.
  int n_lo = 0, n_hi = sk;
  if (causal) n_hi = min(sk, m0 + BM + off);
  if (window >= 0) n_lo = max(0, m0 + off - window);
  const int n_first = (n_lo / BN) * BN;

  // Q through the K / V buffers into registers; warp w owns rows 16 MW w .. 16 MW w + 16 MW - 1.
  load_tile<T, D, BM>(sKV, qb, qs, sq - m0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  unsigned qf[MW][KD][4];
  {
    const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = (lane >> 4) * 8;
#pragma unroll
    for (int mi = 0; mi < MW; ++mi)
#pragma unroll
      for (int kk = 0; kk < KD; ++kk)
        ldsm_x4(qf[mi][kk], sKV + ((warp * MW + mi) * 16 + r) * LD + kk * 16 + c);
  }
  __syncthreads();  // every warp holds its Q: the buffers are free
  if (n_first < n_hi) load_tile<T, D, BN>(sK, kb + (long long)n_first * ks, ks, sk - n_first);
  cp_async_commit();

  float acc[MW][DT][4];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi)
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
  // Row statistics of this thread's rows: m tile mi, row half rr (rows g and g + 8).
  float mx[MW][2], ls[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) mx[mi][0] = mx[mi][1] = -INFINITY, ls[mi][0] = ls[mi][1] = 0.f;
  const float sl2 = scale * LOG2E;
  const int row_a = m0 + warp * MW * 16 + g;  // row of (mi, rr): row_a + mi * 16 + rr * 8

  for (int n0 = n_first; n0 < n_hi; n0 += BN) {
    cp_async_wait<0>();
    __syncthreads();  // K(n0) ready; every warp is done with V of the previous tile
    load_tile<T, D, BN>(sV, vb + (long long)n0 * ks, ks, sk - n0);
    cp_async_commit();

    float s[MW][NT][4];
#pragma unroll
    for (int mi = 0; mi < MW; ++mi)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
    {
      const int r = ((lane >> 4) * 8) + (lane & 7), c = ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          unsigned bf[4];
          ldsm_x4(bf, sK + (nn * 16 + r) * LD + kk * 16 + c);
#pragma unroll
          for (int mi = 0; mi < MW; ++mi) {
            mma16816<T>(s[mi][2 * nn], qf[mi][kk], bf[0], bf[1]);
            mma16816<T>(s[mi][2 * nn + 1], qf[mi][kk], bf[2], bf[3]);
          }
        }
      }
    }

    // Scale to log2 units; mask only where the tile crosses a boundary of some row.
    const bool need_mask = n0 + BN > sk || (causal && n0 + BN - 1 > m0 + off) ||
                           (window >= 0 && n0 < m0 + BM - 1 + off - window);
#pragma unroll
    for (int mi = 0; mi < MW; ++mi)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mi][j][e] * sl2;
          if (need_mask) {
            const int i = row_a + mi * 16 + (e >> 1) * 8, kj = n0 + j * 8 + 2 * t + (e & 1);
            bool vis;
            if constexpr (D == 64)  // each variant measured the faster at its head dim
              vis = visible_bits(i, kj, sk, off, causal, window);
            else
              vis = visible(i, kj, sk, off, causal, window);
            if (!vis) x = -INFINITY;
          }
          s[mi][j][e] = x;
        }

    // Online softmax: new row max, rescale, exponentials.
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
      float alpha[2], mu[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float m = mx[mi][rr];
#pragma unroll
        for (int j = 0; j < NT; ++j) m = fmaxf(m, fmaxf(s[mi][j][2 * rr], s[mi][j][2 * rr + 1]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        mu[rr] = m == -INFINITY ? 0.f : m;  // all masked so far: exp2(-inf - 0) = 0
        alpha[rr] = exp2f(mx[mi][rr] - mu[rr]);
        mx[mi][rr] = m;
        ls[mi][rr] *= alpha[rr];
      }
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        acc[mi][i][0] *= alpha[0];
        acc[mi][i][1] *= alpha[0];
        acc[mi][i][2] *= alpha[1];
        acc[mi][i][3] *= alpha[1];
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[mi][j][e] - mu[e >> 1]);
          s[mi][j][e] = p;
          ls[mi][e >> 1] += p;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(n0) ready; every warp is done with K(n0)
    if (n0 + BN < n_hi) {
      load_tile<T, D, BN>(sK, kb + (long long)(n0 + BN) * ks, ks, sk - n0 - BN);
      cp_async_commit();
    }

    // O += P V: P from the S accumulators (C layout of n8 tiles 2kk, 2kk+1 = A layout of k16
    // step kk); V^T fragments by ldmatrix.trans of the [key][d] tile.
    {
      const int r = ((lane >> 3) & 1) * 8 + (lane & 7), c = (lane >> 4) * 8;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned pa[MW][4];
#pragma unroll
        for (int mi = 0; mi < MW; ++mi) {
          pa[mi][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          pa[mi][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          pa[mi][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          pa[mi][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          unsigned bf[4];
          ldsm_x4_t(bf, sV + (kk * 16 + r) * LD + dd * 16 + c);
#pragma unroll
          for (int mi = 0; mi < MW; ++mi) {
            mma16816<T>(acc[mi][2 * dd], pa[mi], bf[0], bf[1]);
            mma16816<T>(acc[mi][2 * dd + 1], pa[mi], bf[2], bf[3]);
          }
        }
      }
    }
  }

  // Finish: row sums over the 4 lanes of a row, normalise, write O and L.
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float l = ls[mi][rr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool empty = mx[mi][rr] == -INFINITY || !(l > 0.f);
      const float inv = empty ? 0.f : 1.f / l;
      const int i = row_a + mi * 16 + rr * 8;
      if (i < sq) {
        T *orow = o + ((long long)(q0 + i) * hq + h) * D;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          const unsigned w = pack2<T>(acc[mi][dt][2 * rr] * inv, acc[mi][dt][2 * rr + 1] * inv);
          *reinterpret_cast<unsigned *>(orow + dt * 8 + 2 * t) = w;
        }
        if (t == 0)
          lse[(long long)h * total_q + q0 + i] =
              empty ? -INFINITY : (mx[mi][rr] + log2f(l)) * LN2;
      }
    }
  }
}

// ---- backward: preprocess, main, convert ---------------------------------------------------

// delta[h, i] = sum_d dO[i, h, d] * O[i, h, d]; dq_acc[i, h, :] = 0. One warp per (i, h).
template <typename T, int D>
__device__ __forceinline__ void bwd_pre(float *__restrict__ delta, float *__restrict__ dq_acc,
                                        const T *__restrict__ o, const T *__restrict__ dout,
                                        int total_q, int hq) {
  constexpr int E = D / 32;
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= (long long)total_q * hq) return;
  const T *orow = o + row * D + lane * E;
  const T *drow = dout + row * D + lane * E;
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) s += to_f(orow[e]) * to_f(drow[e]);
  float *qa = dq_acc + row * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) qa[e] = 0.f;
  s = warp_reduce<SumOp>(s);
  if (lane == 0) {
    const long long i = row / hq, h = row % hq;
    delta[h * total_q + i] = s;
  }
}

template <typename T>
__device__ __forceinline__ void bwd_convert(T *__restrict__ dq, const float *__restrict__ dq_acc,
                                            long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    dq[i] = from_f<T>(dq_acc[i]);
}

template <typename T, int D>
__device__ __forceinline__ void bwd(T *__restrict__ dk, T *__restrict__ dv,
                                    float *__restrict__ dq_acc, const T *__restrict__ q,
                                    const T *__restrict__ k, const T *__restrict__ v,
                                    const T *__restrict__ dout, const float *__restrict__ lse,
                                    const float *__restrict__ delta, const int *__restrict__ cu_q,
                                    const int *__restrict__ cu_k, int hq, int hkv, int total_q,
                                    float scale, int causal, int window,
                                    float *__restrict__ dk_acc, float *__restrict__ dv_acc,
                                    int split) {
  constexpr int NTH = FA_BWD_THREADS(D), NW = NTH / 32;
  constexpr int BN = FA_BWD_BN(D), BM = FA_BWD_BM(D), LD = D + 8, LDS = BM + 8;
  constexpr int KM = FA_BWD_KM(D);  // m16 key tiles per warp
  static_assert(BN == 16 * KM * NW, "warp w owns keys 16 KM w .. 16 KM (w + 1) - 1");
  static_assert(BM <= NTH, "one thread stages one row's L and D");
  constexpr int KD = D / 16;  // k16 steps over the head dim
  constexpr int MT = BM / 8;  // n8 tiles of queries (S^T, dP^T per warp)
  constexpr int DT = D / 8;   // n8 tiles of dK / dV per warp
  T *sK = reinterpret_cast<T *>(dynamic_smem());
  T *sV = sK + BN * LD;
  T *sQ0 = sV + BN * LD;       // [2][BM][LD]: Q tiles, double-buffered
  T *sdO0 = sQ0 + 2 * BM * LD;  // [2][BM][LD]: dO tiles
  T *sdS0 = sdO0 + 2 * BM * LD;  // [2][BN][LDS]: dS^T [key][query], double-buffered
  float *sL0 = reinterpret_cast<float *>(sdS0 + 2 * BN * LDS);  // [2][BM], log2 units
  float *sD0 = sL0 + 2 * BM;                              // [2][BM]

  // Key blocks in the order (key block, kv head, sequence), key block slowest: under causal
  // the low key blocks see the most queries, so the heaviest blocks of every head start first.
  const int nblk = gridDim.y * gridDim.z;
  const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int xb = lin / nblk, hs = (lin % nblk) % gridDim.y, b = (lin % nblk) / gridDim.y;
  // gridDim.y = hkv * split: kv head hk, and which part of its group's query heads.
  const int hk = hs / split, part = hs % split;
  const int q0 = cu_q[b], sq = cu_q[b + 1] - q0;
  const int k0 = cu_k[b], sk = cu_k[b + 1] - k0;
  const int n0 = xb * BN;
  if (n0 >= sk) return;
  const int G = hq / hkv / split;  // query heads of this block: h0 .. h0 + G - 1
  const int h0 = hk * (hq / hkv) + part * G;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const long long qs = (long long)hq * D, ks = (long long)hkv * D;
  const int off = sk - sq;
  const float sl2 = scale * LOG2E;

  // Query rows [m_lo, m_hi) can see some key of [n0, n_last].
  const int n_last = min(n0 + BN, sk) - 1;
  int m_lo = 0, m_hi = sq;
  if (causal) m_lo = max(0, n0 - off);
  if (window >= 0) m_hi = min(sq, n_last - off + window + 1);
  const int m_first = (m_lo / BM) * BM;
  const int n_mt = m_hi > m_first ? (m_hi - m_first + BM - 1) / BM : 0;
  const int iters = n_mt * G;  // (query head of the group, query tile) pairs

  const T *kb = k + ((long long)(k0 + n0) * hkv + hk) * D;
  const T *vb = v + ((long long)(k0 + n0) * hkv + hk) * D;
  load_tile<T, D, BN, NTH>(sK, kb, ks, sk - n0);
  load_tile<T, D, BN, NTH>(sV, vb, ks, sk - n0);

  // Iteration it: query head h = h0 + it / n_mt, query tile m0 = m_first + (it % n_mt) BM.
  // Stages the Q, dO tiles of iteration it in buffer it & 1 (cp.async, not committed here).
  auto load_q = [&](int it) {
    const int h = h0 + it / n_mt, m0 = m_first + (it % n_mt) * BM;
    const long long base = ((long long)(q0 + m0) * hq + h) * D;
    const int buf = it & 1;
    load_tile<T, D, BM, NTH>(sQ0 + buf * BM * LD, q + base, qs, sq - m0);
    load_tile<T, D, BM, NTH>(sdO0 + buf * BM * LD, dout + base, qs, sq - m0);
  };
  // L (log2 units) and D of iteration it's row threadIdx.x into registers (stored to shared
  // memory later, so the loads overlap the tile's math). Rows past the sequence: L = +inf
  // (P = 0), D = 0.
  auto fetch_ld = [&](int it, float &l, float &d) {
    const int h = h0 + it / n_mt, m0 = m_first + (it % n_mt) * BM;
    const int i = m0 + threadIdx.x;
    const bool ok = threadIdx.x < BM && i < sq;
    const long long idx = (long long)h * total_q + q0 + i;
    l = ok ? lse[idx] * LOG2E : INFINITY;
    d = ok ? delta[idx] : 0.f;
  };
  if (iters > 0) {
    load_q(0);
    float l, d;
    fetch_ld(0, l, d);
    if (threadIdx.x < BM) sL0[threadIdx.x] = l, sD0[threadIdx.x] = d;
  }
  cp_async_commit();

  float dka[KM][DT][4], dva[KM][DT][4];
#pragma unroll
  for (int km = 0; km < KM; ++km)
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dka[km][i][e] = dva[km][i][e] = 0.f;

  const int kw0 = n0 + warp * 16 * KM;  // this warp's first key
  const int key_a = kw0 + g;  // this thread's keys: key_a + 16 km, key_a + 16 km + 8
  // ldmatrix lane offsets: A fragment (rows x k), B fragment non-trans (n x k), trans (k x n).
  const int a_r = (lane & 7) + ((lane >> 3) & 1) * 8, a_c = (lane >> 4) * 8;
  const int b_r = (lane >> 4) * 8 + (lane & 7), b_c = ((lane >> 3) & 1) * 8;
  const int bt_r = ((lane >> 3) & 1) * 8 + (lane & 7), bt_c = (lane >> 4) * 8;

  // dQ += scale * dS K of iteration it (its dS^T in buffer it & 1): pieces of 16 queries x 32
  // dims, one per warp (round-robin). A = dS (query rows) by ldmatrix.trans of dS^T; B = K by
  // ldmatrix.trans; the piece is added to dq_acc with f32 atomics.
  auto dq_step = [&](int it) {
    const int h = h0 + it / n_mt, m0 = m_first + (it % n_mt) * BM;
    const T *sdS = sdS0 + (it & 1) * BN * LDS;
    constexpr int PIECES = (BM / 16) * (D / 32);
    for (int pc = warp; pc < PIECES; pc += NW) {
      const int r16 = pc / (D / 32), c32 = pc % (D / 32);
      float qa[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qa[i][0] = qa[i][1] = qa[i][2] = qa[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned af[4];
        // a0: keys 0-7 x q 0-7, a1: keys 0-7 x q 8-15, a2: keys 8-15 x q 0-7, a3: both 8-15.
        ldsm_x4_t(af, sdS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + r16 * 16 +
                          ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int nn = 0; nn < 2; ++nn) {
          unsigned bf[4];
          ldsm_x4_t(bf, sK + (kk * 16 + bt_r) * LD + c32 * 32 + nn * 16 + bt_c);
          mma16816<T>(qa[2 * nn], af, bf[0], bf[1]);
          mma16816<T>(qa[2 * nn + 1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int i = m0 + r16 * 16 + g + rr * 8;
        if (i < sq) {
          float *dst = dq_acc + ((long long)(q0 + i) * hq + h) * D + c32 * 32 + 2 * t;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#if __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float2 *>(dst + j * 8),
                      make_float2(qa[j][2 * rr] * scale, qa[j][2 * rr + 1] * scale));
#else
            atomicAdd(dst + j * 8, qa[j][2 * rr] * scale);
            atomicAdd(dst + j * 8 + 1, qa[j][2 * rr + 1] * scale);
#endif
          }
        }
      }
    }
  };

  for (int it = 0; it < iters; ++it) {
    const int m0 = m_first + (it % n_mt) * BM;
    const int buf = it & 1;
    T *sdS = sdS0 + buf * BN * LDS;
    const T *sQ = sQ0 + buf * BM * LD, *sdO = sdO0 + buf * BM * LD;
    const float *sL = sL0 + buf * BM, *sDl = sD0 + buf * BM;
    cp_async_wait<0>();
    // One barrier per iteration: Q, dO, L, D of it (and K, V) ready; dS^T of it - 1 complete;
    // every warp done with the math of it - 1 (whose Q / dO / L / D buffers it + 1 refills)
    // and with the dQ of it - 2 (whose dS^T buffer it overwrites).
    __syncthreads();
    const bool more = it + 1 < iters;
    if (more) load_q(it + 1);
    cp_async_commit();
    float nl = 0.f, nd = 0.f;
    if (more) fetch_ld(it + 1, nl, nd);
    if (it > 0) dq_step(it - 1);  // its atomics drain while this tile's math runs

    // S^T = K Q^T and dP^T = V dO^T, keys (this warp's 16 KM) as rows, queries as columns;
    // every Q / dO fragment read from shared memory feeds KM m16 key tiles.
    float st[KM][MT][4], dpt[KM][MT][4];
#pragma unroll
    for (int km = 0; km < KM; ++km)
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[km][i][e] = dpt[km][i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      unsigned ka[KM][4], va[KM][4];
#pragma unroll
      for (int km = 0; km < KM; ++km) {
        ldsm_x4(ka[km], sK + ((warp * KM + km) * 16 + a_r) * LD + kk * 16 + a_c);
        ldsm_x4(va[km], sV + ((warp * KM + km) * 16 + a_r) * LD + kk * 16 + a_c);
      }
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        unsigned bf[4];
        ldsm_x4(bf, sQ + (nn * 16 + b_r) * LD + kk * 16 + b_c);
#pragma unroll
        for (int km = 0; km < KM; ++km) {
          mma16816<T>(st[km][2 * nn], ka[km], bf[0], bf[1]);
          mma16816<T>(st[km][2 * nn + 1], ka[km], bf[2], bf[3]);
        }
        ldsm_x4(bf, sdO + (nn * 16 + b_r) * LD + kk * 16 + b_c);
#pragma unroll
        for (int km = 0; km < KM; ++km) {
          mma16816<T>(dpt[km][2 * nn], va[km], bf[0], bf[1]);
          mma16816<T>(dpt[km][2 * nn + 1], va[km], bf[2], bf[3]);
        }
      }
    }

    // P^T = exp2(S^T * scale * log2 e - L), 0 where masked; dS^T = P^T (dP^T - D). The mask
    // is evaluated per element only where this warp's 16 KM keys x BM queries cross a boundary.
    const int kw1 = kw0 + 16 * KM - 1;  // this warp's last key
    const bool need_mask = m0 + BM > sq || kw1 >= sk || (causal && kw1 > m0 + off) ||
                           (window >= 0 && kw0 < m0 + BM - 1 + off - window);
#pragma unroll
    for (int km = 0; km < KM; ++km)
#pragma unroll
      for (int j = 0; j < MT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = j * 8 + 2 * t + (e & 1);
          float p = exp2f(st[km][j][e] * sl2 - sL[qc]);
          if (need_mask) {
            const int kj = key_a + km * 16 + (e >> 1) * 8, i = m0 + qc;
            if (!((i < sq) & visible_bits(i, kj, sk, off, causal, window))) p = 0.f;
          }
          st[km][j][e] = p;
          dpt[km][j][e] = p * (dpt[km][j][e] - sDl[qc]);
        }
      }
    // dS^T to shared memory as T (for dQ).
#pragma unroll
    for (int km = 0; km < KM; ++km)
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const int r = (warp * KM + km) * 16 + g, c = j * 8 + 2 * t;
        *reinterpret_cast<unsigned *>(sdS + r * LDS + c) =
            pack2<T>(dpt[km][j][0], dpt[km][j][1]);
        *reinterpret_cast<unsigned *>(sdS + (r + 8) * LDS + c) =
            pack2<T>(dpt[km][j][2], dpt[km][j][3]);
      }

    // dV += P^T dO, dK += dS^T Q: A from the accumulators, B = ldmatrix.trans of [q][d].
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      unsigned pa[KM][4], da[KM][4];
#pragma unroll
      for (int km = 0; km < KM; ++km) {
        pa[km][0] = pack2<T>(st[km][2 * kk][0], st[km][2 * kk][1]);
        pa[km][1] = pack2<T>(st[km][2 * kk][2], st[km][2 * kk][3]);
        pa[km][2] = pack2<T>(st[km][2 * kk + 1][0], st[km][2 * kk + 1][1]);
        pa[km][3] = pack2<T>(st[km][2 * kk + 1][2], st[km][2 * kk + 1][3]);
        da[km][0] = pack2<T>(dpt[km][2 * kk][0], dpt[km][2 * kk][1]);
        da[km][1] = pack2<T>(dpt[km][2 * kk][2], dpt[km][2 * kk][3]);
        da[km][2] = pack2<T>(dpt[km][2 * kk + 1][0], dpt[km][2 * kk + 1][1]);
        da[km][3] = pack2<T>(dpt[km][2 * kk + 1][2], dpt[km][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        unsigned bf[4];
        ldsm_x4_t(bf, sdO + (kk * 16 + bt_r) * LD + dd * 16 + bt_c);
#pragma unroll
        for (int km = 0; km < KM; ++km) {
          mma16816<T>(dva[km][2 * dd], pa[km], bf[0], bf[1]);
          mma16816<T>(dva[km][2 * dd + 1], pa[km], bf[2], bf[3]);
        }
        ldsm_x4_t(bf, sQ + (kk * 16 + bt_r) * LD + dd * 16 + bt_c);
#pragma unroll
        for (int km = 0; km < KM; ++km) {
          mma16816<T>(dka[km][2 * dd], da[km], bf[0], bf[1]);
          mma16816<T>(dka[km][2 * dd + 1], da[km], bf[2], bf[3]);
        }
      }
    }
    // L, D of it + 1 into the other buffer (nobody reads it during this iteration).
    if (more && threadIdx.x < BM)
      sL0[(buf ^ 1) * BM + threadIdx.x] = nl, sD0[(buf ^ 1) * BM + threadIdx.x] = nd;

  }
  cp_async_wait<0>();  // nothing may stay in flight at exit (the last commit is empty)
  if (iters > 0) {
    __syncthreads();  // dS^T of the last iteration complete
    dq_step(iters - 1);
  }

  // Write dK = scale * sum dS^T Q and dV (every key of the block, zeros where nothing saw it),
  // or with split > 1 add this block's part of the group's sum to the f32 buffers.
#pragma unroll
  for (int km = 0; km < KM; ++km)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int j = key_a + km * 16 + rr * 8;
      if (j < sk) {
        const long long base = ((long long)(k0 + j) * hkv + hk) * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          const float k0v = dka[km][dt][2 * rr] * scale, k1v = dka[km][dt][2 * rr + 1] * scale;
          const float v0v = dva[km][dt][2 * rr], v1v = dva[km][dt][2 * rr + 1];
          if (split == 1) {
            *reinterpret_cast<unsigned *>(dk + base + dt * 8) = pack2<T>(k0v, k1v);
            *reinterpret_cast<unsigned *>(dv + base + dt * 8) = pack2<T>(v0v, v1v);
          } else {
            atomicAdd(dk_acc + base + dt * 8, k0v);
            atomicAdd(dk_acc + base + dt * 8 + 1, k1v);
            atomicAdd(dv_acc + base + dt * 8, v0v);
            atomicAdd(dv_acc + base + dt * 8 + 1, v1v);
          }
        }
      }
    }
}

}  // namespace fa

#define FLASH_ATTN_INSTANCES(T, SUF, D)                                                             \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, FA_FWD_MIN_BLOCKS(D))                \
      flash_attn_fwd_d##D##_##SUF(T *__restrict__ o, float *__restrict__ lse,                    \
                                  const T *__restrict__ q, const T *__restrict__ k,              \
                                  const T *__restrict__ v, const int *__restrict__ cu_q,         \
                                  const int *__restrict__ cu_k, int hq, int hkv, int total_q,    \
                                  float scale, int causal, int window) {                         \
    fa::fwd<T, D>(o, lse, q, k, v, cu_q, cu_k, hq, hkv, total_q, scale, causal, window);         \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      flash_attn_bwd_pre_d##D##_##SUF(float *__restrict__ delta, float *__restrict__ dq_acc,     \
                                      const T *__restrict__ o, const T *__restrict__ dout,       \
                                      int total_q, int hq) {                                     \
    fa::bwd_pre<T, D>(delta, dq_acc, o, dout, total_q, hq);                                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(FA_BWD_THREADS(D), 1)                             \
      flash_attn_bwd_d##D##_##SUF(                                                               \
          T *__restrict__ dk, T *__restrict__ dv, float *__restrict__ dq_acc,                    \
          const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,             \
          const T *__restrict__ dout, const float *__restrict__ lse,                             \
          const float *__restrict__ delta, const int *__restrict__ cu_q,                         \
          const int *__restrict__ cu_k, int hq, int hkv, int total_q, float scale, int causal,   \
          int window, float *__restrict__ dk_acc, float *__restrict__ dv_acc, int split) {       \
    fa::bwd<T, D>(dk, dv, dq_acc, q, k, v, dout, lse, delta, cu_q, cu_k, hq, hkv, total_q,       \
                  scale, causal, window, dk_acc, dv_acc, split);                                 \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      flash_attn_bwd_convert_d##D##_##SUF(T *__restrict__ dq, const float *__restrict__ dq_acc,  \
                                          long long n) {                                         \
    fa::bwd_convert<T>(dq, dq_acc, n);                                                           \
  }

FLASH_ATTN_INSTANCES(__nv_bfloat16, bf16, 64)
FLASH_ATTN_INSTANCES(__nv_bfloat16, bf16, 128)
FLASH_ATTN_INSTANCES(__half, f16, 64)
FLASH_ATTN_INSTANCES(__half, f16, 128)
