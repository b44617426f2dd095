#!/usr/bin/env python3
"""LoRA low-rank terms folded into the frozen GEMMs, against flare's sequence, at the
Llama-3.1-8B shape (a development probe for issue 13's MFU, GPU machine).

    python3 bench/dev/fold_probe.py [--tokens 4096] [--r 16] [--reps 30] [--steps 12]

flare's fused LoRA linear (`crates/flare/src/lora/op/cuda.rs`) adds the low-rank term through
memory: forward `H = x Aᵀ`, `Y = s H Bᵀ` (per block of a grouped op), then the base GEMM
`Y = x Wᵀ + 1 · Y`; backward `G = s dy B` (per block), `dx = G A`, then `dx = dy W + 1 · dx`.
Each `Y` and `dx` of the low-rank part is written once and read back in the base GEMM's
epilogue. Folded, the rank joins the base GEMM's reduction:

    forward   Y  = [x | H] · [W | blockdiag(s B)]ᵀ      (K = in + G·r)
    backward  dx = [dy | G] · [W ; A]                   (K = out + G·r)

with `x` and `dy` in buffers of `G·r` (padded to 64) spare columns per row, `H` and `G`
written into them by their GEMMs (`ldc` = the padded width), and `W` stored with the spare
columns (`s B`) and rows (`A`). Nothing of the output's size is written twice. The spare
columns come either from the producer of `x` / `dy` writing its rows at the padded stride
(`producer`: RMSNorm, SwiGLU, RoPE's backward are flare's own kernels) or from a copy into the
padded buffer (`copy`: for inputs flare does not write, e.g. the residual stream's gradient).

For the four products of a layer as flare groups them (q/k/v, o, gate/up, down), each timed as
a CUDA graph of 10 calls (no host cost; median of --reps replays, µs per call), it prints
flare's sequence (`now`) and the fold with a copy and with a producer, forward and backward,
the factor gradients `dA = Gᵀ x`, `dB = dyᵀ H` (f32 out, as flare's) included in every
backward. Then, sustained under the card's power limit: one layer's frozen GEMMs alone
(`base`), with flare's low-rank terms (`now`), folded as flare's fused MLP folds gate/up and
down (`mlp`: x and dy copied in, SwiGLU writing the padded rows; q/k/v and o as now), and
folded wherever it wins (`fold`, each product's cheaper variant of those flare could run),
each captured as one graph and replayed once per layer
beside the layer's attention forward and backward (cuDNN SDPA), then the LM head's forward
and input gradient in 1024-row chunks: a step's vendor work. The four are alternated for
--steps steps with the SM clock and power sampled by nvidia-smi, and each is printed with
the MFU it reaches alone and with --rest-ms of flare's other kernels (norms, SwiGLU, RoPE,
loss, optimizer) on top. `now - fold` is what the fold would save in flare's step; `fold`
plus the rest against the step MFU --mfu needs says whether 55% is within reach on the card.
"""
import argparse
import statistics
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from graph_timing import graphed, mm_f32, timed
from step_floor import (HEAD_DIM, HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, PEAKS, VOCAB,
                        flops_per_token)

PAD = 64  # spare columns / rows per padded buffer (the largest G·r here is 48)


class Product:
    """One grouped LoRA product `y[:, block g] = x W_gᵀ + s (x A_gᵀ) B_gᵀ` and its backward,
    with every buffer both sequences need."""

    def __init__(self, name, inf, splits, r, t, s=2.0):
        dev, bf = "cuda", torch.bfloat16
        self.name, self.inf, self.splits, self.r, self.s = name, inf, splits, r, s
        out = sum(splits)
        self.out = out
        gr = len(splits) * r
        self.gr = gr
        w = torch.randn(out, inf, dtype=bf, device=dev) * 0.02
        self.a = torch.randn(gr, inf, dtype=bf, device=dev) / 64
        self.b = torch.randn(out, r, dtype=bf, device=dev) / 4
        # W with the spare columns (blockdiag(s B)) and rows (A): [out + PAD, in + PAD].
        self.wp = torch.zeros(out + PAD, inf + PAD, dtype=bf, device=dev)
        self.wp[:out, :inf] = w
        self.wp[out:out + gr, :inf] = self.a
        self.w_plain = w  # flare's W, contiguous: the sequences that do not fold
        first = 0
        for g, n in enumerate(splits):
            self.wp[first:first + n, inf + g * r:inf + (g + 1) * r] = self.b[first:first + n] * s
            first += n
        self.x = torch.randn(t, inf, dtype=bf, device=dev)
        self.dy = torch.randn(t, out, dtype=bf, device=dev)
        self.xp = torch.zeros(t, inf + PAD, dtype=bf, device=dev)
        self.xp[:, :inf] = self.x
        self.dyp = torch.zeros(t, out + PAD, dtype=bf, device=dev)
        self.dyp[:, :out] = self.dy
        self.h = torch.empty(t, gr, dtype=bf, device=dev)
        self.gm = torch.empty(t, gr, dtype=bf, device=dev)
        self.y = torch.empty(t, out, dtype=bf, device=dev)
        self.dx = torch.empty(t, inf, dtype=bf, device=dev)

    def blocks(self):
        first = 0
        for g, n in enumerate(self.splits):
            yield g, first, n
            first += n

    def base_fwd(self):
        torch.mm(self.x, self.w_plain.t(), out=self.y)

    def base_bwd(self):
        torch.mm(self.dy, self.w_plain, out=self.dx)

    def now_fwd(self):
        torch.mm(self.x, self.a.t(), out=self.h)
        for g, first, n in self.blocks():
            r = self.r
            torch.addmm(self.y[:, first:first + n], self.h[:, g * r:(g + 1) * r],
                        self.b[first:first + n].t(), beta=0, alpha=self.s,
                        out=self.y[:, first:first + n])
        self.y.addmm_(self.x, self.w_plain.t())

    def now_bwd(self):
        r = self.r
        for g, first, n in self.blocks():
            torch.addmm(self.gm[:, g * r:(g + 1) * r], self.dy[:, first:first + n],
                        self.b[first:first + n], beta=0, alpha=self.s,
                        out=self.gm[:, g * r:(g + 1) * r])
        torch.mm(self.gm, self.a, out=self.dx)
        self.dx.addmm_(self.dy, self.w_plain)
        mm_f32(self.gm.t(), self.x)
        for g, first, n in self.blocks():
            mm_f32(self.dy[:, first:first + n].t(), self.h[:, g * r:(g + 1) * r])

    def fold_fwd(self, copy):
        inf, gr = self.inf, self.gr
        if copy:
            self.xp[:, :inf].copy_(self.x)
        torch.mm(self.xp[:, :inf], self.a.t(), out=self.xp[:, inf:inf + gr])
        torch.mm(self.xp[:, :inf + gr], self.wp[:self.out, :inf + gr].t(), out=self.y)

    def fold_bwd(self, copy):
        out, inf, r, gr = self.out, self.inf, self.r, self.gr
        if copy:
            self.dyp[:, :out].copy_(self.dy)
        for g, first, n in self.blocks():
            dst = self.dyp[:, out + g * r:out + (g + 1) * r]
            torch.addmm(dst, self.dyp[:, first:first + n], self.b[first:first + n], beta=0,
                        alpha=self.s, out=dst)
        torch.mm(self.dyp[:, :out + gr], self.wp[:out + gr, :inf], out=self.dx)
        mm_f32(self.dyp[:, out:out + gr].t(), self.xp[:, :inf])
        for g, first, n in self.blocks():
            mm_f32(self.dyp[:, first:first + n].t(), self.xp[:, inf + g * r:inf + (g + 1) * r])

    def check(self):
        """The fold's y and dx against flare's sequence (relative max error)."""
        self.now_fwd()
        y0 = self.y.float().clone()
        self.fold_fwd(copy=True)
        ey = (self.y.float() - y0).abs().max().item() / y0.abs().max().item()
        self.now_bwd()
        d0 = self.dx.float().clone()
        self.fold_bwd(copy=True)
        ed = (self.dx.float() - d0).abs().max().item() / d0.abs().max().item()
        return ey, ed


def sample_clocks():
    """An nvidia-smi process sampling the SM clock and power every 100 ms, or None."""
    try:
        return subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
             "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def attention(t):
    """One layer's causal GQA attention forward and backward (SDPA on cuDNN where it runs)."""
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, dtype=bf, requires_grad=True)
    v = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, dtype=bf, requires_grad=True)
    do = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, dtype=bf)

    def run(restrict=True):
        if restrict:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, (q, k, v), do)

    try:
        run()
        print("attention: SDPA on cuDNN")
        return run
    except RuntimeError:
        print("attention: SDPA's default backend (cuDNN's refused)")
        return lambda: run(False)


def lm_head_chunks(t, chunk=1024):
    """The LM head's forward logits and input gradient over `t` rows, `chunk` rows at a time
    (as flare's fused linear + cross-entropy runs it)."""
    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(VOCAB, HIDDEN, device=dev, dtype=bf) * 0.02
    x = torch.randn(t, HIDDEN, device=dev, dtype=bf)
    dl = torch.randn(min(chunk, t), VOCAB, device=dev, dtype=bf)
    logits = torch.empty(min(chunk, t), VOCAB, device=dev, dtype=bf)
    dx = torch.empty(t, HIDDEN, device=dev, dtype=bf)

    def run():
        for c in range(0, t, chunk):
            n = min(chunk, t - c)
            torch.mm(x[c:c + n], w.t(), out=logits[:n])
            torch.mm(dl[:n], w, out=dx[c:c + n])

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=12, help="sustained steps of each sequence")
    ap.add_argument("--rest-ms", type=float, default=24.0,
                    help="flare's kernels besides GEMMs and attention per step (the tenth "
                         "round's trace: 24 ms)")
    ap.add_argument("--mfu", type=float, default=0.55)
    a = ap.parse_args()
    t, r = a.tokens, a.r
    kv = KV_HEADS * HEAD_DIM
    # (name, in, splits, producer of x writes padded?, producer of dy writes padded?)
    spec = [
        ("q/k/v", HIDDEN, [HEADS * HEAD_DIM, kv, kv], True, True),  # RMSNorm / RoPE backward
        ("o", HEADS * HEAD_DIM, [HIDDEN], False, False),  # attention output / residual gradient
        ("gate/up", HIDDEN, [INTER, INTER], True, True),  # RMSNorm / SwiGLU backward
        ("down", INTER, [HIDDEN], True, False),  # SwiGLU forward / residual gradient
    ]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; tokens {t}, r {r}")
    prods = [(Product(n, i, sp, r, t), px, pd) for n, i, sp, px, pd in spec]
    for p, _, _ in prods:
        ey, ed = p.check()
        print(f"{p.name:>8}: fold against now, max |diff| / max |now|: y {ey:.2e}, dx {ed:.2e}")
    print(f"{'product':>8} {'pass':>4} {'base':>8} {'now':>8} {'fold+copy':>10} {'fold+prod':>10}"
          "   (us per call)")
    best = []
    save = 0.0
    for p, px, pd in prods:
        for pas, prod in (("fwd", px), ("bwd", pd)):
            base = timed(p.base_fwd if pas == "fwd" else p.base_bwd, a.reps)
            now = timed(p.now_fwd if pas == "fwd" else p.now_bwd, a.reps)
            fold = p.fold_fwd if pas == "fwd" else p.fold_bwd
            fc = timed(lambda: fold(True), a.reps)
            fp = timed(lambda: fold(False), a.reps)
            pick = fp if prod else fc
            use_fold = pick < now
            best.append((p, pas, prod, use_fold))
            save += (now - pick) if use_fold else 0.0
            print(f"{p.name:>8} {pas:>4} {base:8.1f} {now:8.1f} {fc:10.1f} {fp:10.1f}"
                  f"   -> {'fold+' + ('prod' if prod else 'copy') if use_fold else 'now'}")
    print(f"per layer the fold saves {save:.0f} us where it wins (x{LAYERS}: "
          f"{save * LAYERS / 1000:.2f} ms per step), summed from the rows above")

    # flare's fused MLP (`lora/op/fold.rs`) as it runs: gate/up folded with x copied in
    # (forward) and SwiGLU's backward writing the padded rows (backward); down folded with
    # SwiGLU's forward writing the padded rows (forward) and dy copied in (backward); q/k/v
    # and o as now.
    mlp_fold = {("gate/up", "fwd"): True, ("gate/up", "bwd"): False, ("down", "fwd"): False,
                ("down", "bwd"): True}

    def seq(kind):
        def run():
            for p, pas, prod, use_fold in best:
                if kind == "base":
                    (p.base_fwd if pas == "fwd" else p.base_bwd)()
                elif kind == "mlp" and (p.name, pas) in mlp_fold:
                    (p.fold_fwd if pas == "fwd" else p.fold_bwd)(mlp_fold[(p.name, pas)])
                elif kind in ("now", "mlp") or not use_fold:
                    (p.now_fwd if pas == "fwd" else p.now_bwd)()
                else:
                    (p.fold_fwd if pas == "fwd" else p.fold_bwd)(not prod)
        return run

    kinds = ("base", "now", "mlp", "fold")
    graphs = {k: graphed(seq(k), 1) for k in kinds}
    attn = attention(t)
    lm_head = lm_head_chunks(t)

    def step(kind):
        """One step's vendor work: per layer its products (graph) and its attention forward and
        backward (cuDNN SDPA, eager: the host runs ahead of the GEMMs), then the LM head."""
        a0, a1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a0.record()
        for _ in range(LAYERS):
            graphs[kind].replay()
            attn()
        lm_head()
        a1.record()
        a1.synchronize()
        return a0.elapsed_time(a1)

    smi = sample_clocks()
    times = {k: [] for k in graphs}
    for _ in range(2):  # warm-up steps
        for k in graphs:
            step(k)
    for _ in range(a.steps):
        for k in graphs:
            times[k].append(step(k))
    clocks = []
    if smi:
        smi.terminate()
        out, _ = smi.communicate()
        for line in out.splitlines():
            try:
                mhz, watts = (float(v) for v in line.split(","))
                clocks.append((mhz, watts))
            except ValueError:
                pass
    med = {k: statistics.median(v) for k, v in times.items()}
    name = torch.cuda.get_device_name()
    peak = next((pk for key, pk in PEAKS if key in name), None)
    flops = flops_per_token(t) * t
    print(f"sustained, {a.steps} steps of each alternated ({LAYERS} layers of the products above "
          "forward and backward, each layer's attention forward and backward, the LM head's "
          "forward and input gradient in 1024-row chunks), median ms per step; MFU of the "
          f"sequence alone, and with --rest-ms {a.rest_ms} of flare's other kernels on top:")
    for k in kinds:
        mfu = ""
        if peak:
            alone = flops / (med[k] / 1e3) / (peak * 1e12)
            rest = flops / ((med[k] + a.rest_ms) / 1e3) / (peak * 1e12)
            mfu = f"  MFU {alone:.1%} alone, {rest:.1%} with the rest"
        print(f"  {k:>5}: {med[k]:8.2f} ms  (min {min(times[k]):.2f}, max {max(times[k]):.2f})"
              f"{mfu}")
    if clocks:
        mhz = statistics.median(c for c, _ in clocks)
        watts = statistics.median(w for _, w in clocks)
        print(f"  SM clock median {mhz:.0f} MHz (min {min(c for c, _ in clocks):.0f}), "
              f"power median {watts:.0f} W over {len(clocks)} samples")
    if peak:
        need = flops / (a.mfu * peak * 1e12) * 1e3
        print(f"MFU {a.mfu:.0%} of {peak} TFLOP/s needs a step of at most {need:.1f} ms")
    print(f"FOLD SAVES {med['now'] - med['fold']:.2f} ms per step sustained, every product "
          f"folded where it wins ({med['now'] - med['mlp']:.2f} ms as flare's fused MLP folds "
          f"gate/up and down; the low-rank terms now cost {med['now'] - med['base']:.2f} ms "
          f"over the frozen GEMMs)")


if __name__ == "__main__":
    main()
