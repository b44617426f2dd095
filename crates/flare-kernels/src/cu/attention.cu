// Decode attention without a mask: out[z, g] = softmax(q[z, g] . k[z, :]^T) @ v[z, :], for
// every query row g < G of every batch z against all t keys of that batch (the queries are
// already scaled by 1/sqrt(d)). This is the single-new-token case of the model: z runs over
// batch x kv-heads, g over the query heads of a kv head (GQA), and k, v are strided views of
// the KV cache (batch stride, row stride; unit element stride). Two launches replace the
// scores GEMM, the softmax and the probabilities-times-values GEMM.
//
// Flash-decoding split: attention_split_* runs a grid (chunks, B); block (c, z) takes keys
// [c * chunk, min((c + 1) * chunk, t)) of batch z for ALL G query rows, so each key and value
// row is read once per kv head, and many blocks share one head at batch 1. It stages q (f32)
// and its chunk of k (f32, rows padded to d + 1 floats: the score loop reads down a column
// without bank conflicts) in shared memory (16-byte loads when the layout allows), computes
// the G x chunk scores (one thread per pair, f32), then per query row the chunk's maximum m
// and sum of exponentials l, and the unnormalised partial output o[g, :] = sum_j e_j v[j, :]
// (one thread per (g, column), v rows read coalesced). Partials go to an f32 workspace:
// ws_o[z][c][g][d], ws_ml[z][c][g][2]. attention_combine_* (grid (G, B), threads over the
// columns) merges the chunks: M = max m_c, out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c,
// in chunk order (deterministic), rounded once to T.
// Dynamic shared memory of the split kernel: (G * d + chunk * (d + 1) + G * chunk) floats.
#include "common.cuh"

using namespace flare;

#define ATTN_THREADS 128

template <typename T>
__device__ __forceinline__ void split_body(const T *__restrict__ q, const T *__restrict__ k,
                                           const T *__restrict__ v, float *__restrict__ ws_o,
                                           float *__restrict__ ws_ml, int G, int t, int d,
                                           int chunk, long long k_bs, long long k_rs,
                                           long long v_bs, long long v_rs) {
  extern __shared__ float smem[];
  constexpr int V = VecWidth<T>::value;
  const int dp = d + 1;
  float *qs = smem;                 // [G][d]
  float *ks = qs + G * d;           // [chunk][d + 1]
  float *ps = ks + chunk * dp;      // [G][chunk]
  const int tid = threadIdx.x, nt = blockDim.x;
  const long long z = blockIdx.y;
  const int ci = blockIdx.x, chunks = gridDim.x;
  const int j0 = ci * chunk;
  const int cnt = min(chunk, t - j0);
  const T *qz = q + z * (long long)G * d;
  const T *kz = k + z * k_bs + (long long)j0 * k_rs;
  const T *vz = v + z * v_bs + (long long)j0 * v_rs;
  for (int i = tid; i < G * d; i += nt) qs[i] = to_f(qz[i]);
  const bool vec = (d % V == 0) && (k_rs % V == 0) &&
                   (reinterpret_cast<uintptr_t>(kz) % 16 == 0);
  if (vec) {
    const int dv = d / V;
    for (int i = tid; i < cnt * dv; i += nt) {
      const int j = i / dv, c = (i - j * dv) * V;
      const Pack<T, V> p = load_pack<T, V>(kz + j * k_rs + c);
#pragma unroll
      for (int e = 0; e < V; ++e) ks[j * dp + c + e] = to_f(p.v[e]);
    }
  } else {
    for (int i = tid; i < cnt * d; i += nt) {
      const int j = i / d, c = i - j * d;
      ks[j * dp + c] = to_f(kz[j * k_rs + c]);
    }
  }
  __syncthreads();
  chunk_softmax_stats(qs, ks, ps, ws_ml + (z * chunks + ci) * G * 2, G, d, cnt, chunk);
  for (int i = tid; i < G * d; i += nt) {
    const int g = i / d, c = i - g * d;
    const float *pr = ps + g * chunk;
    float acc = 0.0f;
    for (int j = 0; j < cnt; ++j) acc = fmaf(pr[j], to_f(vz[j * v_rs + c]), acc);
    ws_o[((z * chunks + ci) * G + g) * (long long)d + c] = acc;
  }
}

template <typename T>
__device__ __forceinline__ void combine_body(const float *__restrict__ ws_o,
                                             const float *__restrict__ ws_ml, T *__restrict__ out,
                                             int G, int d, int chunks) {
  const int g = blockIdx.x;
  const long long z = blockIdx.y;
  float mx = -INFINITY;
  for (int c = 0; c < chunks; ++c) mx = fmaxf(mx, ws_ml[((z * chunks + c) * G + g) * 2]);
  float l = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const float *ml = ws_ml + ((z * chunks + c) * G + g) * 2;
    l += __expf(ml[0] - mx) * ml[1];
  }
  const float inv = 1.0f / l;
  for (int col = threadIdx.x; col < d; col += blockDim.x) {
    float acc = 0.0f;
    for (int c = 0; c < chunks; ++c) {
      const float w = __expf(ws_ml[((z * chunks + c) * G + g) * 2] - mx);
      acc = fmaf(w, ws_o[((z * chunks + c) * G + g) * (long long)d + col], acc);
    }
    out[(z * G + g) * (long long)d + col] = from_f<T>(acc * inv);
  }
}

#define ATTN_OPS(T, SPLIT, COMBINE)                                                               \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                                    \
      SPLIT(const T *q, const T *k, const T *v, float *ws_o, float *ws_ml, int G, int t, int d, \
            int chunk, long long k_bs, long long k_rs, long long v_bs, long long v_rs) {        \
    split_body<T>(q, k, v, ws_o, ws_ml, G, t, d, chunk, k_bs, k_rs, v_bs, v_rs);                \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                                    \
      COMBINE(const float *ws_o, const float *ws_ml, T *out, int G, int d, int chunks) {        \
    combine_body<T>(ws_o, ws_ml, out, G, d, chunks);                                            \
  }

ATTN_OPS(float, attention_split_f32, attention_combine_f32)
ATTN_OPS(__half, attention_split_f16, attention_combine_f16)
ATTN_OPS(__nv_bfloat16, attention_split_bf16, attention_combine_bf16)
