#!/usr/bin/env python3
"""SwiGLU backward variants at the Llama-3.1-8B MLP shape (a development probe, GPU machine).

    python3 bench/dev/swiglu_probe.py [--rows 4096] [--cols 14336]

Compiles `crates/flare-kernels/src/cu/swiglu.cu` with a launcher and times its backward (its
flat grid-stride path and its row path, in place over g and u as the training MLP runs it, and
into fresh buffers) against variants that take several packs per thread, with CUDA graphs of 10 calls (median of 30 replays), beside a
device-to-device copy of the same bytes.
"""
import argparse
import ctypes
import os
import subprocess
import tempfile

import torch

from graph_timing import timed

HERE = os.path.dirname(os.path.abspath(__file__))
CU = os.path.join(HERE, "..", "..", "crates", "flare-kernels", "src", "cu")

LAUNCHER = r"""
#include "swiglu.cu"
#include <cuda_runtime.h>
// Variant: U packs per thread, all loads issued before the math, grid-stride over rows x packs.
template <int U>
__global__ void __launch_bounds__(256) bwd_unrolled(const __nv_bfloat16 *g, const __nv_bfloat16 *u,
    const __nv_bfloat16 *__restrict__ dy, __nv_bfloat16 *dg, __nv_bfloat16 *du, long long n_packs) {
  constexpr int V = 8;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long p0 = (long long)blockIdx.x * blockDim.x * U + threadIdx.x; p0 < n_packs;
       p0 += stride * U) {
    Pack<__nv_bfloat16, V> gp[U], up[U], dp[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      long long p = p0 + j * (long long)blockDim.x;
      if (p < n_packs) {
        gp[j] = load_pack_rw<__nv_bfloat16, V>(g + p * V);
        up[j] = load_pack_rw<__nv_bfloat16, V>(u + p * V);
        dp[j] = load_pack<__nv_bfloat16, V>(dy + p * V);
      }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      long long p = p0 + j * (long long)blockDim.x;
      if (p < n_packs) {
        Pack<__nv_bfloat16, V> dgp, dup;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float gv = to_f(gp[j].v[e]), uv = to_f(up[j].v[e]), d = to_f(dp[j].v[e]);
          const float sg = sigmoid_f(gv);
          dgp.v[e] = from_f<__nv_bfloat16>(d * uv * sg * (1.0f + gv * (1.0f - sg)));
          dup.v[e] = from_f<__nv_bfloat16>(d * gv * sg);
        }
        store_pack<__nv_bfloat16, V>(dg + p * V, dgp);
        store_pack<__nv_bfloat16, V>(du + p * V, dup);
      }
    }
  }
}
extern "C" int cur(const void *g, const void *u, const void *dy, void *dg, void *du, long long rows,
                   int cols, void *s) {
  dim3 grid((cols / 8 + 255) / 256, rows < 65535 ? rows : 65535);
  swiglu_bwd_bf16<<<grid, 256, 0, (cudaStream_t)s>>>((const __nv_bfloat16 *)g, (const __nv_bfloat16 *)u,
      (const __nv_bfloat16 *)dy, (__nv_bfloat16 *)dg, (__nv_bfloat16 *)du, rows, cols, cols, cols, cols, 1);
  return (int)cudaGetLastError();
}
extern "C" int flat(const void *g, const void *u, const void *dy, void *dg, void *du, long long rows,
                    int cols, void *s) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long blocks = (rows * cols / 8 + 255) / 256;
  if (blocks > 16 * sms) blocks = 16 * sms;
  swiglu_bwd_bf16<<<(unsigned)blocks, 256, 0, (cudaStream_t)s>>>((const __nv_bfloat16 *)g, (const __nv_bfloat16 *)u,
      (const __nv_bfloat16 *)dy, (__nv_bfloat16 *)dg, (__nv_bfloat16 *)du, rows, cols, cols, cols, cols, 2);
  return (int)cudaGetLastError();
}
extern "C" int fwd(const void *g, const void *u, void *y, long long rows, int cols, void *s) {
  dim3 grid((cols / 8 + 255) / 256, rows < 65535 ? rows : 65535);
  swiglu_fwd_bf16<<<grid, 256, 0, (cudaStream_t)s>>>((const __nv_bfloat16 *)g, (const __nv_bfloat16 *)u,
      (__nv_bfloat16 *)y, rows, cols, cols, cols, cols, 0);
  return (int)cudaGetLastError();
}
extern "C" int unr(int which, int blocks_per_sm, const void *g, const void *u, const void *dy, void *dg,
                   void *du, long long n, void *s) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long packs = n / 8;
  int blocks = sms * blocks_per_sm;
  auto G = (const __nv_bfloat16 *)g; auto U = (const __nv_bfloat16 *)u; auto D = (const __nv_bfloat16 *)dy;
  auto DG = (__nv_bfloat16 *)dg; auto DU = (__nv_bfloat16 *)du;
  cudaStream_t st = (cudaStream_t)s;
  if (which == 1) bwd_unrolled<1><<<blocks, 256, 0, st>>>(G, U, D, DG, DU, packs);
  if (which == 2) bwd_unrolled<2><<<blocks, 256, 0, st>>>(G, U, D, DG, DU, packs);
  if (which == 4) bwd_unrolled<4><<<blocks, 256, 0, st>>>(G, U, D, DG, DU, packs);
  return (int)cudaGetLastError();
}
"""


def build():
    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "launch.cu")
    with open(src, "w") as f:
        f.write(LAUNCHER)
    so = os.path.join(tmp, "libprobe.so")
    subprocess.run(["nvcc", "-O3", "-arch=sm_90", "-shared", "-Xcompiler", "-fPIC", "-I", CU, "-o", so,
                    src], check=True)
    return ctypes.CDLL(so)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    a = ap.parse_args()
    lib = build()
    vp = ctypes.c_void_p
    lib.cur.argtypes = [vp, vp, vp, vp, vp, ctypes.c_longlong, ctypes.c_int, vp]
    lib.flat.argtypes = lib.cur.argtypes
    lib.fwd.argtypes = [vp, vp, vp, ctypes.c_longlong, ctypes.c_int, vp]
    lib.unr.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, vp, vp, vp, ctypes.c_longlong, vp]
    rows, cols = a.rows, a.cols
    n = rows * cols
    mk = lambda: torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    g, u, dy = mk(), mk(), mk()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    s = lambda: torch.cuda.current_stream().cuda_stream
    # Reference and checks.
    sg = torch.sigmoid(g.float())
    want_dg = (dy.float() * u.float() * sg * (1 + g.float() * (1 - sg))).bfloat16()
    want_du = (dy.float() * g.float() * sg).bfloat16()
    gb = 2 * n  # bytes of one [rows, cols] bf16 tensor
    copy_src, copy_dst = torch.empty(gb, dtype=torch.uint8, device="cuda"), torch.empty(gb, dtype=torch.uint8, device="cuda")
    cp = timed(lambda: copy_dst.copy_(copy_src))
    bw = 2 * gb / (cp * 1e-6)
    print(f"copy of {gb / 2**20:.0f} MiB: {cp:.1f} us = {bw / 1e12:.2f} TB/s; bwd floor (5 tensors) "
          f"{5 * gb / bw * 1e6:.1f} us, fwd floor (3) {3 * gb / bw * 1e6:.1f} us")
    y = torch.empty_like(g)
    print(f"fwd current                  {timed(lambda: lib.fwd(g.data_ptr(), u.data_ptr(), y.data_ptr(), rows, cols, s())):7.1f} us")
    cases = [("bwd row path (vec 1), fresh outputs", lambda gi, ui: lib.cur(gi.data_ptr(), ui.data_ptr(), dy.data_ptr(), dg.data_ptr(), du.data_ptr(), rows, cols, s()), False)]
    cases.append(("bwd flat path (vec 2), in place", lambda gi, ui: lib.flat(gi.data_ptr(), ui.data_ptr(), dy.data_ptr(), gi.data_ptr(), ui.data_ptr(), rows, cols, s()), True))
    cases.append(("bwd row path (vec 1), in place", lambda gi, ui: lib.cur(gi.data_ptr(), ui.data_ptr(), dy.data_ptr(), gi.data_ptr(), ui.data_ptr(), rows, cols, s()), True))
    for which in (1, 2, 4):
        for bps in (4, 8, 16):
            cases.append((f"bwd unrolled x{which}, {bps} blocks/SM, in place",
                          (lambda w, b: lambda gi, ui: lib.unr(w, b, gi.data_ptr(), ui.data_ptr(), dy.data_ptr(), gi.data_ptr(), ui.data_ptr(), n, s()))(which, bps), True))
    for label, f, inplace in cases:
        gi, ui = g.clone(), u.clone()
        f(gi, ui)
        torch.cuda.synchronize()
        og, ou = (gi, ui) if inplace else (dg, du)
        ok = torch.equal(og, want_dg) or (og.float() - want_dg.float()).abs().max().item() < 0.05 * want_dg.float().abs().max().item()
        ok2 = (ou.float() - want_du.float()).abs().max().item() < 0.05 * want_du.float().abs().max().item()
        # Timing: in place rewrites its inputs each call; the values do not matter for the time.
        t = timed(lambda: f(gi, ui))
        print(f"{label:40s} {t:7.1f} us  {5 * gb / (t * 1e-6) / 1e12:.2f} TB/s  check {'ok' if ok and ok2 else 'DIFF'}")


if __name__ == "__main__":
    main()
