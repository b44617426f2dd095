#!/usr/bin/env python3
"""Per-kernel GPU time from traces written by bench/cupti/kernel_trace.c.

    python3 bench/kernel_report.py TRACE.tsv [--top 25] [--label flare]

Prints the kernels by total GPU time: share of all GPU time, total ms, calls, mean us, and the
(demangled, shortened) name. Kernels whose names differ only in template arguments are kept
apart; memcpy and memset lines are included so that copies show up as what they cost.
"""
import argparse
import re
import shutil
import subprocess


def demangle(names):
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.split("\n")
    return lines[: len(names)] if len(lines) >= len(names) else names


def shorten(name, width):
    name = re.sub(r"\(.*\)$", "", name)  # argument list
    name = re.sub(r"^void ", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--label", default="")
    ap.add_argument("--width", type=int, default=90)
    args = ap.parse_args()
    rows = []
    with open(args.trace) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            rows.append((int(parts[0]), int(parts[1]), parts[2], parts[3]))
    if not rows:
        print(f"{args.trace}: no records")
        return
    names = demangle([r[3] for r in rows])
    total = sum(r[0] for r in rows)
    print(f"{args.label or args.trace}: {total / 1e6:.1f} ms of GPU time in {sum(r[1] for r in rows)} records")
    print(f"{'share':>6} {'total ms':>9} {'calls':>7} {'mean us':>8}  kind    name")
    for (ns, calls, kind, _), name in list(zip(rows, names))[: args.top]:
        print(f"{100 * ns / total:5.1f}% {ns / 1e6:9.2f} {calls:7d} {ns / calls / 1e3:8.1f}  {kind:7} {shorten(name, args.width)}")


if __name__ == "__main__":
    main()
