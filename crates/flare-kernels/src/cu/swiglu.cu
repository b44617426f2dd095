// SwiGLU: y = silu(g) * u = g * sigmoid(g) * u, elementwise, with its backward.
//
// Backward, with sig = sigmoid(g) and upstream gradient dy:
//   dg = dy * u * sig * (1 + g * (1 - sig))
//   du = dy * g * sig
// The backward writes both gradients into one buffer of 2n elements: dg in [0, n), du in
// [n, 2n) (gradients overwrite, never accumulate). Inputs are contiguous; one thread per
// element, grid-stride loop; all arithmetic in f32, rounded once.
#include "common.cuh"

using namespace flare;

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + __expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_body(const T *__restrict__ g, const T *__restrict__ u,
                                                T *__restrict__ y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float gv = to_f(g[i]);
    y[i] = from_f<T>(gv * sigmoid_f(gv) * to_f(u[i]));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_body(const T *__restrict__ g, const T *__restrict__ u,
                                                const T *__restrict__ dy, T *__restrict__ out,
                                                long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float gv = to_f(g[i]);
    const float uv = to_f(u[i]);
    const float d = to_f(dy[i]);
    const float sg = sigmoid_f(gv);
    out[i] = from_f<T>(d * uv * sg * (1.0f + gv * (1.0f - sg)));
    out[n + i] = from_f<T>(d * gv * sg);
  }
}

#define SWIGLU_OP(T, SUFFIX)                                                                      \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *g, const T *u, T *y, long long n) {    \
    swiglu_fwd_body<T>(g, u, y, n);                                                             \
  }                                                                                             \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *g, const T *u, const T *dy, T *out,   \
                                                 long long n) {                                 \
    swiglu_bwd_body<T>(g, u, dy, out, n);                                                       \
  }

SWIGLU_OP(float, f32)
SWIGLU_OP(__half, f16)
SWIGLU_OP(__nv_bfloat16, bf16)
