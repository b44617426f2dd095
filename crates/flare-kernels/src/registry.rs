// THE ONE LIST OF FLARE'S KERNELS. Read twice, through `include!`: by `build.rs` (which `.cu`
// files to compile) and by `lib.rs` (the `Module` and `Kernel` enums, their PTX and function
// names), each with its own `registry!` macro. The runtime loads `Module::ALL` and resolves
// `Kernel::ALL` into its launch table from these enums, so nothing else lists kernels.
//
// To add a kernel:
// - a function of an existing file: add `Variant = "extern_c_name",` under its module;
// - a new file `src/cu/<file>.cu`: add a module block `Name = "<file>" { ... }` with its
//   functions, and a doc line saying what the file computes.
// Then launch it from flare as `runtime.function(Kernel::Variant)`. Integer `#define`s at the
// top of the `.cu` file (launch bounds, elements per thread) reach Rust as
// `flare_kernels::launch::NAME`; see `build.rs`.
//
// Variants are listed in table order: a kernel's index in the runtime's function table is its
// position here.
registry! {
    /// `softmax.cu`: `softmax_fwd_*`, `softmax_masked_fwd_*` and `softmax_bwd_*`.
    Softmax = "softmax" {
        SoftmaxFwdF32 = "softmax_fwd_f32",
        SoftmaxFwdF16 = "softmax_fwd_f16",
        SoftmaxFwdBF16 = "softmax_fwd_bf16",
        SoftmaxBwdF32 = "softmax_bwd_f32",
        SoftmaxBwdF16 = "softmax_bwd_f16",
        SoftmaxBwdBF16 = "softmax_bwd_bf16",
        SoftmaxMaskedFwdF32 = "softmax_masked_fwd_f32",
        SoftmaxMaskedFwdF16 = "softmax_masked_fwd_f16",
        SoftmaxMaskedFwdBF16 = "softmax_masked_fwd_bf16",
    }
    /// `rms_norm.cu`: `rms_norm_fwd_*`, `add_rms_norm_fwd_*`, `rms_norm_bwd_*`,
    /// `rms_norm_bwd_rows_*` and `rms_norm_dw_*`.
    RmsNorm = "rms_norm" {
        RmsNormFwdF32 = "rms_norm_fwd_f32",
        RmsNormFwdF16 = "rms_norm_fwd_f16",
        RmsNormFwdBF16 = "rms_norm_fwd_bf16",
        AddRmsNormFwdF32 = "add_rms_norm_fwd_f32",
        AddRmsNormFwdF16 = "add_rms_norm_fwd_f16",
        AddRmsNormFwdBF16 = "add_rms_norm_fwd_bf16",
        RmsNormBwdF32 = "rms_norm_bwd_f32",
        RmsNormBwdF16 = "rms_norm_bwd_f16",
        RmsNormBwdBF16 = "rms_norm_bwd_bf16",
        RmsNormBwdRowsF32 = "rms_norm_bwd_rows_f32",
        RmsNormBwdRowsF16 = "rms_norm_bwd_rows_f16",
        RmsNormBwdRowsBF16 = "rms_norm_bwd_rows_bf16",
        RmsNormDwF32 = "rms_norm_dw_f32",
        RmsNormDwF16 = "rms_norm_dw_f16",
        RmsNormDwBF16 = "rms_norm_dw_bf16",
    }
    /// `gemm_small.cu`: `gemm_small_*`, a strided, batched GEMM for products too small for
    /// cuBLASLt's host overhead to pay off.
    GemmSmall = "gemm_small" {
        GemmSmallF32 = "gemm_small_f32",
        GemmSmallF16 = "gemm_small_f16",
        GemmSmallBF16 = "gemm_small_bf16",
    }
    /// `rope.cu`: `rope_*`, RoPE with the seq/head transposition fused in (forward and, by the
    /// opposite sign, backward), and `rope_copy_rows_*`, the v rows copied beside them.
    Rope = "rope" {
        RopeF32 = "rope_f32",
        RopeF16 = "rope_f16",
        RopeBF16 = "rope_bf16",
        RopeCopyRowsF32 = "rope_copy_rows_f32",
        RopeCopyRowsF16 = "rope_copy_rows_f16",
        RopeCopyRowsBF16 = "rope_copy_rows_bf16",
    }
    /// `swiglu.cu`: `swiglu_fwd_*` and `swiglu_bwd_*`, `silu(g) * u` and its gradients.
    SwiGlu = "swiglu" {
        SwiGluFwdF32 = "swiglu_fwd_f32",
        SwiGluFwdF16 = "swiglu_fwd_f16",
        SwiGluFwdBF16 = "swiglu_fwd_bf16",
        SwiGluBwdF32 = "swiglu_bwd_f32",
        SwiGluBwdF16 = "swiglu_bwd_f16",
        SwiGluBwdBF16 = "swiglu_bwd_bf16",
    }
    /// `argmax.cu`: `argmax_*`, the index of the largest element of each row (u32), and the
    /// two-stage `argmax_part_*` / `argmax_final`.
    Argmax = "argmax" {
        ArgmaxF32 = "argmax_f32",
        ArgmaxF16 = "argmax_f16",
        ArgmaxBF16 = "argmax_bf16",
        ArgmaxPartF32 = "argmax_part_f32",
        ArgmaxPartF16 = "argmax_part_f16",
        ArgmaxPartBF16 = "argmax_part_bf16",
        ArgmaxFinal = "argmax_final",
    }
    /// `gemv.cu`: `gemv_*`, `x @ w.T` for a few rows of `x` (decoding), one warp per output
    /// column reading the weight once.
    Gemv = "gemv" {
        GemvF32 = "gemv_f32",
        GemvF16 = "gemv_f16",
        GemvBF16 = "gemv_bf16",
    }
    /// `cross_entropy.cu`: `cross_entropy_fwd_*` and `cross_entropy_bwd_*`.
    CrossEntropy = "cross_entropy" {
        CrossEntropyFwdF32 = "cross_entropy_fwd_f32",
        CrossEntropyFwdF16 = "cross_entropy_fwd_f16",
        CrossEntropyFwdBF16 = "cross_entropy_fwd_bf16",
        CrossEntropyBwdF32 = "cross_entropy_bwd_f32",
        CrossEntropyBwdF16 = "cross_entropy_bwd_f16",
        CrossEntropyBwdBF16 = "cross_entropy_bwd_bf16",
    }
    /// `linear_cross_entropy.cu`: `linear_cross_entropy_rows_*`, the row pass of the fused
    /// linear + cross-entropy (each row's NLL, and `softmax - onehot` written over the logits),
    /// and `linear_cross_entropy_scale_*`, its backward's scaling by the upstream gradient.
    LinearCrossEntropy = "linear_cross_entropy" {
        LinearCrossEntropyRowsF32 = "linear_cross_entropy_rows_f32",
        LinearCrossEntropyRowsF16 = "linear_cross_entropy_rows_f16",
        LinearCrossEntropyRowsBF16 = "linear_cross_entropy_rows_bf16",
        LinearCrossEntropyScaleF32 = "linear_cross_entropy_scale_f32",
        LinearCrossEntropyScaleF16 = "linear_cross_entropy_scale_f16",
        LinearCrossEntropyScaleBF16 = "linear_cross_entropy_scale_bf16",
    }
    /// `adamw.cu`: `adamw_multi_f32`, the multi-tensor AdamW update.
    AdamW = "adamw" {
        AdamWMultiF32 = "adamw_multi_f32",
    }
    /// `grad_norm.cu`: `grad_norm_part_f32` and `grad_norm_final`, the sum of squares of every
    /// gradient tensor of an optimizer (the global gradient norm) in two launches, in f64.
    GradNorm = "grad_norm" {
        GradNormPartF32 = "grad_norm_part_f32",
        GradNormFinal = "grad_norm_final",
    }
    /// `attention.cu`: `attention_split_*` and `attention_combine_*`, `softmax(q kᵀ) v` of the
    /// single-new-token decode step by flash decoding.
    Attention = "attention" {
        AttentionSplitF32 = "attention_split_f32",
        AttentionSplitF16 = "attention_split_f16",
        AttentionSplitBF16 = "attention_split_bf16",
        AttentionCombineF32 = "attention_combine_f32",
        AttentionCombineF16 = "attention_combine_f16",
        AttentionCombineBF16 = "attention_combine_bf16",
    }
    /// `decode.cu`: `decode_*`, the kernels of the batch-1 decode engine (one decode step as a
    /// fixed sequence of launches reading the token id and position from device memory,
    /// replayed as one CUDA graph): gemv with RMSNorm/SwiGLU staging and residual epilogue,
    /// RoPE + KV-cache append, flash-decoding attention, embedding lookup and the final argmax.
    Decode = "decode" {
        DecodeEmbedF32 = "decode_embed_f32",
        DecodeGemvF32 = "decode_gemv_f32",
        DecodeAttnSplitF32 = "decode_attn_split_f32",
        DecodeAttnCombineF32 = "decode_attn_combine_f32",
        DecodeEmbedF16 = "decode_embed_f16",
        DecodeGemvF16 = "decode_gemv_f16",
        DecodeAttnSplitF16 = "decode_attn_split_f16",
        DecodeAttnCombineF16 = "decode_attn_combine_f16",
        DecodeEmbedBF16 = "decode_embed_bf16",
        DecodeGemvBF16 = "decode_gemv_bf16",
        DecodeAttnSplitBF16 = "decode_attn_split_bf16",
        DecodeAttnCombineBF16 = "decode_attn_combine_bf16",
        DecodeArgmaxFinal = "decode_argmax_final",
        DecodeSpin = "decode_spin",
    }
    /// `flash_attention.cu`: `flash_attn_{fwd,bwd_pre,bwd,bwd_convert}_d{64,128}_{bf16,f16}`,
    /// FlashAttention-2 for training and prefill over packed variable-length sequences (causal,
    /// sliding window, GQA) on tensor cores (`mma.sync`, sm_80+): the forward writes `O` and the
    /// logsumexp `L`; the backward is `bwd_pre` (`D = rowsum(dO * O)`, zeroes the f32 dQ
    /// workspace), `bwd` (dK, dV per key block, dQ by f32 atomics) and `bwd_convert` (dQ to T).
    FlashAttention = "flash_attention" {
        FlashAttnFwdD64BF16 = "flash_attn_fwd_d64_bf16",
        FlashAttnFwdD128BF16 = "flash_attn_fwd_d128_bf16",
        FlashAttnFwdD64F16 = "flash_attn_fwd_d64_f16",
        FlashAttnFwdD128F16 = "flash_attn_fwd_d128_f16",
        FlashAttnBwdPreD64BF16 = "flash_attn_bwd_pre_d64_bf16",
        FlashAttnBwdPreD128BF16 = "flash_attn_bwd_pre_d128_bf16",
        FlashAttnBwdPreD64F16 = "flash_attn_bwd_pre_d64_f16",
        FlashAttnBwdPreD128F16 = "flash_attn_bwd_pre_d128_f16",
        FlashAttnBwdD64BF16 = "flash_attn_bwd_d64_bf16",
        FlashAttnBwdD128BF16 = "flash_attn_bwd_d128_bf16",
        FlashAttnBwdD64F16 = "flash_attn_bwd_d64_f16",
        FlashAttnBwdD128F16 = "flash_attn_bwd_d128_f16",
        FlashAttnBwdConvertD64BF16 = "flash_attn_bwd_convert_d64_bf16",
        FlashAttnBwdConvertD128BF16 = "flash_attn_bwd_convert_d128_bf16",
        FlashAttnBwdConvertD64F16 = "flash_attn_bwd_convert_d64_f16",
        FlashAttnBwdConvertD128F16 = "flash_attn_bwd_convert_d128_f16",
    }
    /// `grad_add.cu`: `grad_add_*`, `a + b` of two contiguous tensors in 16-byte packs: the
    /// backward pass's gradient accumulation (installed into Candle's `GradStore`).
    GradAdd = "grad_add" {
        GradAddF32 = "grad_add_f32",
        GradAddF16 = "grad_add_f16",
        GradAddBF16 = "grad_add_bf16",
    }
    /// `multi_copy.cu`: `multi_copy_16`, many contiguous buffers copied in one launch (the step
    /// graph's gradient outputs).
    MultiCopy = "multi_copy" {
        MultiCopy16 = "multi_copy_16",
    }
    /// `lora_factors.cu`: `lora_factors_stack_*` (grouped projections' factors stacked in one
    /// launch) and `lora_factors_cast_*` (a LoRA pair of f32 factors cast to the half base
    /// dtype in one launch).
    LoraFactors = "lora_factors" {
        StackRowsB32 = "lora_factors_stack_b32",
        StackRowsB16 = "lora_factors_stack_b16",
        CastPairF32F16 = "lora_factors_cast_f16",
        CastPairF32BF16 = "lora_factors_cast_bf16",
    }
}
