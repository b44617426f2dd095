//! Activation checkpointing for Candle's autograd: a block whose activations are recomputed in
//! the backward instead of kept from the forward ([`checkpoint`]).
//!
//! Candle frees a tensor's activations when nothing refers to its graph any more. So the
//! forward of a checkpointed block `y = f(x)` runs `f` normally, detaches its result (dropping
//! the block's graph, hence its intermediates) and returns it through a one-input custom op on
//! `x` ([`Checkpoint`]): the outer graph keeps only `x` (the block's input) and the op.
//! When the backward reaches the op with `∂L/∂y`, the op:
//!
//! 1. rebuilds the block on a fresh graph from a copy of `x` made a [`Var`] (`f` must compute
//!    the same function again: the transformer runs each layer in a
//!    [`crate::lora::with_dropout_seed`] scope, so LoRA dropout draws the same masks);
//! 2. runs that graph's backward seeded with `∂L/∂y` (a scalar [`SeedGrad`] op whose gradient
//!    is `∂L/∂y`, so nothing of the size of `y` is multiplied or summed to seed it);
//! 3. returns `∂L/∂x` to the outer backward, and adds the gradients of the block's parameters
//!    into a [`CheckpointGrads`] accumulator: the outer graph cannot reach them (it holds the
//!    block's output only through the detached result), so the caller merges them into the
//!    outer backward's gradients afterwards ([`CheckpointGrads::merge_into`]). Nothing is
//!    counted twice: parameters used only inside checkpointed blocks get their gradient only
//!    from the accumulator.
//!
//! Memory: the forward holds one block's intermediates at a time (while it runs), then only the
//! inputs of the blocks; the backward rebuilds one block at a time. The op's output is the
//! block's own last operation when `f` returns its result as a sum `update + residual` (a
//! residual block): the op's forward computes that sum, so checkpointing costs no copy. A
//! block returning one tensor costs one copy of it.
//!
//! The block's input is made a [`Var`] when it does not track gradients (the embeddings of
//! the first layer, say) so that the op is part of the graph and its parameters get their
//! gradient; its own gradient is then not returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};

use crate::{Error, Result};

const OP: &str = "checkpoint";

/// The parameter gradients computed by checkpointed blocks' backward passes, waiting to be
/// merged into the outer backward's [`GradStore`]. Clones share one accumulator.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use flare::models::checkpoint::{checkpoint, CheckpointGrads};
/// let dev = Device::Cpu;
/// let w = Var::new(&[2f64, 3.], &dev)?;
/// let x = Var::new(&[1f64, 4.], &dev)?;
/// let acc = CheckpointGrads::default();
/// let w2 = w.clone();
/// // y = x * w + x, recomputed in the backward.
/// let y = checkpoint(x.as_tensor(), vec![w.clone()], &acc, move |x| {
///     Ok((x.mul(w2.as_tensor())?, Some(x.clone())))
/// })?;
/// let mut grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f64>()?, [3., 4.]);
/// assert!(grads.get(w.as_tensor()).is_none()); // not reached by the outer graph...
/// acc.merge_into(&mut grads)?; // ...until merged
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec1::<f64>()?, [1., 4.]);
/// assert!(acc.is_empty());
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct CheckpointGrads {
    /// By parameter id: the parameter and its summed gradient.
    inner: Arc<Mutex<HashMap<TensorId, (Tensor, Tensor)>>>,
}

impl CheckpointGrads {
    /// Adds `grad` to the gradient held for `param`.
    fn add(&self, param: &Tensor, grad: &Tensor) -> Result<()> {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = match map.remove(&param.id()) {
            Some((_, old)) => (old + grad)?,
            None => grad.clone(),
        };
        map.insert(param.id(), (param.clone(), sum));
        Ok(())
    }

    /// Moves every accumulated gradient into `grads` (added to the gradient `grads` already
    /// holds for that parameter, if any) and empties the accumulator. Returns how many
    /// parameters were merged.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<usize> {
        let drained: Vec<(Tensor, Tensor)> = {
            let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            map.drain().map(|(_, v)| v).collect()
        };
        let n = drained.len();
        for (param, g) in drained {
            let sum = match grads.remove(&param) {
                Some(old) => (old + g)?,
                None => g,
            };
            grads.insert(&param, sum);
        }
        Ok(n)
    }

    /// Drops every accumulated gradient (e.g. after a backward whose gradients are not used).
    pub fn clear(&self) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The number of parameters holding an accumulated gradient.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no gradient is waiting to be merged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A block's recomputation: its result as `(y, None)`, or `(update, Some(residual))` for
/// `update + residual`.
type Block = dyn Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync;

/// Runs block `f` on `x` with its activations recomputed in the backward (see the module
/// docs): returns `f`'s result (`y`, or `update + residual` when `f` returns
/// `(update, Some(residual))`), whose backward gives `x` its gradient and adds the gradients of
/// `params` (the trainable variables `f` uses) to `grads`, to be merged with
/// [`CheckpointGrads::merge_into`] after the outer backward.
///
/// `f` is called once now and once in the backward: it must compute the same function both
/// times (seed any randomness). When `x` tracks no gradient and `params` is empty, the
/// result is `f(x)` without the op (nothing to differentiate).
///
/// Errors: `f`'s errors; an `update` and `residual` of different shapes, dtypes or devices.
pub fn checkpoint<F>(x: &Tensor, params: Vec<Var>, grads: &CheckpointGrads, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync + 'static,
{
    let grad_input = x.track_op();
    if !grad_input && params.is_empty() {
        return sum_parts(f(x)?);
    }
    // An input that tracks nothing is made a variable, so that the op joins the graph.
    let input = if grad_input {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let (y, residual) = f(&input)?;
    let parts = match residual {
        None => {
            // One copy: a contiguous whole storage (try_clone copies the storage as it is).
            let y = y.detach();
            let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
                y
            } else {
                y.force_contiguous()?
            };
            (y, None)
        }
        Some(r) => {
            crate::ops::check_same(OP, &y, &r)?;
            if y.dims() != r.dims() {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    msg: "the block's update and residual must have one shape (update, residual)",
                    lhs: y.dims().to_vec(),
                    rhs: r.dims().to_vec(),
                });
            }
            (y.detach(), Some(r.detach()))
        }
    };
    let op = Checkpoint {
        parts: Mutex::new(Some(parts)),
        block: Box::new(f),
        params,
        grads: grads.clone(),
        grad_input,
    };
    Ok(input.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// `y`, or `update + residual`.
fn sum_parts((y, r): (Tensor, Option<Tensor>)) -> Result<Tensor> {
    Ok(match r {
        Some(r) => (y + r)?,
        None => y,
    })
}

/// The checkpoint op on a block's input (see the module docs).
struct Checkpoint {
    /// The block's detached result, taken (and summed or copied) by the forward.
    parts: Mutex<Option<(Tensor, Option<Tensor>)>>,
    block: Box<Block>,
    params: Vec<Var>,
    grads: CheckpointGrads,
    /// Whether the input's gradient is wanted (false: it was made a variable only to join the
    /// graph).
    grad_input: bool,
}

impl Checkpoint {
    /// The op's output from the stored parts on one backend: `update + residual` (Candle's
    /// own add kernel on the parts' layouts), or a copy of `y`.
    fn output<S: BackendStorage>(
        &self,
        unwrap: fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((y, r)) = parts else {
            candle_core::bail!("{OP}: internal error: the forward ran twice");
        };
        let wrong = || {
            candle_core::Error::Msg(format!("{OP}: internal error: a part is on another device"))
        };
        let (sy, ly) = y.storage_and_layout();
        let sy = unwrap(&sy).ok_or_else(wrong)?;
        let out = match r {
            None => sy.try_clone(ly)?,
            Some(r) => {
                let (sr, lr) = r.storage_and_layout();
                let sr = unwrap(&sr).ok_or_else(wrong)?;
                sy.binary_impl::<candle_core::op::Add>(sr, ly, lr)?
            }
        };
        Ok((out, y.shape().clone()))
    }

    fn backward(&self, arg: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // A fresh graph from a copy of the input (a variable only when its gradient is wanted).
        let input = if self.grad_input {
            Some(Var::from_tensor(&arg.detach())?)
        } else {
            None
        };
        let x = match &input {
            Some(v) => v.as_tensor().clone(),
            None => arg.detach(),
        };
        let y = sum_parts((self.block)(&x)?)?;
        if y.dims() != grad_res.dims() {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "the block's recomputed output differs in shape from its forward's \
                      (recomputed, forward)",
                lhs: y.dims().to_vec(),
                rhs: grad_res.dims().to_vec(),
            });
        }
        let seed = y.apply_op1(SeedGrad {
            grad: grad_res.detach(),
        })?;
        let g = seed.backward()?;
        for p in &self.params {
            if let Some(gp) = g.get(p.as_tensor()) {
                self.grads.add(p.as_tensor(), gp)?;
            }
        }
        Ok(input.and_then(|v| g.get(v.as_tensor()).cloned()))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.backward(arg, grad_res).map_err(Error::into_candle)
    }
}

/// A scalar zero whose gradient with respect to its input `y` is `grad`: the root of a
/// backward seeded with `∂L/∂y` instead of ones.
struct SeedGrad {
    grad: Tensor,
}

impl CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "checkpoint-seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A two-parameter block `tanh(x · w1) · w2 + x` checkpointed three times in a row gives
    /// the gradients of the plain composition, exactly (the same ops run in the same order).
    #[test]
    fn stacked_blocks_give_the_plain_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, (3, 5), &dev)?;
        let ws: Vec<(Var, Var)> = (0..3)
            .map(|_| -> Result<_> {
                Ok((
                    Var::randn(0f64, 0.5, (5, 5), &dev)?,
                    Var::randn(0f64, 0.5, (5, 5), &dev)?,
                ))
            })
            .collect::<Result<_>>()?;
        let block = |w1: Var, w2: Var| {
            move |x: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
                let h = x.matmul(w1.as_tensor())?.tanh()?;
                Ok((h.matmul(w2.as_tensor())?, Some(x.clone())))
            }
        };
        let weights = Tensor::randn(0f64, 1.0, (3, 5), &dev)?;
        // Plain.
        let mut h = x0.clone();
        for (w1, w2) in &ws {
            h = sum_parts(block(w1.clone(), w2.clone())(&h)?)?;
        }
        let plain_loss = (h * &weights)?.sum_all()?;
        let plain = plain_loss.backward()?;
        // Checkpointed: x0 tracks nothing, so it is made a variable inside.
        let acc = CheckpointGrads::default();
        let mut h = x0.clone();
        for (w1, w2) in &ws {
            let params = vec![w1.clone(), w2.clone()];
            h = checkpoint(&h, params, &acc, block(w1.clone(), w2.clone()))?;
        }
        let loss = (h * &weights)?.sum_all()?;
        assert_eq!(
            loss.to_scalar::<f64>()?,
            plain_loss.to_scalar::<f64>()?,
            "forward differs"
        );
        let mut g = loss.backward()?;
        assert_eq!(acc.merge_into(&mut g)?, 6);
        for (w1, w2) in &ws {
            for w in [w1, w2] {
                let a = g.get(w.as_tensor()).expect("merged").to_vec2::<f64>()?;
                let b = plain.get(w.as_tensor()).expect("plain").to_vec2::<f64>()?;
                assert_eq!(a, b);
            }
        }
        Ok(())
    }

    /// The one-tensor form copies the result; a merged gradient is added to one already
    /// present; a block with nothing to differentiate is not wrapped.
    #[test]
    fn single_output_and_merge_adds() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        let x = Var::new(&[[0.5f32, -1.]], &dev)?;
        let acc = CheckpointGrads::default();
        let w2 = w.clone();
        let y = checkpoint(x.as_tensor(), vec![w.clone()], &acc, move |x| {
            Ok((x.matmul(w2.as_tensor())?, None))
        })?;
        // The loss also uses w directly: its gradient there and the block's add up.
        let loss = (y.sum_all()? + w.as_tensor().sum_all()?)?;
        let mut g = loss.backward()?;
        acc.merge_into(&mut g)?;
        let gw = g.get(w.as_tensor()).unwrap().to_vec2::<f32>()?;
        assert_eq!(gw, [[1.5, 1.5], [0.0, 0.0]]);
        let gx = g.get(x.as_tensor()).unwrap().to_vec2::<f32>()?;
        assert_eq!(gx, [[3., 7.]]);
        // Nothing tracks: f(x) itself.
        let c = Tensor::ones((2, 2), DType::F32, &dev)?;
        let out = checkpoint(&c, vec![], &acc, |x| Ok((x.clone(), Some(x.clone()))))?;
        assert!(!out.track_op());
        assert_eq!(out.to_vec2::<f32>()?, [[2., 2.], [2., 2.]]);
        // Mismatched parts are refused.
        let bad = checkpoint(x.as_tensor(), vec![], &acc, |x| {
            Ok((x.clone(), Some(x.t()?.contiguous()?)))
        });
        assert!(bad.is_err());
        Ok(())
    }
}
