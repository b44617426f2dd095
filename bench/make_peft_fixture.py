#!/usr/bin/env python3
"""Writes the PEFT reference fixture that flare's `tests/it/peft.rs` reads.

Needs torch, peft and safetensors (CPU is enough):

    pip install torch peft safetensors
    python3 bench/make_peft_fixture.py            # writes crates/flare/tests/fixtures/peft/
    python3 bench/make_peft_fixture.py --out DIR

It builds a tiny float32 model whose Linear modules sit at Llama/Qwen2-style paths

    model.layers.0.self_attn.q_proj   24 -> 32, with bias   (targeted)
    model.layers.0.self_attn.k_proj   24 -> 16, with bias   (not targeted)
    model.layers.0.self_attn.v_proj   24 -> 16, with bias   (targeted)
    model.layers.0.mlp.down_proj      24 -> 32, no bias     (targeted)

wraps it with `peft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, ...))`, sets every
lora_B to random values (PEFT initialises B to zero, which would make the adapter a no-op), and
writes, all float32:

    adapter_config.json, adapter_model.safetensors   PeftModel.save_pretrained(out)
    base.safetensors       the base weights: "<module path>.weight" and "<module path>.bias"
    reference.safetensors  "x" [5, 24] and, per targeted module, "<module path>.y" = the
                           PEFT-wrapped module applied to x (base + LoRA), with the torch and
                           peft versions in its metadata

Everything is seeded, so a rerun with the same torch/peft versions writes the same numbers.
"""

import argparse
import json
import os
import sys

import torch
from torch import nn

IN = 24
ROWS = 5
R = 4
ALPHA = 8
SEED = 0
TARGETS = ["q_proj", "v_proj", "down_proj"]
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "crates", "flare", "tests", "fixtures", "peft"
)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(IN, 32, bias=True)
        self.k_proj = nn.Linear(IN, 16, bias=True)
        self.v_proj = nn.Linear(IN, 16, bias=True)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_proj = nn.Linear(IN, 32, bias=False)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = Mlp()


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer()])


class Tiny(nn.Module):
    """Module tree only; the fixture calls the Linear modules one by one."""

    def __init__(self):
        super().__init__()
        self.model = Inner()

    def forward(self, x):
        a = self.model.layers[0].self_attn
        return a.q_proj(x), a.k_proj(x), a.v_proj(x), self.model.layers[0].mlp.down_proj(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    args = ap.parse_args()

    import peft
    import safetensors
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)

    model = Tiny().float().eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    base = {}
    for name, m in linears.items():
        base[f"{name}.weight"] = m.weight.detach().clone().contiguous()
        if m.bias is not None:
            base[f"{name}.bias"] = m.bias.detach().clone().contiguous()
    targeted = sorted(n for n in linears if n.rsplit(".", 1)[-1] in TARGETS)

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, bias="none")
    pm = get_peft_model(model, config)
    pm.eval()
    with torch.no_grad():
        n_b = 0
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
                n_b += 1
        assert n_b == len(targeted), f"expected {len(targeted)} lora_B, found {n_b}"

        x = torch.randn(ROWS, IN, dtype=torch.float32)
        reference = {"x": x.contiguous()}
        for name in targeted:
            wrapped = pm.get_submodule(f"base_model.model.{name}")
            y = wrapped(x)
            plain = torch.nn.functional.linear(x, base[f"{name}.weight"], base.get(f"{name}.bias"))
            rel = ((y - plain).norm() / y.norm()).item()
            assert rel > 1e-2, f"{name}: the adapter barely changes the output ({rel:.2e})"
            reference[f"{name}.y"] = y.detach().contiguous()

    pm.save_pretrained(out)
    # save_pretrained may add a model card; the fixture does not need it.
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    save_file(base, os.path.join(out, "base.safetensors"), metadata={"format": "pt"})
    save_file(
        reference,
        os.path.join(out, "reference.safetensors"),
        metadata={
            "format": "pt",
            "torch": torch.__version__,
            "peft": peft.__version__,
            "safetensors": safetensors.__version__,
            "scaling": str(ALPHA / R),
        },
    )

    from safetensors import safe_open

    total = 0
    print(f"wrote {out} (torch {torch.__version__}, peft {peft.__version__})")
    for f in sorted(os.listdir(out)):
        path = os.path.join(out, f)
        size = os.path.getsize(path)
        total += size
        print(f"  {f:28s} {size:7d} bytes")
        if f.endswith(".safetensors"):
            with safe_open(path, framework="pt") as st:
                for k in sorted(st.keys()):
                    t = st.get_tensor(k)
                    print(f"      {k:60s} {str(t.dtype):14s} {list(t.shape)}")
        elif f.endswith(".json"):
            with open(path) as fh:
                cfg = json.load(fh)
            keys = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias")
            print("      " + ", ".join(f"{k}={cfg.get(k)!r}" for k in keys))
    print(f"  total {total} bytes")
    if total > 100_000:
        print("error: the fixture is over 100 KB", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
