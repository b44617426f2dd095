// Validator and benchmark of crates/flare-kernels/src/cu/flash_attention.cu (llm.c dev/cuda
// style): it #includes the kernel file, so it builds standalone with nvcc.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -I crates/flare-kernels/src/cu \
//        bench/dev/flash_attention_check.cu -o /tmp/fa_check && /tmp/fa_check
//
// Part 1, correctness: for odd varlen batches (lengths 1, 17, 127, 333, seqlen_k != seqlen_q,
// a sequence with no keys), Hq/Hkv 2/2, 8/2, 14/2, D 64 and 128, causal / window on and off,
// bf16 and f16, fresh random inputs are rounded to the dtype, a float64 CPU reference computes
// O, L, dQ, dK, dV from the rounded values, every output buffer is filled with NaN before the
// launches, and every element is compared: rel = ||out - ref|| / ||ref|| (L2 over the tensor)
// and the max abs error; a non-finite output where the reference is finite fails the case.
// Part 2, timing: forward and forward + backward (pre + main + convert) at the issue's shapes,
// causal bf16, cudaEvent per iteration, median of 30 after 5 warm-ups; FLOPs counted as
// FlashAttention does (fwd 4 B H T^2 D / 2 for causal, bwd 2.5x fwd). Each timed shape also
// checks that every output element is finite and spot-checks O, L and dQ of 16 rows against
// the float64 reference (row-local, so cheap). Exit code 0 iff everything passed.
#include "flash_attention.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "flash_attention_ref.h"

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      fprintf(stderr, "CUDA error '%s' at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__,      \
              __LINE__, #x);                                                                   \
      exit(2);                                                                                 \
    }                                                                                          \
  } while (0)

using bf16 = __nv_bfloat16;
using f16 = __half;

// ---- kernel table and host launchers (what the Rust op will mirror) -------------------------

template <typename T, int D> struct Kern;
#define KERN(T, SUF, D)                                                                        \
  template <> struct Kern<T, D> {                                                              \
    static constexpr auto fwd = flash_attn_fwd_d##D##_##SUF;                                   \
    static constexpr auto pre = flash_attn_bwd_pre_d##D##_##SUF;                               \
    static constexpr auto bwd = flash_attn_bwd_d##D##_##SUF;                                   \
    static constexpr auto cvt = flash_attn_bwd_convert_d##D##_##SUF;                           \
  };
KERN(bf16, bf16, 64)
KERN(bf16, bf16, 128)
KERN(f16, f16, 64)
KERN(f16, f16, 128)

template <typename T> const char *dtype_name();
template <> const char *dtype_name<bf16>() { return "bf16"; }
template <> const char *dtype_name<f16>() { return "f16"; }

struct Shape {
  int batch, hq, hkv, total_q, total_k, max_sq, max_sk, causal, window;
  float scale;
  const int *cu_q, *cu_k;  // device
};

template <typename T, int D>
void launch_fwd(T *o, float *lse, const T *q, const T *k, const T *v, const Shape &s) {
  if (s.max_sq == 0) return;
  dim3 grid((s.max_sq + FA_FWD_BM(D) - 1) / FA_FWD_BM(D), s.hq, s.batch);
  Kern<T, D>::fwd<<<grid, FA_THREADS>>>(o, lse, q, k, v, s.cu_q, s.cu_k, s.hq, s.hkv, s.total_q,
                                        s.scale, s.causal, s.window);
  CK(cudaGetLastError());
}

template <typename T, int D>
void launch_bwd(T *dq, T *dk, T *dv, float *dq_acc, float *delta, const T *q, const T *k,
                const T *v, const T *o, const T *dout, const float *lse, const Shape &s,
                int parts = 7, int split = 1, float *dkv_acc = nullptr) {
  // parts: bit 0 bwd_pre, bit 1 bwd, bit 2 convert (timing). split > 1: dkv_acc holds
  // 2 * total_k * hkv * D floats (zeroed here), converted into dk, dv after the kernel.
  const long long nk = (long long)s.total_k * s.hkv * D;
  const long long rows = (long long)s.total_q * s.hq;
  if ((parts & 1) && rows > 0) {
    Kern<T, D>::pre<<<(unsigned)((rows + 7) / 8), 256>>>(delta, dq_acc, o, dout, s.total_q, s.hq);
    CK(cudaGetLastError());
  }
  if ((parts & 2) && s.max_sk > 0) {
    static bool attr = false;
    const int smem = FA_BWD_SMEM(D);
    if (!attr) {
      CK(cudaFuncSetAttribute(Kern<T, D>::bwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      attr = true;
    }
    if (split > 1) CK(cudaMemsetAsync(dkv_acc, 0, 2 * nk * sizeof(float)));
    dim3 grid((s.max_sk + FA_BWD_BN(D) - 1) / FA_BWD_BN(D), s.hkv * split, s.batch);
    Kern<T, D>::bwd<<<grid, FA_BWD_THREADS(D), smem>>>(
        dk, dv, dq_acc, q, k, v, dout, lse, delta, s.cu_q, s.cu_k, s.hq, s.hkv, s.total_q,
        s.scale, s.causal, s.window, split > 1 ? dkv_acc : nullptr,
        split > 1 ? dkv_acc + nk : nullptr, split);
    CK(cudaGetLastError());
  }
  if ((parts & 4) && split > 1 && nk > 0) {  // dk and dv are contiguous in the callers' buffers
    const long long blocks = std::min<long long>((nk + 255) / 256, 8192);
    Kern<T, D>::cvt<<<(unsigned)blocks, 256>>>(dk, dkv_acc, nk);
    Kern<T, D>::cvt<<<(unsigned)blocks, 256>>>(dv, dkv_acc + nk, nk);
    CK(cudaGetLastError());
  }
  const long long n = rows * D;
  if ((parts & 4) && n > 0) {
    const long long blocks = std::min<long long>((n + 255) / 256, 8192);
    Kern<T, D>::cvt<<<(unsigned)blocks, 256>>>(dq, dq_acc, n);
    CK(cudaGetLastError());
  }
}

// ---- host data --------------------------------------------------------------------------------

static std::mt19937_64 rng(20261206);
static float randn() {
  static std::normal_distribution<float> nd(0.f, 1.f);
  return nd(rng);
}

template <typename T> float tof(T x);
template <> float tof<bf16>(bf16 x) { return __bfloat162float(x); }
template <> float tof<f16>(f16 x) { return __half2float(x); }
template <typename T> T fromf(float x);
template <> bf16 fromf<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> f16 fromf<f16>(float x) { return __float2half_rn(x); }

template <typename T> std::vector<T> rand_vec(size_t n, float sd) {
  std::vector<T> v(n);
  for (auto &x : v) x = fromf<T>(sd * randn());
  return v;
}
template <typename T> std::vector<double> to_double(const std::vector<T> &v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = tof<T>(v[i]);
  return r;
}

template <typename T> T *to_dev(const std::vector<T> &h) {
  T *d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T> T *dev_alloc_nan(size_t n) {
  T *d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(T)));
  CK(cudaMemset(d, 0xFF, std::max<size_t>(n, 1) * sizeof(T)));  // NaN in bf16, f16 and f32
  return d;
}
template <typename T> std::vector<double> from_dev(const T *d, size_t n) {
  std::vector<T> h(n);
  if (n) CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<double> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = (double)tof<T>(h[i]);
  return r;
}
template <> std::vector<double> from_dev<float>(const float *d, size_t n) {
  std::vector<float> h(n);
  if (n) CK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return std::vector<double>(h.begin(), h.end());
}

// ---- part 1: correctness cases ----------------------------------------------------------------

struct Lens {
  std::vector<int> q, k;
  const char *name;
};

static std::string lens_str(const std::vector<int> &v) {
  std::string s = "{";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "}";
}

static const double TOL_REL = 1e-2;   // O, dQ, dK, dV: ||out - ref|| / ||ref||
static const double TOL_LSE = 5e-3;   // L: max abs error (natural log units)

template <typename T, int D>
bool run_case(const Lens &ln, int hq, int hkv, int causal, int window, int idx, int split = 1) {
  std::vector<int> cq{0}, ck{0};
  int max_sq = 0, max_sk = 0;
  for (size_t b = 0; b < ln.q.size(); ++b) {
    cq.push_back(cq.back() + ln.q[b]);
    ck.push_back(ck.back() + ln.k[b]);
    max_sq = std::max(max_sq, ln.q[b]);
    max_sk = std::max(max_sk, ln.k[b]);
  }
  const int batch = (int)ln.q.size(), total_q = cq.back(), total_k = ck.back();
  const size_t nq = (size_t)total_q * hq * D, nk = (size_t)total_k * hkv * D;
  const double scale = 1.0 / std::sqrt((double)D);
  // The case first, so that a launch failure below is seen with its case.
  printf("%3d %-4s D%-3d H%2d/%-2d split %d causal=%d win=%-3d q=%-14s k=%-14s ", idx,
         dtype_name<T>(), D, hq, hkv, split, causal, window, lens_str(ln.q).c_str(),
         lens_str(ln.k).c_str());
  fflush(stdout);

  // q a bit wider than N(0,1) so that some rows have peaked softmaxes.
  auto hq_ = rand_vec<T>(nq, 1.5f), hk_ = rand_vec<T>(nk, 1.f), hv_ = rand_vec<T>(nk, 1.f),
       hdo = rand_vec<T>(nq, 1.f);
  Ref ref;
  cpu_reference(to_double(hq_), to_double(hk_), to_double(hv_), to_double(hdo), cq, ck, hq, hkv,
                D, scale, causal, window, ref);

  T *q = to_dev(hq_), *k = to_dev(hk_), *v = to_dev(hv_), *dout = to_dev(hdo);
  int *cu_q = to_dev(cq), *cu_k = to_dev(ck);
  T *o = dev_alloc_nan<T>(nq), *dq = dev_alloc_nan<T>(nq), *dk = dev_alloc_nan<T>(nk),
    *dv = dev_alloc_nan<T>(nk);
  float *lse = dev_alloc_nan<float>((size_t)hq * total_q),
        *delta = dev_alloc_nan<float>((size_t)hq * total_q), *dq_acc = dev_alloc_nan<float>(nq),
        *dkv_acc = dev_alloc_nan<float>(2 * nk + 1);
  Shape s{batch, hq, hkv, total_q, total_k, max_sq, max_sk, causal, window, (float)scale, cu_q,
          cu_k};
  launch_fwd<T, D>(o, lse, q, k, v, s);
  CK(cudaDeviceSynchronize());
  launch_bwd<T, D>(dq, dk, dv, dq_acc, delta, q, k, v, o, dout, lse, s, 7, split, dkv_acc);
  CK(cudaDeviceSynchronize());

  const Cmp co = compare(from_dev(o, nq), ref.o);
  const Cmp cl = compare(from_dev(lse, (size_t)hq * total_q), ref.lse);
  const Cmp cdq = compare(from_dev(dq, nq), ref.dq);
  const Cmp cdk = compare(from_dev(dk, nk), ref.dk);
  const Cmp cdv = compare(from_dev(dv, nk), ref.dv);
  const bool pass = co.bad + cl.bad + cdq.bad + cdk.bad + cdv.bad == 0 && co.rel <= TOL_REL &&
                    cl.maxabs <= TOL_LSE && cdq.rel <= TOL_REL && cdk.rel <= TOL_REL &&
                    cdv.rel <= TOL_REL;
  printf("| O %.1e (%.1e) L %.1e | dQ %.1e (%.1e) dK %.1e (%.1e) dV %.1e (%.1e) | bad %lld | %s\n",
         co.rel, co.maxabs, cl.maxabs, cdq.rel, cdq.maxabs, cdk.rel, cdk.maxabs, cdv.rel,
         cdv.maxabs, co.bad + cl.bad + cdq.bad + cdk.bad + cdv.bad, pass ? "PASS" : "FAIL");
  fflush(stdout);
  for (void *p : {(void *)q, (void *)k, (void *)v, (void *)dout, (void *)cu_q, (void *)cu_k,
                  (void *)o, (void *)dq, (void *)dk, (void *)dv, (void *)lse, (void *)delta,
                  (void *)dq_acc, (void *)dkv_acc})
    CK(cudaFree(p));
  return pass;
}

// ---- part 2: timing -----------------------------------------------------------------------------

struct TimeShape {
  int B, hq, hkv, T;
};

template <typename T, int D> bool time_shape(const TimeShape &ts, int split = 1) {
  const int B = ts.B, hq = ts.hq, hkv = ts.hkv, S = ts.T;
  std::vector<int> cq(B + 1);
  for (int b = 0; b <= B; ++b) cq[b] = b * S;
  const int total = B * S;
  const size_t nq = (size_t)total * hq * D, nk = (size_t)total * hkv * D;
  const double scale = 1.0 / std::sqrt((double)D);
  auto hq_ = rand_vec<T>(nq, 1.5f), hk_ = rand_vec<T>(nk, 1.f), hv_ = rand_vec<T>(nk, 1.f),
       hdo = rand_vec<T>(nq, 1.f);
  T *q = to_dev(hq_), *k = to_dev(hk_), *v = to_dev(hv_), *dout = to_dev(hdo);
  int *cu = to_dev(cq);
  T *o = dev_alloc_nan<T>(nq), *dq = dev_alloc_nan<T>(nq), *dk = dev_alloc_nan<T>(nk),
    *dv = dev_alloc_nan<T>(nk);
  float *lse = dev_alloc_nan<float>((size_t)hq * total),
        *delta = dev_alloc_nan<float>((size_t)hq * total), *dq_acc = dev_alloc_nan<float>(nq),
        *dkv_acc = dev_alloc_nan<float>(2 * nk);
  Shape s{B, hq, hkv, total, total, S, S, 1, -1, (float)scale, cu, cu};

  auto fwd = [&] { launch_fwd<T, D>(o, lse, q, k, v, s); };
  auto fwdbwd = [&] {
    launch_fwd<T, D>(o, lse, q, k, v, s);
    launch_bwd<T, D>(dq, dk, dv, dq_acc, delta, q, k, v, o, dout, lse, s, 7, split, dkv_acc);
  };
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto median_ms = [&](auto fn) {
    for (int i = 0; i < 5; ++i) fn();
    CK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int i = 0; i < 30; ++i) {
      CK(cudaEventRecord(e0));
      fn();
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float t;
      CK(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return (double)ms[ms.size() / 2];
  };
  const double t_f = median_ms(fwd);
  // The backward's launches one by one (bwd alone re-adds into dq_acc: harmless for timing).
  double t_part[3];
  for (int i = 0; i < 3; ++i)
    t_part[i] = median_ms(
        [&] { launch_bwd<T, D>(dq, dk, dv, dq_acc, delta, q, k, v, o, dout, lse, s, 1 << i, split,
                               dkv_acc); });
  // The last fwd+bwd run leaves every output of the pass in place for the checks below.
  const double t_fb = median_ms(fwdbwd);
  CK(cudaDeviceSynchronize());

  // Every element written and finite (they were NaN before the first launch).
  auto O = from_dev(o, nq), L = from_dev(lse, (size_t)hq * total), dQ = from_dev(dq, nq);
  long long nonfinite = 0;
  for (double x : O) nonfinite += !std::isfinite(x);
  for (double x : L) nonfinite += !std::isfinite(x);
  for (double x : dQ) nonfinite += !std::isfinite(x);
  for (auto *p : {dk, dv})
    for (double x : from_dev(p, nk)) nonfinite += !std::isfinite(x);

  // Spot check: O, L, dQ of 16 (row, head) pairs against float64 (row-local math).
  std::vector<double> o_out, o_ref, l_out, l_ref, dq_out, dq_ref, p;
  const int rows[4] = {0, 17, S / 2 + 5, S - 1};
  const int heads[2] = {0, hq - 1};
  const int bs[2] = {0, B - 1};
  for (int b : bs) {
    // This sequence's k, v as double (row j of the sequence at j * hkv * D).
    std::vector<double> kd((size_t)S * hkv * D), vd((size_t)S * hkv * D);
    for (size_t x = 0; x < kd.size(); ++x) {
      kd[x] = tof<T>(hk_[(size_t)b * S * hkv * D + x]);
      vd[x] = tof<T>(hv_[(size_t)b * S * hkv * D + x]);
    }
    for (int h : heads)
      for (int i : rows) {
        const int hk = h / (hq / hkv);
        const size_t qrow = ((size_t)(b * S + i) * hq + h) * D;
        std::vector<double> qi(D), doi(D);
        for (int d = 0; d < D; ++d) {
          qi[d] = tof<T>(hq_[qrow + d]);
          doi[d] = tof<T>(hdo[qrow + d]);
        }
        double Lr;
        ref_row(qi.data(), kd, 0, S, hkv, hk, D, i, 0, 1, -1, scale, p, Lr);
        std::vector<double> orf(D, 0.0), dp(S, 0.0), dqr(D, 0.0);
        double Dl = 0;
        for (int j = 0; j < S; ++j) {
          if (p[j] == 0.0) continue;
          const double *vj = &vd[((size_t)j * hkv + hk) * D];
          double sdp = 0;
          for (int d = 0; d < D; ++d) {
            orf[d] += p[j] * vj[d];
            sdp += doi[d] * vj[d];
          }
          dp[j] = sdp;
          Dl += p[j] * sdp;
        }
        for (int j = 0; j < S; ++j) {
          if (p[j] == 0.0) continue;
          const double *kj = &kd[((size_t)j * hkv + hk) * D];
          const double ds = p[j] * (dp[j] - Dl);
          for (int d = 0; d < D; ++d) dqr[d] += scale * ds * kj[d];
        }
        for (int d = 0; d < D; ++d) {
          o_out.push_back(O[qrow + d]);
          o_ref.push_back(orf[d]);
          dq_out.push_back(dQ[qrow + d]);
          dq_ref.push_back(dqr[d]);
        }
        l_out.push_back(L[(size_t)h * total + b * S + i]);
        l_ref.push_back(Lr);
      }
  }
  const Cmp co = compare(o_out, o_ref), cl = compare(l_out, l_ref),
            cdq = compare(dq_out, dq_ref);
  const bool pass = nonfinite == 0 && co.bad + cl.bad + cdq.bad == 0 && co.rel <= TOL_REL &&
                    cl.maxabs <= TOL_LSE && cdq.rel <= TOL_REL;

  const double flops_f = 4.0 * B * hq * (double)S * S * D / 2.0;
  const double flops_fb = flops_f * 3.5;
  char name[64];
  snprintf(name, sizeof name, "B%d H%d/KV%d T%d D%d s%d", B, hq, hkv, S, D, split);
  printf("%-26s | %8.3f | %8.1f | %10.3f | %10.1f | nonfinite %lld, spot O %.1e L %.1e dQ %.1e "
         "%s\n",
         name, t_f, flops_f / (t_f * 1e9), t_fb, flops_fb / (t_fb * 1e9), nonfinite, co.rel,
         cl.maxabs, cdq.rel, pass ? "PASS" : "FAIL");
  printf("%-26s   backward launches: bwd_pre %.3f ms, bwd %.3f ms (%.1f TFLOP/s), convert %.3f "
         "ms\n",
         "", t_part[0], t_part[1], 2.5 * flops_f / (t_part[1] * 1e9), t_part[2]);
  fflush(stdout);
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  for (void *ptr : {(void *)q, (void *)k, (void *)v, (void *)dout, (void *)cu, (void *)o,
                    (void *)dq, (void *)dk, (void *)dv, (void *)lse, (void *)delta,
                    (void *)dq_acc, (void *)dkv_acc})
    CK(cudaFree(ptr));
  return pass;
}

int main(int argc, char **argv) {
  // --time-only: part 2 alone; --quick: 8 cases of part 1 and no timing (for compute-sanitizer).
  const std::string arg = argc > 1 ? argv[1] : "";
  const bool skip_check = arg == "--time-only", quick = arg == "--quick";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s (sm_%d%d, %d SMs), flare flash_attention.cu check\n", prop.name, prop.major,
         prop.minor, prop.multiProcessorCount);
  {  // resident blocks per SM of the hot kernels (registers / shared memory bound them)
    int f64, f128, b64, b128;
    CK(cudaFuncSetAttribute(Kern<bf16, 128>::bwd, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            FA_BWD_SMEM(128)));
    CK(cudaFuncSetAttribute(Kern<bf16, 64>::bwd, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            FA_BWD_SMEM(64)));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f64, Kern<bf16, 64>::fwd, FA_THREADS, 0));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f128, Kern<bf16, 128>::fwd, FA_THREADS, 0));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b64, Kern<bf16, 64>::bwd,
                                                     FA_BWD_THREADS(64), FA_BWD_SMEM(64)));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b128, Kern<bf16, 128>::bwd,
                                                     FA_BWD_THREADS(128), FA_BWD_SMEM(128)));
    printf("blocks per SM: fwd (%d warps) d64 %d, d128 %d; bwd d64 %d (%d warps), "
           "d128 %d (%d warps)\n",
           FA_THREADS / 32, f64, f128, b64, FA_BWD_THREADS(64) / 32, b128,
           FA_BWD_THREADS(128) / 32);
  }

  int passed = 0, total = 0;
  if (!skip_check) {
    const Lens lens[] = {
        {{333}, {333}, "one"},
        {{17, 127}, {17, 127}, "two"},
        {{1, 333, 17}, {1, 333, 17}, "three"},
        {{127, 17}, {333, 0}, "sk>sq, sk=0"},
        {{333, 5}, {127, 64}, "sq>sk"},
    };
    const int heads[3][2] = {{2, 2}, {8, 2}, {14, 2}};
    const int masks[5][2] = {{0, -1}, {1, -1}, {0, 48}, {1, 48}, {1, 0}};  // (causal, window)
    printf("\n== correctness: rel = ||out-ref||/||ref|| (max abs err), L = max abs err; "
           "tolerance rel <= %.0e, L <= %.0e ==\n",
           TOL_REL, TOL_LSE);
    int idx = 0;
    for (int dt = 0; dt < 2; ++dt)
      for (int D : {64, 128})
        for (int m = 0; m < 5; ++m)
          for (int rep = 0; rep < 2; ++rep) {
            const int c = idx % 5;
            const Lens &ln = lens[(c + 2 * rep) % 5];
            const int *hh = heads[(idx + rep) % 3];
            const int causal = masks[m][0], window = masks[m][1];
            if (quick && idx % 5 != (idx / 10) % 5) {  // 8 cases: every mask, dtype and D
              ++idx;
              continue;
            }
            bool ok;
            if (dt == 0)
              ok = D == 64 ? run_case<bf16, 64>(ln, hh[0], hh[1], causal, window, idx)
                           : run_case<bf16, 128>(ln, hh[0], hh[1], causal, window, idx);
            else
              ok = D == 64 ? run_case<f16, 64>(ln, hh[0], hh[1], causal, window, idx)
                           : run_case<f16, 128>(ln, hh[0], hh[1], causal, window, idx);
            passed += ok;
            ++total;
            ++idx;
          }
    // The GQA group split over blocks (dK, dV summed in f32 by atomics, then converted).
    for (int split : {2, 7}) {
      const bool ok = split == 7 ? run_case<bf16, 64>(lens[2], 14, 2, 1, -1, idx, 7)
                                 : run_case<bf16, 128>(lens[4], 8, 2, 1, 48, idx, 2);
      passed += ok;
      ++total;
      ++idx;
    }
    passed += run_case<f16, 64>(lens[3], 8, 2, 1, -1, idx++, 4);
    ++total;
    printf("correctness: %d / %d cases PASS\n", passed, total);
  }
  if (quick) {
    printf("\nOVERALL (quick): %s\n", passed == total ? "PASS" : "FAIL");
    return passed == total ? 0 : 1;
  }

  printf("\n== timing: causal bf16, median of 30 (cudaEvent), FLOPs fwd = 4*B*H*T^2*D/2, "
         "fwd+bwd = 3.5x fwd ==\n");
  printf("%-26s | %8s | %8s | %10s | %10s | checks\n", "shape", "fwd ms", "TFLOP/s",
         "fwd+bwd ms", "TFLOP/s");
  int tpass = 0;
  tpass += time_shape<bf16, 64>({8, 14, 14, 1024});
  tpass += time_shape<bf16, 64>({2, 14, 14, 4096});
  tpass += time_shape<bf16, 128>({1, 32, 8, 8192});
  // The models' GQA shapes (Qwen2-0.5B: 14/2 heads, D 64; Llama-3.1-8B: 32/8, D 128) with
  // the group split over 1, 2, ... blocks.
  int ntimed = 3;
  for (int sp : {1, 7}) tpass += time_shape<bf16, 64>({4, 14, 2, 512}, sp), ++ntimed;
  for (int sp : {1, 7}) tpass += time_shape<bf16, 64>({8, 14, 2, 1024}, sp), ++ntimed;
  for (int sp : {1, 2, 4}) tpass += time_shape<bf16, 128>({1, 32, 8, 4096}, sp), ++ntimed;
  for (int sp : {1, 2}) tpass += time_shape<bf16, 128>({1, 32, 8, 8192}, sp), ++ntimed;
  printf("timed shapes: %d / %d checks PASS\n", tpass, ntimed);
  const bool ok = passed == total && tpass == ntimed;
  printf("\nOVERALL: %s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
