// The kernels of the batch-1 decode engine (crates/flare/src/models/decode_graph.rs): one decode
// step of a transformer as a fixed sequence of launches over static buffers, replayed as one CUDA
// graph. Nothing that changes from step to step is a kernel argument: the token id and the
// position are read from device memory (`token`, `pos`), and the last kernel of a step
// (decode_argmax_final) writes the next token id and increments the position, so the same graph
// replays every step.
//
// Per layer (6 launches):
//   decode_gemv   (rmsnorm in the staging)    qkv = norm(x) @ Wqkv.T + b
//   decode_attn_split / decode_attn_combine   flash-decoding over keys 0..=pos (GQA); the split
//                                             applies RoPE to q (and the scale) and to the new
//                                             k, and writes k and v into the KV cache at `pos`
//   decode_gemv   (residual epilogue)         x = x + attn @ Wo.T (+ b)
//   decode_gemv   (rmsnorm in the staging)    gu = norm(x) @ Wgu.T (+ b), gate then up
//   decode_gemv   (swiglu in the staging, residual epilogue)  x = x + silu(g) * u @ Wd.T (+ b)
// and per step: decode_embed first; decode_gemv (final norm) for the logits, argmax_part_* (of
// argmax.cu) and decode_argmax_final last.
//
// Rounding follows the regular per-op path (Transformer::forward_impl): every intermediate that
// the per-op path materialises in the model dtype T is rounded to T here too (the normed input,
// the projection before and after its bias, the SwiGLU product, the residual sum, the rotated
// q/k, the attention output, the logits); accumulation is in f32. The gemv reduces each output
// in exactly the order of gemv.cu (lane l takes the 16-byte packs l, l + 32, ... in GEMV_UNROLL
// groups, fma in element order, then an xor butterfly), so a projection of the same input gives
// bitwise the same output as the per-op path's gemv.
#include "common.cuh"

using namespace flare;

#define DG_GEMV_WARPS 4
#define DG_GEMV_THREADS (DG_GEMV_WARPS * 32)
#define DG_GEMV_UNROLL 4
// Output rows per warp, interleaved so that 2 * DG_GEMV_UNROLL 16-byte loads per lane are in
// flight at once.
#define DG_GEMV_ROWS 2
#define DG_THREADS 256
#define DG_ATTN_THREADS 128

// ---- programmatic dependent launch ---------------------------------------------------------

// The host launches every kernel after the first of a step with programmatic stream
// serialisation (always; sm_90+): a kernel may start once every block of
// the one before has run dg_launch_next (each kernel runs it first thing), and reads or writes
// nothing that another kernel of the step writes or reads before dg_wait_prior returns (the
// kernel before has completed and its writes are visible; by induction, so have all before it).
// What comes before the wait reads only weights: the gemv's first weight loads overlap the tail
// of the kernel before and the launch latency. Without the launch attribute (or before sm_90)
// both are no-ops.
__device__ __forceinline__ void dg_wait_prior() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void dg_launch_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---- embedding -----------------------------------------------------------------------------

// x[i] = embed[token, i] for i < hidden. An id outside the vocabulary (only possible after an
// all-NaN argmax, which the host reports as an error) reads row 0 instead of out of bounds.
template <typename T>
__device__ __forceinline__ void embed_body(const T *__restrict__ embed,
                                           const unsigned int *__restrict__ token,
                                           T *__restrict__ x, int hidden, int vocab) {
  dg_launch_next();
  unsigned int t = *token;
  if (t >= (unsigned int)vocab) t = 0;
  const T *row = embed + (long long)t * hidden;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hidden; i += gridDim.x * blockDim.x)
    x[i] = row[i];
}

// ---- gemv with fused input staging and epilogue ----------------------------------------------

__device__ __forceinline__ float dg_sigmoid(float g) { return 1.0f / (1.0f + __expf(-g)); }

// The weight packs of rows wr[0..DG_GEMV_ROWS) at l0, l0 + STEP, ... (DG_GEMV_UNROLL of them,
// those below k).
template <typename T, int V>
__device__ __forceinline__ void gemv_load(Pack<T, V> (&wp)[DG_GEMV_ROWS][DG_GEMV_UNROLL],
                                          const T *const (&wr)[DG_GEMV_ROWS], int l0, int k) {
  constexpr int STEP = 32 * V;
#pragma unroll
  for (int r = 0; r < DG_GEMV_ROWS; ++r) {
#pragma unroll
    for (int u = 0; u < DG_GEMV_UNROLL; ++u) {
      const int l = l0 + u * STEP;
      if (l < k) wp[r][u] = load_pack<T, V>(wr[r] + l);
    }
  }
}

// Row pointers of the row group starting at j0. A row past n re-reads row j0 (in bounds) and is
// never stored.
template <typename T>
__device__ __forceinline__ void gemv_rows(const T *(&wr)[DG_GEMV_ROWS], const T *w, int j0, int n,
                                          int k) {
#pragma unroll
  for (int r = 0; r < DG_GEMV_ROWS; ++r) wr[r] = w + (long long)(j0 + r < n ? j0 + r : j0) * k;
}

// y[j] (j < n) = in' . w[j, :] with in' staged in shared memory as f32 by `in_mode`:
//   0: in' = in[0..k)
//   1: in' = round_T(in * rsqrt(mean(in^2) + eps) * norm_w)            (RMSNorm of in, k wide)
//   2: in' = round_T(silu(in[i]) * in[k + i])                         (SwiGLU of [gate | up])
// then out = round_T(acc), with a bias out = round_T(out + bias[j]); `out_mode` 0 stores
// y[j] = out, 1 adds into the residual: y[j] = round_T(y[j] + out). `ksplit`: 1 or DG_GEMV_WARPS
// (see below). k % (16 / sizeof(T)) == 0, 16-byte aligned w, in and norm_w (checked by the
// host). Dynamic shared memory: k floats.
//
// Latency: a warp issues the weight loads of its first row group before the staging (they do
// not depend on the input, so their DRAM round trip overlaps the staging's two dependent
// reads), and those of its next row group before reducing the current one. The host sizes the
// grid to one wave of resident blocks, so that no block stages the input twice over.
template <typename T>
__device__ __forceinline__ void gemv_body(const T *__restrict__ in, const T *__restrict__ norm_w,
                                          float eps, int in_mode, const T *__restrict__ w,
                                          const T *__restrict__ bias, T *__restrict__ y, int n,
                                          int k, int out_mode, int ksplit) {
  extern __shared__ __align__(16) float xs[];
  __shared__ float red[DG_GEMV_WARPS];
  __shared__ float part[DG_GEMV_WARPS][DG_GEMV_ROWS];
  constexpr int V = VecWidth<T>::value;
  constexpr int STEP = 32 * V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // ksplit == 1: each warp owns DG_GEMV_ROWS rows. ksplit == DG_GEMV_WARPS: the block's warps
  // share the same rows and split k (warp w takes the unrolled steps w, w + ksplit, ...), then
  // add their partials in warp order through shared memory: for few long rows (down_proj), so
  // that enough loads are in flight.
  const int groups = DG_GEMV_WARPS / ksplit;  // row groups per block
  const int wg = warp / ksplit, wk = warp - wg * ksplit;
  const int stride_rows = gridDim.x * groups * DG_GEMV_ROWS;
  const int lstart = lane * V + wk * STEP * DG_GEMV_UNROLL;
  const int lstep = STEP * DG_GEMV_UNROLL * ksplit;
  int j0 = (blockIdx.x * groups + wg) * DG_GEMV_ROWS;
  dg_launch_next();

  Pack<T, V> wp[DG_GEMV_ROWS][DG_GEMV_UNROLL];
  const T *wr[DG_GEMV_ROWS];
  gemv_rows<T>(wr, w, j0, n, k);
  bool loaded = j0 < n && lstart < k;
  if (loaded) gemv_load<T, V>(wp, wr, lstart, k);
  dg_wait_prior();

  // Staging, 16-byte packs (k % V == 0).
  if (in_mode == 2) {
#pragma unroll 4
    for (int i = tid * V; i < k; i += DG_GEMV_THREADS * V) {
      const Pack<T, V> g = load_pack_rw<T, V>(in + i);
      const Pack<T, V> u = load_pack_rw<T, V>(in + k + i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float gv = to_f(g.v[e]);
        xs[i + e] = to_f(from_f<T>(gv * dg_sigmoid(gv) * to_f(u.v[e])));
      }
    }
  } else {
    float ss = 0.0f;
#pragma unroll 4
    for (int i = tid * V; i < k; i += DG_GEMV_THREADS * V) {
      const Pack<T, V> xp = load_pack_rw<T, V>(in + i);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float v = to_f(xp.v[e]);
        xs[i + e] = v;
        ss = fmaf(v, v, ss);
      }
    }
    if (in_mode == 1) {
      ss = warp_reduce<SumOp>(ss);
      if (lane == 0) red[warp] = ss;
      __syncthreads();
      float tot = 0.0f;
#pragma unroll
      for (int i = 0; i < DG_GEMV_WARPS; ++i) tot += red[i];
      const float rinv = rsqrtf(tot / (float)k + eps);
      // Each thread rescales the packs it staged itself: no barrier needed before.
#pragma unroll 4
      for (int i = tid * V; i < k; i += DG_GEMV_THREADS * V) {
        const Pack<T, V> np = load_pack<T, V>(norm_w + i);
#pragma unroll
        for (int e = 0; e < V; ++e) xs[i + e] = to_f(from_f<T>(xs[i + e] * rinv * to_f(np.v[e])));
      }
    }
  }
  __syncthreads();

  for (; j0 < n; j0 += stride_rows) {
    float acc[DG_GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < DG_GEMV_ROWS; ++r) acc[r] = 0.0f;
    for (int l0 = lstart; l0 < k; l0 += lstep) {
      if (!loaded) gemv_load<T, V>(wp, wr, l0, k);
      loaded = false;
#pragma unroll
      for (int u = 0; u < DG_GEMV_UNROLL; ++u) {
        const int l = l0 + u * STEP;
        if (l < k) {
          // x read as float4s: a lane's V floats are contiguous, and 16-byte shared loads keep
          // the bank conflicts of the lanes' stride-V addresses to 2-way (8-way with scalars).
#pragma unroll
          for (int e4 = 0; e4 < V; e4 += 4) {
            const float4 x4 = *reinterpret_cast<const float4 *>(xs + l + e4);
            const float xv[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#pragma unroll
              for (int r = 0; r < DG_GEMV_ROWS; ++r)
                acc[r] = fmaf(xv[e], to_f(wp[r][u].v[e4 + e]), acc[r]);
            }
          }
        }
      }
    }
    // The next row group's first loads go out before this group's reduction and stores.
    const int jn = j0 + stride_rows;
    const T *wn[DG_GEMV_ROWS];
    gemv_rows<T>(wn, w, jn, n, k);
    loaded = jn < n && lstart < k;
    if (loaded) gemv_load<T, V>(wp, wn, lstart, k);
#pragma unroll
    for (int r = 0; r < DG_GEMV_ROWS; ++r) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], off);
    }
    if (ksplit > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < DG_GEMV_ROWS; ++r) part[warp][r] = acc[r];
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < DG_GEMV_ROWS; ++r) {
        float t = 0.0f;
        for (int w2 = 0; w2 < ksplit; ++w2) t += part[wg * ksplit + w2][r];
        acc[r] = t;
      }
      // The partials are read before the next rows overwrite them.
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < DG_GEMV_ROWS; ++r) {
      const int j = j0 + r;
      if (wk == 0 && lane == r && j < n) {
        T out = from_f<T>(acc[r]);
        if (bias != nullptr) out = from_f<T>(to_f(out) + to_f(bias[j]));
        if (out_mode == 1) out = from_f<T>(to_f(y[j]) + to_f(out));
        y[j] = out;
      }
    }
#pragma unroll
    for (int r = 0; r < DG_GEMV_ROWS; ++r) wr[r] = wn[r];
  }
}

// ---- attention ------------------------------------------------------------------------------

// attention.cu's split kernel fused with RoPE and the KV-cache append, with the key count
// t = *pos + 1 read from the device: grid (chunks, kv_heads) over the whole cache, blocks whose
// chunk starts at or past t exit at once. Unlike attention.cu it stages the chunk's values in
// shared memory too (all loads of a block in flight at once: the per-column value loop over
// global memory was latency bound).
// qkv = [q (G * kv_heads heads) | k (kv_heads heads) | v (kv_heads heads)], each head d wide, as
// the projection wrote it. With p = *pos and (c, s) = (cos[p, i], sin[p, i]), i < d / 2, every
// block rotates its G query heads and scales them by `scale` (1 / sqrt(d)) into shared memory;
// the block whose chunk holds p (the last one) also rotates key head z and writes it, and value
// head z, into the cache's row p and into its own shared rows. Same formula and rounding as
// rope.cu (the rotated q and k are rounded to T).
// Block (c, z) takes keys [c * chunk, min(t, (c + 1) * chunk)) of kv head z for its G query heads
// (q heads z * G .. z * G + G - 1, consecutive in q) and writes the chunk's unnormalised output
// and (max, sum of exponentials) to ws_o[z][c][g][d], ws_ml[z][c][g][2]. Keys and values are
// [kv_heads, max_len, d] (head stride hs = max_len * d, row stride d).
template <typename T>
__device__ __forceinline__ void split_body(const T *__restrict__ qkv, T *__restrict__ k,
                                           T *__restrict__ v, const T *__restrict__ cosv,
                                           const T *__restrict__ sinv, float *__restrict__ ws_o,
                                           float *__restrict__ ws_ml, const int *__restrict__ pos,
                                           int G, int d, int chunk, long long hs, float scale) {
  dg_launch_next();
  dg_wait_prior();
  const int p = *pos;
  const int t = p + 1;
  const int ci = blockIdx.x, chunks = gridDim.x;
  const int j0 = ci * chunk;
  if (j0 >= t) return;
  extern __shared__ float smem[];
  constexpr int V = VecWidth<T>::value;
  const int dp = d + 1;
  float *qs = smem;             // [G][d]
  float *ks = qs + G * d;       // [chunk][d + 1]
  float *vs = ks + chunk * dp;  // [chunk][d]
  float *ps = vs + chunk * d;   // [G][chunk]
  const int tid = threadIdx.x, nt = blockDim.x;
  const long long z = blockIdx.y;
  const int cnt = min(chunk, t - j0);
  const int nkv = gridDim.y, half = d / 2;
  const T *qz = qkv + z * (long long)G * d;
  const T *kz = k + z * hs + (long long)j0 * d;
  const T *vz = v + z * hs + (long long)j0 * d;
  const T *cs = cosv + (long long)p * half;
  const T *sn = sinv + (long long)p * half;
  for (int i = tid; i < G * half; i += nt) {
    const int g = i / half, ii = i - g * half;
    const float x1 = to_f(qz[g * d + ii]);
    const float x2 = to_f(qz[g * d + ii + half]);
    const float c = to_f(cs[ii]);
    const float s = to_f(sn[ii]);
    qs[g * d + ii] = to_f(from_f<T>((x1 * c - x2 * s) * scale));
    qs[g * d + ii + half] = to_f(from_f<T>((x2 * c + x1 * s) * scale));
  }
  // The new position's row of this chunk (j0 <= p here), if the chunk holds it.
  const int jp = p - j0;
  if (jp < cnt) {
    const T *kn = qkv + ((long long)G * nkv + z) * d;
    const T *vn = qkv + ((long long)G * nkv + nkv + z) * d;
    T *kd = k + z * hs + (long long)p * d;
    T *vd = v + z * hs + (long long)p * d;
    for (int i = tid; i < half; i += nt) {
      const float x1 = to_f(kn[i]);
      const float x2 = to_f(kn[i + half]);
      const float c = to_f(cs[i]);
      const float s = to_f(sn[i]);
      const T r1 = from_f<T>((x1 * c - x2 * s) * 1.0f);
      const T r2 = from_f<T>((x2 * c + x1 * s) * 1.0f);
      kd[i] = r1;
      kd[i + half] = r2;
      ks[jp * dp + i] = to_f(r1);
      ks[jp * dp + i + half] = to_f(r2);
    }
    for (int i = tid; i < d; i += nt) {
      const T x = vn[i];
      vd[i] = x;
      vs[jp * d + i] = to_f(x);
    }
  }
  if (d % V == 0) {
    const int dv = d / V;
    for (int i = tid; i < cnt * dv; i += nt) {
      const int j = i / dv, c = (i - j * dv) * V;
      if (j == jp) continue;
      const Pack<T, V> pk = load_pack_rw<T, V>(kz + (long long)j * d + c);
      const Pack<T, V> pv = load_pack_rw<T, V>(vz + (long long)j * d + c);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        ks[j * dp + c + e] = to_f(pk.v[e]);
        vs[j * d + c + e] = to_f(pv.v[e]);
      }
    }
  } else {
    for (int i = tid; i < cnt * d; i += nt) {
      const int j = i / d, c = i - j * d;
      if (j == jp) continue;
      ks[j * dp + c] = to_f(kz[(long long)j * d + c]);
      vs[j * d + c] = to_f(vz[(long long)j * d + c]);
    }
  }
  __syncthreads();
  chunk_softmax_stats(qs, ks, ps, ws_ml + (z * chunks + ci) * G * 2, G, d, cnt, chunk);
  for (int i = tid; i < G * d; i += nt) {
    const int g = i / d, c = i - g * d;
    const float *pr = ps + g * chunk;
    float acc = 0.0f;
    for (int j = 0; j < cnt; ++j) acc = fmaf(pr[j], vs[j * d + c], acc);
    ws_o[((z * chunks + ci) * G + g) * (long long)d + c] = acc;
  }
}

// Merges the ceil(t / chunk) partials of query head g of kv head z (grid (G, kv_heads)) into
// out[(z * G + g) * d ..] (the outputs weighted in chunk order), rounded once to T. `chunks` is
// the workspace's chunk count (its stride), not the number in use.
template <typename T>
__device__ __forceinline__ void combine_body(const float *__restrict__ ws_o,
                                             const float *__restrict__ ws_ml, T *__restrict__ out,
                                             const int *__restrict__ pos, int G, int d, int chunk,
                                             int chunks) {
  dg_launch_next();
  dg_wait_prior();
  const int t = *pos + 1;
  const int used = min(chunks, (t + chunk - 1) / chunk);
  const int g = blockIdx.x;
  const long long z = blockIdx.y;
  // The partials' (max, sum) pairs of chunk c are at ml[c * stride], its outputs at o[c * ostride].
  const float *ml = ws_ml + (z * chunks * G + g) * 2;
  const long long stride = 2LL * G;
  const float *o = ws_o + (z * chunks * G + g) * (long long)d;
  const long long ostride = (long long)G * d;
  // The block's threads take the chunks in turn for the maximum and the sum (every chunk's loads
  // in flight at once, not one round trip per chunk).
  __shared__ float sh_m[32], sh_l[32];
  float mx = -INFINITY;
  for (int c = threadIdx.x; c < used; c += blockDim.x) mx = fmaxf(mx, ml[c * stride]);
  mx = group_reduce<MaxOp>(mx, blockDim.x, sh_m);
  float l = 0.0f;
  for (int c = threadIdx.x; c < used; c += blockDim.x)
    l += __expf(ml[c * stride] - mx) * ml[c * stride + 1];
  l = group_reduce<SumOp>(l, blockDim.x, sh_l);
  const float inv = 1.0f / l;
  for (int col = threadIdx.x; col < d; col += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 8
    for (int c = 0; c < used; ++c) {
      const float wgt = __expf(ml[c * stride] - mx);
      acc = fmaf(wgt, o[c * ostride + col], acc);
    }
    out[(z * G + g) * (long long)d + col] = from_f<T>(acc * inv);
  }
}

// ---- the end of a step ----------------------------------------------------------------------

// One block of DG_THREADS: reduces the `parts` (value, index) pairs of argmax_part_* (larger
// value, then smaller index: the first maximum), writes the id to *token and increments *pos.
extern "C" __global__ void __launch_bounds__(DG_THREADS)
    decode_argmax_final(const float *pv, const unsigned int *pi, int parts, unsigned int *token,
                        int *pos) {
  __shared__ float sv[32];
  __shared__ unsigned int si[32];
  float bv = -INFINITY;
  unsigned int bi = 0xFFFFFFFFu;
  for (int p = threadIdx.x; p < parts; p += blockDim.x) {
    if (better(pv[p], pi[p], bv, bi)) {
      bv = pv[p];
      bi = pi[p];
    }
  }
  block_best(bv, bi, sv, si);
  if (threadIdx.x == 0) {
    *token = bi;
    *pos += 1;
  }
}

// Holds its stream for `ns` nanoseconds: the engine's profiler (DecodeGraph::profile_step) queues
// a step's launches behind it, so that they run back to back and not as the host issues them.
extern "C" __global__ void decode_spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

#define DECODE_OPS(T, SUF)                                                                         \
  extern "C" __global__ void __launch_bounds__(DG_THREADS)                                       \
      decode_embed_##SUF(const T *embed, const unsigned int *token, T *x, int hidden, int vocab) {  \
    embed_body<T>(embed, token, x, hidden, vocab);                                               \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(DG_GEMV_THREADS, 4)                               \
      decode_gemv_##SUF(const T *in, const T *norm_w, float eps, int in_mode, const T *w,          \
                        const T *bias, T *y, int n, int k, int out_mode, int ksplit) {              \
    gemv_body<T>(in, norm_w, eps, in_mode, w, bias, y, n, k, out_mode, ksplit);                  \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(DG_ATTN_THREADS)                                  \
      decode_attn_split_##SUF(const T *qkv, T *k, T *v, const T *cosv, const T *sinv,            \
                              float *ws_o, float *ws_ml, const int *pos, int G, int d,           \
                              int chunk, long long hs, float scale) {                            \
    split_body<T>(qkv, k, v, cosv, sinv, ws_o, ws_ml, pos, G, d, chunk, hs, scale);             \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(DG_ATTN_THREADS)                                  \
      decode_attn_combine_##SUF(const float *ws_o, const float *ws_ml, T *out, const int *pos,     \
                                int G, int d, int chunk, int chunks) {                           \
    combine_body<T>(ws_o, ws_ml, out, pos, G, d, chunk, chunks);                                 \
  }

DECODE_OPS(float, f32)
DECODE_OPS(__half, f16)
DECODE_OPS(__nv_bfloat16, bf16)
