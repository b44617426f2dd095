// Decode attention without a mask: out[z, g] = softmax(q[z, g] . k[z, :]^T) @ v[z, :], for
// every query row g of every batch z against all t keys of that batch (the queries are already
// scaled by 1/sqrt(d)). This is the single-new-token case of the model: z runs over
// batch x kv-heads, g over the query heads of a kv head (GQA), and k, v are strided views of
// the KV cache (batch stride, row stride; unit element stride). One launch replaces the scores
// GEMM, the softmax and the probabilities-times-values GEMM.
//
// One block per (g, z), ATTN_WARPS warps. Lane l owns the head-dim elements c = e * 32 + l
// (e < d / 32 rounded up), so every row of k and v is read coalesced. Scores: warp w takes keys
// j = w, w + ATTN_WARPS, ...; each lane multiplies its elements of q and k_j, the warp sums by
// shuffles, lane 0 stores the f32 score in shared memory. The block reduces the maximum and
// the sum of exponentials (fixed order: deterministic). Output: warp w accumulates
// sum_j p_j * v[j, c] over its keys in registers, then the warps' partial rows are summed
// through shared memory in warp order. All arithmetic in f32, the output rounded once.
// Dynamic shared memory: (t + ATTN_WARPS * d) floats.
#include "common.cuh"

using namespace flare;

#define ATTN_WARPS 8
#define ATTN_THREADS (ATTN_WARPS * 32)
// Head-dim elements per lane at most: d <= 32 * ATTN_MAX_E = 256.
#define ATTN_MAX_E 8

__device__ __forceinline__ float block_reduce(float v, float *red, bool is_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < warps; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

template <typename T>
__device__ __forceinline__ void attn_body(const T *__restrict__ q, const T *__restrict__ k,
                                          const T *__restrict__ v, T *__restrict__ out, int g_rows,
                                          int t, int d, long long k_bs, long long k_rs,
                                          long long v_bs, long long v_rs) {
  extern __shared__ float smem[];
  __shared__ float red[32];
  float *p = smem;          // [t]
  float *part = smem + t;   // [ATTN_WARPS][d]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = blockIdx.x;
  const long long z = blockIdx.y;
  const T *qr = q + (z * g_rows + g) * (long long)d;
  float qv[ATTN_MAX_E];
#pragma unroll
  for (int e = 0; e < ATTN_MAX_E; ++e) {
    const int c = e * 32 + lane;
    qv[e] = c < d ? to_f(qr[c]) : 0.0f;
  }
  const T *kz = k + z * k_bs;
  float mx = -INFINITY;
#pragma unroll 4
  for (int j = warp; j < t; j += ATTN_WARPS) {
    const T *kr = kz + j * k_rs;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < ATTN_MAX_E; ++e) {
      const int c = e * 32 + lane;
      if (c < d) s = fmaf(qv[e], to_f(kr[c]), s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
    if (lane == 0) p[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce(mx, red, true);  // its barriers also publish every p[j]
  float sum = 0.0f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    const float e = __expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, red, false);  // and these publish the exponentials
  const T *vz = v + z * v_bs;
  float acc[ATTN_MAX_E];
#pragma unroll
  for (int e = 0; e < ATTN_MAX_E; ++e) acc[e] = 0.0f;
#pragma unroll 4
  for (int j = warp; j < t; j += ATTN_WARPS) {
    const T *vr = vz + j * v_rs;
    const float pj = p[j];
#pragma unroll
    for (int e = 0; e < ATTN_MAX_E; ++e) {
      const int c = e * 32 + lane;
      if (c < d) acc[e] = fmaf(pj, to_f(vr[c]), acc[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < ATTN_MAX_E; ++e) {
    const int c = e * 32 + lane;
    if (c < d) part[warp * d + c] = acc[e];
  }
  __syncthreads();
  const float inv = 1.0f / sum;
  T *o = out + (z * g_rows + g) * (long long)d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float r = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) r += part[w * d + c];
    o[c] = from_f<T>(r * inv);
  }
}

#define ATTN_OP(T, NAME)                                                                          \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                                    \
      NAME(const T *q, const T *k, const T *v, T *out, int g_rows, int t, int d,                \
           long long k_bs, long long k_rs, long long v_bs, long long v_rs) {                    \
    attn_body<T>(q, k, v, out, g_rows, t, d, k_bs, k_rs, v_bs, v_rs);                           \
  }

ATTN_OP(float, attention_decode_f32)
ATTN_OP(__half, attention_decode_f16)
ATTN_OP(__nv_bfloat16, attention_decode_bf16)
