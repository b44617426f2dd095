//! Argmax over the last dimension on the device, returning only the indices (u32): greedy
//! decoding then copies one token id per row to the host instead of a row of the vocabulary.
//!
//! The first maximum wins on ties (as `torch.argmax` and [`crate::generate::sampling::argmax`]);
//! NaN elements are skipped; a row without a non-NaN element yields `u32::MAX`, which callers
//! treat as an error. No backward: the output is an index.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{check_dtype, check_rank, contiguous_range, native};
use crate::Result;

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use cpu::argmax_cpu;

const OP: &str = "argmax_last_dim";

/// The op `x -> indices` (u32, `x`'s shape without its last dim).
struct ArgmaxLastDim;

fn out_shape(l: &Layout) -> Shape {
    let d = l.dims();
    Shape::from(d[..d.len() - 1].to_vec())
}

impl CustomOp1 for ArgmaxLastDim {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage as _;
        let (a, b) = contiguous_range(OP, l)?;
        let cols = l.dims().last().copied().unwrap_or(1);
        let out = match s {
            CpuStorage::F32(v) => argmax_cpu(&v[a..b], cols),
            CpuStorage::F64(v) => argmax_cpu(&v[a..b], cols),
            CpuStorage::F16(v) => argmax_cpu(&v[a..b], cols),
            CpuStorage::BF16(v) => argmax_cpu(&v[a..b], cols),
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{OP}: unsupported dtype {:?} on cpu",
                    other.dtype()
                )))
            }
        };
        Ok((CpuStorage::U32(out), out_shape(l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::fwd(s, l)?, out_shape(l)))
    }
}

/// The index of the largest element along the last dimension, as u32, of shape `x`'s dims
/// without the last (rank >= 1; a rank-1 `x` gives a scalar). First maximum on ties, NaN
/// skipped, `u32::MAX` for a row with no non-NaN element. f32, f16, bf16 (f64 on CPU).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0.5f32, 2.0, 2.0], [f32::NAN, -1.0, -3.0]], &Device::Cpu)?;
/// assert_eq!(flare::ops::argmax_last_dim(&x)?.to_vec1::<u32>()?, vec![1, 1]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn argmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_rank(OP, x, 1)?;
    check_dtype(OP, x)?;
    if !native(x.device()) {
        // Candle's argmax has no NaN rule; the host sees the same values.
        return Ok(x.argmax(candle_core::D::Minus1)?);
    }
    Ok(x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(ArgmaxLastDim)))?)
}
