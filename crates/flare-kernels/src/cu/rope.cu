// RoPE (rotary position embedding), with the transposition between the projection layout and
// the head layout fused in where the host asks for it.
//
// For each head vector x (head_dim d, half = d / 2) at sequence position t:
//   y[i]        = (x[i] * cos[t, i] - sign * x[i + half] * sin[t, i]) * scale
//   y[i + half] = (x[i + half] * cos[t, i] + sign * x[i] * sin[t, i]) * scale,   i < half
// (transformers' `x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`).
// sign = +1 is the forward rotation by +theta; sign = -1 the rotation by -theta, which is the
// backward (the rotation is orthogonal, so its transpose is its inverse).
//
// The input is read through element strides (any layout); the output is written contiguous
// in the axis order the host picks through `ys_*`: rope_heads reads [b, s, h, d] (the
// projection's output) and writes [b, h, s, d] (the attention layout), its backward reads
// [b, h, s, d] and writes [b, s, h, d]; rope_tokens and its backward read and write
// [b, s, h, d]. `xs_*` are the input strides of the (batch, seq, head, dim) axes whatever their
// order in memory; `ys_*` the output strides of (batch, seq, head) (its dim stride is 1).
// cos and sin are [rows, half], contiguous, with row `b * cos_bs + t` for batch b and position
// t (cos_bs = 0: one table for every batch row; cos_bs = s: one table per batch row).
// Grid: y over the b * s tokens (stride gridDim.y), x over a token's h * half (head, i) pairs
// (stride gridDim.x * blockDim.x), or over its h * half / V packs of V pairs when `vec` (16-byte
// accesses, see rope_vec_body); all arithmetic in f32, rounded once.
#include "common.cuh"

using namespace flare;

template <typename T>
__device__ __forceinline__ void rope_body(const T *__restrict__ x, T *__restrict__ y,
                                          const T *__restrict__ cosv, const T *__restrict__ sinv,
                                          long long b, int s, int h, int half, long long xs_b,
                                          long long xs_s, long long xs_h, long long xs_d,
                                          long long ys_b, long long ys_s, long long ys_h,
                                          long long cos_bs, float sign, float scale) {
  // y over tokens (b, t), x over the (head, i) pairs of a token: one 64-bit division per token
  // row of the grid instead of four per element.
  const long long tokens = b * (long long)s;
  const int per_tok = h * half;
  for (long long tok = blockIdx.y; tok < tokens; tok += gridDim.y) {
    const long long bb = tok / s;
    const int t = (int)(tok - bb * s);
    const long long xo_t = bb * xs_b + t * xs_s, yo_t = bb * ys_b + t * ys_s;
    const long long co_t = (bb * cos_bs + t) * half;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < per_tok; j += gridDim.x * blockDim.x) {
      const int hh = j / half, i = j - hh * half;
      const long long xo = xo_t + hh * xs_h;
      const float x1 = to_f(x[xo + i * xs_d]);
      const float x2 = to_f(x[xo + (long long)(i + half) * xs_d]);
      const float c = to_f(cosv[co_t + i]);
      const float sn = sign * to_f(sinv[co_t + i]);
      const long long yo = yo_t + hh * ys_h;
      y[yo + i] = from_f<T>((x1 * c - x2 * sn) * scale);
      y[yo + i + half] = from_f<T>((x2 * c + x1 * sn) * scale);
    }
  }
}

// The same rotation in 16-byte packs: each thread takes V = 16 / sizeof(T) consecutive i of one
// head, reading its x1, x2, cos and sin packs and writing both output packs in one access each.
// Taken when the host found every pack aligned (`vec`): xs_d == 1, half % V == 0, the other
// strides and the start of x, y, cos and sin multiples of V elements (16 bytes).
template <typename T>
__device__ __forceinline__ void rope_vec_body(const T *__restrict__ x, T *__restrict__ y,
                                              const T *__restrict__ cosv,
                                              const T *__restrict__ sinv, long long b, int s,
                                              int h, int half, long long xs_b, long long xs_s,
                                              long long xs_h, long long ys_b, long long ys_s,
                                              long long ys_h, long long cos_bs, float sign,
                                              float scale) {
  constexpr int V = VecWidth<T>::value;
  const long long tokens = b * (long long)s;
  const int hp = half / V;  // packs per half head
  const int per_tok = h * hp;
  for (long long tok = blockIdx.y; tok < tokens; tok += gridDim.y) {
    const long long bb = tok / s;
    const int t = (int)(tok - bb * s);
    const long long xo_t = bb * xs_b + t * xs_s, yo_t = bb * ys_b + t * ys_s;
    const long long co_t = (bb * cos_bs + t) * half;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < per_tok; j += gridDim.x * blockDim.x) {
      const int hh = j / hp, i = (j - hh * hp) * V;
      const long long xo = xo_t + hh * xs_h + i;
      const Pack<T, V> p1 = load_pack<T, V>(x + xo);
      const Pack<T, V> p2 = load_pack<T, V>(x + xo + half);
      const Pack<T, V> pc = load_pack<T, V>(cosv + co_t + i);
      const Pack<T, V> ps = load_pack<T, V>(sinv + co_t + i);
      Pack<T, V> o1, o2;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float x1 = to_f(p1.v[e]), x2 = to_f(p2.v[e]);
        const float c = to_f(pc.v[e]), sn = sign * to_f(ps.v[e]);
        o1.v[e] = from_f<T>((x1 * c - x2 * sn) * scale);
        o2.v[e] = from_f<T>((x2 * c + x1 * sn) * scale);
      }
      const long long yo = yo_t + hh * ys_h + i;
      store_pack<T, V>(y + yo, o1);
      store_pack<T, V>(y + yo + half, o2);
    }
  }
}

// The v third of the packed q/k/v rows (flare's RopeQkv), copied beside the q and k rotations:
// rows x width elements from x (row stride xs) to y (row stride ys), one grid-stride loop over
// the rows * (width / V) 16-byte packs when `vec` (the host checked that width, both strides
// and both pointers are multiples of 16 bytes), element by element otherwise. Candle's copy2d
// moves 2-byte elements: 21 us for the [4096, 1024] bf16 v of a Llama-3.1-8B layer, a third of
// the bandwidth.
template <typename T>
__device__ __forceinline__ void rope_copy_rows_body(const T *__restrict__ x, T *__restrict__ y,
                                                    long long rows, int width, long long xs,
                                                    long long ys, int vec) {
  constexpr int V = VecWidth<T>::value;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    const long long ppr = width / V;
    for (long long p = first; p < rows * ppr; p += stride) {
      const long long r = p / ppr;
      const long long c = (p - r * ppr) * V;
      store_pack<T, V>(y + r * ys + c, load_pack<T, V>(x + r * xs + c));
    }
  } else {
    for (long long i = first; i < rows * width; i += stride) {
      const long long r = i / width;
      const long long c = i - r * width;
      y[r * ys + c] = x[r * xs + c];
    }
  }
}

#define ROPE_COPY(T, NAME)                                                                        \
  extern "C" __global__ void NAME(const T *x, T *y, long long rows, int width, long long xs,    \
                                  long long ys, int vec) {                                      \
    rope_copy_rows_body<T>(x, y, rows, width, xs, ys, vec);                                     \
  }

ROPE_COPY(float, rope_copy_rows_f32)
ROPE_COPY(__half, rope_copy_rows_f16)
ROPE_COPY(__nv_bfloat16, rope_copy_rows_bf16)

#define ROPE_OP(T, NAME)                                                                          \
  extern "C" __global__ void NAME(const T *x, T *y, const T *cosv, const T *sinv, long long b,  \
                                  int s, int h, int half, long long xs_b, long long xs_s,       \
                                  long long xs_h, long long xs_d, long long ys_b,               \
                                  long long ys_s, long long ys_h, long long cos_bs, float sign, \
                                  float scale, int vec) {                                       \
    if (vec)                                                                                    \
      rope_vec_body<T>(x, y, cosv, sinv, b, s, h, half, xs_b, xs_s, xs_h, ys_b, ys_s, ys_h,      \
                       cos_bs, sign, scale);                                                    \
    else                                                                                        \
      rope_body<T>(x, y, cosv, sinv, b, s, h, half, xs_b, xs_s, xs_h, xs_d, ys_b, ys_s, ys_h,    \
                   cos_bs, sign, scale);                                                        \
  }

ROPE_OP(float, rope_f32)
ROPE_OP(__half, rope_f16)
ROPE_OP(__nv_bfloat16, rope_bf16)
