// Float64 reference of flash attention (crates/flare-kernels/src/cu/flash_attention.cu) and the
// element-wise comparison, shared by flash_attention_check.cu (GPU) and flash_attention_emu.cpp
// (CPU emulation). Same layout and mask conventions as the kernel file's header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

static bool visible_ref(int i, int j, int sk, int off, int causal, int window) {
  return j < sk && (!causal || j <= i + off) && (window < 0 || j >= i + off - window);
}

// One query row of one head: probabilities p[0..sk) (0 where masked), L, and whether any key is
// visible.
static bool ref_row(const double *qi, const std::vector<double> &k, int k0, int sk, int hkv,
                    int hk, int D, int i, int off, int causal, int window, double scale,
                    std::vector<double> &p, double &L) {
  p.assign(sk, 0.0);
  double m = -INFINITY;
  for (int j = 0; j < sk; ++j) {
    if (!visible_ref(i, j, sk, off, causal, window)) {
      p[j] = -INFINITY;
      continue;
    }
    const double *kj = &k[((size_t)(k0 + j) * hkv + hk) * D];
    double s = 0;
    for (int d = 0; d < D; ++d) s += qi[d] * kj[d];
    p[j] = s * scale;
    m = std::max(m, p[j]);
  }
  if (m == -INFINITY) {
    std::fill(p.begin(), p.end(), 0.0);
    L = -INFINITY;
    return false;
  }
  double sum = 0;
  for (int j = 0; j < sk; ++j) {
    p[j] = p[j] == -INFINITY ? 0.0 : std::exp(p[j] - m);
    sum += p[j];
  }
  for (int j = 0; j < sk; ++j) p[j] /= sum;
  L = m + std::log(sum);
  return true;
}

struct Ref {
  std::vector<double> o, lse, dq, dk, dv;
};

// The full reference (o, lse [hq, total_q], dq, dk, dv) of a varlen batch.
static void cpu_reference(const std::vector<double> &q, const std::vector<double> &k,
                          const std::vector<double> &v, const std::vector<double> &dout,
                          const std::vector<int> &cq, const std::vector<int> &ck, int hq, int hkv,
                          int D, double scale, int causal, int window, Ref &r) {
  const int batch = (int)cq.size() - 1, total_q = cq.back(), total_k = ck.back();
  r.o.assign((size_t)total_q * hq * D, 0.0);
  r.dq.assign((size_t)total_q * hq * D, 0.0);
  r.lse.assign((size_t)hq * total_q, 0.0);
  r.dk.assign((size_t)total_k * hkv * D, 0.0);
  r.dv.assign((size_t)total_k * hkv * D, 0.0);
  std::vector<double> p, dp;
  for (int b = 0; b < batch; ++b) {
    const int q0 = cq[b], sq = cq[b + 1] - q0, k0 = ck[b], sk = ck[b + 1] - k0, off = sk - sq;
    for (int h = 0; h < hq; ++h) {
      const int hk = h / (hq / hkv);
      for (int i = 0; i < sq; ++i) {
        const size_t qrow = ((size_t)(q0 + i) * hq + h) * D;
        double L;
        ref_row(&q[qrow], k, k0, sk, hkv, hk, D, i, off, causal, window, scale, p, L);
        r.lse[(size_t)h * total_q + q0 + i] = L;
        dp.assign(sk, 0.0);
        double Dl = 0;
        for (int j = 0; j < sk; ++j) {
          if (p[j] == 0.0) continue;
          const size_t kv = ((size_t)(k0 + j) * hkv + hk) * D;
          double s = 0;
          for (int d = 0; d < D; ++d) {
            r.o[qrow + d] += p[j] * v[kv + d];
            s += dout[qrow + d] * v[kv + d];
          }
          dp[j] = s;
          Dl += p[j] * s;
        }
        for (int j = 0; j < sk; ++j) {
          if (p[j] == 0.0) continue;
          const size_t kv = ((size_t)(k0 + j) * hkv + hk) * D;
          const double ds = p[j] * (dp[j] - Dl);
          for (int d = 0; d < D; ++d) {
            r.dq[qrow + d] += scale * ds * k[kv + d];
            r.dk[kv + d] += scale * ds * q[qrow + d];
            r.dv[kv + d] += p[j] * dout[qrow + d];
          }
        }
      }
    }
  }
}

// ---- comparison -----------------------------------------------------------------------------

struct Cmp {
  double rel = 0, maxabs = 0;
  long long bad = 0;  // non-finite outputs where the reference is finite, or -inf mismatches
  size_t n = 0;
};

static Cmp compare(const std::vector<double> &out, const std::vector<double> &ref) {
  Cmp c;
  c.n = ref.size();
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double r = ref[i], x = out[i];
    if (std::isinf(r)) {  // L of a row that sees no key: must be exactly -inf
      if (!(std::isinf(x) && x < 0)) ++c.bad;
      continue;
    }
    if (!std::isfinite(x)) {
      ++c.bad;
      continue;
    }
    const double e = std::fabs(x - r);
    c.maxabs = std::max(c.maxabs, e);
    num += e * e;
    den += r * r;
  }
  c.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return c;
}
