#!/usr/bin/env python3
"""Prints flare's `bench decode` rows beside the HF anchor's (bench/anchor_decode.py) and the
issue's target line (batch-1 greedy decode >= 500 tokens/s).

Usage: compare_decode.py FLARE_JSON [ANCHOR_JSON]
"""

import json
import sys

TARGET_B1 = 500.0


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    flare = json.load(open(sys.argv[1]))
    anchor = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else []
    frameworks = sorted({r["framework"] for r in anchor})
    key = lambda r: (r["name"], r["batch"])
    by = {}
    for r in anchor:
        by.setdefault(key(r), {})[r["framework"]] = r
    if flare:
        f0 = flare[0]
        print(f"model {f0['model']} {f0['dtype']} on {f0['device_name']}; "
              f"weights per step {f0['weight_bytes'] / 1e6:.1f} MB")
    w = max([9] + [len(r["name"]) for r in flare])
    head = f"{'row':<{w}} {'path':<8} {'batch':>5} {'flare tok/s':>12} {'% floor':>8}"
    for fw in frameworks:
        head += f" {fw + ' tok/s':>16}"
    head += f" {'flare / best HF':>16}"
    print(head)
    for r in flare:
        line = f"{r['name']:<{w}} {r.get('path', '-'):<8} {r['batch']:>5} {r['tokens_per_s']:>12.1f} "
        pct = r.get("pct_of_floor")
        line += f"{pct:>8.1f}" if pct is not None else f"{'-':>8}"
        others = by.get(key(r), {})
        best = 0.0
        for fw in frameworks:
            o = others.get(fw)
            if o:
                line += f" {o['tokens_per_s']:>16.1f}"
                best = max(best, o["tokens_per_s"])
            else:
                line += f" {'-':>16}"
        line += f" {r['tokens_per_s'] / best:>15.1f}x" if best > 0 else f" {'-':>16}"
        print(line)
    # The target is judged on the path generation uses by default: the decode engine's graph
    # replay where it applies, else the per-op path.
    b1 = [r for r in flare if r["name"] == "decode" and r["batch"] == 1]
    b1.sort(key=lambda r: r.get("path") != "graph")
    if b1:
        v = b1[0]["tokens_per_s"]
        verdict = "PASS" if v >= TARGET_B1 else "FAIL"
        print(f"target batch-1 greedy decode >= {TARGET_B1:.0f} tokens/s: {v:.1f} "
              f"(path {b1[0].get('path', '-')}) -> {verdict} "
              f"({b1[0].get('pct_of_floor', 0):.1f}% of the weight-read floor "
              f"{b1[0].get('floor_tokens_per_s', 0):.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
