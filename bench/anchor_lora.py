#!/usr/bin/env python3
"""PyTorch anchor for `flare bench lora`: the same shapes, timed with the same method.

Runs on the GPU machine with PyTorch (no other dependency). Cases, x [tokens, in] and
W [out, in] (requires_grad=False), A [r, in], B [out, r], s = 2:

  torch base linear   y = x @ W.T                           x requires_grad=True
  torch lora          y = x @ W.T + (x @ A.T @ B.T) * s     x, A, B requires_grad=True
                      (PyTorch's unfused LoRA, as PEFT's Linear computes it)

Each case has a fwd row (the forward, building the autograd graph as in training) and a fwd+bwd
row (the forward, then torch.autograd.grad from y with grad_outputs=ones_like(y), as Candle's
`.backward()` seeds it, to x (base) or to x, A, B (lora)).

Method (as flare's harness): warm-up (every input set once, then whole bursts), then per repeat:
torch.cuda.synchronize(), start the clock, a burst of N back-to-back calls,
torch.cuda.synchronize(), stop the clock; per-call time = burst time / N; median over repeats.
N makes a burst last ~2 ms. All cases share the random-normal input sets (several when one set
fits in L2, 50 MB on H100) and run in turn within each repeat, the first case rotating.

Peak memory: after the warm-up, for one isolated call per case, torch.cuda.max_memory_allocated()
after torch.cuda.reset_peak_memory_stats(), minus torch.cuda.memory_allocated() before the call
(the inputs), in MiB.

Writes a JSON list of rows with keys case, pass, shape (`tokens x in x out rR`, as flare writes
it), dtype, us, peak_mib (plus min_us, burst, repeats, input_sets, tokens, in_features,
out_features, r, scale, device, device_name, torch_version, impl). Feed it to
`flare bench lora --torch-json PATH`.
"""

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time

SCALE = 2.0
L2_BYTES = 50_000_000
MAX_SETS = 16
TARGET_REGION_US = 2000.0
MAX_BURST = 2000
BUDGET_S = 30.0
DTYPE_SIZE = {"f32": 4, "bf16": 2, "f16": 2}


def shape_label(t, i, o, r):
    return f"{t}x{i}x{o} r{r}"


def footprint(t, i, o, r, dtype):
    """As flare's `Shape::footprint`: x, W, A, B plus y, dy, dx of one fwd+bwd."""
    return (2 * t * i + o * i + r * i + o * r + 2 * t * o) * DTYPE_SIZE[dtype]


def input_sets(fp, cache=L2_BYTES, max_sets=MAX_SETS):
    if fp == 0 or fp >= cache:
        return 1
    return max(1, min(max_sets, -(-2 * cache // fp)))


CASES = [
    ("torch base linear", "fwd"),
    ("torch lora", "fwd"),
    ("torch base linear", "fwd+bwd"),
    ("torch lora", "fwd+bwd"),
]

IMPL = {
    "torch base linear": "x @ W.T",
    "torch lora": "x @ W.T + (x @ A.T @ B.T) * s",
}


def make_call(torch, case, pass_, sets):
    n = len(sets)

    def fwd(s):
        x, w, a, b = s
        if case == "torch base linear":
            return x @ w.T
        return x @ w.T + (x @ a.T @ b.T) * SCALE

    if pass_ == "fwd":
        def call(i):
            fwd(sets[i % n])
        return call

    def call_bwd(i):
        s = sets[i % n]
        y = fwd(s)
        inputs = (s[0],) if case == "torch base linear" else (s[0], s[2], s[3])
        torch.autograd.grad(y, inputs, grad_outputs=torch.ones_like(y))

    return call_bwd


class Runner:
    def __init__(self, torch, case, pass_, call):
        self.torch, self.case, self.pass_, self.call = torch, case, pass_, call
        self.next = 0
        self.burst = 1
        self.region_s = 0.0
        self.samples = []
        self.peak_mib = None

    def time(self, n):
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            self.call(self.next)
            self.next += 1
        self.torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e6 / n


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


def fmt_num(x):
    if x is None or not math.isfinite(x):
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    ap.add_argument("--quick", action="store_true", help="1024 tokens, 1024 -> 1024, r 16 (as flare's --quick on CUDA)")
    ap.add_argument("--tokens", type=int, default=None, help="rows of x [4096; 1024 with --quick]")
    ap.add_argument("--in", dest="in_features", type=int, default=None, help="in_features [4096; 1024 with --quick]")
    ap.add_argument("--out", dest="out_features", type=int, default=None, help="out_features [4096; 1024 with --quick]")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank [16]")
    ap.add_argument("--dtype", choices=sorted(DTYPE_SIZE), default="bf16", help="element type [bf16]")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats [25; 5 with --quick]")
    ap.add_argument("--device", default="cuda", help="torch device [cuda]")
    args = ap.parse_args(argv)

    d = 1024 if args.quick else 4096
    t = args.tokens or d
    i = args.in_features or d
    o = args.out_features or d
    r = args.r
    if min(t, i, o, r) < 1:
        ap.error("--tokens, --in, --out and --r must be positive")
    repeats = args.repeats or (5 if args.quick else 25)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    warmup_bursts = 1 if args.quick else 2

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
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    if args.dtype == "f32":
        torch.backends.cuda.matmul.allow_tf32 = False  # flare's default: TF32 off
    shape = shape_label(t, i, o, r)
    nsets = input_sets(footprint(t, i, o, r, args.dtype))
    print(f"anchor_lora: torch {torch.__version__} on {name}, {shape} {args.dtype}, s = {SCALE}, "
          f"{nsets} input set(s), {repeats} repeats", file=sys.stderr)

    def rnd(*s, grad):
        return torch.randn(*s, device=dev, dtype=torch.float32).to(tdt).requires_grad_(grad)

    # (x, W, A, B): x, A, B require grad in every row (the forward of a training step), W never.
    sets = [(rnd(t, i, grad=True), rnd(o, i, grad=False), rnd(r, i, grad=True), rnd(o, r, grad=True))
            for _ in range(nsets)]

    started = time.perf_counter()
    runners, failed = [], []
    for case, pass_ in CASES:
        rn = Runner(torch, case, pass_, make_call(torch, case, pass_, sets))
        try:
            rn.time(nsets)
            single = min(rn.time(1), rn.time(1))
            rn.burst = max(1, min(MAX_BURST, math.ceil(TARGET_REGION_US / max(single, 1e-3))))
            for _ in range(warmup_bursts):
                rn.region_s = rn.time(rn.burst) * rn.burst * 1e-6
            runners.append(rn)
        except Exception as e:  # keep going: one failing case must not lose the others
            print(f"  {case + ' ' + pass_:<28} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(f"{case} {pass_}")

    # Peak memory of one isolated call per case, after the warm-up.
    for rn in runners:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        rn.call(0)
        torch.cuda.synchronize()
        rn.peak_mib = (torch.cuda.max_memory_allocated() - before) / (1 << 20)

    per_repeat_s = sum(rn.region_s for rn in runners)
    if per_repeat_s * repeats > BUDGET_S:
        repeats = max(3, min(repeats, int(BUDGET_S / per_repeat_s)))
    n = len(runners)
    dead = [False] * n
    for rep in range(repeats):
        for j in range(n):
            k = (rep + j) % n
            if dead[k]:
                continue
            rn = runners[k]
            try:
                rn.samples.append(rn.time(rn.burst))
            except Exception as e:
                print(f"  {rn.case + ' ' + rn.pass_:<28} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                failed.append(f"{rn.case} {rn.pass_}")
                dead[k] = True

    rows = []
    for rn, d_ in zip(runners, dead):
        if d_ or not rn.samples:
            continue
        us = statistics.median(rn.samples)
        rows.append({
            "case": rn.case, "pass": rn.pass_, "shape": shape, "dtype": args.dtype,
            "us": us, "peak_mib": rn.peak_mib, "min_us": min(rn.samples), "burst": rn.burst,
            "repeats": len(rn.samples), "input_sets": nsets, "tokens": t, "in_features": i,
            "out_features": o, "r": r, "scale": SCALE, "device": str(dev), "device_name": name,
            "torch_version": torch.__version__, "impl": IMPL[rn.case],
        })
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    base = {r_["pass"]: r_["us"] for r_ in rows if r_["case"] == "torch base linear"}
    print(f"{'case':<18}  {'pass':<7}  {'us':>8}  {'vs base':>7}  {'peak MiB':>8}")
    for r_ in rows:
        b = base.get(r_["pass"])
        vs = f"{r_['us'] / b:.2f}x" if b else "-"
        print(f"{r_['case']:<18}  {r_['pass']:<7}  {fmt_num(r_['us']):>8}  {vs:>7}  {r_['peak_mib']:>8.1f}")
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
