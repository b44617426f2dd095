#!/usr/bin/env python3
"""PyTorch + PEFT anchor for `flare bench train`: the same model shapes, cases, phases and keys.

Model: a transformers causal LM built from a config (`--config`): a preset or a path to an HF
config.json. Presets (the HF shapes, random weights; the table is bench/model_presets.json, which
`flare bench train --config` reads too):
  qwen2-0.5b    hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936,
                tied embeddings, q/k/v biases, rope_theta 1e6 (the default, as before)
  llama-3.1-8b  hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256,
                untied, rope_theta 5e5 (llama3 rope scaling), max_position_embeddings 131072
  qwen2.5-7b    hidden 3584, 28 layers, 28 heads / 4 KV heads, intermediate 18944, vocab 152064,
                untied, q/k/v biases, rope_theta 1e6
Built on the device under a bf16 default dtype (f32 on CPU), SDPA attention, use_cache off.
PEFT LoraConfig r=16, alpha=32, dropout 0 on all seven projections, adapter weights f32 (as
PEFT's autocast_adapter_dtype does); torch.optim.AdamW (fused=True on CUDA); global-norm clipping
at 1.0. Random token ids; the model reads ids[:, :S] and predicts ids[:, 1:S+1].

Implementations (`--impl`, comma-separated; each one also with and without gradient
checkpointing when `--gradient-checkpointing both`):
  eager    PEFT on the plain transformers model                          -> impl "peft-eager"
  liger    + Liger-Kernel: apply_liger_kernel_to_<llama|qwen2|...>(rope, rms_norm, swiglu,
           fused_linear_cross_entropy) on the model instance before PEFT  -> impl "peft-liger"
  compile  torch.compile(PEFT model), default mode                        -> impl "peft-compile"
Gradient checkpointing: model.gradient_checkpointing_enable(use_reentrant=False) and
model.enable_input_require_grads(), before PEFT (grad_ckpt true in the row).

Phases, each timed with torch.cuda.synchronize() between them: forward (logits), loss
(F.cross_entropy over the full-vocab logits in f32, as transformers' loss does), backward,
optimizer (clip_grad_norm_ + step + zero_grad). With Liger's fused linear cross-entropy the loss
is computed inside the model's forward (model(input_ids, labels=...)): the logits are never
materialised, so there is no separate loss phase: fwd_ms holds forward + loss, loss_ms is null
and fwd_includes_loss is true (compare fwd_ms + loss_ms of the other rows with it). Liger's
labels= path shifts internally, so its loss covers S-1 tokens per row (S for the others): a
difference of one lm_head row per sequence.

Steps: warm-up steps, then timed steps; the row reports the mean of the timed steps (step_ms and
the phases; step_ms_median too). Defaults: models over 2e9 frozen parameters 1 warm-up + 3
timed, smaller ones 2 + 5, `--quick` 2 + 3 (`--warmup`, `--steps` override); torch.compile rows
get one more warm-up step (a new shape recompiles). first_step_s is the first warm-up step's
time (for torch.compile, mostly compilation). Peak memory: torch.cuda.max_memory_allocated() over
the timed steps after reset_peak_memory_stats(), weights included, in GiB.

MFU (the same formula as `flare bench train`, crates/flare-cli/src/bench/presets.rs: keep the two
identical; its test pins the numbers this file's flops_per_token gives): model FLOPs per trained
token
    F = 4 * N_frozen + 6 * N_lora + 6 * S * L * H * d_head
  N_frozen: the frozen base's matmul weights, per layer D*(H*dh) + 2*D*(KV*dh) + (H*dh)*D
            + 3*D*I, plus the LM head D*V (counted even when tied; embeddings' lookup and
            norms/biases are not counted): 2*N_frozen forward + 2*N_frozen for the input
            gradient in the backward (the frozen base gets no weight gradient).
  N_lora:   the LoRA factors, r*(in+out) per adapted projection: 2 forward + 2 input gradient
            + 2 weight gradient.
  attention (causal): QK^T and PV are 4*S*(H*dh) FLOPs per token and layer in full, /2 causal
            = 2*S*L*H*dh forward, x3 for forward + backward.
  Gradient-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs).
  mfu = F * tokens_per_s / peak, peak = the GPU's dense bf16 peak: H100 SXM / H200 989.4
  TFLOP/s, H100 PCIe 756, H100 NVL 835, A100 312 (from torch.cuda.get_device_name;
  `--peak-tflops` overrides; unknown GPU or CPU: mfu null).

`--max-context`: batch 1, the longest sequence that runs one training step, per configuration:
doubling from `--max-context-start` (default 4096) until a step fails with out-of-memory (or
`--max-context-limit`), then bisection between the longest that ran and the shortest that did
not, down to `--max-context-granularity` (default 1024); every try frees the memory of the last
(gc + empty_cache). Each try is one step (its time and peak are in the row's `tries`); then the
longest that ran is measured like a shape row (warm-up + timed steps; if that fails, the next
longest that ran). `--max-context-budget-s` stops the bisection early (the row says so in
`search`). Without `--shapes`, `--max-context` runs only the search.

One configuration (impl x checkpointing) that cannot be built -- liger_kernel not importable,
an error in torch.compile -- gives rows with status "missing: liger_kernel" / "error: ...";
a shape that runs out of memory gives a row with status "oom"; the script goes on either way.

Prints and (with --json PATH) writes rows with the keys flare's rows have: impl, device, dtype,
layers, batch, seq, tokens_per_s, peak_gib, fwd_ms, loss_ms, bwd_ms, opt_ms, step_ms; and model,
grad_ckpt, mfu, status, flops_per_token, peak_tflops, tflops, warmup, steps, first_step_s,
fwd_includes_loss, max_context (true on the search's row), library versions.

Liger-Kernel on the GPU machine travels as a wheel (bench/fetch_wheels.sh puts it in .whl/):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16

# The presets: one table, bench/model_presets.json, that `flare bench train` compiles in too
# (crates/flare-cli/src/bench/presets.rs), so both sides train the same shapes.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_presets.json")) as _f:
    PRESETS = json.load(_f)

IMPLS = {"eager": "peft-eager", "liger": "peft-liger", "compile": "peft-compile"}

# Dense bf16 tensor-core peaks, TFLOP/s (no sparsity), matched against get_device_name().
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4),
         ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0)]


def load_config_dict(spec):
    """A preset's dict, or a config.json's (a path to the file or to its folder)."""
    if spec in PRESETS:
        return spec, dict(PRESETS[spec])
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise SystemExit(f"--config {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
    with open(path) as f:
        d = json.load(f)
    if "model_type" not in d:
        raise SystemExit(f"{path}: no model_type")
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path, d


def shape_numbers(d):
    """(D, L, H, KV, dh, I, V) from a config dict."""
    D = d["hidden_size"]
    H = d["num_attention_heads"]
    KV = d.get("num_key_value_heads") or H
    dh = d.get("head_dim") or D // H
    return D, d["num_hidden_layers"], H, KV, dh, d["intermediate_size"], d["vocab_size"]


def param_counts(d, r=LORA_R):
    """(N_frozen matmul weights incl. the LM head, N_lora) as in the docstring."""
    D, L, H, KV, dh, I, V = shape_numbers(d)
    per_layer = D * H * dh + 2 * D * KV * dh + H * dh * D + 3 * D * I
    lora_layer = r * ((D + H * dh) + 2 * (D + KV * dh) + (H * dh + D) + 3 * (D + I))
    return L * per_layer + D * V, L * lora_layer


def flops_per_token(d, seq, r=LORA_R):
    """Model FLOPs per trained token for LoRA training (see the module docstring)."""
    D, L, H, KV, dh, I, V = shape_numbers(d)
    n_frozen, n_lora = param_counts(d, r)
    return 4 * n_frozen + 6 * n_lora + 6 * seq * L * H * dh


def peak_tflops_for(name):
    for key, v in PEAKS:
        if key in name:
            return v
    return None


def parse_shapes(s):
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if not part:
            continue
        b, _, t = part.partition("x")
        try:
            out.append((int(b), int(t)))
        except ValueError:
            raise SystemExit(f"--shapes: {part!r} is not BxS")
    return out


def is_oom(e):
    import torch
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    m = str(e).lower()
    return "out of memory" in m or "cuda_error_out_of_memory" in m


def free_memory(cuda):
    import torch
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class ModulePatchGuard:
    """Undoes Liger's module-level patches (apply_rotary_pos_emb, the RMSNorm / MLP classes,
    the CausalLM class's forward) when the configuration is done, so that the later eager and
    compile configurations in the same process run the plain transformers code."""

    def __init__(self, model_type):
        import importlib
        self.saved = []
        try:
            mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            return
        self.saved.append((mod, dict(vars(mod))))
        for v in list(vars(mod).values()):
            if isinstance(v, type) and v.__module__ == mod.__name__ and "forward" in vars(v):
                self.saved.append((v, {"forward": vars(v)["forward"]}))
        try:
            from transformers.loss import loss_utils
            self.saved.append((loss_utils.nn.functional, {
                "cross_entropy": loss_utils.nn.functional.cross_entropy}))
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for obj, d in self.saved:
            for k, v in d.items():
                if getattr(obj, k, None) is not v:
                    setattr(obj, k, v)
        return False


class Config:
    """One configuration: an implementation with or without gradient checkpointing."""

    def __init__(self, impl, ckpt):
        self.impl, self.ckpt = impl, ckpt

    @property
    def label(self):
        return IMPLS[self.impl] + (" +ckpt" if self.ckpt else "")


def build(cfgd, conf, dev, dtype):
    """Model (PEFT-wrapped, maybe compiled), the callable step pieces and the optimizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfgd)
    mt = d.pop("model_type")
    d.pop("architectures", None)
    for k in ("torch_dtype", "dtype", "transformers_version", "auto_map", "quantization_config"):
        d.pop(k, None)
    hf = AutoConfig.for_model(mt, **d)
    hf.use_cache = False
    liger = None
    if conf.impl == "liger":
        try:
            import liger_kernel  # noqa: F401
            from liger_kernel.transformers import monkey_patch as lmp
        except ImportError as e:
            raise MissingPackage("liger_kernel") from e
        liger = getattr(lmp, f"apply_liger_kernel_to_{mt}", None)
        if liger is None:
            raise MissingPackage(f"liger_kernel support for {mt}")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    if any(p.dtype != dtype for p in model.parameters()):  # buffers (rope inv_freq) stay f32
        model.to(dtype=dtype)
    model.config.use_cache = False
    if liger is not None:
        liger(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
              fused_linear_cross_entropy=True, model=model)
    if conf.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=LORA_R, lora_alpha=32, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=dev.type == "cuda")
    run = torch.compile(model) if conf.impl == "compile" else model
    return model, run, params, opt, sum(p.numel() for p in params)


class MissingPackage(Exception):
    pass


def train_step(run, params, opt, ids, fused_loss, sync):
    """One step; returns (fwd, loss, bwd, opt, total) in ms (loss None with a fused loss)."""
    import torch
    import torch.nn.functional as F
    s = ids.shape[1] - 1
    inp = ids[:, :s]
    sync()
    t0 = time.perf_counter()
    if fused_loss:
        loss = run(input_ids=inp, labels=inp).loss
        sync()
        t1 = t2 = time.perf_counter()
    else:
        logits = run(input_ids=inp).logits
        sync()
        t1 = time.perf_counter()
        tgt = ids[:, 1:]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.reshape(-1))
        sync()
        t2 = time.perf_counter()
        del logits
    loss.backward()
    sync()
    t3 = time.perf_counter()
    del loss
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t4 = time.perf_counter()
    return [(t1 - t0) * 1e3, None if fused_loss else (t2 - t1) * 1e3, (t3 - t2) * 1e3,
            (t4 - t3) * 1e3, (t4 - t0) * 1e3]


def make_ids(vocab, b, s, dev):
    import torch
    g = torch.Generator().manual_seed(b * 131 + s)
    return torch.randint(0, vocab, (b, s + 1), generator=g).to(dev)


def measure(run, params, opt, vocab, b, s, warmup, steps, fused_loss, cuda, dev):
    """Warm-up + timed steps: (mean phases, median step, peak GiB, first step s)."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    ids = make_ids(vocab, b, s, dev)
    times, peak, first = [], None, None
    for it in range(warmup + steps):
        if it == warmup and cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        t = train_step(run, params, opt, ids, fused_loss, sync)
        if it == 0:
            first = t[4] / 1e3
        if it >= warmup:
            times.append(t)
    if cuda:
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**30
    mean = [None if times[0][k] is None else statistics.fmean(t[k] for t in times) for k in range(5)]
    return mean, statistics.median(t[4] for t in times), peak, first


def one_step_try(run, params, opt, vocab, s, fused_loss, cuda, dev):
    """One batch-1 step at length s: ("ok", step s, peak GiB) or ("oom", None, None)."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    status, secs, peak = "ok", None, None
    try:
        ids = make_ids(vocab, 1, s, dev)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        t = train_step(run, params, opt, ids, fused_loss, sync)
        secs = t[4] / 1e3
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
        del ids
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        status = "oom"
    if status != "ok":
        opt.zero_grad(set_to_none=True)
    free_memory(cuda)
    return status, secs, peak


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Without arguments: Qwen2-0.5B shape, 4x512 and 8x1024, PEFT eager (as before).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="2 layers, 1x128 and 2x256 (the default on CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--config", default="qwen2-0.5b",
                    help=f"a preset ({', '.join(PRESETS)}) or an HF config.json (default qwen2-0.5b)")
    ap.add_argument("--shapes", metavar="BxS,...",
                    help="batch x seq cases (default 4x512,8x1024 for qwen2-0.5b, 1x4096,4x4096 "
                         "for the 7-8B presets; none with --max-context)")
    ap.add_argument("--impl", default="eager",
                    help="comma-separated: eager, liger, compile (default eager)")
    ap.add_argument("--gradient-checkpointing", nargs="?", const="on", default="off",
                    choices=["off", "on", "both"],
                    help="off (default), on (the bare flag), or both (each impl twice)")
    ap.add_argument("--max-context", action="store_true",
                    help="batch 1: search the longest sequence that fits (doubling, bisection)")
    ap.add_argument("--max-context-start", type=int, default=4096)
    ap.add_argument("--max-context-granularity", type=int, default=1024)
    ap.add_argument("--max-context-limit", type=int, default=1 << 20)
    ap.add_argument("--max-context-budget-s", type=float, default=None,
                    help="stop the bisection after this many seconds of search")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per shape")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per shape")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak for MFU (default: from the device name)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--expandable-segments", action="store_true",
                    help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (off by default)")
    args = ap.parse_args()

    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"--impl: {i!r} is not one of {', '.join(IMPLS)}")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    confs = [Config(i, c) for i in impls for c in ckpts]
    model_name, cfgd = load_config_dict(args.config)
    if args.expandable_segments:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

    import torch

    dev = torch.device(args.device if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    quick = args.quick or not cuda
    big = param_counts(cfgd)[0] > 2e9  # the full model's size decides the step counts
    if quick:
        cfgd["num_hidden_layers"] = 2
    if args.layers:
        cfgd["num_hidden_layers"] = args.layers
    layers = cfgd["num_hidden_layers"]
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.shapes:
        cases = parse_shapes(args.shapes)
    elif args.max_context:
        cases = []
    elif quick:
        cases = [(1, 128), (2, 256)]
    elif big:
        cases = [(1, 4096), (4, 4096)]
    else:
        cases = [(4, 512), (8, 1024)]
    warmup = args.warmup if args.warmup is not None else (2 if quick or not big else 1)
    steps = args.steps if args.steps is not None else (3 if quick else (3 if big else 5))

    name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({os.cpu_count()} threads)"
    peak_tf = args.peak_tflops if args.peak_tflops else (peak_tflops_for(name) if cuda else None)
    versions = {"torch_version": torch.__version__}
    for mod in ("transformers", "peft", "liger_kernel"):
        try:
            m = __import__(mod)
            versions[f"{mod}_version"] = getattr(m, "__version__", None)
        except Exception:  # noqa: BLE001
            versions[f"{mod}_version"] = None
    if versions["liger_kernel_version"] is None:
        try:
            from importlib.metadata import version
            versions["liger_kernel_version"] = version("liger-kernel")
        except Exception:  # noqa: BLE001
            pass
    n_frozen, n_lora = param_counts(cfgd)
    print(f"{model_name}: {layers} layers, {n_frozen / 1e9:.3f}B frozen matmul weights, "
          f"{n_lora / 1e6:.1f}M LoRA; {name}, peak {peak_tf} TFLOP/s; "
          f"warm-up {warmup}, timed {steps} (mean)", flush=True)

    def row(conf, b, s, status, **kw):
        r = dict(
            impl=IMPLS[conf.impl], device=name, dtype=str(dtype).replace("torch.", ""),
            layers=layers, batch=b, seq=s, tokens_per_s=None, peak_gib=None, fwd_ms=None,
            loss_ms=None, bwd_ms=None, opt_ms=None, step_ms=None, model=model_name,
            grad_ckpt=conf.ckpt, mfu=None, status=status,
            flops_per_token=flops_per_token(cfgd, s), peak_tflops=peak_tf, tflops=None,
            warmup=None, steps=None, first_step_s=None,
            fwd_includes_loss=conf.impl == "liger", max_context=False, lora_params=None,
            alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        )
        r.update(versions)
        r.update(kw)
        return r

    def timed_row(conf, b, s, mean, med, peak, first, w, n, nlora):
        tps = b * s / (mean[4] / 1e3)
        tf = flops_per_token(cfgd, s) * tps / 1e12
        return row(conf, b, s, "ok", tokens_per_s=tps, peak_gib=peak, fwd_ms=mean[0],
                   loss_ms=mean[1], bwd_ms=mean[2], opt_ms=mean[3], step_ms=mean[4],
                   step_ms_median=med, tflops=tf, mfu=(tf / peak_tf if peak_tf else None),
                   warmup=w, steps=n, first_step_s=first, lora_params=nlora)

    def show(r):
        tag = f"{r['impl']}{' +ckpt' if r['grad_ckpt'] else ''}"
        shape = f"{r['batch']:>2}x{r['seq']:<6}"
        if r["status"] != "ok":
            print(f"{tag:<20} {shape} {r['status']}", flush=True)
            return
        pk = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        loss = "(in fwd)" if r["loss_ms"] is None else f"{r['loss_ms']:.2f} ms"
        print(f"{tag:<20} {shape} {r['tokens_per_s']:>9.0f} tok/s  MFU {mfu:>6}  peak {pk:>10}  "
              f"fwd {r['fwd_ms']:8.2f} ms  loss {loss:>10}  bwd {r['bwd_ms']:8.2f} ms  "
              f"opt {r['opt_ms']:6.2f} ms  step {r['step_ms']:8.2f} ms  "
              f"(first step {r['first_step_s']:.1f} s)", flush=True)

    rows = []

    def emit(r):
        rows.append(r)
        show(r)
        if args.json:
            write_json(args.json, rows)

    for conf in confs:
        fused = conf.impl == "liger"
        w = warmup + (1 if conf.impl == "compile" else 0)
        model = run = params = opt = None
        guard = ModulePatchGuard(cfgd["model_type"]) if conf.impl == "liger" else None
        try:
            if guard:
                guard.__enter__()
            try:
                t0 = time.perf_counter()
                model, run, params, opt, nlora = build(cfgd, conf, dev, dtype)
                print(f"--- {conf.label}: built in {time.perf_counter() - t0:.1f} s, "
                      f"{nlora / 1e6:.1f}M trainable", flush=True)
            except MissingPackage as e:
                for b, s in cases or [(1, 0)]:
                    emit(row(conf, b, s, f"missing: {e}", max_context=args.max_context and not cases))
                continue
            except Exception as e:  # noqa: BLE001
                st = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
                for b, s in cases or [(1, 0)]:
                    emit(row(conf, b, s, st))
                continue
            for b, s in cases:
                res, st = None, None
                try:
                    res = measure(run, params, opt, cfgd["vocab_size"], b, s, w, steps, fused,
                                  cuda, dev)
                except Exception as e:  # noqa: BLE001
                    st = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
                if res is None:
                    opt.zero_grad(set_to_none=True)
                    emit(row(conf, b, s, st, lora_params=nlora))
                else:
                    emit(timed_row(conf, b, s, *res, w, steps, nlora))
                free_memory(cuda)
            if args.max_context:
                emit(max_context(args, conf, run, params, opt, cfgd, fused, cuda, dev, w, steps,
                                 nlora, row, timed_row))
        finally:
            del model, run, params, opt
            if conf.impl == "compile":
                try:
                    torch._dynamo.reset()
                except Exception:  # noqa: BLE001
                    pass
            if guard:
                guard.__exit__(None, None, None)
            free_memory(cuda)
    if args.json:
        write_json(args.json, rows)


def max_context(args, conf, run, params, opt, cfgd, fused, cuda, dev, w, steps, nlora, row,
                timed_row):
    """Doubling then bisection for the longest batch-1 sequence; the row for the longest."""
    vocab = cfgd["vocab_size"]
    g = max(1, args.max_context_granularity)
    limit = args.max_context_limit
    tries = {}
    t_start = time.perf_counter()

    def attempt(s):
        try:
            st, secs, peak = one_step_try(run, params, opt, vocab, s, fused, cuda, dev)
        except Exception as e:  # noqa: BLE001
            st, secs, peak = f"error: {type(e).__name__}: {str(e)[:200]}", None, None
            free_memory(cuda)
        tries[s] = (st, secs, peak)
        tps = f"{s / secs:.0f} tok/s" if secs else "-"
        pk = f"{peak:.2f} GiB" if peak is not None else "-"
        print(f"    max-context try {s:>8}: {st:<5} {tps:>13}  peak {pk}", flush=True)
        return st

    good, bad = 0, None
    s = min(max(g, args.max_context_start), limit)
    while True:  # doubling
        st = attempt(s)
        if st == "ok":
            good = s
            if s >= limit:
                break
            s = min(2 * s, limit)
        elif st == "oom":
            bad = s
            break
        else:
            return row(conf, 1, s, st, max_context=True, tries=_tries(tries))
    search = "complete" if bad is not None else f"reached --max-context-limit {limit}"
    if bad is not None:  # bisection on multiples of g
        while bad - good > g:
            if args.max_context_budget_s and time.perf_counter() - t_start > args.max_context_budget_s:
                search = f"stopped by --max-context-budget-s: between {good} and {bad}"
                break
            mid = (good + bad) // 2 // g * g
            if mid <= good:
                mid = good + g
            if mid >= bad:
                break
            st = attempt(mid)
            if st == "ok":
                good = mid
            elif st == "oom":
                bad = mid
            else:
                break
    search_s = time.perf_counter() - t_start
    print(f"    max-context: longest that ran {good}, shortest that did not {bad} "
          f"({search_s:.0f} s of search, {search})", flush=True)
    if good == 0:
        return row(conf, 1, 0, "oom", max_context=True, tries=_tries(tries),
                   search=search, first_oom=bad)
    # Measure the longest that ran; if that no longer fits, the next longest that ran.
    oks = sorted((k for k, v in tries.items() if v[0] == "ok"), reverse=True)
    for s in oks:
        try:
            res = measure(run, params, opt, vocab, 1, s, w, steps, fused, cuda, dev)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                free_memory(cuda)
                return row(conf, 1, s, f"error: {type(e).__name__}: {str(e)[:300]}",
                           max_context=True, tries=_tries(tries))
            res = None
        if res is None:
            opt.zero_grad(set_to_none=True)
            free_memory(cuda)
            print(f"    max-context: {s} ran once but not in the timed run (oom); next", flush=True)
            continue
        free_memory(cuda)
        return timed_row(conf, 1, s, *res, w, steps, nlora) | dict(
            max_context=True, tries=_tries(tries), search=search, first_oom=bad,
            longest_single_step=good, search_s=search_s)
    return row(conf, 1, good, "oom", max_context=True, tries=_tries(tries), search=search)


def _tries(tries):
    return [dict(seq=s, status=v[0], step_s=v[1], peak_gib=v[2]) for s, v in sorted(tries.items())]


def write_json(path, rows):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".anchor_train.")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
