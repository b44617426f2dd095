// CPU emulation of crates/flare-kernels/src/cu/flash_attention.cu, for machines without a GPU:
// the kernel file compiled as host C++ (FLASH_ATTN_EMULATE) on the execution model of
// warp_emu.h (threads, barriers, mma.sync, shfl.xor), with ldmatrix .x4 / .trans emulated here.
// cp.async copies are deferred until the cp.async.wait_group that covers them (a read before its
// wait sees stale shared memory), zero-filled when src-size is 0.
// It checks the index math, the fragment layouts and the masking of the real kernel code
// against the float64 reference (flash_attention_ref.h) on small odd shapes; it says nothing
// about speed, and mma rounding is only approximated (f32 sums in a fixed order).
//
//   g++ -std=c++20 -O2 -pthread -I $CUDA_ROOT/include -I crates/flare-kernels/src/cu \
//       bench/dev/flash_attention_emu.cpp -o /tmp/fa_emu && /tmp/fa_emu
#include <random>
#include <string>

#include "flash_attention_ref.h"
#include "warp_emu.h"

#define FLASH_ATTN_EMULATE 1

// ---- emulated PTX wrappers (the same names and contracts as in the kernel file) ---------------

namespace fa {

struct CpAsync {
  void *dst;
  const void *src;
  bool pred;
};
thread_local std::vector<CpAsync> t_open;
thread_local std::vector<std::vector<CpAsync>> t_groups;

inline void cp_async16(void *dst, const void *src, bool pred) {
  t_open.push_back({dst, src, pred});
}
inline void cp_async_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}
template <int N> inline void cp_async_wait() {
  while ((int)t_groups.size() > N) {
    for (const CpAsync &c : t_groups.front()) {
      if (c.pred)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    t_groups.erase(t_groups.begin());
  }
}

// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; register i of lane l
// holds row l/4, elements 2(l%4), 2(l%4)+1 of matrix i (with .trans: of its transpose).
template <bool TRANS> inline void ldsm(unsigned (&r)[4], const void *p) {
  struct Out {
    unsigned r[4];
  };
  const Out o = warp_exchange(p, [](const void *const *all, int lane) {
    Out o;
    for (int i = 0; i < 4; ++i) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        if (!TRANS) {
          const uint16_t *row = static_cast<const uint16_t *>(all[i * 8 + lane / 4]);
          e[h] = row[2 * (lane % 4) + h];
        } else {
          const uint16_t *row = static_cast<const uint16_t *>(all[i * 8 + 2 * (lane % 4) + h]);
          e[h] = row[lane / 4];
        }
      }
      o.r[i] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }
    return o;
  });
  for (int i = 0; i < 4; ++i) r[i] = o.r[i];
}
inline void ldsm_x4(unsigned (&r)[4], const void *p) { ldsm<false>(r, p); }
inline void ldsm_x4_t(unsigned (&r)[4], const void *p) { ldsm<true>(r, p); }

inline unsigned char *dynamic_smem() { return g_emu_dyn_smem.data(); }

}  // namespace fa

#include "flash_attention.cu"

// Every cp.async copy must have been waited for when a thread exits.
static void check_cp_async() {
  for (auto &gq : fa::t_groups)
    if (!gq.empty()) {
      fprintf(stderr, "cp.async copies still pending at thread exit\n");
      std::abort();
    }
  fa::t_groups.clear();
  fa::t_open.clear();
}

template <typename F> static void fa_launch(dim3 grid, dim3 block, size_t dyn_smem, F body) {
  emu_launch(grid, block, dyn_smem, body, check_cp_async);
}

// ---- one case ---------------------------------------------------------------------------------

static std::mt19937_64 rng(7);

template <typename T> static std::vector<T> rand_vec(size_t n, float sd) {
  return emu_rand_vec<T>(n, sd, rng);
}
template <typename T> static std::vector<double> dbl(const std::vector<T> &v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = tof<T>(v[i]);
  return r;
}
static std::vector<double> dbl(const std::vector<float> &v) {
  return std::vector<double>(v.begin(), v.end());
}
template <typename T> static T nan_of() {
  uint16_t u = 0xFFFF;
  T x;
  std::memcpy(&x, &u, 2);
  return x;
}

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

template <typename T, int D>
static bool run_case(std::vector<int> lq, std::vector<int> lk, int hq, int hkv, int causal,
                     int window, int split = 1) {
  std::vector<int> cq{0}, ck{0};
  int max_sq = 0, max_sk = 0;
  for (size_t b = 0; b < lq.size(); ++b) {
    cq.push_back(cq.back() + lq[b]);
    ck.push_back(ck.back() + lk[b]);
    max_sq = max(max_sq, lq[b]);
    max_sk = max(max_sk, lk[b]);
  }
  const int batch = (int)lq.size(), total_q = cq.back(), total_k = ck.back();
  const size_t nq = (size_t)total_q * hq * D, nk = (size_t)total_k * hkv * D;
  const float scale = 1.f / std::sqrt((float)D);
  auto q = rand_vec<T>(nq, 1.5f), k = rand_vec<T>(nk, 1.f), v = rand_vec<T>(nk, 1.f),
       dout = rand_vec<T>(nq, 1.f);
  Ref ref;
  cpu_reference(dbl(q), dbl(k), dbl(v), dbl(dout), cq, ck, hq, hkv, D, scale, causal, window, ref);

  std::vector<T> o(nq, nan_of<T>()), dq(nq, nan_of<T>()), dk(nk, nan_of<T>()),
      dv(nk, nan_of<T>());
  std::vector<float> lse((size_t)hq * total_q, NAN), delta((size_t)hq * total_q, NAN),
      dq_acc(nq, NAN), dkv_acc(split > 1 ? 2 * nk : 0, 0.f);
  if (max_sq > 0)
    fa_launch(dim3((max_sq + FA_FWD_BM(D) - 1) / FA_FWD_BM(D), hq, batch), dim3(FA_THREADS), 0, [&] {
      Kern<T, D>::fwd(o.data(), lse.data(), q.data(), k.data(), v.data(), cq.data(), ck.data(),
                      hq, hkv, total_q, scale, causal, window);
    });
  const long long rows = (long long)total_q * hq;
  if (rows > 0)
    fa_launch(dim3((unsigned)((rows + 7) / 8)), dim3(256), 0, [&] {
      Kern<T, D>::pre(delta.data(), dq_acc.data(), o.data(), dout.data(), total_q, hq);
    });
  if (max_sk > 0)
    fa_launch(dim3((max_sk + FA_BWD_BN(D) - 1) / FA_BWD_BN(D), hkv * split, batch),
               dim3(FA_BWD_THREADS(D)), FA_BWD_SMEM(D), [&] {
                 Kern<T, D>::bwd(dk.data(), dv.data(), dq_acc.data(), q.data(), k.data(),
                                 v.data(), dout.data(), lse.data(), delta.data(), cq.data(),
                                 ck.data(), hq, hkv, total_q, scale, causal, window,
                                 split > 1 ? dkv_acc.data() : nullptr,
                                 split > 1 ? dkv_acc.data() + nk : nullptr, split);
               });
  if (split > 1 && nk > 0) {  // dK, dV from the f32 sums, as the launcher converts them
    fa_launch(dim3(4), dim3(256), 0,
               [&] { Kern<T, D>::cvt(dk.data(), dkv_acc.data(), (long long)nk); });
    fa_launch(dim3(4), dim3(256), 0,
               [&] { Kern<T, D>::cvt(dv.data(), dkv_acc.data() + nk, (long long)nk); });
  }
  if (rows > 0)
    fa_launch(dim3(4), dim3(256), 0, [&] { Kern<T, D>::cvt(dq.data(), dq_acc.data(), rows * D); });

  const Cmp co = compare(dbl(o), ref.o), cl = compare(dbl(lse), ref.lse),
            cdq = compare(dbl(dq), ref.dq), cdk = compare(dbl(dk), ref.dk),
            cdv = compare(dbl(dv), ref.dv);
  const long long bad = co.bad + cl.bad + cdq.bad + cdk.bad + cdv.bad;
  const bool pass = bad == 0 && co.rel <= 1e-2 && cl.maxabs <= 5e-3 && cdq.rel <= 1e-2 &&
                    cdk.rel <= 1e-2 && cdv.rel <= 1e-2;
  std::string ls = "q{", ks = "k{";
  for (size_t b = 0; b < lq.size(); ++b) {
    ls += (b ? "," : "") + std::to_string(lq[b]);
    ks += (b ? "," : "") + std::to_string(lk[b]);
  }
  printf("%-4s D%-3d H%d/%d split %d causal=%d win=%-3d %s} %s} | O %.1e L %.1e | dQ %.1e dK %.1e dV %.1e "
         "| bad %lld | %s\n",
         std::is_same_v<T, bf16> ? "bf16" : "f16", D, hq, hkv, split, causal, window, ls.c_str(),
         ks.c_str(), co.rel, cl.maxabs, cdq.rel, cdk.rel, cdv.rel, bad, pass ? "PASS" : "FAIL");
  fflush(stdout);
  return pass;
}

int main(int argc, char **argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  int ok = 0, n = 0;
  auto tally = [&](bool p) {
    ok += p;
    ++n;
  };
  tally(run_case<bf16, 64>({70}, {70}, 2, 2, 0, -1));
  tally(run_case<bf16, 64>({70}, {70}, 2, 2, 1, -1));
  if (!quick) {
    tally(run_case<bf16, 64>({1, 17, 70}, {1, 17, 70}, 4, 2, 1, -1));
    tally(run_case<bf16, 128>({17, 70}, {17, 70}, 4, 2, 1, -1));
    tally(run_case<f16, 64>({33, 5}, {80, 0}, 2, 1, 1, -1));   // sk > sq, sk = 0
    tally(run_case<f16, 128>({80, 5}, {20, 9}, 2, 2, 1, -1));  // sq > sk: masked rows
    tally(run_case<bf16, 64>({130}, {130}, 2, 1, 1, 20));      // window, GQA 2/1
    tally(run_case<bf16, 128>({70}, {130}, 3, 1, 0, 30));      // window without causal
    tally(run_case<f16, 64>({70}, {70}, 2, 2, 1, 0));          // window 0: the diagonal
    tally(run_case<bf16, 64>({257}, {257}, 2, 2, 1, -1));      // 3 forward blocks of 128 rows
    tally(run_case<f16, 64>({150, 40}, {150, 200}, 4, 2, 0, -1));
    // The GQA group's query heads split over blocks (f32 dK / dV sums by atomics).
    tally(run_case<bf16, 64>({1, 17, 140}, {1, 17, 140}, 14, 2, 1, -1, 7));
    tally(run_case<bf16, 128>({70, 33}, {70, 40}, 8, 2, 1, -1, 2));
    tally(run_case<f16, 64>({130}, {130}, 4, 1, 1, 20, 4));  // window
  }
  tally(run_case<bf16, 64>({70}, {70}, 4, 2, 1, -1, 2));
  printf("emulation: %d / %d cases PASS\n", ok, n);
  return ok == n ? 0 : 1;
}
