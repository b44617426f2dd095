#!/usr/bin/env python3
"""PyTorch + PEFT anchor for `flare bench train`: the same model shape, cases and phases.

Model: transformers Qwen2ForCausalLM built from a config of the Qwen2-0.5B shape (hidden 896,
24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings, q/k/v
biases), random weights, bf16 on CUDA (f32 on CPU). PEFT LoraConfig r=16, alpha=32, dropout 0 on
all seven projections (adapter weights kept f32 as PEFT's autocast_adapter_dtype does), AdamW
(torch.optim.AdamW, fused=True on CUDA), global-norm clipping at 1.0.

Cases batch x seq: 4x512 and 8x1024 (--quick: 2 layers, 1x128 and 2x256), random token ids.
Each step is timed by phase with torch.cuda.synchronize() between phases: forward (logits),
loss (F.cross_entropy over the full-vocab logits, computed in f32 as transformers' loss does),
backward, optimizer (clip_grad_norm_ + step + zero_grad). 2 warmup steps, then 5 timed (3 with
--quick); medians. Peak memory: torch.cuda.max_memory_allocated() over the first timed step
after reset_peak_memory_stats(), weights included, in GiB.

Prints and (with --json PATH) writes rows with the keys flare's rows have: impl, device, dtype,
layers, batch, seq, tokens_per_s, peak_gib, fwd_ms, loss_ms, bwd_ms, opt_ms, step_ms.
"""

import argparse
import json
import os
import statistics
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = torch.device(args.device if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() // 2))
    quick = args.quick or not cuda
    layers = 2 if quick else 24
    cases = [(1, 128), (2, 256)] if quick else [(4, 512), (8, 1024)]
    timed = 3 if quick else 5
    dtype = torch.bfloat16 if cuda else torch.float32

    cfg = Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=dev, dtype=dtype)
    model.config.use_cache = False
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({os.cpu_count()} threads)"
    rows = []
    for b, s in cases:
        g = torch.Generator().manual_seed(b * 131 + s)
        ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g).to(dev)
        inp, tgt = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        times, peak = [], None
        for it in range(2 + timed):
            if it == 2 and cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            logits = model(input_ids=inp).logits
            sync()
            t1 = time.perf_counter()
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1))
            sync()
            t2 = time.perf_counter()
            loss.backward()
            sync()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t4 = time.perf_counter()
            del logits, loss
            if it == 2 and cuda:
                sync()
                peak = torch.cuda.max_memory_allocated() / 2**30
            if it >= 2:
                times.append([(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3, (t4 - t0) * 1e3])
        med = [statistics.median(t[k] for t in times) for k in range(5)]
        row = dict(
            impl="torch+peft", device=name, dtype=str(dtype).replace("torch.", ""), layers=layers,
            batch=b, seq=s, tokens_per_s=b * s / (med[4] / 1e3), peak_gib=peak,
            fwd_ms=med[0], loss_ms=med[1], bwd_ms=med[2], opt_ms=med[3], step_ms=med[4],
            torch_version=torch.__version__,
        )
        rows.append(row)
        pk = "-" if peak is None else f"{peak:.2f} GiB"
        print(f"{b:>2}x{s:<5} {row['tokens_per_s']:>10.0f} tok/s  peak {pk:>9}  fwd {med[0]:8.2f} ms  "
              f"loss {med[1]:7.2f} ms  bwd {med[2]:8.2f} ms  opt {med[3]:6.2f} ms  step {med[4]:8.2f} ms",
              flush=True)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".anchor_train.")
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
