//! flare's CUDA C kernels, compiled to PTX at build time.
//!
//! With the `cuda` feature, `build.rs` compiles each `src/cu/*.cu` file with `nvcc --ptx` for
//! `compute_$CUDA_COMPUTE_CAP` (default 90) and this crate embeds the PTX text; the driver
//! JIT-compiles it when flare's runtime loads the module (once per device). Without the
//! feature the crate is empty and needs no CUDA toolkit.
//!
//! Every kernel is `extern "C"`, instantiated per dtype with the suffix `_f32`, `_f16` or
//! `_bf16`, and computes in f32. The row kernels (softmax, RMSNorm) take a `group` argument,
//! the threads per row chosen by the host; see `src/cu/common.cuh` for the execution model.
#![deny(missing_docs)]

/// PTX of `softmax.cu`: `softmax_fwd_*` and `softmax_bwd_*`.
#[cfg(feature = "cuda")]
pub const SOFTMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

/// PTX of `rms_norm.cu`: `rms_norm_fwd_*`, `add_rms_norm_fwd_*`, `rms_norm_bwd_*` and
/// `rms_norm_dw_*`.
#[cfg(feature = "cuda")]
pub const RMS_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));

/// PTX of `gemm_small.cu`: `gemm_small_*`, a strided, batched GEMM for products too small for
/// cuBLASLt's host overhead to pay off.
#[cfg(feature = "cuda")]
pub const GEMM_SMALL: &str = include_str!(concat!(env!("OUT_DIR"), "/gemm_small.ptx"));

/// PTX of `rope.cu`: `rope_*`, RoPE with the seq/head transposition fused in (forward and, by
/// the opposite sign, backward).
#[cfg(feature = "cuda")]
pub const ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));

/// PTX of `swiglu.cu`: `swiglu_fwd_*` and `swiglu_bwd_*`, `silu(g) * u` and its gradients.
#[cfg(feature = "cuda")]
pub const SWIGLU: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));

/// PTX of `argmax.cu`: `argmax_*`, the index of the largest element of each row (u32).
#[cfg(feature = "cuda")]
pub const ARGMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"));

/// PTX of `gemv.cu`: `gemv_*`, `x @ w.T` for a few rows of `x` (decoding), one warp per
/// output column reading the weight once.
#[cfg(feature = "cuda")]
pub const GEMV: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));
/// PTX of `cross_entropy.cu`: `cross_entropy_fwd_*` and `cross_entropy_bwd_*`.
#[cfg(feature = "cuda")]
pub const CROSS_ENTROPY: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));

/// PTX of `adamw.cu`: `adamw_multi_f32`, the multi-tensor AdamW update.
#[cfg(feature = "cuda")]
pub const ADAMW: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

/// PTX of `attention.cu`: `attention_decode_*`, `softmax(q kᵀ) v` over every key in one launch
/// (the single-new-token decode step).
#[cfg(feature = "cuda")]
pub const ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// PTX of `decode.cu`: `decode_*`, the kernels of the batch-1 decode engine (one decode step as
/// a fixed sequence of launches reading the token id and position from device memory, replayed
/// as one CUDA graph): gemv with RMSNorm/SwiGLU staging and residual epilogue, RoPE + KV-cache
/// append, flash-decoding attention, embedding lookup and the final argmax.
#[cfg(feature = "cuda")]
pub const DECODE: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
