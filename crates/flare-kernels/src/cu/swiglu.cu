// SwiGLU: y = silu(g) * u = g * sigmoid(g) * u, elementwise over rows, with its backward.
//
// Backward, with sig = sigmoid(g) and upstream gradient dy:
//   dg = dy * u * sig * (1 + g * (1 - sig))
//   du = dy * g * sig
// Layouts, by element strides so one kernel serves both of flare's ops:
//   * swiglu(g, u): g, u, dy, y contiguous [rows, cols]; the backward writes dg then du into one
//     buffer of 2 * rows * cols (dg = out, du = out + rows * cols, ldo = cols), or, for the
//     training MLP, over g and u themselves (dg = g, du = u, ldo = cols).
//   * swiglu_packed(gu): gate and up are the two halves of each row of gu [rows, 2 * cols] (one
//     fused gate/up projection): g = gu, u = gu + cols, ldg = ldu = 2 * cols; the backward
//     writes d(gu) [rows, 2 * cols] (dg = out, du = out + cols, ldo = 2 * cols).
// y's rows are ldy apart (cols, or wider for the fused LoRA MLP, whose down projection reads
// spare columns beside them); dy is contiguous [rows, cols]. Gradients overwrite, never accumulate. All arithmetic
// in f32, rounded once. The backward's outputs may alias g and u element for element (in
// place): each thread reads its g and u pack before it writes the same pack of dg and du, and
// no other thread touches that pack, so g, u, dg and du are not declared __restrict__.
//
// Grids: when every row start of every operand is 16-byte aligned (the launcher checks pointers,
// strides and cols), a grid-stride loop over packs of V = 16 / sizeof(T) consecutive columns,
// each one 16-byte access, on a few blocks per SM (the *_rows_body and *_flat_body paths).
// Otherwise the row grid: x over packs (a thread takes one pack per row, stride
// gridDim.x * blockDim.x packs), y over rows (stride gridDim.y), each pack read and written
// element by element (the last pack of a row partial).
#include "common.cuh"

using namespace flare;

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + __expf(-g)); }

// silu(g) * u of one pack.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> swiglu_fwd_pack(const Pack<T, V> &gp, const Pack<T, V> &up) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float gv = to_f(gp.v[e]);
    out.v[e] = from_f<T>(gv * sigmoid_f(gv) * to_f(up.v[e]));
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd_body(const T *__restrict__ g, const T *__restrict__ u,
                                                T *__restrict__ y, long long rows, int cols,
                                                long long ldg, long long ldu, long long ldy) {
  constexpr int V = VecWidth<T>::value;
  const int packs = (cols + V - 1) / V;
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const T *gr = g + r * ldg, *ur = u + r * ldu;
    T *yr = y + r * ldy;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < packs; c += gridDim.x * blockDim.x) {
      const Pack<T, V> gp = load_row_pack<T, V, false>(gr, c, cols, 0.f);
      const Pack<T, V> up = load_row_pack<T, V, false>(ur, c, cols, 0.f);
      store_row_pack<T, V, false>(yr, c, cols, swiglu_fwd_pack<T, V>(gp, up));
    }
  }
}

// The forward over aligned rows of any strides (the packed gate/up layout: ldg = ldu =
// 2 * cols) with 16-byte access: one grid-stride loop over the rows * (cols / V) packs, each
// split into (row, pack) by one division, on a few blocks per SM, as the backward's rows path.
// The host takes it when every row start is 16-byte aligned and cols % V == 0.
template <typename T>
__device__ __forceinline__ void swiglu_fwd_rows_body(const T *__restrict__ g,
                                                     const T *__restrict__ u,
                                                     T *__restrict__ y, long long rows, int cols,
                                                     long long ldg, long long ldu,
                                                     long long ldy) {
  constexpr int V = VecWidth<T>::value;
  const long long ppr = cols / V;
  const long long packs = rows * ppr;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const long long r = p / ppr;
    const long long c = (p - r * ppr) * V;
    const Pack<T, V> gp = load_pack<T, V>(g + r * ldg + c);
    const Pack<T, V> up = load_pack<T, V>(u + r * ldu + c);
    store_pack<T, V>(y + r * ldy + c, swiglu_fwd_pack<T, V>(gp, up));
  }
}

// dg and du of one pack.
template <typename T, int V>
__device__ __forceinline__ void swiglu_bwd_pack(const Pack<T, V> &gp, const Pack<T, V> &up,
                                                const Pack<T, V> &dp, Pack<T, V> &dgp,
                                                Pack<T, V> &dup) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float gv = to_f(gp.v[e]), uv = to_f(up.v[e]), d = to_f(dp.v[e]);
    const float sg = sigmoid_f(gv);
    dgp.v[e] = from_f<T>(d * uv * sg * (1.0f + gv * (1.0f - sg)));
    dup.v[e] = from_f<T>(d * gv * sg);
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_body(const T *g, const T *u, const T *__restrict__ dy,
                                                T *dg, T *du, long long rows, int cols,
                                                long long ldg, long long ldu, long long ldo) {
  constexpr int V = VecWidth<T>::value;
  const int packs = (cols + V - 1) / V;
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const T *gr = g + r * ldg, *ur = u + r * ldu, *dyr = dy + r * cols;
    T *dgr = dg + r * ldo, *dur = du + r * ldo;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < packs; c += gridDim.x * blockDim.x) {
      // Coherent loads for g and u: this kernel may write them (in place).
      const Pack<T, V> gp = load_row_pack_rw<T, V, false>(gr, c, cols);
      const Pack<T, V> up = load_row_pack_rw<T, V, false>(ur, c, cols);
      const Pack<T, V> dp = load_row_pack<T, V, false>(dyr, c, cols, 0.f);
      Pack<T, V> dgp, dup;
      swiglu_bwd_pack<T, V>(gp, up, dp, dgp, dup);
      store_row_pack<T, V, false>(dgr, c, cols, dgp);
      store_row_pack<T, V, false>(dur, c, cols, dup);
    }
  }
}


// The backward over five flat arrays (every operand contiguous, rows back to back: ldg = ldu =
// ldo = cols, the training MLP's separate, in-place case) with 16-byte access: one grid-stride
// loop over the n / V packs, the n % V tail element by element by the first threads. The host
// sizes the grid to a few blocks per SM: a block per (row, 2048 columns) tile, as the row grid
// above makes, ran the Llama-3.1-8B MLP's backward at 1.6 TB/s where this runs at 2.9
// (bench/dev/swiglu_probe.py).
template <typename T>
__device__ __forceinline__ void swiglu_bwd_flat_body(const T *g, const T *u, const T *__restrict__ dy,
                                                     T *dg, T *du, long long n) {
  constexpr int V = VecWidth<T>::value;
  const long long packs = n / V;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long long p = first; p < packs; p += stride) {
    const Pack<T, V> gp = load_pack_rw<T, V>(g + p * V);
    const Pack<T, V> up = load_pack_rw<T, V>(u + p * V);
    const Pack<T, V> dp = load_pack<T, V>(dy + p * V);
    Pack<T, V> dgp, dup;
    swiglu_bwd_pack<T, V>(gp, up, dp, dgp, dup);
    store_pack<T, V>(dg + p * V, dgp);
    store_pack<T, V>(du + p * V, dup);
  }
  const long long i = packs * V + first;
  if (i < n) {
    Pack<T, 1> gp, up, dp, dgp, dup;
    gp.v[0] = g[i];
    up.v[0] = u[i];
    dp.v[0] = dy[i];
    swiglu_bwd_pack<T, 1>(gp, up, dp, dgp, dup);
    dg[i] = dgp.v[0];
    du[i] = dup.v[0];
  }
}

// The backward over aligned rows of any strides (the packed gate/up layout: ldg = ldu = ldo =
// 2 * cols) with 16-byte access: one grid-stride loop over the rows * (cols / V) packs, each
// split into (row, pack) by one division, on a few blocks per SM as the flat path. The host
// takes it when every row start is 16-byte aligned and cols % V == 0.
template <typename T>
__device__ __forceinline__ void swiglu_bwd_rows_body(const T *g, const T *u,
                                                     const T *__restrict__ dy, T *dg, T *du,
                                                     long long rows, int cols, long long ldg,
                                                     long long ldu, long long ldo) {
  constexpr int V = VecWidth<T>::value;
  const long long ppr = cols / V;
  const long long packs = rows * ppr;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const long long r = p / ppr;
    const long long c = (p - r * ppr) * V;
    const Pack<T, V> gp = load_pack_rw<T, V>(g + r * ldg + c);
    const Pack<T, V> up = load_pack_rw<T, V>(u + r * ldu + c);
    const Pack<T, V> dp = load_pack<T, V>(dy + r * cols + c);
    Pack<T, V> dgp, dup;
    swiglu_bwd_pack<T, V>(gp, up, dp, dgp, dup);
    store_pack<T, V>(dg + r * ldo + c, dgp);
    store_pack<T, V>(du + r * ldo + c, dup);
  }
}

// `vec`: 0 the row grid with element accesses (any alignment); the forward takes 2, aligned
// rows on a grid-stride loop (swiglu_fwd_rows_body); the backward takes 2, flat and 16-byte
// aligned (swiglu_bwd_flat_body), and 3, aligned rows on a grid-stride loop
// (swiglu_bwd_rows_body).
#define SWIGLU_OP(T, SUFFIX)                                                                      \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *g, const T *u, T *y, long long rows,   \
                                                 int cols, long long ldg, long long ldu,        \
                                                 long long ldy, int vec) {                      \
    if (vec == 2)                                                                               \
      swiglu_fwd_rows_body<T>(g, u, y, rows, cols, ldg, ldu, ldy);                              \
    else                                                                                        \
      swiglu_fwd_body<T>(g, u, y, rows, cols, ldg, ldu, ldy);                                   \
  }                                                                                             \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *g, const T *u, const T *dy, T *dg,     \
                                                 T *du, long long rows, int cols, long long ldg, \
                                                 long long ldu, long long ldo, int vec) {       \
    if (vec == 3)                                                                               \
      swiglu_bwd_rows_body<T>(g, u, dy, dg, du, rows, cols, ldg, ldu, ldo);                     \
    else if (vec == 2)                                                                          \
      swiglu_bwd_flat_body<T>(g, u, dy, dg, du, rows * cols);                                   \
    else                                                                                        \
      swiglu_bwd_body<T>(g, u, dy, dg, du, rows, cols, ldg, ldu, ldo);                          \
  }

SWIGLU_OP(float, f32)
SWIGLU_OP(__half, f16)
SWIGLU_OP(__nv_bfloat16, bf16)
