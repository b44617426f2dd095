"""Builds the golden greedy continuations of flare's generation tests.

For each fixture model of `bench/make_model_fixtures.py` (qwen2, llama, mistral, under
`crates/flare/tests/fixtures/models/<arch>/`), the model is loaded in f32 and HF's greedy
continuation of 32 new tokens from a fixed prompt (the first row of the fixture's
`reference.safetensors` `input_ids`, 7 tokens) is saved as `generation.json`:
`{"prompt": [...], "new_tokens": [...32 ids...]}`. EOS is disabled so that all 32 tokens come
out.

Run after make_model_fixtures.py: python bench/make_generation_fixtures.py
(needs torch, transformers, safetensors).
"""

import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "flare", "tests", "fixtures", "models")
NEW_TOKENS = 32


def main():
    for arch in ["qwen2", "llama", "mistral"]:
        d = os.path.join(ROOT, arch)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        # No EOS at all (not a suppressed one, which would change the greedy choice).
        model.generation_config.eos_token_id = None
        model.config.eos_token_id = None
        prompt = load_file(os.path.join(d, "reference.safetensors"))["input_ids"][0:1]
        with torch.no_grad():
            out = model.generate(
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
        new = out[0, prompt.shape[1]:].tolist()
        assert len(new) == NEW_TOKENS, (arch, len(new))
        with open(os.path.join(d, "generation.json"), "w") as f:
            json.dump({"prompt": prompt[0].tolist(), "new_tokens": new}, f)
            f.write("\n")
        print(arch, new)


if __name__ == "__main__":
    main()
