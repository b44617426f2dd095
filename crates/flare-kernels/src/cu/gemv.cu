// Skinny GEMM for decoding: y[r, j] = sum_l x[r, l] * w[j, l], for r < m <= GEMV_MAX_M rows of
// x (the tokens of one decode step) against a weight w stored row-major [n, k] (the layout of a
// linear layer's weight, read through `x @ w.T`).
//
// Design: one warp per output column j (GEMV_WARPS columns per block, small blocks so that a
// 896-column weight still spreads over every SM). The warp's lanes walk w's row j along k,
// GEMV_UNROLL independent 16-byte loads per lane in flight at once (the first version issued
// one at a time and was latency bound, ~10x off bandwidth), so the weight, which is the traffic that matters, is read once, coalesced,
// 16 bytes per lane per step when k, the row strides and the pointers allow it (decided by the
// kernel uniformly for the grid), element by element otherwise. Each lane reads the matching
// slice of every x row (x is tiny and stays in L1/L2), keeps one f32 accumulator per row, and
// the warp reduces them with shuffles in a fixed order (bitwise deterministic). Lane r writes
// y[r, j]. No shared memory. y is contiguous [m, n]; x rows are ldx apart, w rows ldw apart.
#include "common.cuh"

using namespace flare;

#define GEMV_MAX_M 8
#define GEMV_WARPS 4
#define GEMV_UNROLL 4
#define GEMV_THREADS (GEMV_WARPS * 32)

template <typename T>
__device__ __forceinline__ void gemv_body(const T *__restrict__ x, const T *__restrict__ w,
                                          T *__restrict__ y, int m, int n, int k, long long ldx,
                                          long long ldw) {
  constexpr int V = VecWidth<T>::value;
  const int lane = threadIdx.x & 31;
  const bool vec = (k % V == 0) && (ldx % V == 0) && (ldw % V == 0) &&
                   (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(w) % 16 == 0);
  const long long warps_total = (long long)gridDim.x * GEMV_WARPS;
  for (long long j = (long long)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5); j < n;
       j += warps_total) {
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[r] = 0.0f;
    const T *wr = w + j * ldw;
    if (vec) {
      // GEMV_UNROLL independent weight loads are issued before any arithmetic, so a warp keeps
      // GEMV_UNROLL * 512 bytes of its row in flight (a 896-wide bf16 row is one round trip).
      constexpr int STEP = 32 * V;
      for (int l0 = lane * V; l0 < k; l0 += STEP * GEMV_UNROLL) {
        Pack<T, V> wp[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
          const int l = l0 + u * STEP;
          if (l < k) wp[u] = load_pack<T, V>(wr + l);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
          const int l = l0 + u * STEP;
          if (l < k) {
#pragma unroll
            for (int r = 0; r < GEMV_MAX_M; ++r) {
              if (r < m) {
                const Pack<T, V> xp = load_pack<T, V>(x + r * ldx + l);
#pragma unroll
                for (int e = 0; e < V; ++e) acc[r] = fmaf(to_f(xp.v[e]), to_f(wp[u].v[e]), acc[r]);
              }
            }
          }
        }
      }
    } else {
      for (int l0 = lane; l0 < k; l0 += 32 * GEMV_UNROLL) {
        float wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
          const int l = l0 + u * 32;
          wv[u] = l < k ? to_f(__ldg(wr + l)) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
          const int l = l0 + u * 32;
          if (l < k) {
#pragma unroll
            for (int r = 0; r < GEMV_MAX_M; ++r) {
              if (r < m) acc[r] = fmaf(to_f(__ldg(x + r * ldx + l)), wv[u], acc[r]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
      if (r < m) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], off);
      }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
      if (r < m && lane == r) y[(long long)r * n + j] = from_f<T>(acc[r]);
    }
  }
}

#define GEMV_OP(T, NAME)                                                                          \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                    \
      NAME(const T *x, const T *w, T *y, int m, int n, int k, long long ldx, long long ldw) {   \
    gemv_body<T>(x, w, y, m, n, k, ldx, ldw);                                                   \
  }

GEMV_OP(float, gemv_f32)
GEMV_OP(__half, gemv_f16)
GEMV_OP(__nv_bfloat16, gemv_bf16)
