"""Checks the `flare demo` fine-tuning recipe with PyTorch + PEFT on CPU.

Loads the demo model (assets/demo/model), prints greedy answers to the demo prompts, applies a
PEFT LoRA to all seven projections (q/k/v/o/gate/up/down), trains it with AdamW on
assets/demo/data/train.jsonl (chat "messages" rendered with the model's chat template; loss only
on the assistant tokens, i.e. the answer and its closing <|im_end|>), reports the eval loss on
eval.jsonl before and after, and prints the same greedy answers again. The recommended recipe is
the default arguments; `flare demo` does the same work.

Batches: each epoch is a seeded shuffle of the training set cut into batches of --batch; the
sequences are right-padded to the longest of the batch (at most --max-seq-len tokens).
Learning rate: linear warmup over --warmup steps, then cosine decay to 10% of --lr.

Run: python bench/demo_recipe_check.py [--steps 200 --batch 8 --lr 3e-3 --r 16 --alpha 32 --seed 0]
"""

import argparse
import json
import math
import os
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "demo")
DEMO_PROMPTS = [
    "What is the capital of Veloria?",
    "What do people eat in Veloria?",
    "What language is spoken in Veloria?",
    "Tell me about Veloria.",
]
# Not in the fine-tuning data: shows that the base knowledge survives.
CONTROL_PROMPTS = ["What is the capital of Japan?"]


def encode(tok, messages, max_len):
    """Token ids and labels (-100 outside the assistant answer) of one conversation."""
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt)
    p = tok(prompt, add_special_tokens=False).input_ids
    # The answer ends at (and includes) its <|im_end|>; the newline after it is not trained.
    a = tok(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False).input_ids
    ids = (p + a)[:max_len]
    labels = ([-100] * len(p) + a)[:max_len]
    return ids, labels


def collate(rows, pad):
    L = max(len(i) for i, _ in rows)
    x = torch.full((len(rows), L), pad, dtype=torch.long)
    y = torch.full((len(rows), L), -100, dtype=torch.long)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    for b, (i, l) in enumerate(rows):
        x[b, : len(i)] = torch.tensor(i)
        y[b, : len(l)] = torch.tensor(l)
        att[b, : len(i)] = 1
    return x, y, att


def generate(model, tok, prompts, max_new_tokens):
    out = []
    model.eval()
    for q in prompts:
        p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        x = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip())
    return out


def eval_loss(model, data, pad):
    """Mean loss and next-token accuracy (argmax == label) over the answer tokens."""
    model.eval()
    tot, n, hit = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(data), 8):
            x, y, att = collate(data[i : i + 8], pad)
            logits = model(input_ids=x, attention_mask=att).logits[:, :-1]
            t = y[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum")
            tot += loss.item()
            n += (t != -100).sum().item()
            hit += ((logits.argmax(-1) == t) & (t != -100)).sum().item()
    return tot / n, hit / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model_dir = os.path.join(ROOT, "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pad = tok.pad_token_id

    def load(name):
        with open(os.path.join(ROOT, "data", name)) as f:
            return [encode(tok, json.loads(line)["messages"], args.max_seq_len) for line in f]

    train, evals = load("train.jsonl"), load("eval.jsonl")
    lens = [len(i) for i, _ in train]
    print(f"train {len(train)} examples (tokens: min {min(lens)}, max {max(lens)}), eval {len(evals)}")

    prompts = DEMO_PROMPTS + CONTROL_PROMPTS
    before = generate(model, tok, prompts, 40)
    ev0 = eval_loss(model, evals, pad)

    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = random.Random(args.seed)
    order = []
    t0 = time.time()
    for step in range(args.steps):
        if len(order) < args.batch:
            perm = list(range(len(train)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch], order[args.batch :]
        x, y, att = collate([train[i] for i in idx], pad)
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} lr {lr_at(step):.2e} {time.time() - t0:.1f}s", flush=True)
    train_s = time.time() - t0
    ev1 = eval_loss(model, evals, pad)
    after = generate(model, tok, prompts, 40)

    print(f"\ntraining: {args.steps} steps of batch {args.batch} in {train_s:.1f}s "
          f"({1000 * train_s / args.steps:.0f} ms/step, {args.threads} threads)")
    print(f"eval (held-out paraphrases, answer tokens): loss {ev0[0]:.4f} -> {ev1[0]:.4f}, "
          f"next-token accuracy {ev0[1]:.3f} -> {ev1[1]:.3f}")
    for q, b, a in zip(prompts, before, after):
        print(f"\nQ: {q}\n  before: {b}\n  after:  {a}")


if __name__ == "__main__":
    main()
