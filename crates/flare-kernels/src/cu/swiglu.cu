// SwiGLU: y = silu(g) * u = g * sigmoid(g) * u, elementwise over rows, with its backward.
//
// Backward, with sig = sigmoid(g) and upstream gradient dy:
//   dg = dy * u * sig * (1 + g * (1 - sig))
//   du = dy * g * sig
// Layouts, by element strides so one kernel serves both of flare's ops:
//   * swiglu(g, u): g, u, dy, y contiguous [rows, cols]; the backward writes dg then du into one
//     buffer of 2 * rows * cols (ldo = cols, du_off = rows * cols).
//   * swiglu_packed(gu): gate and up are the two halves of each row of gu [rows, 2 * cols] (one
//     fused gate/up projection): g = gu, u = gu + cols, ldg = ldu = 2 * cols; the backward
//     writes d(gu) [rows, 2 * cols] (ldo = 2 * cols, du_off = cols).
// y and dy are contiguous [rows, cols]. Gradients overwrite, never accumulate. One thread per
// element, grid-stride loop; all arithmetic in f32, rounded once.
#include "common.cuh"

using namespace flare;

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + __expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_body(const T *__restrict__ g, const T *__restrict__ u,
                                                T *__restrict__ y, long long rows, int cols,
                                                long long ldg, long long ldu) {
  const long long n = rows * cols;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / cols;
    const long long c = i - r * cols;
    const float gv = to_f(g[r * ldg + c]);
    y[i] = from_f<T>(gv * sigmoid_f(gv) * to_f(u[r * ldu + c]));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_body(const T *__restrict__ g, const T *__restrict__ u,
                                                const T *__restrict__ dy, T *__restrict__ out,
                                                long long rows, int cols, long long ldg,
                                                long long ldu, long long ldo, long long du_off) {
  const long long n = rows * cols;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / cols;
    const long long c = i - r * cols;
    const float gv = to_f(g[r * ldg + c]);
    const float uv = to_f(u[r * ldu + c]);
    const float d = to_f(dy[i]);
    const float sg = sigmoid_f(gv);
    out[r * ldo + c] = from_f<T>(d * uv * sg * (1.0f + gv * (1.0f - sg)));
    out[du_off + r * ldo + c] = from_f<T>(d * gv * sg);
  }
}

#define SWIGLU_OP(T, SUFFIX)                                                                      \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *g, const T *u, T *y, long long rows,   \
                                                 int cols, long long ldg, long long ldu) {      \
    swiglu_fwd_body<T>(g, u, y, rows, cols, ldg, ldu);                                          \
  }                                                                                             \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *g, const T *u, const T *dy, T *out,   \
                                                 long long rows, int cols, long long ldg,       \
                                                 long long ldu, long long ldo,                  \
                                                 long long du_off) {                            \
    swiglu_bwd_body<T>(g, u, dy, out, rows, cols, ldg, ldu, ldo, du_off);                       \
  }

SWIGLU_OP(float, f32)
SWIGLU_OP(__half, f16)
SWIGLU_OP(__nv_bfloat16, bf16)
