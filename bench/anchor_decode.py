#!/usr/bin/env python3
"""Hugging Face transformers anchor for `flare bench decode`: the same model shape and rows.

Builds Qwen2ForCausalLM from the same config as flare's default (the Qwen2-0.5B shape: hidden
896, 24 layers, 14 heads, 2 KV heads, head_dim 64, intermediate 4864, vocab 151936, tied
embeddings, rope_theta 1e6) with random weights, in bf16 on CUDA, once per attention
implementation (eager and sdpa), and times:

  prefill   batch 1, --prompt-len tokens, one forward with use_cache (tokens/s)
  generate  batch 1, model.generate(greedy, min_new_tokens = max_new_tokens =
            --generate-tokens), prefill included (new tokens/s)
  decode    per --batch size: a bare loop of --new-tokens forwards of one token per row with
            the model's KV cache (DynamicCache), argmax on the device, the ids copied to the
            host each step (as flare's rows do), after an untimed prefill (tokens/s)

Each row: torch.cuda.synchronize() around the timed region, one warm-up run, median of
--repeats. Writes a JSON list of rows with flare's keys (name, batch, prompt_len, new_tokens,
tokens_per_s, ms_per_step, framework = hf-eager / hf-sdpa, device, device_name, dtype, model),
rewritten after every row so a time-out keeps what was measured.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

CONFIG = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
QUICK = dict(CONFIG, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
             max_position_embeddings=256)


def write_atomic(path, rows):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".anchor_decode.")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--generate-tokens", type=int, default=32,
                    help="new tokens of the generate row (HF generate is slow: ~13 tokens/s)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", default="eager,sdpa")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--quick", action="store_true", help="tiny config (CPU smoke test)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    cfg_dict = QUICK if args.quick else CONFIG
    prompt_len = min(args.prompt_len, 32) if args.quick else args.prompt_len
    new_tokens = min(args.new_tokens, 16) if args.quick else args.new_tokens
    gen_tokens = min(args.generate_tokens, 8) if args.quick else args.generate_tokens
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    cuda = dev.type == "cuda"
    device_name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    model_label = "qwen2 h{hidden_size} l{num_hidden_layers} heads{num_attention_heads}/{num_key_value_heads} d{head_dim} i{intermediate_size} v{vocab_size}".format(**cfg_dict)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(f):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t0

    def median_secs(f):
        f()
        return statistics.median(f() for _ in range(args.repeats))

    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)

    def prompt(b):
        return torch.randint(0, cfg_dict["vocab_size"], (b, prompt_len), generator=g).to(dev)

    for impl in [s.strip() for s in args.impl.split(",") if s.strip()]:
        config = Qwen2Config(**cfg_dict, attn_implementation=impl)
        t0 = time.perf_counter()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with dev:
            model = Qwen2ForCausalLM(config)
        torch.set_default_dtype(prev)
        model.eval()
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        print(f"[{impl}] built {model_label} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        framework = f"hf-{impl}"

        def row(name, batch, new, secs, steps):
            tokens = prompt_len if new == 0 else batch * new
            r = dict(name=name, batch=batch, prompt_len=prompt_len, new_tokens=new,
                     tokens_per_s=tokens / secs, ms_per_step=secs * 1e3 / max(steps, 1),
                     repeats=args.repeats, framework=framework, device=str(dev),
                     device_name=device_name, dtype=args.dtype, model=model_label,
                     torch_version=torch.__version__)
            rows.append(r)
            print(f"{framework:<9} {name:<9} batch {batch:>2}: {r['tokens_per_s']:10.1f} tokens/s "
                  f"({r['ms_per_step']:.3f} ms/step)", flush=True)
            if args.json:
                write_atomic(args.json, rows)

        with torch.inference_mode():
            ids = prompt(1)
            secs = median_secs(lambda: timed(lambda: model(input_ids=ids, use_cache=True)))
            row("prefill", 1, 0, secs, 1)

            for b in batches:
                ids = prompt(b)

                def run_loop():
                    out = model(input_ids=ids, use_cache=True)
                    pkv = out.past_key_values
                    nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)

                    def steps():
                        nonlocal pkv, nxt
                        for _ in range(new_tokens):
                            o = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
                            pkv = o.past_key_values
                            nxt = o.logits[:, -1, :].argmax(-1, keepdim=True)
                            nxt.tolist()  # the host read of the ids, as flare's loop does

                    return timed(steps)

                secs = median_secs(run_loop)
                row("decode", b, new_tokens, secs, new_tokens)

            ids = prompt(1)

            def run_generate():
                return timed(lambda: model.generate(
                    ids, do_sample=False, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens))

            secs = median_secs(run_generate)
            row("generate", 1, gen_tokens, secs, gen_tokens)
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
