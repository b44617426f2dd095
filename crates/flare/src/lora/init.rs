//! PEFT's initialisation of a LoRA adapter, seeded and deterministic.
//!
//! `A: [r, in]` is drawn from Kaiming-uniform with `a = sqrt(5)` (PyTorch's
//! `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, what PEFT's `init_lora_weights=True` does),
//! which is the uniform distribution on `[-1/sqrt(in), 1/sqrt(in)]`:
//! gain `sqrt(2 / (1 + a²)) = sqrt(1/3)`, bound `sqrt(3) · gain / sqrt(fan_in) = 1/sqrt(in)`.
//! `B: [out, r]` is zeros, so a fresh adapter leaves the layer's output unchanged.
//!
//! The values are generated on the CPU in f32 from `rand::rngs::StdRng::seed_from_u64(seed)`
//! (row-major order), then cast to the requested dtype and moved to the requested device, so
//! one seed gives the same adapter on every device. The stream is stable for a given version
//! of the `rand` crate (rand documents that `StdRng` may change between its releases).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

const OP: &str = "lora init";

/// The bound of PEFT's Kaiming-uniform initialisation of `A`: `1 / sqrt(in_features)`
/// (0 when `in_features` is 0).
///
/// ```
/// assert_eq!(flare::lora::init::kaiming_uniform_bound(16), 0.25);
/// ```
pub fn kaiming_uniform_bound(in_features: usize) -> f64 {
    if in_features == 0 {
        0.0
    } else {
        1.0 / (in_features as f64).sqrt()
    }
}

/// A fresh adapter `(A, B)` for a linear layer `[out_features, in_features]` at rank `r`:
/// `A: [r, in]` Kaiming-uniform (see the module doc), `B: [out, r]` zeros, both of `dtype` on
/// `device`. Deterministic in `seed`.
///
/// Errors with [`Error::InvalidArgument`] when `r` is 0 or `dtype` is not a float type.
///
/// ```
/// use candle_core::{DType, Device};
/// let (a, b) = flare::lora::init::init_adapter(33, 7, 4, 42, DType::F32, &Device::Cpu)?;
/// assert_eq!((a.dims(), b.dims()), (&[4, 33][..], &[7, 4][..]));
/// let bound = flare::lora::init::kaiming_uniform_bound(33) as f32;
/// assert!(a.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.abs() <= bound));
/// assert!(b.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v == 0.0));
/// // Same seed, same adapter.
/// let (a2, _) = flare::lora::init::init_adapter(33, 7, 4, 42, DType::F32, &Device::Cpu)?;
/// assert_eq!(a.to_vec2::<f32>()?, a2.to_vec2::<f32>()?);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn init_adapter(
    in_features: usize,
    out_features: usize,
    r: usize,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if r == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "r must be >= 1".into(),
        });
    }
    if !dtype.is_float() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("adapter dtype must be a float type, got {dtype:?}"),
        });
    }
    let bound = kaiming_uniform_bound(in_features) as f32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a: Vec<f32> = (0..r * in_features)
        .map(|_| {
            // Uniform on [-bound, bound]: `random::<f32>()` is in [0, 1).
            (2.0 * rng.random::<f32>() - 1.0) * bound
        })
        .collect();
    let a = Tensor::from_vec(a, (r, in_features), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let b = Tensor::zeros((out_features, r), dtype, device)?;
    Ok((a, b))
}
