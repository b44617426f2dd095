"""PyTorch SDPA anchor for bench/dev/flash_attention_check.cu.

Times torch.nn.functional.scaled_dot_product_attention (is_causal=True, bf16, enable_gqa=True
for the GQA shape; PyTorch picks its backend, cuDNN / flash on an H100) forward and
forward + backward at the issue's three shapes, with the method of the CUDA harness: 5 warm-ups,
then 30 iterations each between two CUDA events, median. FLOPs as FlashAttention counts them:
fwd 4*B*H*T^2*D/2 (causal), fwd+bwd 3.5x fwd. Prints the same table as the harness.

    python3 bench/dev/sdpa_anchor.py
"""

import torch
import torch.nn.functional as F

SHAPES = [  # (B, Hq, Hkv, T, D)
    (8, 14, 14, 1024, 64),
    (2, 14, 14, 4096, 64),
    (1, 32, 8, 8192, 128),
]
WARMUP, ITERS = 5, 30


def median_ms(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(ITERS):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2]


def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, PyTorch SDPA anchor")
    print(
        "\n== timing: causal bf16, median of 30 (cudaEvent), FLOPs fwd = 4*B*H*T^2*D/2, "
        "fwd+bwd = 3.5x fwd =="
    )
    print(f"{'shape':<26} | {'fwd ms':>8} | {'TFLOP/s':>8} | {'fwd+bwd ms':>10} | {'TFLOP/s':>10}")
    for b, hq, hkv, t, d in SHAPES:
        # [B, H, T, D] as SDPA wants it (a transposed view of the packed [B, T, H, D] layout
        # costs the same to the kernels; contiguous here to time the kernel, not a copy).
        q = (1.5 * torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16)).requires_grad_()
        k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16).requires_grad_()
        v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16).requires_grad_()
        do = torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16)
        gqa = hq != hkv

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        def fwdbwd():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            torch.autograd.grad(o, (q, k, v), do)

        t_f = median_ms(fwd)
        t_fb = median_ms(fwdbwd)
        flops_f = 4.0 * b * hq * t * t * d / 2.0
        flops_fb = 3.5 * flops_f
        name = f"B{b} H{hq}/KV{hkv} T{t} D{d}"
        print(
            f"{name:<26} | {t_f:8.3f} | {flops_f / (t_f * 1e9):8.1f} | {t_fb:10.3f} | "
            f"{flops_fb / (t_fb * 1e9):10.1f}",
            flush=True,
        )
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
