// Decode attention without a mask: out[z, g] = softmax(q[z, g] . k[z, :]^T) @ v[z, :], for
// every query row g of every batch z against all t keys of that batch (the queries are already
// scaled by 1/sqrt(d)). This is the single-new-token case of the model: z runs over
// batch x kv-heads, g over the query heads of a kv head (GQA), and k, v are strided views of
// the KV cache (batch stride, row stride; unit element stride). One launch replaces the scores
// GEMM, the softmax and the probabilities-times-values GEMM.
//
// One block per (g, z). The query row is staged in shared memory as f32; each thread scores
// keys j = tid, tid + blockDim, ... (a dot product over d) into a shared f32 row of t scores;
// the block reduces the maximum and the sum of exponentials (warp shuffles, then one exchange
// through shared memory, fixed order: deterministic); then thread c accumulates
// sum_j p_j * v[j, c] for columns c = tid, tid + blockDim, ... (coalesced reads of v rows).
// All arithmetic in f32, the output rounded once. Dynamic shared memory: (d + t) floats.
#include "common.cuh"

using namespace flare;

#define ATTN_THREADS 128

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
  float *qs = smem;      // [d]
  float *p = smem + d;   // [t]
  const int g = blockIdx.x;
  const long long z = blockIdx.y;
  const T *qr = q + (z * g_rows + g) * (long long)d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = to_f(qr[c]);
  __syncthreads();
  const T *kz = k + z * k_bs;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    const T *kr = kz + j * k_rs;
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s = fmaf(qs[c], to_f(kr[c]), s);
    p[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce(mx, red, true);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    const float e = __expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, red, false);  // its barriers also publish every p[j]
  const float inv = 1.0f / sum;
  const T *vz = v + z * v_bs;
  T *o = out + (z * g_rows + g) * (long long)d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < t; ++j) acc = fmaf(p[j], to_f(vz[j * v_rs + c]), acc);
    o[c] = from_f<T>(acc * inv);
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
