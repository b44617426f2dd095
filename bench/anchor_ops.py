#!/usr/bin/env python3
"""PyTorch anchor for `flare bench ops`: the same shapes, timed with the same method.

Runs on the GPU machine with PyTorch (no other dependency). For every case of `flare bench ops
--device cuda` it times PyTorch's equivalent:

  matmul        A @ B                     (f32: TF32 off; tf32: TF32 on; bf16: defaults)
  softmax       torch.softmax(x, -1)
  rms_norm      torch.nn.functional.rms_norm(x, (cols,), w, eps)
  add_rms_norm  h = x + r; y = rms_norm(h)
  copy          y.copy_(x)                (the bandwidth reference: bytes read + written)
  flash_attention  F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)
                (q, k, v as [B, H, T, D]; PyTorch picks its backend: cuDNN / flash on an H100)

fwd+bwd rows run the forward, then torch.autograd.grad from the first output with a ones
upstream gradient (as Candle's `.backward()` seeds it) to every input (x and the weight for the
norms, both operands for matmul).

Method (as in flare's harness): warm-up (every input set once, then whole bursts), then per
repeat: torch.cuda.synchronize(), start the clock, a burst of N back-to-back calls,
torch.cuda.synchronize(), stop the clock; per-call time = burst time / N; median over repeats.
N is at least the case's minimum (large for the dispatch-bound 64x64 / 64^3 cases) and otherwise
chosen so a burst lasts ~2 ms. Calls rotate through several random input sets when one set fits
in L2 (50 MB on H100). Rates count work exactly as flare does (see `flare bench ops --help`).

Writes a JSON list of rows with keys op, shape, dtype, pass, torch_us, torch_rate, rate_unit
(plus torch_min_us, burst, repeats, input_sets, device, device_name, torch_version, impl).
"""

import argparse
import json
import math
import signal
import os
import statistics
import sys
import tempfile
import time

EPS = 1e-6
L2_BYTES = 50_000_000
MAX_SETS = 16
TARGET_REGION_US = 2000.0
MAX_BURST = 2000
CASE_BUDGET_S = 5.0


def fmt_bytes(b):
    gib, mib = 1 << 30, 1 << 20
    if b >= gib and b % gib == 0:
        return f"{b // gib}GiB"
    if b >= mib and b % mib == 0:
        return f"{b // mib}MiB"
    return f"{b}B"


# (op, dims, dtype label, pass, min_burst); dims: bytes for copy, (m, k, n) for matmul,
# (rows, cols) for the row ops. Mirrors `cases(cuda=true, quick)` in crates/flare-cli/src/bench.rs.
CASES_FULL = [
    ("copy", 1 << 30, "f32", "fwd", 1),
    ("matmul", (64, 64, 64), "bf16", "fwd", 200),
    ("matmul", (1024, 1024, 1024), "bf16", "fwd", 20),
    ("matmul", (4096, 4096, 4096), "bf16", "fwd", 1),
    ("matmul", (4096, 4096, 4096), "f32", "fwd", 1),
    ("matmul", (4096, 4096, 4096), "tf32", "fwd", 1),
    ("softmax", (8192, 8192), "f32", "fwd", 1),
    ("softmax", (8192, 8192), "bf16", "fwd", 1),
    ("rms_norm", (8192, 8192), "f32", "fwd", 1),
    ("rms_norm", (8192, 8192), "bf16", "fwd", 1),
    ("add_rms_norm", (8192, 8192), "bf16", "fwd", 1),
    ("softmax", (64, 64), "f32", "fwd", 200),
    ("rms_norm", (64, 64), "f32", "fwd", 200),
    ("matmul", (4096, 4096, 4096), "bf16", "fwd+bwd", 1),
    ("softmax", (4096, 4096), "f32", "fwd+bwd", 1),
    ("softmax", (4096, 4096), "bf16", "fwd+bwd", 1),
    ("rms_norm", (4096, 4096), "f32", "fwd+bwd", 1),
    ("rms_norm", (4096, 4096), "bf16", "fwd+bwd", 1),
    ("add_rms_norm", (4096, 4096), "bf16", "fwd+bwd", 1),
    ("flash_attention", (8, 14, 14, 1024, 64), "bf16", "fwd", 1),
    ("flash_attention", (2, 14, 14, 4096, 64), "bf16", "fwd", 1),
    ("flash_attention", (1, 32, 8, 8192, 128), "bf16", "fwd", 1),
    ("flash_attention", (8, 14, 14, 1024, 64), "bf16", "fwd+bwd", 1),
    ("flash_attention", (2, 14, 14, 4096, 64), "bf16", "fwd+bwd", 1),
    ("flash_attention", (1, 32, 8, 8192, 128), "bf16", "fwd+bwd", 1),
]

CASES_QUICK = [
    ("copy", 256 << 20, "f32", "fwd", 1),
    ("matmul", (64, 64, 64), "bf16", "fwd", 100),
    ("matmul", (1024, 1024, 1024), "bf16", "fwd", 10),
    ("softmax", (2048, 2048), "f32", "fwd", 1),
    ("rms_norm", (2048, 2048), "bf16", "fwd", 1),
    ("add_rms_norm", (2048, 2048), "bf16", "fwd", 1),
    ("softmax", (64, 64), "f32", "fwd", 100),
    ("rms_norm", (64, 64), "f32", "fwd", 100),
    ("softmax", (1024, 1024), "f32", "fwd+bwd", 1),
    ("rms_norm", (1024, 1024), "bf16", "fwd+bwd", 1),
    ("flash_attention", (8, 14, 14, 1024, 64), "bf16", "fwd", 1),
    ("flash_attention", (8, 14, 14, 1024, 64), "bf16", "fwd+bwd", 1),
]

DTYPE_SIZE = {"f32": 4, "tf32": 4, "bf16": 2}


def shape_label(op, dims):
    if op == "copy":
        return fmt_bytes(dims)
    if op == "flash_attention":
        b, hq, hkv, t, d = dims
        heads = f"H{hq}" if hq == hkv else f"H{hq}/KV{hkv}"
        return f"B{b}.{heads}.T{t}.D{d}"
    return "x".join(str(d) for d in dims)


def work(op, dims, dtype, pass_):
    """(amount, unit) per call, counted exactly as flare's `Case::work`."""
    s = DTYPE_SIZE[dtype]
    bwd = pass_ == "fwd+bwd"
    if op == "copy":
        return 2.0 * dims, "GB/s"
    if op == "matmul":
        m, k, n = dims
        f = 2.0 * m * n * k
        return (3.0 * f if bwd else f), "TFLOP/s"
    if op == "flash_attention":
        b, hq, _, t, d = dims
        f = 4.0 * b * hq * d * t * t / 2.0  # causal: half the scores
        return (3.5 * f if bwd else f), "TFLOP/s"
    rows, cols = dims
    n, h = float(rows * cols), float(cols)
    if op == "softmax":
        return (5.0 if bwd else 2.0) * n * s, "GB/s"
    if op == "rms_norm":
        return ((5.0 * n + 3.0 * h) if bwd else (2.0 * n + h)) * s, "GB/s"
    if op == "add_rms_norm":
        return ((7.0 * n + 3.0 * h) if bwd else (4.0 * n + h)) * s, "GB/s"
    raise ValueError(op)


def rate(amount, unit, us):
    if not us or us <= 0 or math.isnan(us):
        return float("nan")
    return amount / (us * 1e-6) / (1e12 if unit == "TFLOP/s" else 1e9)


def footprint(op, dims, dtype, pass_):
    """Bytes of one input set plus outputs, as flare's `Case::footprint`."""
    s = DTYPE_SIZE[dtype]
    b = 2 if pass_ == "fwd+bwd" else 1
    if op == "copy":
        return 2 * dims
    if op == "matmul":
        m, k, n = dims
        return (m * k + k * n + m * n) * s * b
    if op == "flash_attention":
        bb, hq, hkv, t, d = dims
        return bb * t * (2 * hq + 2 * hkv) * d * s * b
    rows, cols = dims
    per = {"softmax": 2 * rows * cols, "rms_norm": 2 * rows * cols + cols,
           "add_rms_norm": 4 * rows * cols + cols}[op]
    return per * s * b


def input_sets(fp, cache=L2_BYTES, max_sets=MAX_SETS):
    if fp == 0 or fp >= cache:
        return 1
    return max(1, min(max_sets, -(-2 * cache // fp)))


def label(op, dims, dtype, pass_):
    return f"{op} {shape_label(op, dims)} {dtype} {pass_}"


def matches(lbl, flt):
    if not flt:
        return True
    parts = [p.strip().lower() for p in flt.split(",") if p.strip()]
    return any(p in lbl.lower() for p in parts)


def prepare(torch, op, dims, dtype, pass_, nsets, dev):
    """Returns (call(i), impl) for a case; inputs are random normal, never zeros."""
    F = torch.nn.functional
    tdt = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}[dtype]
    bwd = pass_ == "fwd+bwd"

    def rnd(*shape):
        t = torch.randn(*shape, device=dev, dtype=torch.float32).to(tdt)
        return t.requires_grad_(bwd)

    if op == "copy":
        n = dims // 4
        x = torch.randn(n, device=dev, dtype=torch.float32)
        y = torch.randn(n, device=dev, dtype=torch.float32)
        return (lambda i: y.copy_(x)), "y.copy_(x)"
    if op == "matmul":
        m, k, n = dims
        sets = [(rnd(m, k), rnd(k, n)) for _ in range(nsets)]
        fwd = lambda s: (s[0] @ s[1],)  # noqa: E731
        impl = "A @ B"
    elif op == "softmax":
        rows, cols = dims
        sets = [(rnd(rows, cols),) for _ in range(nsets)]
        fwd = lambda s: (torch.softmax(s[0], -1),)  # noqa: E731
        impl = "torch.softmax(x, -1)"
    elif op == "rms_norm":
        rows, cols = dims
        sets = [(rnd(rows, cols), rnd(cols)) for _ in range(nsets)]
        fwd = lambda s: (F.rms_norm(s[0], (s[0].shape[-1],), s[1], EPS),)  # noqa: E731
        impl = "F.rms_norm"
    elif op == "add_rms_norm":
        rows, cols = dims
        sets = [(rnd(rows, cols), rnd(rows, cols), rnd(cols)) for _ in range(nsets)]

        def fwd(s):
            h = s[0] + s[1]
            return (F.rms_norm(h, (h.shape[-1],), s[2], EPS), h)

        impl = "x + r; F.rms_norm"
    elif op == "flash_attention":
        b, hq, hkv, t, d = dims
        sets = [(rnd(b, hq, t, d), rnd(b, hkv, t, d), rnd(b, hkv, t, d)) for _ in range(nsets)]
        gqa = hq != hkv
        fwd = lambda s: (F.scaled_dot_product_attention(  # noqa: E731
            s[0], s[1], s[2], is_causal=True, enable_gqa=gqa),)
        impl = "F.scaled_dot_product_attention(is_causal=True)"
    else:
        raise ValueError(op)

    if not bwd:
        # Inputs do not require grad, so no autograd graph is built (no no_grad() context
        # either: its Python cost would land on the dispatch-bound cases).
        def call(i):
            return fwd(sets[i % nsets])
        return call, impl

    def call_bwd(i):
        s = sets[i % nsets]
        y = fwd(s)[0]
        return torch.autograd.grad(y, s, grad_outputs=torch.ones_like(y))

    return call_bwd, impl + " + autograd.grad"


def time_burst(torch, call, burst, state):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(burst):
        call(state[0])
        state[0] += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / burst


def measure(torch, call, nsets, min_burst, repeats, warmup_bursts):
    state = [0]
    time_burst(torch, call, nsets, state)  # every set once
    single = min(time_burst(torch, call, 1, state) for _ in range(2))
    burst = max(min_burst, min(MAX_BURST, max(1, math.ceil(TARGET_REGION_US / max(single, 1e-3)))))
    per_repeat_s = 0.0
    for _ in range(warmup_bursts):
        per_repeat_s = time_burst(torch, call, burst, state) * burst * 1e-6
    if per_repeat_s * repeats > CASE_BUDGET_S:
        repeats = max(3, min(repeats, int(CASE_BUDGET_S / per_repeat_s)))
    samples = [time_burst(torch, call, burst, state) for _ in range(repeats)]
    return samples, burst


def write_json_atomic(path, rows):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    ap.add_argument("--quick", action="store_true", help="the smaller shapes of `flare bench ops --quick`")
    ap.add_argument("--filter", metavar="SUBSTR", help="only cases whose 'op shape dtype pass' contains SUBSTR (comma: any)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case [25; 5 with --quick]")
    ap.add_argument("--device", default="cuda", help="torch device [cuda]")
    ap.add_argument("--list", action="store_true", help="list the cases and exit (needs no torch)")
    args = ap.parse_args(argv)

    cases = [c for c in (CASES_QUICK if args.quick else CASES_FULL) if matches(label(*c[:4]), args.filter)]
    if args.list:
        for c in cases:
            print(label(*c[:4]))
        return 0
    if not cases:
        print(f"no case matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    repeats = args.repeats or (5 if args.quick else 25)
    if repeats < 1:
        ap.error("--repeats must be >= 1")

    import torch

    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.index is None:
        dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.manual_seed(0x5EED)
    name = torch.cuda.get_device_name(dev)
    print(f"anchor_ops: torch {torch.__version__} on {name}, {len(cases)} cases, {repeats} repeats", file=sys.stderr)
    tf32_default = torch.backends.cuda.matmul.allow_tf32

    rows, failed = [], []
    started = time.perf_counter()
    for op, dims, dtype, pass_, min_burst in cases:
        lbl = label(op, dims, dtype, pass_)
        try:
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32" if op == "matmul" else tf32_default
            nsets = input_sets(footprint(op, dims, dtype, pass_))
            call, impl = prepare(torch, op, dims, dtype, pass_, nsets, dev)
            samples, burst = measure(torch, call, nsets, min_burst, repeats, 2)
            del call
            us = statistics.median(samples)
            amount, unit = work(op, dims, dtype, pass_)
            rows.append({
                "op": op, "shape": shape_label(op, dims), "dtype": dtype, "pass": pass_,
                "torch_us": us, "torch_rate": rate(amount, unit, us), "rate_unit": unit,
                "torch_min_us": min(samples), "burst": burst, "repeats": len(samples),
                "input_sets": nsets, "device": str(dev), "device_name": name,
                "torch_version": torch.__version__, "impl": impl,
            })
            print(f"  {lbl:<40} torch {us:>10.3f} us  {rows[-1]['torch_rate']:>9.2f} {unit}", file=sys.stderr)
        except Exception as e:  # keep going: one failing case must not lose the others
            print(f"  {lbl:<40} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(lbl)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_default
            torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, rows)
        print(f"wrote {args.json}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} case(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    sys.exit(main())
