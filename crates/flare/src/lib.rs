//! flare: fast, correct LoRA fine-tuning and inference on top of Candle.
//!
//! flare routes the hot operations of a transformer to the vendor's GEMM library (cuBLASLt on
//! CUDA) and to its own fused kernels, with every per-device resource (stream, library handle,
//! kernel module, function handle, GEMM algorithm choice) created once and reused. Every op is a
//! Candle custom op with a CPU forward and a CUDA forward, and every differentiable op has a
//! backward, so `Tensor::backward` flows through it (the inference-only ops, argmax and the
//! fused decode attention, are listed in [`ops`]). CPU is the default and does everything; on
//! other devices (Metal) the ops fall back to Candle's own composite ops.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::randn(0f32, 1.0, (4, 33), &Device::Cpu)?;
//! let y = flare::ops::softmax_last_dim(&x)?;
//! let sums = y.sum(1)?.to_vec1::<f32>()?;
//! assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
//! # Ok::<(), flare::Error>(())
//! ```
#![deny(missing_docs)]

pub mod error;
pub mod generate;
mod hf_json;
pub mod io;
pub mod lora;
pub mod models;
pub mod ops;
pub mod runtime;
mod safetensors_header;
pub mod text;
pub mod train;

pub use error::{Error, Result};
