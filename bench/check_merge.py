#!/usr/bin/env python3
"""Checks a model directory written by `flare merge` against PEFT.

Loads the base model with the adapter through PEFT and merges it (`merge_and_unload`), loads the
merged directory with `AutoModelForCausalLM`, runs both on the same token ids and compares the
logits. Exits non-zero if the merged directory does not load or the logits differ by more than
--tol (max abs difference relative to the logits' max abs value).

Run: python bench/check_merge.py --model BASE_DIR --adapter ADAPTER_DIR --merged MERGED_DIR
"""

import argparse
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--merged", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, args.adapter).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    vocab = ref.config.vocab_size
    ids = torch.randint(0, vocab, (2, 17))
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()(input_ids=ids).logits
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item() / max(scale, 1e-12)
    moved = (a - plain).abs().max().item() / max(scale, 1e-12)
    print(f"merged vs PEFT merge_and_unload: max |diff| / max |logit| = {diff:.3e} (tol {args.tol:g}); "
          f"the adapter moves the logits by {moved:.3e}")
    if not diff <= args.tol:
        print("FAIL: the merged model's logits differ from PEFT's")
        return 1
    if moved <= 10 * args.tol:
        print("FAIL: the adapter does not change the logits, the check would prove nothing")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
