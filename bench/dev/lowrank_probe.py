#!/usr/bin/env python3
"""The LoRA low-rank products of one Llama-3.1-8B layer at 4096 tokens on cuBLAS, against their
bandwidth floor (a development probe, GPU machine).

    python3 bench/dev/lowrank_probe.py [--tokens 4096] [--r 16] [--reps 50]

Times, per projection shape (in -> out), with CUDA events (median of --reps replays):

- fwd `H = x A^T` and `Y = s H B^T`;
- bwd `G = s dy B`, `dx_low = G A`, `dA = G^T x`, `dB = s dy^T H` (f32 out as flare's);
- timing: CUDA graphs of 10 calls (no host launch cost, as in flare's step graph);
- the floor of each: its bytes at the device-to-device copy bandwidth measured here.
"""
import argparse

import torch

from graph_timing import mm_f32, timed

SHAPES = [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096)]
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    t, r, s = a.tokens, a.r, 2.0
    bf = torch.bfloat16
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    big2 = torch.empty_like(big)
    copy_us = timed(lambda: big2.copy_(big), a.reps)
    bw = 2 * big.numel() / (copy_us * 1e-6)
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write); floors below use it")
    print(f"tokens {t}, r {r}; us per call (median), floor = bytes / copy bandwidth")
    print(f"{'shape':>8} {'product':>10} {'cuBLAS':>8} {'floor':>8}")
    tot = {"cublas": 0.0, "floor": 0.0}
    counts = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
    for name, inf, out in SHAPES:
        x = torch.randn(t, inf, dtype=bf, device="cuda")
        dy = torch.randn(t, out, dtype=bf, device="cuda")
        A = torch.randn(r, inf, dtype=bf, device="cuda") / 64
        B = torch.randn(out, r, dtype=bf, device="cuda") / 4
        H = x @ A.T
        G = (dy @ B) * s
        y = torch.empty(t, out, dtype=bf, device="cuda")
        dx = torch.empty(t, inf, dtype=bf, device="cuda")
        rows = [
            ("H=xA^T", lambda: x @ A.T, (t * inf + t * r) * 2),
            ("Y=sHB^T", lambda: torch.addmm(y, H, B.T, beta=0, alpha=s), (t * out + t * r) * 2),
            ("G=s dyB", lambda: dy @ B, (t * out + t * r) * 2),
            ("dx=GA", lambda: torch.mm(G, A, out=dx), (t * inf + t * r) * 2),
            ("dA=G^Tx", lambda: mm_f32(G.T, x), (t * inf + t * r) * 2),
            ("dB=dy^TH", lambda: mm_f32(dy.T, H), (t * out + t * r) * 2),
        ]
        for label, f_cublas, nbytes in rows:
            cb = timed(f_cublas, a.reps)
            fl = nbytes / bw * 1e6
            print(f"{name:>8} {label:>10} {cb:8.1f} {fl:8.1f}")
            tot["cublas"] += counts[name] * cb
            tot["floor"] += counts[name] * fl
    print(f"per layer (7 projections): cuBLAS {tot['cublas']:.0f} us, floor {tot['floor']:.0f} us; "
          f"x32 layers: {32 * tot['cublas'] / 1000:.1f} / {32 * tot['floor'] / 1000:.1f} ms")


if __name__ == "__main__":
    main()
