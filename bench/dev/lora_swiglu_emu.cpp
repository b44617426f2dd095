// CPU emulation of crates/flare-kernels/src/cu/lora_swiglu.cu (the MLP's SwiGLU with the LoRA
// terms added in the kernel), for machines without a GPU: the kernel file compiled as host C++
// on the execution model of warp_emu.h, checked against a float64 reference on small odd shapes
// (rows not a multiple of the tile, a partial column tile, ranks not multiples of 16, a grid
// that strides over row tiles). It checks index math, staging and fragment layouts, not speed.
//
//   g++ -std=c++20 -O2 -pthread -I $CUDA_ROOT/include -I crates/flare-kernels/src/cu \
//       bench/dev/lora_swiglu_emu.cpp -o /tmp/lsw_emu && /tmp/lsw_emu
#include <random>

#include "warp_emu.h"

#define __expf expf

#include "lora_swiglu.cu"

static std::mt19937_64 rng(11);

template <typename T> static std::vector<T> rand_vec(size_t n, float sd) {
  return emu_rand_vec<T>(n, sd, rng);
}
template <typename T> static T nan_of() {
  uint16_t u = 0xFFFF;
  T x;
  std::memcpy(&x, &u, 2);
  return x;
}

template <typename T> struct Kern;
template <> struct Kern<bf16> {
  static constexpr auto fwd = lora_swiglu_fwd_bf16;
  static constexpr auto bwd = lora_swiglu_bwd_bf16;
};
template <> struct Kern<f16> {
  static constexpr auto fwd = lora_swiglu_fwd_f16;
  static constexpr auto bwd = lora_swiglu_bwd_f16;
};

// Largest |got - want| / (1 + |want|) over the elements.
template <typename T>
static double err(const std::vector<T> &got, const std::vector<double> &want, int &bad) {
  double e = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = tof<T>(got[i]);
    const double d = std::isfinite(g) ? std::abs(g - want[i]) / (1.0 + std::abs(want[i])) : 1e9;
    e = std::max(e, d);
  }
  bad += e > (std::is_same_v<T, bf16> ? 2e-2 : 3e-3);
  return e;
}

template <typename T>
static bool run_case(long long rows, int inter, int r, int r2, float s, unsigned grid_y) {
  const int I = inter;
  auto yb = rand_vec<T>(rows * 2 * I, 1.5f), h = rand_vec<T>(rows * 2 * r, 1.f),
       b = rand_vec<T>(2LL * I * r, 0.3f), dab = rand_vec<T>(rows * I, 1.f),
       gd = rand_vec<T>(rows * r2, 0.5f), ad = rand_vec<T>((long long)r2 * I, 0.5f);
  std::vector<double> act_ref(rows * I), dgu_ref(rows * 2 * I);
  for (long long t = 0; t < rows; ++t)
    for (int c = 0; c < I; ++c) {
      double lg = 0, lu = 0, la = 0;
      for (int k = 0; k < r; ++k) {
        lg += (double)tof<T>(h[t * 2 * r + k]) * tof<T>(b[(long long)c * r + k]);
        lu += (double)tof<T>(h[t * 2 * r + r + k]) * tof<T>(b[(long long)(I + c) * r + k]);
      }
      for (int k = 0; k < r2; ++k)
        la += (double)tof<T>(gd[t * r2 + k]) * tof<T>(ad[(long long)k * I + c]);
      const double g = tof<T>(yb[t * 2 * I + c]) + s * lg;
      const double u = tof<T>(yb[t * 2 * I + I + c]) + s * lu;
      const double sg = 1.0 / (1.0 + std::exp(-g));
      act_ref[t * I + c] = g * sg * u;
      const double d = tof<T>(dab[t * I + c]) + la;
      dgu_ref[t * 2 * I + c] = d * u * sg * (1.0 + g * (1.0 - sg));
      dgu_ref[t * 2 * I + I + c] = d * g * sg;
    }
  std::vector<T> act(rows * I, nan_of<T>()), dgu(rows * 2 * I, nan_of<T>());
  const dim3 grid((I + LSW_TN - 1) / LSW_TN, grid_y);
  emu_launch(grid, dim3(LSW_THREADS), 0, [&] {
    Kern<T>::fwd(yb.data(), h.data(), b.data(), act.data(), rows, I, r, s);
  });
  emu_launch(grid, dim3(LSW_THREADS), 0, [&] {
    Kern<T>::bwd(yb.data(), h.data(), b.data(), dab.data(), gd.data(), ad.data(), dgu.data(), rows,
                 I, r, r2, s);
  });
  int bad = 0;
  const double ea = err(act, act_ref, bad), ed = err(dgu, dgu_ref, bad);
  printf("%s rows %lld I %d r %d r2 %d s %.2f grid %ux%u | act %.1e dgu %.1e | %s\n",
         std::is_same_v<T, bf16> ? "bf16" : "f16 ", rows, I, r, r2, s, grid.x, grid.y, ea, ed,
         bad ? "FAIL" : "PASS");
  return bad == 0;
}

int main() {
  int pass = 0, total = 0;
  auto tally = [&](bool ok) { pass += ok, ++total; };
  tally(run_case<bf16>(37, 72, 16, 16, 2.0f, 2));
  tally(run_case<bf16>(64, 128, 8, 24, 0.5f, 1));
  tally(run_case<f16>(33, 200, 32, 5, 1.0f, 3));
  tally(run_case<bf16>(5, 8, 1, 32, 4.0f, 1));
  tally(run_case<f16>(70, 64, 24, 16, 0.25f, 1));
  // The 16-byte factor staging (ranks of a multiple of 8) and the next-tile loads (grid 1: 3
  // row tiles one after another), and the 2-layer test model's shape (rows 14, I 96, ranks 3).
  tally(run_case<bf16>(90, 136, 16, 16, 1.0f, 1));
  tally(run_case<f16>(65, 72, 8, 32, 2.0f, 2));
  tally(run_case<bf16>(14, 96, 3, 3, 2.0f, 1));
  printf("emulation: %d / %d cases %s\n", pass, total, pass == total ? "PASS" : "FAIL");
  return pass == total ? 0 : 1;
}
