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

/// PTX of `cross_entropy.cu`: `cross_entropy_fwd_*` and `cross_entropy_bwd_*`.
#[cfg(feature = "cuda")]
pub const CROSS_ENTROPY: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));

/// PTX of `adamw.cu`: `adamw_multi_f32`, the multi-tensor AdamW update.
#[cfg(feature = "cuda")]
pub const ADAMW: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
