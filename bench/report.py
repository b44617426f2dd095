#!/usr/bin/env python3
"""Merges `flare bench ops --json` and `bench/anchor_ops.py --json` into a Markdown report.

Usage:
  python3 bench/report.py FLARE_JSON [TORCH_JSON]            # Markdown table + targets
  python3 bench/report.py --short FLARE_JSON [TORCH_JSON]    # compact text table + targets
  add --strict to exit 1 when a target fails (exit 2 on unreadable input)

Rows are merged by (op, shape, dtype, pass). "% copy" is a row's rate as a fraction of the copy
bandwidth measured in the same run: flare's and Candle's against the flare run's raw memcpy row,
torch's against the torch run's `y.copy_(x)` row.

Targets checked (PASS/FAIL each):
  matmul 4096x4096x4096 bf16 fwd: flare TFLOP/s >= 0.97 x torch
  softmax and rms_norm 8192x8192 f32 and bf16 fwd: flare >= 80% of the copy bandwidth
  softmax 64x64 f32 fwd: flare <= 6 us/call
  matmul 64x64x64 bf16 fwd: flare <= 9 us/call

Python 3 standard library only.
"""

import argparse
import json
import math
import signal
import sys

KEY = ("op", "shape", "dtype", "pass")


def load(path):
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    out = {}
    for r in rows:
        missing = [k for k in KEY if k not in r]
        if missing:
            raise ValueError(f"{path}: a row lacks {missing}: {r}")
        out[tuple(r[k] for k in KEY)] = r
    return out


def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, digits=4):
    """About `digits` significant digits, no exponent; '-' for missing."""
    if not num(x):
        return "-"
    a = abs(x)
    if a >= 10 ** (digits - 1):
        return f"{x:.0f}"
    decimals = digits - 1 - (int(math.floor(math.log10(a))) if a > 0 else 0)
    return f"{x:.{max(0, decimals)}f}"


def ratio(a, b):
    """a / b, or None."""
    return a / b if num(a) and num(b) and b > 0 else None


def pct(a, b):
    """100 * a / b, or None."""
    r = ratio(a, b)
    return None if r is None else 100.0 * r


def fmt_ratio(x):
    return f"{x:.2f}x" if num(x) else "-"


def fmt_pct(x):
    return f"{x:.1f}%" if num(x) else "-"


def copy_rate(rows, field):
    for (op, _, _, _), r in rows.items():
        if op == "copy" and num(r.get(field)) and r[field] > 0:
            return r[field]
    return None


def merge(flare, torch):
    """One merged dict per key, flare's order first, then torch-only rows."""
    keys = list(flare) + [k for k in torch if k not in flare]
    fcopy = copy_rate(flare, "flare_rate")
    tcopy = copy_rate(torch, "torch_rate")
    out = []
    for k in keys:
        f, t = flare.get(k, {}), torch.get(k, {})
        unit = f.get("rate_unit") or t.get("rate_unit") or ""
        m = dict(zip(KEY, k))
        m.update(
            unit=unit,
            flare_us=f.get("flare_us"),
            candle_us=f.get("candle_us"),
            torch_us=t.get("torch_us"),
            flare_rate=f.get("flare_rate"),
            candle_rate=f.get("candle_rate"),
            torch_rate=t.get("torch_rate"),
            check=("ok" if f.get("check_ok") else
                   (f"DIFF {f['check_rel_diff']:.1e}" if f.get("check_ok") is False and num(f.get("check_rel_diff"))
                    else "-")),
        )
        m["candle_over_flare"] = ratio(m["candle_us"], m["flare_us"])
        m["torch_over_flare"] = ratio(m["torch_us"], m["flare_us"])
        mem = unit == "GB/s"
        m["flare_pct_copy"] = pct(m["flare_rate"], fcopy) if mem else None
        m["candle_pct_copy"] = pct(m["candle_rate"], fcopy) if mem else None
        m["torch_pct_copy"] = pct(m["torch_rate"], tcopy) if mem else None
        out.append(m)
    return out, fcopy, tcopy


def targets(merged, fcopy):
    """[(name, passed, detail)]; a missing row fails its target."""
    by = {tuple(m[k] for k in KEY): m for m in merged}
    res = []

    def get(*k):
        return by.get(k)

    m = get("matmul", "4096x4096x4096", "bf16", "fwd")
    name = "matmul 4096^3 bf16: flare TFLOP/s >= 0.97 x torch"
    if m and num(m["flare_rate"]) and num(m["torch_rate"]):
        r = m["flare_rate"] / m["torch_rate"]
        res.append((name, r >= 0.97, f"flare {fmt(m['flare_rate'])} vs torch {fmt(m['torch_rate'])} TFLOP/s = {r:.3f}x"))
    else:
        res.append((name, False, "missing flare or torch row"))

    for op in ("softmax", "rms_norm"):
        for dt in ("f32", "bf16"):
            m = get(op, "8192x8192", dt, "fwd")
            name = f"{op} 8192x8192 {dt}: flare >= 80% of copy bandwidth"
            if m and num(m["flare_rate"]) and num(fcopy):
                p = 100 * m["flare_rate"] / fcopy
                res.append((name, p >= 80.0, f"{fmt(m['flare_rate'])} GB/s = {p:.1f}% of {fmt(fcopy)} GB/s"))
            else:
                res.append((name, False, "missing row or copy bandwidth"))

    for (op, shape, dt, limit) in (("softmax", "64x64", "f32", 6.0), ("matmul", "64x64x64", "bf16", 9.0)):
        m = get(op, shape, dt, "fwd")
        name = f"{op} {shape} {dt}: flare <= {limit:g} us/call"
        if m and num(m["flare_us"]):
            res.append((name, m["flare_us"] <= limit, f"{fmt(m['flare_us'])} us"))
        else:
            res.append((name, False, "missing row"))
    return res


def markdown(merged, fcopy, tcopy, meta):
    lines = []
    if meta:
        lines.append(meta)
        lines.append("")
    hdr = ["op", "shape", "dtype", "pass", "flare µs", "candle µs", "torch µs", "candle/flare",
           "torch/flare", "flare rate", "candle rate", "torch rate", "unit", "flare % copy",
           "candle % copy", "torch % copy", "check"]
    right = set(range(4, 12)) | {13, 14, 15}
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join("---:" if i in right else "---" for i in range(len(hdr))) + "|")
    for m in merged:
        cells = [m["op"], m["shape"], m["dtype"], m["pass"], fmt(m["flare_us"]), fmt(m["candle_us"]),
                 fmt(m["torch_us"]), fmt_ratio(m["candle_over_flare"]), fmt_ratio(m["torch_over_flare"]),
                 fmt(m["flare_rate"]), fmt(m["candle_rate"]), fmt(m["torch_rate"]), m["unit"],
                 fmt_pct(m["flare_pct_copy"]), fmt_pct(m["candle_pct_copy"]), fmt_pct(m["torch_pct_copy"]),
                 m["check"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Copy bandwidth (read + write): flare run {fmt(fcopy)} GB/s (raw device-to-device memcpy), "
                 f"torch run {fmt(tcopy)} GB/s (`y.copy_(x)`).")
    lines.append("candle/flare and torch/flare above 1 mean flare is faster. Rates count each input read "
                 "once and each output written once (see `flare bench ops --help`).")
    return "\n".join(lines)


def short_table(merged):
    hdr = ["op", "shape", "dtype", "pass", "flare us", "candle us", "torch us", "c/f", "t/f", "%copy"]
    body = [[m["op"], m["shape"], m["dtype"], m["pass"], fmt(m["flare_us"]), fmt(m["candle_us"]),
             fmt(m["torch_us"]), fmt_ratio(m["candle_over_flare"]), fmt_ratio(m["torch_over_flare"]),
             fmt_pct(m["flare_pct_copy"])] for m in merged]
    w = [max(len(r[i]) for r in [hdr] + body) for i in range(len(hdr))]
    out = []
    for r in [hdr] + body:
        out.append("  ".join(c.ljust(w[i]) if i < 4 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(out)


def meta_line(flare_path, torch_path, flare_rows, torch_rows):
    parts = []
    f = next(iter(flare_rows.values()), None)
    t = next(iter(torch_rows.values()), None)
    if f:
        parts.append(f"flare/Candle: {f.get('device', '?')} ({f.get('device_name', '?')})")
    if t:
        parts.append(f"torch {t.get('torch_version', '?')}: {t.get('device', '?')} ({t.get('device_name', '?')})")
    return "; ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("flare_json")
    ap.add_argument("torch_json", nargs="?")
    ap.add_argument("--short", action="store_true", help="compact text table instead of Markdown")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = ap.parse_args(argv)
    try:
        flare = load(args.flare_json)
        torch = load(args.torch_json) if args.torch_json else {}
    except (OSError, ValueError) as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2
    merged, fcopy, tcopy = merge(flare, torch)
    if args.short:
        print(short_table(merged))
    else:
        print(markdown(merged, fcopy, tcopy, meta_line(args.flare_json, args.torch_json, flare, torch)))
    res = targets(merged, fcopy)
    print()
    print("Targets:" if args.short else "### Targets\n")
    for name, ok, detail in res:
        line = f"{'PASS' if ok else 'FAIL'}  {name}  ({detail})"
        print(line if args.short else f"- {line}")
    npass = sum(ok for _, ok, _ in res)
    print(f"\n{npass}/{len(res)} targets pass")
    return 1 if args.strict and npass < len(res) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    sys.exit(main())
