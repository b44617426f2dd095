"""Lists the operations of the cuDNN graphs in a cuDNN API log, one line per operation.

Usage: python bench/dev/cudnn_log_ops.py cudnn.log

The log comes from a process run with CUDNN_LOGLEVEL_DBG=3 and CUDNN_LOGDEST_DBG=<file> (e.g.
bench/dev/cudnn_sdpa_probe.py, PyTorch's SDPA on cuDNN, or flare with FLARE_ATTENTION_CUDNN=1).
Each finalized operation prints as its kind, mode, math precision, axis, and each tensor slot as
u<uid>:<dtype>[dims][strides] with V (virtual) or B (by value). Graph and plan finalizations
print as separators. Comparing PyTorch's list with flare's shows where flare's attention graphs
differ from the pattern cuDNN's engines recognise.
"""

import re
import sys


def tensor(body):
    d = dict(re.findall(r"(\w+): type=[\w ]+; val=([^;\n]+)", body))
    dt = d.get("type", "?").replace("CUDNN_DATA_", "").split(" ")[0]
    flags = ("V" if d.get("isVirtual") == "true" else "") + ("B" if d.get("isByVal") == "true" else "")
    return f"u{d.get('uid')}:{dt}{d.get('dimA')}{d.get('strideA')}{flags}"


def main(path):
    for b in open(path).read().split("\n\n"):
        if "cudnnBackendFinalize() called" not in b:
            continue
        m = re.search(r"descriptor: type=CUDNN_BACKEND_(OPERATION_\w+|OPERATIONGRAPH_DESCRIPTOR|EXECUTION_PLAN_DESCRIPTOR)", b)
        if not m:
            continue
        kind = m.group(1)
        if not kind.startswith("OPERATION_"):
            print("----", kind)
            continue
        parts = re.split(r"\ni!         (\w+): type=CUDNN_BACKEND_(\w+):", b)
        mode = [x.replace("CUDNN_POINTWISE_", "").replace("CUDNN_REDUCE_TENSOR_", "")
                for x in re.findall(r"mode: type=\w+; val=(\w+)", b)]
        prec = [p.replace("CUDNN_DATA_", "") for p in re.findall(r"mathPrec: type=\w+; val=(\w+)", b)]
        axis = re.findall(r"axis: type=\w+; val=(\w+)", b)
        slots = [f"{parts[i]}={tensor(parts[i + 2])}" for i in range(1, len(parts) - 1, 3)
                 if parts[i + 1] == "TENSOR_DESCRIPTOR"]
        name = kind.replace("OPERATION_", "").replace("_DESCRIPTOR", "")
        print(name, " ".join(mode), " ".join(prec), f"axis={axis[0]}" if axis else "", " ".join(slots))


if __name__ == "__main__":
    main(sys.argv[1])
