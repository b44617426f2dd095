#!/usr/bin/env python3
"""The vendor-kernel floor of one LoRA training step of the Llama-3.1-8B shape (issue 13's MFU).

    python3 bench/dev/step_floor.py [--tokens 4096] [--reps 20] [--mfu 0.55]

Times, with PyTorch on the GPU (cuBLAS and cuDNN, the kernels flare calls too), only the work a
step cannot avoid, each piece alone and back to back (CUDA events, median of --reps):

- every frozen GEMM of one step: per layer the forward `x @ W.T` of q, k, v, o, gate, up and
  down (the separate projections of a LoRA model: an adapter sits on each) and the input
  gradient `dy @ W`; the LM head's forward and input gradient on all tokens;
- causal GQA attention forward + backward (SDPA, cuDNN backend) per layer.

Their sum is a floor for the step: the LoRA products, norms, RoPE, SwiGLU, residual adds, the
loss and the optimizer all come on top. It prints the floor, the step time that MFU --mfu needs
(model FLOPs of `crates/flare-cli/src/bench/presets.rs`), and whether the floor leaves room.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

# Llama-3.1-8B.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 4096, 32, 32, 8, 128, 14336, 128256
LORA_R = 16
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4)]


def timed(fn, reps):
    """Median ms of `fn` over `reps` runs, each between two events, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def flops_per_token(seq):
    """presets.rs: 4 N_frozen + 6 N_lora + 6 S L H dh."""
    d, kv = HIDDEN, KV_HEADS * HEAD_DIM
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * INTER
    n_frozen = LAYERS * per_layer + d * VOCAB
    lora = [(d, d), (d, kv), (d, kv), (d, d), (d, INTER), (d, INTER), (INTER, d)]
    n_lora = LAYERS * sum(LORA_R * (i + o) for i, o in lora)
    return 4 * n_frozen + 6 * n_lora + 6 * seq * LAYERS * HEADS * HEAD_DIM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="batch-1 sequence length")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--mfu", type=float, default=0.55)
    a = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((p for k, p in PEAKS if k in name), None)
    t, dt = a.tokens, torch.bfloat16
    kv = KV_HEADS * HEAD_DIM
    # (in, out) of each projection, as nn.Linear weights [out, in].
    projs = [("q", HIDDEN, HIDDEN), ("k", HIDDEN, kv), ("v", HIDDEN, kv), ("o", HIDDEN, HIDDEN),
             ("gate", HIDDEN, INTER), ("up", HIDDEN, INTER), ("down", INTER, HIDDEN)]
    rows = []
    total = 0.0
    gemm_flops = 0.0
    for nm, i, o in projs:
        w = torch.randn(o, i, device=dev, dtype=dt) * 0.02
        x = torch.randn(t, i, device=dev, dtype=dt)
        dy = torch.randn(t, o, device=dev, dtype=dt)
        fwd = timed(lambda: x @ w.t(), a.reps)
        bwd = timed(lambda: dy @ w, a.reps)
        tf = 2 * t * i * o / 1e9  # GFLOP, one GEMM
        rows.append((f"{nm} fwd [{t}x{i}]@[{i}x{o}]", fwd, LAYERS, tf / fwd))
        rows.append((f"{nm} dx  [{t}x{o}]@[{o}x{i}]", bwd, LAYERS, tf / bwd))
        total += LAYERS * (fwd + bwd)
        gemm_flops += LAYERS * 2 * tf
        del w, x, dy
    w = torch.randn(VOCAB, HIDDEN, device=dev, dtype=dt) * 0.02
    x = torch.randn(t, HIDDEN, device=dev, dtype=dt)
    dl = torch.randn(t, VOCAB, device=dev, dtype=dt)
    fwd = timed(lambda: x @ w.t(), a.reps)
    bwd = timed(lambda: dl @ w, a.reps)
    tf = 2 * t * HIDDEN * VOCAB / 1e9
    rows.append((f"lm_head fwd [{t}x{HIDDEN}]@[{HIDDEN}x{VOCAB}]", fwd, 1, tf / fwd))
    rows.append((f"lm_head dx  [{t}x{VOCAB}]@[{VOCAB}x{HIDDEN}]", bwd, 1, tf / bwd))
    total += fwd + bwd
    gemm_flops += 2 * tf
    # The LM head in token chunks, as a fused linear + cross-entropy runs it (flare's
    # linear_cross_entropy: CHUNK_BYTES of logits per chunk): forward logits and input gradient
    # per chunk, summed over the chunks of the step.
    chunked = []
    for c in (512, 1024, 2048, 4096):
        if c > t:
            continue
        xc, dc = x[:c], dl[:c]
        ms = timed(lambda: (xc @ w.t(), dc @ w), a.reps) * (t // c)
        chunked.append((c, ms))
    del w, x, dl
    # The beta = 1 epilogue (flare's base GEMMs add onto the LoRA term in C): gate's forward
    # and down's input gradient as addmm onto a C of the output's size.
    betas = []
    for nm, i, o in (("gate", HIDDEN, INTER), ("down dx", INTER, HIDDEN), ("q", HIDDEN, HIDDEN),
                     ("k", HIDDEN, kv)):
        w = torch.randn(o, i, device=dev, dtype=dt) * 0.02
        x = torch.randn(t, i, device=dev, dtype=dt)
        c0 = torch.randn(t, o, device=dev, dtype=dt)
        b0 = timed(lambda: x @ w.t(), a.reps)
        b1 = timed(lambda: torch.addmm(c0, x, w.t()), a.reps)
        betas.append((nm, b0, b1))
        del w, x, c0
    gemm_ms = total
    q = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, dtype=dt)

    def attn():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o.backward(do)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        try:
            at = timed(attn, a.reps)
            backend = "cuDNN"
        except RuntimeError:
            at = None
    if at is None:
        at = timed(attn, a.reps)
        backend = "default SDPA backend"
    rows.append((f"attention fwd+bwd ({backend}) H{HEADS}/KV{KV_HEADS} T{t} D{HEAD_DIM}", at,
                 LAYERS, 3 * 2 * t * t * HEADS * HEAD_DIM / 1e9 / at))
    total += LAYERS * at
    print(f"device: {name}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    print(f"{'piece':<52} {'ms':>8} {'x':>4} {'total ms':>9} {'TFLOP/s':>8}")
    for nm, ms, n, tfs in rows:
        print(f"{nm:<52} {ms:>8.3f} {n:>4} {ms * n:>9.2f} {tfs:>8.0f}")
    for c, ms in chunked:
        print(f"lm_head fwd + dx in chunks of {c} rows: {ms:.2f} ms per step")
    for nm, b0, b1 in betas:
        print(f"{nm} [{t} rows]: beta 0 {b0:.3f} ms, beta 1 (addmm onto C) {b1:.3f} ms")
    f_tok = flops_per_token(t)
    print(f"frozen GEMMs: {gemm_ms:.1f} ms ({gemm_flops / gemm_ms:.0f} TFLOP/s "
          "over the step's GEMMs)")
    print(f"floor (GEMMs + attention): {total:.1f} ms per step of {t} tokens")
    if peak:
        need = f_tok * t / (a.mfu * peak * 1e12) * 1e3
        print(f"model FLOPs {f_tok * t / 1e12:.1f} TFLOP; MFU {a.mfu:.0%} of {peak} TFLOP/s needs "
              f"a step of at most {need:.1f} ms; the floor alone is MFU "
              f"{f_tok * t / (total / 1e3) / (peak * 1e12):.1%}; left for everything else: "
              f"{need - total:.1f} ms")


if __name__ == "__main__":
    main()
