// Argmax over the last dimension: out[r] = the index of the largest element of row r, the
// first one on ties (as torch.argmax); NaN elements are skipped; a row with no non-NaN element
// gives 0xFFFFFFFF (the host turns it into an error). Used by greedy decoding so that only the
// token id, not the vocabulary row, is copied to the host.
//
// One block (ARGMAX_THREADS threads) per row, grid-stride over rows. Each thread scans its
// strided share of the row in increasing index order, keeping the first maximum; the block then
// reduces (value, index) pairs by warp shuffles and one exchange through shared memory,
// preferring the larger value and, on equal values, the smaller index. Comparisons in f32
// (exact for every input dtype).
#include "common.cuh"

using namespace flare;

#define ARGMAX_THREADS 1024

__device__ __forceinline__ bool better(float v, unsigned int i, float bv, unsigned int bi) {
  return v > bv || (v == bv && i < bi);
}

// Keeps the better of (bv, bi) and its partner's pair across `off` lanes, for every `off` of a
// butterfly: after it every lane of the warp holds the warp's best pair.
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

// The block's best (value, index) pair, in thread 0's (bv, bi) (and every lane of warp 0's):
// warp shuffles, then one exchange of the warps' pairs through `sv` / `si` (32 slots each). Ends
// with a barrier, so the slots may be reused at once.
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

template <typename T>
__device__ __forceinline__ void argmax_body(const T *__restrict__ x, unsigned int *__restrict__ out,
                                            long long rows, int cols) {
  __shared__ float sv[32];
  __shared__ unsigned int si[32];
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *row = x + r * (long long)cols;
    float bv = -INFINITY;
    unsigned int bi = 0xFFFFFFFFu;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      const float v = to_f(row[c]);
      // NaN compares false both ways and is skipped.
      if (better(v, (unsigned int)c, bv, bi)) {
        bv = v;
        bi = (unsigned int)c;
      }
    }
    block_best(bv, bi, sv, si);
    if (threadIdx.x == 0) {
      out[r] = bi;
    }
  }
}

#define ARGMAX_OP(T, NAME)                                                                        \
  extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                                  \
      NAME(const T *x, unsigned int *out, long long rows, int cols) {                           \
    argmax_body<T>(x, out, rows, cols);                                                         \
  }

ARGMAX_OP(float, argmax_f32)
ARGMAX_OP(__half, argmax_f16)
ARGMAX_OP(__nv_bfloat16, argmax_bf16)

// Two-stage form for few long rows (greedy decoding: one or a few rows of ~150k logits, where
// one block per row leaves the GPU idle). Stage 1, argmax_part_*: grid (parts, rows); block p
// of row r scans columns [p * chunk, min((p + 1) * chunk, cols)) as above and writes its
// (value, index) pair to pv/pi[r * parts + p] (-inf / 0xFFFFFFFF when it saw only NaN).
// Stage 2, argmax_final: one block per row reduces its `parts` pairs with the same rule
// (larger value, then smaller index), so the result equals the one-block kernel's.
#define ARGMAX_PART_THREADS 256

template <typename T>
__device__ __forceinline__ void argmax_part_body(const T *__restrict__ x, float *__restrict__ pv,
                                                 unsigned int *__restrict__ pi, int cols,
                                                 int chunk) {
  __shared__ float sv[32];
  __shared__ unsigned int si[32];
  const long long r = blockIdx.y;
  const int parts = gridDim.x;
  const int lo = blockIdx.x * chunk;
  const int hi = min(cols, lo + chunk);
  const T *row = x + r * (long long)cols;
  float bv = -INFINITY;
  unsigned int bi = 0xFFFFFFFFu;
  for (int c = lo + threadIdx.x; c < hi; c += blockDim.x) {
    const float v = to_f(row[c]);
    if (better(v, (unsigned int)c, bv, bi)) {
      bv = v;
      bi = (unsigned int)c;
    }
  }
  block_best(bv, bi, sv, si);
  if (threadIdx.x == 0) {
    pv[r * parts + blockIdx.x] = bv;
    pi[r * parts + blockIdx.x] = bi;
  }
}

#define ARGMAX_PART_OP(T, NAME)                                                                   \
  extern "C" __global__ void __launch_bounds__(ARGMAX_PART_THREADS)                             \
      NAME(const T *x, float *pv, unsigned int *pi, int cols, int chunk) {                      \
    argmax_part_body<T>(x, pv, pi, cols, chunk);                                                \
  }

ARGMAX_PART_OP(float, argmax_part_f32)
ARGMAX_PART_OP(__half, argmax_part_f16)
ARGMAX_PART_OP(__nv_bfloat16, argmax_part_bf16)

extern "C" __global__ void __launch_bounds__(ARGMAX_PART_THREADS)
    argmax_final(const float *pv, const unsigned int *pi, unsigned int *out, int parts) {
  __shared__ float sv[32];
  __shared__ unsigned int si[32];
  const long long r = blockIdx.x;
  float bv = -INFINITY;
  unsigned int bi = 0xFFFFFFFFu;
  for (int p = threadIdx.x; p < parts; p += blockDim.x) {
    const float v = pv[r * parts + p];
    const unsigned int i = pi[r * parts + p];
    if (better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  block_best(bv, bi, sv, si);
  if (threadIdx.x == 0) out[r] = bi;
}
