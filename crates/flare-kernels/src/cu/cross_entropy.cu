// Fused cross-entropy of logits against target ids: forward (per-row NLL) and backward
// (softmax - onehot), never materialising the log-softmax.
//
//   forward:  nll[i] = logsumexp(x[i, :]) - x[i, t[i]]      (0 when t[i] == ignore)
//   backward: dx[i, j] = dnll[i] * (exp(x[i, j] - lse[i]) - [j == t[i]])
//
// One block of CE_THREADS threads owns a row (blocks loop over rows with a grid stride). The
// forward keeps an online (max, sum) per thread so every logit is read once; the backward
// recomputes the row's log-sum-exp the same way (Candle's backward gets no side output from the
// forward), then writes the gradient: two reads and one write per element. All arithmetic is
// f32; the logits are f32, f16 or bf16, nll and dnll are f32. A target outside 0..vocab that is
// not the ignore index gives NaN (the host cannot check targets without a round trip).
// Convention: every output is overwritten (=), nothing accumulates.
#include "common.cuh"
#include <math.h>

#define CE_THREADS 512

namespace {

// Merges the running (max, sum of exp(x - max)) pair (m2, s2) into (m, s).
__device__ __forceinline__ void ce_combine(float &m, float &s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {
    return; // both empty
  }
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

// The log-sum-exp of a row, the same value in every thread of the block. Ends with a barrier,
// so the shared scratch can be reused by the next call.
template <typename T> __device__ float ce_row_lse(const T *row, int vocab) {
  __shared__ float sm[32];
  __shared__ float ss[32];
  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = flare::to_f(row[j]);
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else if (v != -INFINITY) {
      s += expf(v - m);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    ce_combine(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  m = lane < nw ? sm[lane] : -INFINITY;
  s = lane < nw ? ss[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    ce_combine(m, s, m2, s2);
  }
  __syncthreads();
  return m + logf(s);
}

template <typename T>
__device__ void ce_fwd(const T *__restrict__ x, const unsigned int *__restrict__ targets,
                       float *__restrict__ nll, long long rows, int vocab, unsigned int ignore) {
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned int t = targets[r];
    if (t == ignore) {
      if (threadIdx.x == 0) nll[r] = 0.f;
      continue; // uniform over the block
    }
    const T *row = x + r * (long long)vocab;
    const float lse = ce_row_lse(row, vocab);
    if (threadIdx.x == 0) {
      nll[r] = t < (unsigned int)vocab ? lse - flare::to_f(row[t]) : NAN;
    }
  }
}

template <typename T>
__device__ void ce_bwd(const T *__restrict__ x, const unsigned int *__restrict__ targets,
                       const float *__restrict__ dnll, T *__restrict__ dx, long long rows,
                       int vocab, unsigned int ignore) {
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned int t = targets[r];
    const float g = dnll[r];
    const T *row = x + r * (long long)vocab;
    T *out = dx + r * (long long)vocab;
    if (t == ignore || g == 0.f) {
      for (int j = threadIdx.x; j < vocab; j += blockDim.x) out[j] = flare::from_f<T>(0.f);
      continue; // uniform over the block
    }
    if (t >= (unsigned int)vocab) {
      for (int j = threadIdx.x; j < vocab; j += blockDim.x) out[j] = flare::from_f<T>(NAN);
      continue;
    }
    const float lse = ce_row_lse(row, vocab);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = expf(flare::to_f(row[j]) - lse);
      out[j] = flare::from_f<T>(g * (p - (j == (int)t ? 1.f : 0.f)));
    }
  }
}

} // namespace

#define CE_OP(T, SUFFIX)                                                                       \
  extern "C" __global__ void __launch_bounds__(CE_THREADS)                                    \
      cross_entropy_fwd_##SUFFIX(const T *x, const unsigned int *targets, float *nll,          \
                                 long long rows, int vocab, unsigned int ignore) {             \
    ce_fwd<T>(x, targets, nll, rows, vocab, ignore);                                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(CE_THREADS)                                    \
      cross_entropy_bwd_##SUFFIX(const T *x, const unsigned int *targets, const float *dnll,   \
                                 T *dx, long long rows, int vocab, unsigned int ignore) {      \
    ce_bwd<T>(x, targets, dnll, dx, rows, vocab, ignore);                                      \
  }

CE_OP(float, f32)
CE_OP(__half, f16)
CE_OP(__nv_bfloat16, bf16)
