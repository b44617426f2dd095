"""Probe the GPU machine's cuDNN: its version, and the backend graph PyTorch's cuDNN SDPA builds.

Run with cuDNN's and cudnn-frontend's logging on (see bench/gpu_run.sh or the session note):
the logs show the descriptors and attributes of the fused-attention graph, which flare's own
cuDNN attention path builds through the backend API; `bench/dev/cudnn_log_ops.py cudnn.log` lists
them one operation per line. Prints each case's result, as a sanity check.
"""

import glob
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
for p in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "**", "libcudnn*"), recursive=True):
    print("lib", os.path.realpath(p), os.path.getsize(p))


def run(b, hq, hk, s, d, label):
    torch.manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    print(f"=== {label}: b{b} hq{hq} hk{hk} s{s} d{d}", flush=True)
    sys.stderr.write(f"\n########## {label}\n")
    sys.stderr.flush()
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hk)
            o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
        print("ok", o.shape, float(o.float().abs().mean()))
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        print("failed:", repr(e)[:400])


run(1, 2, 2, 256, 128, "mha d128")
run(1, 4, 2, 256, 128, "gqa d128")
run(2, 2, 2, 128, 64, "mha d64 b2")
