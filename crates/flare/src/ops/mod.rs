//! flare's ops on Candle tensors.
//!
//! Each op is a Candle custom op with a CPU forward and a CUDA forward; a public function checks
//! shapes, dtypes and devices and returns a clear [`crate::Error`] before anything runs.
//! On devices other than CPU and CUDA each op falls back to Candle's own composite ops. Every
//! differentiable op has a backward, so `Tensor::backward` flows through it, and a composed
//! reference (`*_reference`) built from plain Candle ops, used by the tests and benchmarks. Two
//! ops are inference-only: [`argmax_last_dim`] (its output is an index: no backward, and no
//! reference beyond Candle's own `argmax`) and the fused [`attention_decode`] (no backward: when
//! an input takes part in autograd it computes the same maths from differentiable ops instead).
//!
//! [`flash_attention()`] runs on CUDA on cuDNN's fused attention where it applies and on flare's
//! own kernel elsewhere ([`flash_attention_engine`] says which; see its module doc).
//!
//! Backward kernels are ops too; they have no backward of their own (a second derivative
//! through them returns Candle's `BackwardNotSupported`, never a silently cut gradient).
//!
//! # Layout: one op, one folder
//! Everything of an op is in `ops/<op>/`, its kernel in `crates/flare-kernels/src/cu/<op>.cu`
//! and its tests in `crates/flare/tests/it/` (`<op>.rs` where it has a file of its own):
//! - `mod.rs`: the math (module doc), the custom op structs (forward dispatch and backward), the
//!   public function with its input checks, and the composed `*_reference`;
//! - `cpu.rs`: the CPU forward and backward loops;
//! - `cuda.rs` (with the `cuda` feature): the launcher, which reads the kernel's launch
//!   constants from [`flare_kernels::launch`];
//! - `plan.rs` (where both sides need it): the op's names and the geometry derived from the
//!   layouts, shared by `mod.rs`, `cpu.rs` and `cuda.rs`.
//!
//! Imports inside an op folder run one way, `mod.rs -> cpu.rs / cuda.rs -> plan.rs`; nothing
//! imports `mod.rs` back. Helpers shared by several ops are in `ops/cpu.rs` (dtype dispatch and
//! accumulation) and `ops/cuda/` (row-kernel launch planning, element-wise grids).

pub mod argmax;
pub mod attention;
mod cpu;
pub mod cross_entropy;
pub mod flash_attention;
pub mod linear_cross_entropy;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

pub use argmax::argmax_last_dim;
pub use attention::attention_decode;
pub use cross_entropy::{cross_entropy, cross_entropy_per_token, cross_entropy_weighted};
pub use flash_attention::{
    flash_attention, flash_attention_engine, flash_attention_padded, flash_attention_qkvpacked,
    FlashAttnParams,
};
pub use linear_cross_entropy::linear_cross_entropy;
pub use matmul::matmul;
pub use rms_norm::{add_rms_norm, rms_norm};
pub use rope::{rope_heads, rope_tokens};
pub use softmax::{softmax_last_dim, softmax_masked};
pub use swiglu::{swiglu, swiglu_grad_in_place, swiglu_packed};

use candle_core::{DType, Device, Tensor};

use crate::error::device_name;
use crate::{Error, Result};

/// The dtypes flare's ops run natively on `device`: f32/f16/bf16 everywhere, f64 on CPU too
/// (for float64 references and finite-difference gradient checks).
pub fn supported_dtypes(device: &Device) -> &'static [DType] {
    if device.is_cpu() {
        &[DType::F32, DType::F16, DType::BF16, DType::F64]
    } else {
        &[DType::F32, DType::F16, DType::BF16]
    }
}

/// Refuses dtypes the op has no implementation for on this device.
pub(crate) fn check_dtype(op: &'static str, t: &Tensor) -> Result<()> {
    if supported_dtypes(t.device()).contains(&t.dtype()) {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op,
            dtype: t.dtype(),
            device: device_name(t.device()),
        })
    }
}

/// Refuses a pair of tensors on different devices or with different dtypes.
pub(crate) fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if !a.device().same_device(b.device()) {
        return Err(Error::DeviceMismatch {
            op,
            lhs: device_name(a.device()),
            rhs: device_name(b.device()),
        });
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            lhs: a.dtype(),
            rhs: b.dtype(),
        });
    }
    Ok(())
}

/// Refuses tensors of rank below `min`.
pub(crate) fn check_rank(op: &'static str, t: &Tensor, min: usize) -> Result<()> {
    if t.rank() < min {
        return Err(Error::Rank {
            op,
            min,
            shape: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Refuses the targets of the loss op `op` unless they are u32, `[n]` for the `rows: [n, _]`
/// they label (`shape_msg` says so in the error) and on `rows`' device.
pub(crate) fn check_targets(
    op: &'static str,
    targets: &Tensor,
    rows: &Tensor,
    shape_msg: &'static str,
) -> Result<()> {
    if targets.dtype() != DType::U32 {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("targets must be u32, got {:?}", targets.dtype()),
        });
    }
    if targets.dims() != [rows.dim(0)?] {
        return Err(Error::ShapeMismatch {
            op,
            msg: shape_msg,
            lhs: rows.dims().to_vec(),
            rhs: targets.dims().to_vec(),
        });
    }
    if !rows.device().same_device(targets.device()) {
        return Err(Error::DeviceMismatch {
            op,
            lhs: device_name(rows.device()),
            rhs: device_name(targets.device()),
        });
    }
    Ok(())
}

/// Whether flare's own implementation runs on this device (CPU and, with the `cuda` feature,
/// CUDA); elsewhere the ops fall back to Candle's composite ops.
pub(crate) fn native(device: &Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}

/// Splits a contiguous layout's element range, checking that it is contiguous.
pub(crate) fn contiguous_range(
    op: &'static str,
    l: &candle_core::Layout,
) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: internal error: expected a contiguous input, got strides {:?}",
            l.stride()
        ))
    })
}

/// A one-shot hand-over of a computed storage from one custom op to the next: a Candle custom
/// op returns one storage, so a kernel's second output waits here until an op applied right
/// after (Candle runs ops eagerly, in program order) returns it to the graph. Shared by
/// `Arc` between the two ops.
#[derive(Default)]
pub(crate) struct StorageSlot(std::sync::Mutex<Option<candle_core::Storage>>);

impl StorageSlot {
    /// Leaves `s` in the slot (replacing what was there).
    pub(crate) fn put(&self, s: candle_core::Storage) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    fn take(&self, op: &'static str) -> candle_core::Result<candle_core::Storage> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{op}: internal error: the slot is empty"))
            })
    }

    /// Takes the CPU storage left in the slot (an error names `op` when there is none or it
    /// is on another device).
    pub(crate) fn take_cpu(
        &self,
        op: &'static str,
    ) -> candle_core::Result<candle_core::CpuStorage> {
        match self.take(op)? {
            candle_core::Storage::Cpu(s) => Ok(s),
            _ => Err(candle_core::Error::Msg(format!(
                "{op}: internal error: the slot's storage is not on the CPU"
            ))),
        }
    }

    /// Takes the CUDA storage left in the slot, as [`take_cpu`](Self::take_cpu).
    #[cfg(feature = "cuda")]
    pub(crate) fn take_cuda(
        &self,
        op: &'static str,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        match self.take(op)? {
            candle_core::Storage::Cuda(s) => Ok(s),
            _ => Err(candle_core::Error::Msg(format!(
                "{op}: internal error: the slot's storage is not on CUDA"
            ))),
        }
    }
}
