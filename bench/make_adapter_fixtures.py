"""Builds the PEFT adapter fixtures of flare's adapter golden tests.

For the qwen2 and llama fixture models of `bench/make_model_fixtures.py`, a LoRA adapter
(r=4, lora_alpha=8, no dropout, all seven projections q/k/v/o/gate/up/down) is made with
`peft.get_peft_model`; PEFT initialises lora_B to zero (a no-op), so every lora_B is set to
seeded random values (and every lora_A too, for good measure) that change the output clearly.
Saved under `crates/flare/tests/fixtures/models/<arch>/adapter/`:

- `adapter_config.json`, `adapter_model.safetensors`: `PeftModel.save_pretrained` (f32);
- `reference.safetensors`: the fixture's `input_ids` [2, 7] (from the model's own
  `reference.safetensors`) and the f32 `logits` [2, 7, 256] of the model with the adapter;
- `generation.json`: `{"prompt": [...], "new_tokens": [...32 ids...]}`, the greedy continuation
  with the adapter of the prompt of the model's `generation.json` (EOS disabled).

The model weights and the model's own references are not touched.

Run after make_model_fixtures.py and make_generation_fixtures.py:
/tmp/peftvenv2/bin/python bench/make_adapter_fixtures.py (needs torch, transformers, peft).
"""

import json
import os

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "flare", "tests", "fixtures", "models")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 32


def main():
    torch.set_num_threads(1)
    for i, arch in enumerate(["qwen2", "llama"]):
        d = os.path.join(ROOT, arch)
        out = os.path.join(d, "adapter")
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None
        model.config.eos_token_id = None
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
        pm = get_peft_model(model, cfg).eval()
        gen = torch.Generator().manual_seed(1234 + i)
        n = 0
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name or "lora_A" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
                    n += 1
        assert n == 2 * 7 * model.config.num_hidden_layers, n
        pm.peft_config["default"].base_model_name_or_path = ".."
        pm.save_pretrained(out, safe_serialization=True)
        os.remove(os.path.join(out, "README.md"))  # PEFT's model card template

        ref = load_file(os.path.join(d, "reference.safetensors"))
        input_ids = ref["input_ids"]
        with torch.no_grad():
            logits = pm(input_ids=input_ids).logits.float()
            with pm.disable_adapter():
                base = pm(input_ids=input_ids).logits.float()
        rel = ((logits - base).norm() / base.norm()).item()
        assert rel > 0.05, f"{arch}: the adapter changes the logits too little ({rel})"
        save_file(
            {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
            os.path.join(out, "reference.safetensors"),
            metadata={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        )

        with open(os.path.join(d, "generation.json")) as f:
            prompt = torch.tensor([json.load(f)["prompt"]], dtype=torch.int64)
        with torch.no_grad():
            seq = pm.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                # Plain greedy whatever the fixture's generation_config.json says (the qwen2
                # one, from make_text_fixtures.py, sets a repetition penalty).
                repetition_penalty=1.0,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )
        new = seq[0, prompt.shape[1]:].tolist()
        assert len(new) == NEW_TOKENS, (arch, len(new))
        with open(os.path.join(out, "generation.json"), "w") as f:
            json.dump({"prompt": prompt[0].tolist(), "new_tokens": new}, f)
            f.write("\n")
        print(arch, "adapter logits rel change", round(rel, 3), "greedy", new)


if __name__ == "__main__":
    main()
