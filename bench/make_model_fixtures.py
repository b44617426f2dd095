"""Builds the tiny random transformer fixtures of flare's model tests.

For each architecture, a model with hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128
and vocab 256 is created from a fixed seed and saved with `save_pretrained(safe_serialization=True)`
into `crates/flare/tests/fixtures/models/<arch>/`, next to `reference.safetensors` holding fixed
`input_ids` [2, 7] (i64) and the model's f32 `logits` [2, 7, 256]. The weights are rounded to
bf16 and stored in bf16 (to keep each directory small); the logits are computed in f32 from
those rounded weights, so loading the files in f32 reproduces them.

- qwen2: q/k/v bias, tied embeddings.
- llama: llama3 rope scaling, untied lm_head.
- mistral: sliding window of 4 (shorter than the 7 reference tokens), untied lm_head.

Run: python bench/make_model_fixtures.py (needs torch, transformers, safetensors).
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "flare", "tests", "fixtures", "models")

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def build(arch):
    if arch == "qwen2":
        cfg = Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=True)
        return Qwen2ForCausalLM(cfg)
    if arch == "llama":
        cfg = LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
        return LlamaForCausalLM(cfg)
    if arch == "mistral":
        # A window shorter than the reference sequence, so that it matters.
        cfg = MistralConfig(**COMMON, rope_theta=10000.0, sliding_window=4, tie_word_embeddings=False)
        cfg._attn_implementation = "eager"
        return MistralForCausalLM(cfg)
    raise ValueError(arch)


def main():
    for i, arch in enumerate(["qwen2", "llama", "mistral"]):
        torch.manual_seed(1234 + i)
        model = build(arch).float().eval()
        # Random init gives tiny weights; widen them so that the logits are not all near zero and
        # the attention is not uniform (a real test of RoPE and the mask).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
            # Round the weights to bf16 once: the files are stored in bf16 (half the size) and
            # the f32 reference is computed from exactly those weights.
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        out = os.path.join(ROOT, arch)
        os.makedirs(out, exist_ok=True)
        gen = torch.Generator().manual_seed(99 + i)
        input_ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=gen, dtype=torch.int64)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        save_file(
            {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
            os.path.join(out, "reference.safetensors"),
        )
        # generation_config.json is not needed by the tests.
        gc = os.path.join(out, "generation_config.json")
        if os.path.exists(gc):
            os.remove(gc)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(arch, out, f"{size} bytes", json.load(open(os.path.join(out, "config.json"))).get("architectures"))


if __name__ == "__main__":
    main()
