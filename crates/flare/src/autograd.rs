//! Autograd helpers on top of Candle's `Tensor::backward`.
//!
//! Candle's `backward` starts from a scalar loss (it seeds the root with ones). To back-propagate
//! a given output gradient `dy` — what PyTorch's `y.backward(gradient=dy)` does — one would form
//! `(y * dy).sum()`, which costs three passes over `y` before the backward even starts.
//! [`backward_with_grad`] instead attaches a zero-cost seed op to `y`: its forward writes a single
//! element, and its backward hands `dy` to `y` unchanged.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::device_name;
use crate::{Error, Result};

const OP: &str = "backward_with_grad";

/// The seed: `y -> 0` (a one-element f32 tensor) whose backward returns `dy`.
struct Seed {
    dy: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let zero = s.device.alloc_zeros::<f32>(1)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(zero, s.device.clone()),
            Shape::from(()),
        ))
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.dy.clone()))
    }
}

/// Back-propagates the output gradient `dy` from `y` (same shape, dtype and device), like
/// PyTorch's `y.backward(gradient=dy)`, and returns the gradients of every variable `y`
/// depends on.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let y = x.as_tensor().sqr()?;
/// let dy = Tensor::new(&[1f32, 0., 2.], &Device::Cpu)?;
/// let grads = flare::autograd::backward_with_grad(&y, &dy)?;
/// assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>()?, vec![2., 0., 12.]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn backward_with_grad(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    if y.dims() != dy.dims() {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "the output gradient must have the output's shape",
            lhs: y.dims().to_vec(),
            rhs: dy.dims().to_vec(),
        });
    }
    if y.dtype() != dy.dtype() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: y.dtype(),
            rhs: dy.dtype(),
        });
    }
    if !y.device().same_device(dy.device()) {
        return Err(Error::DeviceMismatch {
            op: OP,
            lhs: device_name(y.device()),
            rhs: device_name(dy.device()),
        });
    }
    let root = y.apply_op1(Seed {
        dy: dy.contiguous()?.detach(),
    })?;
    Ok(root.backward()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_weighted_sum_loss() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 5), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (5,), &dev)?;
        let y = crate::ops::rms_norm(x.as_tensor(), &w, 1e-5)?;
        let dy = Tensor::randn(0f32, 1.0, (3, 5), &dev)?;
        let a = backward_with_grad(&y, &dy)?;
        let b = (&y * &dy)?.sum_all()?.backward()?;
        let (ga, gb) = (a.get(&x).unwrap(), b.get(&x).unwrap());
        let diff = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn refuses_a_wrong_shape() {
        let dev = Device::Cpu;
        let y = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let dy = Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(matches!(
            backward_with_grad(&y, &dy),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
