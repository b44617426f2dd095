// The row kernel of the fused linear + cross-entropy (crates/flare/src/ops/linear_cross_entropy):
// per chunk of token rows the host runs the logits GEMM (cuBLASLt, `logits = h @ w^T` in the
// compute dtype), then this kernel, then the gradient GEMMs that read what it wrote.
//
//   linear_cross_entropy_rows_<t>(x, targets, nll, rows, vocab, ignore, grad),
//   x: [rows, vocab] in/out:
//     nll[i] = logsumexp(x[i, :]) - x[i, t[i]]                  (0 when t[i] == ignore)
//     with grad != 0, x[i, j] = exp(x[i, j] - lse[i]) - [j == t[i]]   (in place; an ignored
//     row becomes all zeros)
//
// i.e. the logits' gradient for an upstream gradient of 1 (the host scales the resulting
// d(hidden) by the real one in the backward). One block of LCE_THREADS threads owns a row (the
// group G = blockDim.x of common.cuh's execution model, always its streaming path: a vocabulary
// row is far longer than the registers hold), blocks loop over rows with a grid stride. The
// first pass keeps an online (max, sum of exp(x - max)) per thread, merged by two group
// reductions; the second pass reads the row again (mostly from L2) and writes the gradient:
// two reads and one write per logit. 16-byte accesses when vocab % (16 / sizeof(T)) == 0 and x
// is 16-byte aligned, element accesses otherwise. All arithmetic is f32; nll is f32. The loads
// are coherent (load_row_pack_rw): the kernel writes the buffer it reads.
//
// A target outside 0..vocab that is not the ignore index gives nll = NaN and a NaN row (the
// host does not read the targets back; the loss is NaN, never silently wrong).
//
//   linear_cross_entropy_scale_<t>(g, s, out, n): out[i] = g[i] * s[0], in f32, rounded once:
//     the backward's d(hidden) (computed for an upstream gradient of 1) times the real upstream
//     gradient, an f32 scalar read on the device (no host sync). 16-byte packs when g and out
//     are 16-byte aligned, the n % V tail element by element; a grid-stride loop.
// Convention: every output is overwritten (=), nothing accumulates.
#include "common.cuh"

using namespace flare;

#define LCE_THREADS 512

namespace {

template <typename T, bool VEC>
__device__ void lce_rows(T *__restrict__ x, const unsigned int *__restrict__ targets,
                         float *__restrict__ nll, long long rows, int vocab, unsigned int ignore,
                         int grad) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float sh[2][32];
  const RowGroups rg(blockDim.x);
  const int nvr = (vocab + V - 1) / V;
  for (long long r0 = rg.first(); r0 < rows; r0 += rg.step()) {
    // One row per block: r0 < rows, so the row is valid in every thread.
    const RowAt rs = rg.at(r0, rows, vocab);
    T *row = x + rs.off;
    const unsigned int t = targets[rs.row];
    if (t == ignore) {  // uniform over the block
      if (threadIdx.x == 0) nll[rs.row] = 0.f;
      if (grad) {
        for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
          store_row_pack<T, V, VEC>(row, c, vocab, zero_pack<T, V>());
        });
      }
      continue;
    }
    const bool ok = t < (unsigned int)vocab;
    // Read by every thread before the reductions' barriers, so before any thread writes.
    const float xt = ok ? to_f(row[t]) : NAN;
    float m = -INFINITY, s = 0.f;
    for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
      const Pack<T, V> p = load_row_pack_rw<T, V, VEC>(row, c, vocab);
      float pm = -INFINITY;
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (VEC || c * V + j < vocab) pm = fmaxf(pm, to_f(p.v[j]));
      if (pm == -INFINITY) return;  // nothing but -inf (or padding): adds 0
      if (pm > m) {
        s = m == -INFINITY ? 0.f : s * expf(m - pm);
        m = pm;
      }
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (VEC || c * V + j < vocab) s += expf(to_f(p.v[j]) - m);
    });
    const float M = group_reduce<MaxOp>(m, rg.G, sh[0]);
    const float S = group_reduce<SumOp>(m == -INFINITY ? 0.f : s * expf(m - M), rg.G, sh[1]);
    const float lse = M + logf(S);
    if (threadIdx.x == 0) nll[rs.row] = ok ? lse - xt : NAN;
    if (!grad) continue;
    for_stream_packs<VEC>(rg, nvr, [&](int c, int) {
      const Pack<T, V> p = load_row_pack_rw<T, V, VEC>(row, c, vocab);
      Pack<T, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int e = c * V + j;
        const float g = ok ? expf(to_f(p.v[j]) - lse) - (e == (int)t ? 1.f : 0.f) : NAN;
        o.v[j] = from_f<T>(g);
      }
      store_row_pack<T, V, VEC>(row, c, vocab, o);
    });
  }
}

template <typename T>
__device__ __forceinline__ void lce_scale(const T *__restrict__ g, const float *__restrict__ s,
                                          T *__restrict__ out, long long n) {
  constexpr int V = VecWidth<T>::value;
  const float k = *s;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const bool vec = aligned16(g) && aligned16(out);
  const long long packs = vec ? n / V : 0;
  for (long long p = first; p < packs; p += stride) {
    const Pack<T, V> x = load_pack<T, V>(g + p * V);
    Pack<T, V> y;
#pragma unroll
    for (int e = 0; e < V; ++e) y.v[e] = from_f<T>(to_f(x.v[e]) * k);
    store_pack<T, V>(out + p * V, y);
  }
  for (long long i = packs * V + first; i < n; i += stride) out[i] = from_f<T>(to_f(g[i]) * k);
}

}  // namespace

#define LCE_SCALE(T, SUFFIX)                                                                   \
  extern "C" __global__ void __launch_bounds__(LCE_THREADS) linear_cross_entropy_scale_##SUFFIX( \
      const T *g, const float *s, T *out, long long n) {                                       \
    lce_scale<T>(g, s, out, n);                                                                \
  }

LCE_SCALE(float, f32)
LCE_SCALE(__half, f16)
LCE_SCALE(__nv_bfloat16, bf16)

#define LCE_OP(T, SUFFIX)                                                                      \
  extern "C" __global__ void __launch_bounds__(LCE_THREADS)                                   \
      linear_cross_entropy_rows_##SUFFIX(T *x, const unsigned int *targets, float *nll,        \
                                         long long rows, int vocab, unsigned int ignore,       \
                                         int grad) {                                           \
    constexpr int V = VecWidth<T>::value;                                                      \
    if (vocab % V == 0 && aligned16(x))                                                        \
      lce_rows<T, true>(x, targets, nll, rows, vocab, ignore, grad);                           \
    else                                                                                       \
      lce_rows<T, false>(x, targets, nll, rows, vocab, ignore, grad);                          \
  }

LCE_OP(float, f32)
LCE_OP(__half, f16)
LCE_OP(__nv_bfloat16, bf16)
