//! [`stack_rows`]: the factors of grouped projections stacked for [`super::lora_linear_grouped`]
//! in one launch.
//!
//! The grouped op takes the `A`s of its projections stacked (`[G · r, in]`) and their `B`s
//! stacked (`[out_1 + ... + out_G, r]`). [`Tensor::cat`] builds them with one copy launch per
//! part, twice per group, every forward: in the Llama-3.1-8B training step that was about 320
//! launches of a few microseconds each. [`stack_rows`] is the same concatenation along dim 0
//! as one op (one `lora_factors_stack_*` launch on CUDA, a copy on the CPU) whose backward hands each
//! part its rows of the gradient (views, no copy), as `Tensor::cat`'s does.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use crate::ops::native;
use crate::Result;

const OP: &str = "stack_rows";

/// `parts` stacked along dim 0: the value and the gradients of `Tensor::cat(parts, 0)`.
///
/// Two or three contiguous-able tensors of one float dtype (f32, f16, bf16; f64 on the CPU) on
/// a CPU or CUDA device, with equal dims after the first, run as one op (one launch on CUDA).
/// Anything else (one part or more than three, other dtypes, Metal) is `Tensor::cat`, whose
/// errors (mismatched shapes, dtypes or devices) it returns.
///
/// ```
/// # fn main() -> flare::Result<()> {
/// use candle_core::{Device, Tensor};
/// use flare::lora::op::stack_rows;
/// let dev = Device::Cpu;
/// let a = Tensor::randn(0f32, 1.0, (3, 5), &dev)?;
/// let b = Tensor::randn(0f32, 1.0, (2, 5), &dev)?;
/// let s = stack_rows(&[&a, &b])?;
/// assert_eq!(s.dims(), &[5, 5]);
/// let cat = Tensor::cat(&[&a, &b], 0)?;
/// assert_eq!(s.to_vec2::<f32>()?, cat.to_vec2::<f32>()?);
/// # Ok(())
/// # }
/// ```
pub fn stack_rows(parts: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        return Ok(Tensor::cat(parts, 0)?);
    };
    let dtype = first.dtype();
    let dev = first.device();
    let float = match dtype {
        DType::F32 | DType::F16 | DType::BF16 => true,
        DType::F64 => dev.is_cpu(),
        _ => false,
    };
    let same = parts.iter().all(|p| {
        p.dtype() == dtype
            && p.device().same_device(dev)
            && p.rank() >= 1
            && p.rank() == first.rank()
            && p.dims()[1..] == first.dims()[1..]
    });
    if !(2..=3).contains(&parts.len()) || !float || !same || !native(dev) {
        return Ok(Tensor::cat(parts, 0)?);
    }
    let parts = parts
        .iter()
        .map(|p| p.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let op = StackRows {
        rows: parts.iter().map(|p| p.dims()[0]).collect(),
    };
    Ok(match parts.as_slice() {
        [a, b] => a.apply_op2(b, op)?,
        [a, b, c] => a.apply_op3(b, c, op)?,
        _ => unreachable!("two or three parts, checked above"),
    })
}

/// The op: the parts' first dims, in order.
struct StackRows {
    rows: Vec<usize>,
}

impl StackRows {
    /// The stacked shape: the first part's with the summed first dim.
    fn shape(&self, l: &Layout) -> Shape {
        let mut dims = l.dims().to_vec();
        dims[0] = self.rows.iter().sum();
        Shape::from(dims)
    }

    fn cpu(&self, parts: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
        fn cat<T: WithDType>(parts: &[(&CpuStorage, &Layout)]) -> candle_core::Result<CpuStorage> {
            let n = parts.iter().map(|(_, l)| l.shape().elem_count()).sum();
            let mut v = Vec::with_capacity(n);
            for (s, l) in parts {
                let (start, end) = crate::ops::contiguous_range(OP, l)?;
                v.extend_from_slice(&s.as_slice::<T>()?[start..end]);
            }
            Ok(T::to_cpu_storage_owned(v))
        }
        let s = match parts[0].0.dtype() {
            DType::F32 => cat::<f32>(parts)?,
            DType::F64 => cat::<f64>(parts)?,
            DType::F16 => cat::<half::f16>(parts)?,
            DType::BF16 => cat::<half::bf16>(parts)?,
            dt => candle_core::bail!("{OP}: internal error: dtype {dt:?}"),
        };
        Ok((s, self.shape(parts[0].1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        parts: &[(&candle_core::CudaStorage, &Layout)],
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::stack_rows(parts)?, self.shape(parts[0].1)))
    }

    /// Each part's rows of the output's gradient.
    fn grads(&self, grad: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut first = 0;
        self.rows
            .iter()
            .map(|&n| {
                let g = grad.narrow(0, first, n)?;
                first += n;
                Ok(Some(g))
            })
            .collect()
    }
}

impl CustomOp2 for StackRows {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(&[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for StackRows {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}
