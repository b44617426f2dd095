#!/usr/bin/env python3
"""Peak memory of `flare merge` on a synthetic sharded model (Linux, CPU, no download).

Writes a Llama-shaped bf16 model in four shards with `model.safetensors.index.json` (constant
weights: the merge's memory does not depend on their values) and an r=16 PEFT adapter on all
seven projections, then runs each `flare` binary given (alternated, --repeats times) merging
them, sampling the process's /proc status every 10 ms: peak RssAnon (heap: what the merge
allocates) and peak RssFile (the mapped input shards, page cache the kernel may reclaim).

Run: python bench/merge_memory.py --flare target/release/flare [--flare OTHER_BUILD] \
         [--hidden 2048 --inter 5632 --layers 8 --vocab 32000] [--dir /tmp/flare-merge-memory]
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_safetensors(path, tensors, dtype, fill):
    """tensors: [(name, shape)]; every element is the bytes `fill`."""
    size = len(fill)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n * size]}
        off += n * size
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape in tensors:
            n = 1
            for d in shape:
                n *= d
            f.write(fill * n)
    return off


def make_model(d, hidden, inter, layers, vocab, kv):
    os.makedirs(os.path.join(d, "adapter"), exist_ok=True)
    shapes = {
        "self_attn.q_proj": [hidden, hidden],
        "self_attn.k_proj": [kv, hidden],
        "self_attn.v_proj": [kv, hidden],
        "self_attn.o_proj": [hidden, hidden],
        "mlp.gate_proj": [inter, hidden],
        "mlp.up_proj": [inter, hidden],
        "mlp.down_proj": [hidden, inter],
    }
    tensors = [
        ("model.embed_tokens.weight", [vocab, hidden]),
        ("lm_head.weight", [vocab, hidden]),
        ("model.norm.weight", [hidden]),
    ]
    for layer in range(layers):
        for k, s in shapes.items():
            tensors.append((f"model.layers.{layer}.{k}.weight", s))
        for norm in ["input_layernorm", "post_attention_layernorm"]:
            tensors.append((f"model.layers.{layer}.{norm}.weight", [hidden]))
    weight_map, total = {}, 0
    for i in range(4):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        part = tensors[i::4]
        total += write_safetensors(os.path.join(d, name), part, "BF16", b"\x80\x3c")
        weight_map.update({t: name for t, _ in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": kv // 128,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    lora = []
    for layer in range(layers):
        for k, (o, i) in shapes.items():
            p = f"base_model.model.model.layers.{layer}.{k}"
            lora += [(p + ".lora_A.weight", [16, i]), (p + ".lora_B.weight", [o, 16])]
    write_safetensors(
        os.path.join(d, "adapter", "adapter_model.safetensors"), lora, "F32", struct.pack("<f", 0.01)
    )
    with open(os.path.join(d, "adapter", "adapter_config.json"), "w") as f:
        json.dump(
            {
                "peft_type": "LORA",
                "r": 16,
                "lora_alpha": 32,
                "target_modules": PROJ,
                "task_type": "CAUSAL_LM",
                "fan_in_fan_out": False,
                "bias": "none",
            },
            f,
        )
    return total


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_merge(flare, model, out):
    shutil.rmtree(out, ignore_errors=True)
    cmd = [flare, "merge", "--model", model, "--adapter", os.path.join(model, "adapter"), "--out", out]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = file_ = 0
    while p.poll() is None:
        anon = max(anon, status_kib(p.pid, "RssAnon"))
        file_ = max(file_, status_kib(p.pid, "RssFile"))
        time.sleep(0.01)
    err = p.stderr.read()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err}")
    return anon / 1024, file_ / 1024, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flare", action="append", required=True, help="a flare binary (repeatable)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv", type=int, default=512, help="k/v projection rows")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/flare-merge-memory")
    a = ap.parse_args()
    model = os.path.join(a.dir, "model")
    shutil.rmtree(a.dir, ignore_errors=True)
    total = make_model(model, a.hidden, a.inter, a.layers, a.vocab, a.kv)
    print(f"model: {total / 2**20:.0f} MiB of bf16 weights in 4 shards, r=16 on all 7 projections")
    for r in range(a.repeats):
        for flare in a.flare:
            anon, file_, secs = peak_merge(flare, model, os.path.join(a.dir, "out"))
            print(f"{flare}: peak RssAnon {anon:.0f} MiB, peak RssFile {file_:.0f} MiB, {secs:.1f} s")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
