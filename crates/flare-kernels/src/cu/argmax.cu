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
