#!/usr/bin/env python3
"""Per-kernel GPU time from traces written by bench/cupti/kernel_trace.c.

    python3 bench/kernel_report.py TRACE.tsv [--top 25] [--label flare]
    python3 bench/kernel_report.py LONG.tsv --minus SHORT.tsv --per 3

The second form subtracts a shorter run's trace kernel by kernel and divides by the number of
steps between them (e.g. a 5-step and a 2-step `flare bench train --steps`): what one step costs,
with the model's initialisation and the warm-up cancelled out. Kernels are matched by name, so
a GEMM whose autotune kept another cuBLASLt kernel in one of the two runs would show as a
difference: `--group` sums every cuBLASLt kernel (nvjet, cutlass, xmma) into one row and every
cuDNN kernel into another before subtracting.

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
    ap.add_argument("--minus", help="a shorter run's trace to subtract, kernel by kernel")
    ap.add_argument("--per", type=float, default=1.0, help="divide by this many steps (with --minus)")
    ap.add_argument("--group", action="store_true", help="one row for cuBLASLt's kernels, one for cuDNN's")
    args = ap.parse_args()
    rows = read(args.trace, args.group)
    if args.minus:
        base = {(kind, name): (ns, calls) for ns, calls, kind, name in read(args.minus, args.group)}
        diff = []
        for ns, calls, kind, name in rows:
            bns, bcalls = base.pop((kind, name), (0, 0))
            diff.append((ns - bns, calls - bcalls, kind, name))
        diff += [(-ns, -calls, kind, name) for (kind, name), (ns, calls) in base.items()]
        rows = [
            (ns / args.per, calls / args.per, kind, name)
            for ns, calls, kind, name in diff
            if calls != 0 or abs(ns) > 0
        ]
        rows.sort(key=lambda r: -r[0])
    if not rows:
        print(f"{args.trace}: no records")
        return
    rows = [r for r in rows if r[1] > 0]
    names = demangle([r[3] for r in rows])
    total = sum(r[0] for r in rows)
    label = args.label or args.trace
    if args.minus:
        label += f" minus {args.minus}, per {args.per:g}"
    print(f"{label}: {total / 1e6:.1f} ms of GPU time in {sum(r[1] for r in rows):.0f} records")
    print(f"{'share':>6} {'total ms':>9} {'calls':>7} {'mean us':>8}  kind    name")
    for (ns, calls, kind, _), name in list(zip(rows, names))[: args.top]:
        print(f"{100 * ns / total:5.1f}% {ns / 1e6:9.2f} {calls:7.0f} {ns / calls / 1e3:8.1f}  {kind:7} {shorten(name, args.width)}")


GROUPS = [
    ("cuBLASLt GEMMs, every algorithm", re.compile(r"nvjet|cutlass|xmma|gemm|splitKreduce", re.I)),
    ("cuDNN, every kernel", re.compile(r"cudnn", re.I)),
]


def read(path, group=False):
    """(total ns, calls, kind, name) per line of a kernel_trace.c TSV, in its order; with
    `group`, the GROUPS' kernels summed into one row each (placed first)."""
    rows = []
    sums = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            row = (int(parts[0]), int(parts[1]), parts[2], parts[3])
            label = next((g for g, pat in GROUPS if pat.search(row[3])), None) if group else None
            if label is None:
                rows.append(row)
            else:
                ns, calls = sums.get(label, (0, 0))
                sums[label] = (ns + row[0], calls + row[1])
    grouped = [(ns, calls, "kernel", label) for label, (ns, calls) in sums.items()]
    return sorted(grouped + rows, key=lambda r: -r[0])


if __name__ == "__main__":
    main()
