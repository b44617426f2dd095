// Small GEMM: C_z[m, n] = sum_k A_z[m, k] * B_z[k, n] for every batch index z, for products too
// small for cuBLASLt's host overhead to pay off (the host picks this kernel; see
// crates/flare/src/ops/matmul/cuda.rs).
//
// Operands
// --------
// A and B are read through arbitrary element strides, so transposed and broadcast operands need
// no copy: A_z[m, k] = A[z * a_bs + m * a_rs + k * a_cs], B_z[k, n] = B[z * b_bs + k * b_rs +
// n * b_cs] (a batch stride of 0 broadcasts the operand). C is contiguous row-major
// [batch, M, N]. Every element of C is written exactly once. Accumulation is in f32 with one
// FMA per k in increasing k order (no TF32, no split of the sum), so an f32 product is exact f32
// arithmetic; f16 / bf16 operands are widened to f32 on load and the result is rounded once.
//
// Execution
// ---------
// A block of 256 threads owns one 32 x 32 tile of C: thread (tx, ty) = (tid % 16, tid / 16)
// accumulates the 2 x 2 outputs at rows 2ty, 2ty + 1 and columns 2tx, 2tx + 1, reading per k one
// 8-byte pair of A and one of B from shared memory (a warp's reads are one broadcast pair and 16
// consecutive pairs: conflict-free), so each shared load feeds two FMAs. The K dimension is
// walked in 32-wide slabs held in shared memory as f32, double-buffered: the next slab is loaded
// from global memory into registers before the current one is multiplied, so its latency
// overlaps the FMAs, and one barrier per slab suffices. Each thread loads 4 elements of each
// operand per slab; the thread-to-element mapping follows the operand's contiguous dimension
// (32 consecutive threads read 32 consecutive elements) so loads coalesce for row-major and
// transposed operands alike. Elements past M, N or K are loaded as zeros (a padded k adds
// 0 * 0 to every valid output, so results are unchanged) and outputs past M or N are not
// stored.
//
// The grid is flattened: x = tiles of C (row-major over the ceil(M/32) x ceil(N/32) tiles),
// z = batch; blocks loop over both with a grid stride, so any grid is correct (the host caps
// z at 65535). Every loop bound is uniform across a block, so the barriers are too.
#include "common.cuh"

// Launch constants, read by the host through flare_kernels::launch (build.rs parses them).
#define SMALL_GEMM_THREADS 256
#define SMALL_GEMM_TILE 32

namespace flare {
namespace gemm_small {

constexpr int THREADS = SMALL_GEMM_THREADS;
// Blocks per SM promised to ptxas. With the default it aims at 64-80 registers and sinks the
// next slab's loads into (or behind) the FMA loop; with 2 it keeps them all ahead of it (about
// 120 registers, 2 blocks = 16 warps per SM, plenty for problems this small).
constexpr int MIN_BLOCKS = 2;
constexpr int BM = SMALL_GEMM_TILE;  // rows of C per block
constexpr int BN = SMALL_GEMM_TILE;  // columns of C per block
constexpr int BK = SMALL_GEMM_TILE;  // k per shared-memory slab
// Shared rows of 34 floats: pairs stay 8-byte aligned, and a warp storing one column of a slab
// (32 consecutive k, the mapping of a k-contiguous operand) hits each bank at most twice.
constexpr int PAD = 2;
constexpr int LOADS = BM * BK / THREADS;  // elements of each operand per thread per slab: 4
constexpr int ROWS_PER_PASS = THREADS / 32;  // 8: the slow index advances by this per load
static_assert(BM == BK && BN == BK && LOADS * ROWS_PER_PASS == 32, "one 32 x 32 slab per operand");

// The (fast, slow) position of load i of thread `tid` within a 32 x 32 slab.
__device__ __forceinline__ int fast_of(int tid) { return tid & 31; }
__device__ __forceinline__ int slow_of(int tid, int i) { return (tid >> 5) + i * ROWS_PER_PASS; }

// An element as loaded: its bits (a 16-bit integer for f16 / bf16, which keeps the in-flight
// registers plain scalars), widened to f32 only when stored to shared memory.
template <typename T> struct Raw {
  using type = T;
  static __device__ __forceinline__ T load(const T *p) { return __ldg(p); }
  static __device__ __forceinline__ float widen(T v) { return v; }
};
template <> struct Raw<__half> {
  using type = unsigned short;
  static __device__ __forceinline__ unsigned short load(const __half *p) {
    return __ldg(reinterpret_cast<const unsigned short *>(p));
  }
  static __device__ __forceinline__ float widen(unsigned short v) {
    return to_f(from_bits<__half>(v));
  }
};
template <> struct Raw<__nv_bfloat16> {
  using type = unsigned short;
  static __device__ __forceinline__ unsigned short load(const __nv_bfloat16 *p) {
    return __ldg(reinterpret_cast<const unsigned short *>(p));
  }
  static __device__ __forceinline__ float widen(unsigned short v) {
    return __uint_as_float((unsigned)v << 16);
  }
};

}  // namespace gemm_small

template <typename T>
__device__ __forceinline__ void gemm_small_impl(const T *__restrict__ A, const T *__restrict__ B,
                                                T *__restrict__ C, int M, int N, int K,
                                                long long a_rs, long long a_cs, long long a_bs,
                                                long long b_rs, long long b_cs, long long b_bs,
                                                int batch) {
  using namespace gemm_small;
  // [buffer][k][m] and [buffer][k][n].
  __shared__ __align__(16) float As[2][BK][BM + PAD];
  __shared__ __align__(16) float Bs[2][BK][BN + PAD];

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int tiles_n = (N + BN - 1) / BN;
  const long long tiles = (long long)((M + BM - 1) / BM) * tiles_n;
  const int slabs = (K + BK - 1) / BK;

  // Which dimension of the slab consecutive threads walk: A's m when its rows are adjacent
  // (a transposed operand), else its k; B's k when its rows are adjacent, else its n.
  const bool a_m_fast = a_rs == 1 && a_cs != 1;
  const bool b_k_fast = b_rs == 1 && b_cs != 1;
  int a_m[LOADS], a_k[LOADS], b_k[LOADS], b_n[LOADS];
#pragma unroll
  for (int i = 0; i < LOADS; ++i) {
    const int f = fast_of(tid), s = slow_of(tid, i);
    a_m[i] = a_m_fast ? f : s;
    a_k[i] = a_m_fast ? s : f;
    b_k[i] = b_k_fast ? f : s;
    b_n[i] = b_k_fast ? s : f;
  }

  for (int z = blockIdx.z; z < batch; z += gridDim.z) {
    const T *Az = A + (long long)z * a_bs;
    const T *Bz = B + (long long)z * b_bs;
    T *Cz = C + (long long)z * M * N;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
      const int m0 = (int)(t / tiles_n) * BM;
      const int n0 = (int)(t % tiles_n) * BN;

      // Per load: the element's address at k = its slab offset in slab 0 (rows / columns past
      // the matrix clamped to its last one, so that no address is formed outside it), and
      // whether its row (A) / column (B) exists. The k part advances by BK per slab.
      const T *pa[LOADS];
      const T *pb[LOADS];
      bool a_ok[LOADS], b_ok[LOADS];
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        const int m = m0 + a_m[i], n = n0 + b_n[i];
        a_ok[i] = m < M;
        b_ok[i] = n < N;
        const int kA = min(a_k[i], K - 1), kB = min(b_k[i], K - 1);
        pa[i] = Az + (long long)min(m, M - 1) * a_rs + (long long)kA * a_cs;
        pb[i] = Bz + (long long)kB * b_rs + (long long)min(n, N - 1) * b_cs;
      }
      const long long a_step = (long long)BK * a_cs, b_step = (long long)BK * b_rs;

      using R = typename Raw<T>::type;
      R ra[LOADS], rb[LOADS];
      // Loads slab `s` into registers (zeros outside the matrices).
      auto load = [&](int s) {
        const int k0 = s * BK;
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
          ra[i] = a_ok[i] && k0 + a_k[i] < K ? Raw<T>::load(pa[i] + s * a_step) : R(0);
          rb[i] = b_ok[i] && k0 + b_k[i] < K ? Raw<T>::load(pb[i] + s * b_step) : R(0);
        }
      };
      auto stash = [&](int buf) {
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
          As[buf][a_k[i]][a_m[i]] = Raw<T>::widen(ra[i]);
          Bs[buf][b_k[i]][b_n[i]] = Raw<T>::widen(rb[i]);
        }
      };

      float c00 = 0.f, c01 = 0.f, c10 = 0.f, c11 = 0.f;
      load(0);
      stash(0);
      __syncthreads();
      for (int s = 0; s < slabs; ++s) {
        const int buf = s & 1;
        // In flight during the FMAs below. Unconditional (no branch for the compiler to sink
        // the loads behind the FMAs): past the last slab every element is out of range (k >=
        // K), so this loads nothing and stashes zeros into a buffer nobody reads.
        load(s + 1);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          const float2 a = *reinterpret_cast<const float2 *>(&As[buf][kk][2 * ty]);
          const float2 b = *reinterpret_cast<const float2 *>(&Bs[buf][kk][2 * tx]);
          c00 = fmaf(a.x, b.x, c00);
          c01 = fmaf(a.x, b.y, c01);
          c10 = fmaf(a.y, b.x, c10);
          c11 = fmaf(a.y, b.y, c11);
        }
        // The other buffer was last read in slab s - 1, before the previous barrier.
        stash(buf ^ 1);
        // Slab s + 1 is visible; nobody reads `buf` again before it is rewritten after this.
        __syncthreads();
      }

      const int r0 = m0 + 2 * ty, r1 = r0 + 1, q0 = n0 + 2 * tx, q1 = q0 + 1;
      if (r0 < M) {
        if (q0 < N) Cz[(long long)r0 * N + q0] = from_f<T>(c00);
        if (q1 < N) Cz[(long long)r0 * N + q1] = from_f<T>(c01);
      }
      if (r1 < M) {
        if (q0 < N) Cz[(long long)r1 * N + q0] = from_f<T>(c10);
        if (q1 < N) Cz[(long long)r1 * N + q1] = from_f<T>(c11);
      }
    }
  }
}

}  // namespace flare

// gemm_small_<t>(A, B, C, M, N, K, a_rs, a_cs, a_bs, b_rs, b_cs, b_bs, batch): see the top of
// this file. Block: 256 threads, no dynamic shared memory; grid: x = tiles of C, z = batch
// (any sizes >= 1 are correct). M, N, K >= 1.
#define GEMM_SMALL(T, SUFFIX)                                                                     \
  extern "C" __global__ void __launch_bounds__(flare::gemm_small::THREADS,                       \
                                                  flare::gemm_small::MIN_BLOCKS)                  \
      gemm_small_##SUFFIX(const T *__restrict__ A, const T *__restrict__ B, T *__restrict__ C,    \
                          int M, int N, int K, long long a_rs, long long a_cs, long long a_bs,   \
                          long long b_rs, long long b_cs, long long b_bs, int batch) {           \
    flare::gemm_small_impl<T>(A, B, C, M, N, K, a_rs, a_cs, a_bs, b_rs, b_cs, b_bs, batch);      \
  }

GEMM_SMALL(float, f32)
GEMM_SMALL(__half, f16)
GEMM_SMALL(__nv_bfloat16, bf16)
