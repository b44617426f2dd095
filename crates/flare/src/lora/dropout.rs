//! LoRA dropout masks, optionally drawn from a seeded stream so that a forward can be replayed
//! with exactly the same masks.
//!
//! Activation checkpointing ([`crate::models::Transformer::set_gradient_checkpointing`]) runs a
//! decoder layer twice: in the forward, then again in the backward to rebuild what the
//! backward needs. Both runs must drop the same elements, so a layer runs inside
//! [`with_dropout_seed`]: every mask drawn in that scope is a function of the scope's seed and of
//! the draw's rank in it (the first mask, the second, ...), so rerunning the same code under the
//! same seed draws the same masks.
//!
//! - On the CPU a mask element is a hash (SplitMix64) of `(seed, draw, index)`: deterministic,
//!   independent of threads, and the same with or without checkpointing.
//! - On a GPU the device generator is reseeded with the scope's seed at the scope's first draw
//!   (Candle's [`candle_core::Device::set_seed`]), then the masks come from it in draw order;
//!   the generator is left in that state when the scope ends.
//!
//! Outside any scope a mask comes from Candle's unseeded generator for the device, as
//! `candle_nn::ops::dropout` draws it.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

const OP: &str = "lora dropout";

/// The seeded stream of the innermost [`with_dropout_seed`] scope of this thread.
#[derive(Debug, Clone, Copy)]
struct Stream {
    seed: u64,
    /// Masks drawn so far in the scope.
    draws: u64,
    /// Whether the device generator has been reseeded in this scope (non-CPU devices).
    device_seeded: bool,
}

thread_local! {
    static STREAM: RefCell<Option<Stream>> = const { RefCell::new(None) };
}

/// Restores the enclosing scope's stream when a scope ends (also on unwinding).
struct Restore(Option<Stream>);

impl Drop for Restore {
    fn drop(&mut self) {
        let prev = self.0.take();
        STREAM.with(|s| *s.borrow_mut() = prev);
    }
}

/// Runs `f` with every LoRA dropout mask drawn in it (on this thread) taken from a stream
/// seeded by `seed`: the same code run twice under the same seed drops the same elements.
/// Scopes nest; the enclosing one's stream is restored (with its position) when `f` returns.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use flare::lora::{with_dropout_seed, LoraConfig, LoraLinear};
/// let dev = Device::Cpu;
/// let mut layer = LoraLinear::new(Tensor::zeros((8, 16), DType::F32, &dev)?, None)?;
/// layer.add_adapter("a", &LoraConfig { r: 2, dropout: 0.5, ..Default::default() }, 0)?;
/// layer.set_adapter_weights("a", &Tensor::ones((2, 16), DType::F32, &dev)?,
///     &Tensor::ones((8, 2), DType::F32, &dev)?)?;
/// layer.set_active(Some("a"))?;
/// layer.set_training(true);
/// let x = Tensor::ones((4, 16), DType::F32, &dev)?;
/// let y1 = with_dropout_seed(7, || layer.forward(&x))?.to_vec2::<f32>()?;
/// let y2 = with_dropout_seed(7, || layer.forward(&x))?.to_vec2::<f32>()?;
/// assert_eq!(y1, y2);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn with_dropout_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let prev = STREAM.with(|s| {
        s.borrow_mut().replace(Stream {
            seed,
            draws: 0,
            device_seeded: false,
        })
    });
    let _restore = Restore(prev);
    f()
}

/// The seed of the enclosing [`with_dropout_seed`] scope, if any: nested scopes derived from it
/// (the tiled MLP's, one per tile) draw the same masks every time the enclosing scope runs.
pub(crate) fn current_seed() -> Option<u64> {
    STREAM.with(|s| s.borrow().as_ref().map(|st| st.seed))
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `x · mask / (1 - p)` with each element of the mask kept with probability `1 - p`; the mask
/// from the current [`with_dropout_seed`] scope, or from Candle's unseeded generator outside
/// one. `p` must be in `[0, 1)`.
pub(crate) fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    if !(p.is_finite() && (0.0..1.0).contains(&p)) {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("dropout must be in [0, 1), got {p}"),
        });
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let draw = STREAM.with(|s| {
        s.borrow_mut().as_mut().map(|st| {
            let d = (st.seed, st.draws, st.device_seeded);
            st.draws += 1;
            st.device_seeded = true;
            d
        })
    });
    let scale = 1.0 / (1.0 - p as f64);
    let mask = match (draw, x.device()) {
        (None, _) => return Ok(candle_nn::ops::dropout(x, p)?),
        (Some((seed, k, _)), Device::Cpu) => cpu_mask(x, p, scale, seed, k)?,
        (Some((seed, _, seeded)), dev) => {
            if !seeded {
                dev.set_seed(seed)?;
            }
            let u = Tensor::rand(0f32, 1f32, x.shape(), dev)?;
            (u.ge(p)?.to_dtype(x.dtype())? * scale)?
        }
    };
    Ok(x.mul(&mask)?)
}

/// The CPU mask of draw `k` under `seed`: element `i` kept when the top 24 bits of
/// `mix64(key + i)` are at least `p · 2²⁴`, `key` a mix of `(seed, k)`.
fn cpu_mask(x: &Tensor, p: f32, scale: f64, seed: u64, k: u64) -> Result<Tensor> {
    let key = mix64(seed ^ mix64(k.wrapping_add(0x5eed)));
    let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u64;
    let n = x.elem_count();
    let values: Vec<f64> = (0..n as u64)
        .map(|i| {
            if mix64(key.wrapping_add(i)) >> 40 >= threshold {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(values, x.shape(), &Device::Cpu)?;
    Ok(if x.dtype() == DType::F64 {
        mask
    } else {
        mask.to_dtype(x.dtype())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_masks_repeat_and_differ_by_draw_and_seed() -> Result<()> {
        let x = Tensor::ones((37, 53), DType::F64, &Device::Cpu)?;
        let draw2 = |seed| -> Result<(Vec<f64>, Vec<f64>)> {
            with_dropout_seed(seed, || {
                let a = dropout(&x, 0.3)?.flatten_all()?.to_vec1::<f64>()?;
                let b = dropout(&x, 0.3)?.flatten_all()?.to_vec1::<f64>()?;
                Ok((a, b))
            })
        };
        let (a1, b1) = draw2(11)?;
        let (a2, b2) = draw2(11)?;
        let (a3, _) = draw2(12)?;
        assert_eq!((&a1, &b1), (&a2, &b2));
        assert_ne!(a1, b1, "two draws of one scope are different masks");
        assert_ne!(a1, a3, "another seed gives another mask");
        // Kept elements are scaled by 1 / (1 - p); the kept fraction is near 1 - p.
        let scale = 1.0 / (1.0 - 0.3f32 as f64);
        assert!(a1.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-15));
        let kept = a1.iter().filter(|&&v| v != 0.0).count() as f64 / a1.len() as f64;
        assert!((kept - 0.7).abs() < 0.05, "kept fraction {kept}");
        Ok(())
    }

    #[test]
    fn nested_scopes_restore_the_outer_stream() -> Result<()> {
        let x = Tensor::ones(64, DType::F32, &Device::Cpu)?;
        let plain = with_dropout_seed(5, || -> Result<_> {
            let a = dropout(&x, 0.5)?.to_vec1::<f32>()?;
            let b = dropout(&x, 0.5)?.to_vec1::<f32>()?;
            Ok((a, b))
        })?;
        let nested = with_dropout_seed(5, || -> Result<_> {
            let a = dropout(&x, 0.5)?.to_vec1::<f32>()?;
            with_dropout_seed(9, || dropout(&x, 0.5))?;
            let b = dropout(&x, 0.5)?.to_vec1::<f32>()?;
            Ok((a, b))
        })?;
        assert_eq!(plain, nested);
        assert!(dropout(&x, 1.0).is_err());
        Ok(())
    }
}
