//! Activation checkpointing for Candle's autograd: a block whose activations are recomputed in
//! the backward instead of kept from the forward ([`checkpoint`]).
//!
//! Candle frees a tensor's activations when nothing refers to its graph any more. So the
//! forward of a checkpointed block `y = f(x)` runs `f` normally, detaches its result (dropping
//! the block's graph, hence its intermediates) and returns it through a one-input custom op on
//! `x` (`Checkpoint`): the outer graph keeps only `x` (the block's input) and the op.
//! When the backward reaches the op with `∂L/∂y`, the op:
//!
//! 1. rebuilds the block on a fresh graph from a copy of `x` made a [`Var`] (`f` must compute
//!    the same function again: the transformer runs each layer in a
//!    [`crate::lora::with_dropout_seed`] scope, so LoRA dropout draws the same masks);
//! 2. runs that graph's backward seeded with `∂L/∂y` (a scalar `SeedGrad` op whose gradient
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
//! A chain of blocks ([`checkpoint_chain`], how the transformer checkpoints its layers) is one
//! such op over all of them: the outer graph keeps the first block's input, and the op keeps
//! every later block's input itself, on the device or, with [`CheckpointStore::Host`], in host
//! memory (offloaded, as Unsloth does: the device then holds one block's activations and no
//! per-block inputs at all, at the price of one device-to-host copy per block in the forward
//! and one host-to-device copy in the backward). The backward walks the blocks from the last,
//! dropping each block's stored input as soon as it is recomputed.
//!
//! A row-wise block over many rows ([`checkpoint_rows`], how the long-context MLP runs in
//! tiles) is one such op too: its forward runs the block on one tile of rows at a time into one
//! output, and its backward recomputes and differentiates one tile at a time, writing the
//! input's gradient tile by tile into one buffer.
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
    /// Adds `grad` to the gradient held for `param`. What is stored is detached and, for a
    /// parameter's first gradient, a copy of its own: a gradient computed by an op's backward
    /// may be a tracked tensor (the fused LoRA backward's outputs are, so that a second
    /// derivative errors) and a view into a larger buffer (it packs `dx`, `dA` and `dB` into
    /// one). Stored as it is, its graph edge and its buffer would keep the whole recomputed
    /// block (its activations) alive until the merge: one block's worth per block of the chain.
    fn add(&self, param: &Tensor, grad: &Tensor) -> Result<()> {
        let grad = grad.detach();
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = match map.remove(&param.id()) {
            Some((_, old)) => (old + grad)?,
            None => grad.force_contiguous()?,
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

/// A block's computation: its result as `(y, None)`, or `(update, Some(residual))` for
/// `update + residual`.
pub type BlockFn = dyn Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync;

/// One block of a [`checkpoint_chain`]: its computation (called once in the forward and once in
/// the backward: it must compute the same function both times) and the trainable variables it
/// uses.
pub struct ChainBlock {
    /// The trainable variables the block uses (their gradients go to the accumulator).
    pub params: Vec<Var>,
    /// The block's computation.
    pub f: Box<BlockFn>,
}

impl ChainBlock {
    /// A block of computation `f` using `params`.
    pub fn new<F>(params: Vec<Var>, f: F) -> Self
    where
        F: Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync + 'static,
    {
        ChainBlock {
            params,
            f: Box::new(f),
        }
    }
}

/// Where a [`checkpoint_chain`] keeps the inputs of its blocks (after the first) from the
/// forward to the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointStore {
    /// On the blocks' device.
    #[default]
    Device,
    /// In host memory: copied out after each block's forward, back in before its
    /// recomputation. The device holds no per-block input. On CUDA the copies are
    /// asynchronous, on the device's stream, through page-locked buffers pinned once and reused
    /// (`flare::runtime::empty_cache` frees them).
    Host,
}

impl CheckpointStore {
    /// `t` as this store keeps it.
    fn keep(self, t: &Tensor) -> Result<Kept> {
        Ok(match self {
            CheckpointStore::Device => Kept::Tensor(t.clone()),
            CheckpointStore::Host if t.device().is_cpu() => Kept::Tensor(t.copy()?),
            #[cfg(feature = "cuda")]
            CheckpointStore::Host if t.device().is_cuda() => {
                Kept::Pinned(crate::runtime::offload::HostCopy::new(t)?)
            }
            CheckpointStore::Host => Kept::Tensor(t.to_device(&candle_core::Device::Cpu)?),
        })
    }
}

/// A block input as a [`CheckpointStore`] keeps it.
enum Kept {
    /// On the device, or in host memory as a CPU tensor.
    Tensor(Tensor),
    /// In a page-locked host buffer, copied asynchronously (CUDA offload).
    #[cfg(feature = "cuda")]
    Pinned(crate::runtime::offload::HostCopy),
}

impl Kept {
    /// The tensor back on `arg`'s device (`arg`: the chain's input).
    fn restore(self, arg: &Tensor) -> Result<Tensor> {
        match self {
            Kept::Tensor(t) => Ok(t.to_device(arg.device())?),
            #[cfg(feature = "cuda")]
            Kept::Pinned(h) => h.restore(arg),
        }
    }
}

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
    checkpoint_chain(
        x,
        vec![ChainBlock::new(params, f)],
        grads,
        CheckpointStore::Device,
    )
}

/// [`checkpoint`] of a chain of blocks `x -> f_1 -> f_2 -> ... -> f_n` as one op: the result of
/// the last block, whose backward recomputes the blocks one at a time from the last, each from
/// its input kept by `store` (the first block's input is the op's own input, kept by the outer
/// graph). Each block's result feeds the next as `y` or `update + residual`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use flare::models::checkpoint::{checkpoint_chain, ChainBlock, CheckpointGrads, CheckpointStore};
/// let dev = Device::Cpu;
/// let w = Var::new(&[2f64, 3.], &dev)?;
/// let x = Var::new(&[1f64, 4.], &dev)?;
/// let acc = CheckpointGrads::default();
/// let block = |w: Var| ChainBlock::new(vec![w.clone()], move |x: &Tensor| {
///     Ok((x.mul(w.as_tensor())?, None))
/// });
/// // y = x * w * w, both inputs of the second block held in host memory.
/// let y = checkpoint_chain(
///     x.as_tensor(), vec![block(w.clone()), block(w.clone())], &acc, CheckpointStore::Host,
/// )?;
/// assert_eq!(y.to_vec1::<f64>()?, [4., 36.]);
/// let mut grads = y.sum_all()?.backward()?;
/// acc.merge_into(&mut grads)?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f64>()?, [4., 9.]);
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec1::<f64>()?, [4., 24.]); // 2 x w
/// # Ok::<(), flare::Error>(())
/// ```
///
/// Errors: a block's errors; an `update` and `residual` of different shapes, dtypes or
/// devices; the host copies' errors with [`CheckpointStore::Host`].
pub fn checkpoint_chain(
    x: &Tensor,
    blocks: Vec<ChainBlock>,
    grads: &CheckpointGrads,
    store: CheckpointStore,
) -> Result<Tensor> {
    let grad_input = x.track_op();
    if blocks.is_empty() || (!grad_input && blocks.iter().all(|b| b.params.is_empty())) {
        let mut h = x.clone();
        for b in &blocks {
            h = sum_parts((b.f)(&h)?)?;
        }
        return Ok(h);
    }
    // An input that tracks nothing is made a variable, so that the op joins the graph.
    let input = if grad_input {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let last = blocks.len() - 1;
    let mut saved = Vec::with_capacity(last);
    let mut h = input.clone();
    for b in &blocks[..last] {
        // The sum is materialised and detached: the block's graph (its intermediates) goes.
        h = sum_parts((b.f)(&h)?)?.detach();
        saved.push(store.keep(&h)?);
    }
    let parts = detached_parts((blocks[last].f)(&h)?)?;
    drop(h);
    let op = Checkpoint {
        parts: Mutex::new(Some(parts)),
        saved: Mutex::new(saved),
        blocks,
        grads: grads.clone(),
        grad_input,
    };
    Ok(input.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// The last block's result, detached, as the op's forward will read it: `y` as one contiguous
/// whole storage (copied only when it is not), or `(update, residual)` checked alike.
fn detached_parts((y, residual): (Tensor, Option<Tensor>)) -> Result<(Tensor, Option<Tensor>)> {
    Ok(match residual {
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
    })
}

/// `y`, or `update + residual`.
fn sum_parts((y, r): (Tensor, Option<Tensor>)) -> Result<Tensor> {
    Ok(match r {
        Some(r) => (y + r)?,
        None => y,
    })
}

/// The checkpoint op on a chain's input (see the module docs).
struct Checkpoint {
    /// The last block's detached result, taken (and summed or copied) by the forward.
    parts: Mutex<Option<(Tensor, Option<Tensor>)>>,
    /// The inputs of blocks 1.. as the store keeps them, taken by the backward.
    saved: Mutex<Vec<Kept>>,
    blocks: Vec<ChainBlock>,
    grads: CheckpointGrads,
    /// Whether the input's gradient is wanted (false: it was made a variable only to join the
    /// graph).
    grad_input: bool,
}

/// A checkpoint op's output from the parts its construction stored, taken from `slot` (once)
/// on one backend: `update + residual` (Candle's own add kernel on the parts' layouts), or a
/// copy of `y`.
fn take_output<S: BackendStorage>(
    slot: &Mutex<Option<(Tensor, Option<Tensor>)>>,
    unwrap: fn(&Storage) -> Option<&S>,
) -> candle_core::Result<(S, Shape)> {
    let parts = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    let Some((y, r)) = parts else {
        candle_core::bail!("{OP}: internal error: the forward ran twice");
    };
    let wrong =
        || candle_core::Error::Msg(format!("{OP}: internal error: a part is on another device"));
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

impl Checkpoint {
    /// The chain's backward: from `∂L/∂(result)`, each block from the last is rebuilt on a
    /// fresh graph from a copy of its input (a variable when a gradient is wanted for it) and
    /// differentiated, its parameters' gradients going to the accumulator; its input's
    /// gradient seeds the block before. Returns the chain input's gradient when it is wanted.
    fn backward(&self, arg: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let mut saved =
            std::mem::take(&mut *self.saved.lock().unwrap_or_else(PoisonError::into_inner));
        if saved.len() + 1 != self.blocks.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "internal error: the chain's backward ran twice".into(),
            });
        }
        let mut grad = grad_res.detach();
        for (k, block) in self.blocks.iter().enumerate().rev() {
            let stored = if k == 0 {
                arg.detach()
            } else {
                // Dropped from the store now: each input lives until its block is recomputed.
                match saved.pop() {
                    Some(t) => t.restore(arg)?,
                    None => {
                        return Err(Error::InvalidArgument {
                            op: OP,
                            msg: "internal error: the chain lost a block's input".into(),
                        })
                    }
                }
            };
            let want_dx = k > 0 || self.grad_input;
            // The variable is a copy: the stored tensor goes at once (one input alive, not two).
            let (input, x) = if want_dx {
                let v = Var::from_tensor(&stored)?;
                drop(stored);
                let x = v.as_tensor().clone();
                (Some(v), x)
            } else {
                (None, stored)
            };
            let y = sum_parts((block.f)(&x)?)?;
            if y.dims() != grad.dims() {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    msg: "the block's recomputed output differs in shape from its forward's \
                          (recomputed, forward)",
                    lhs: y.dims().to_vec(),
                    rhs: grad.dims().to_vec(),
                });
            }
            let seed = y.apply_op1(SeedGrad { grad })?;
            let g = seed.backward()?;
            for p in &block.params {
                if let Some(gp) = g.get(p.as_tensor()) {
                    self.grads.add(p.as_tensor(), gp)?;
                }
            }
            let Some(v) = input else {
                return Ok(None);
            };
            // A block whose result does not depend on its input passes a zero gradient on.
            // Detached: an op's backward may return a tracked gradient, whose graph edges reach
            // back into this block's recomputation and would keep all of its activations alive
            // while the block before is recomputed.
            grad = match g.get(v.as_tensor()) {
                Some(gx) => gx.detach(),
                None => v.as_tensor().zeros_like()?,
            };
        }
        Ok(Some(grad))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        take_output(&self.parts, |s| match s {
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
        take_output(&self.parts, |s| match s {
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

/// A row-wise block `f` over the rows of a 2-D `x` (`[rows, width]`) in tiles of `tile` rows,
/// each tile's activations recomputed in the backward (see the module docs): returns the tiles'
/// results `f(t, x[t·tile ..])` stacked into `[rows, out]`. `f` gets the tile's index `t` (to
/// seed any randomness per tile) and its rows; it must compute the same function again in the
/// backward, and each output row must depend on its input row only (an MLP, a norm).
///
/// One op over all tiles: its forward writes the tiles' results into one output, and its
/// backward recomputes and differentiates one tile at a time, writing the input's gradient tile
/// by tile into one buffer and adding the gradients of `params` to `grads` (merged with
/// [`CheckpointGrads::merge_into`]). So no tile costs a tensor of the whole input's size, as a
/// `narrow` of the input per tile would in the backward (Candle pads each tile's gradient to
/// the input's size and adds it).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use flare::models::checkpoint::{checkpoint_rows, CheckpointGrads};
/// let dev = Device::Cpu;
/// let w = Var::new(&[[2f64], [3.]], &dev)?; // [2, 1]
/// let x = Var::new(&[[1f64, 1.], [2., 0.], [0., 5.]], &dev)?; // 3 rows, tiles of 2 and 1
/// let acc = CheckpointGrads::default();
/// let w2 = w.clone();
/// let y = checkpoint_rows(x.as_tensor(), 2, vec![w.clone()], &acc, move |_, x| {
///     Ok(x.matmul(w2.as_tensor())?)
/// })?;
/// assert_eq!(y.to_vec2::<f64>()?, [[5.], [4.], [15.]]);
/// let mut grads = y.sum_all()?.backward()?;
/// acc.merge_into(&mut grads)?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec2::<f64>()?, [[2., 3.], [2., 3.], [2., 3.]]);
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec2::<f64>()?, [[3.], [6.]]);
/// # Ok::<(), flare::Error>(())
/// ```
///
/// Errors: `x` not 2-D or `tile` 0; `f`'s errors; a tile result that is not 2-D with the
/// tile's rows, or whose width or dtype differs between tiles.
pub fn checkpoint_rows<F>(
    x: &Tensor,
    tile: usize,
    params: Vec<Var>,
    grads: &CheckpointGrads,
    f: F,
) -> Result<Tensor>
where
    F: Fn(usize, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if x.rank() != 2 || tile == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "checkpoint_rows takes a 2-D input and a tile of at least one row (got {:?}, \
                 tile {tile})",
                x.dims()
            ),
        });
    }
    let grad_input = x.track_op();
    if !grad_input && params.is_empty() {
        return run_row_tiles(x, tile, &f);
    }
    let input = if grad_input {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let y = run_row_tiles(&input.detach(), tile, &f)?;
    let op = RowCheckpoint {
        parts: Mutex::new(Some((y, None))),
        tile,
        f: Box::new(f),
        params,
        grads: grads.clone(),
        grad_input,
    };
    Ok(input.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// The row-wise block of a [`RowCheckpoint`].
type RowFn = dyn Fn(usize, &Tensor) -> Result<Tensor> + Send + Sync;

/// `f` over `x`'s row tiles (no graph: `x` is detached), the results written into one output.
fn run_row_tiles(x: &Tensor, tile: usize, f: &RowFn) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if rows == 0 {
        return f(0, x);
    }
    let mut out: Option<Tensor> = None;
    for (t, start) in (0..rows).step_by(tile).enumerate() {
        let len = tile.min(rows - start);
        let y = f(t, &x.narrow(0, start, len)?)?.detach();
        let wrong = |what: &str| Error::InvalidArgument {
            op: OP,
            msg: format!(
                "checkpoint_rows: tile {t} ({len} rows) gave {:?} {:?}: {what}",
                y.dims(),
                y.dtype()
            ),
        };
        if y.rank() != 2 || y.dim(0)? != len {
            return Err(wrong("a tile's result must be 2-D with the tile's rows"));
        }
        let dst = match &out {
            Some(o) => o,
            None => out.insert(Tensor::zeros((rows, y.dim(1)?), y.dtype(), y.device())?),
        };
        if dst.dim(1)? != y.dim(1)? || dst.dtype() != y.dtype() {
            return Err(wrong(
                "every tile's result must have the first one's width and dtype",
            ));
        }
        dst.slice_set(&y.contiguous()?, 0, start)?;
    }
    out.ok_or_else(|| Error::InvalidArgument {
        op: OP,
        msg: "checkpoint_rows: no tile ran".into(),
    })
}

/// The op of [`checkpoint_rows`].
struct RowCheckpoint {
    /// The tiles' results (no residual), taken (copied) by the forward.
    parts: Mutex<Option<(Tensor, Option<Tensor>)>>,
    tile: usize,
    f: Box<RowFn>,
    params: Vec<Var>,
    grads: CheckpointGrads,
    /// Whether the input's gradient is wanted.
    grad_input: bool,
}

impl RowCheckpoint {
    /// Each tile rebuilt on a fresh graph and differentiated with its rows of `∂L/∂y`; the
    /// parameters' gradients go to the accumulator, the input's into one buffer.
    fn backward(&self, arg: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let rows = arg.dim(0)?;
        let dx = if self.grad_input {
            Some(Tensor::zeros(arg.shape(), arg.dtype(), arg.device())?)
        } else {
            None
        };
        let grad = grad_res.detach();
        for (t, start) in (0..rows).step_by(self.tile).enumerate() {
            let len = self.tile.min(rows - start);
            let rows_t = arg.narrow(0, start, len)?.detach();
            let (input, x) = if self.grad_input {
                let v = Var::from_tensor(&rows_t)?;
                let x = v.as_tensor().clone();
                (Some(v), x)
            } else {
                (None, rows_t)
            };
            let y = (self.f)(t, &x)?;
            let g_t = grad.narrow(0, start, len)?;
            if y.dims() != g_t.dims() {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    msg: "a tile's recomputed result differs in shape from its forward's \
                          (recomputed, forward)",
                    lhs: y.dims().to_vec(),
                    rhs: g_t.dims().to_vec(),
                });
            }
            let g = y.apply_op1(SeedGrad { grad: g_t })?.backward()?;
            for p in &self.params {
                if let Some(gp) = g.get(p.as_tensor()) {
                    self.grads.add(p.as_tensor(), gp)?;
                }
            }
            if let (Some(dx), Some(v)) = (&dx, &input) {
                // Rows whose result does not depend on them keep their zeros.
                if let Some(gx) = g.get(v.as_tensor()) {
                    dx.slice_set(&gx.contiguous()?, 0, start)?;
                }
            }
        }
        Ok(dx)
    }
}

impl CustomOp1 for RowCheckpoint {
    fn name(&self) -> &'static str {
        "checkpoint-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        take_output(&self.parts, |s| match s {
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
        take_output(&self.parts, |s| match s {
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

    /// Blocks of fused LoRA linears (whose backward returns tracked gradients, views of one
    /// packed `[dx | dA | dB]` buffer): what the accumulator keeps is detached and holds only
    /// the parameter's own elements, so that no recomputed block's activations stay alive
    /// until the merge; and the gradients equal the plain (unchecked) run's.
    #[test]
    fn accumulated_gradients_keep_nothing_of_the_recomputation() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = crate::lora::LoraConfig {
            r: 2,
            alpha: 4.0,
            ..Default::default()
        };
        let mut lins = Vec::new();
        for i in 0..3 {
            let w = Tensor::randn(0f32, 0.3, (6, 6), &dev)?;
            let mut l = crate::lora::LoraLinear::new(w, None)?;
            l.add_adapter("a", &cfg, i)?;
            l.set_active(Some("a"))?;
            l.set_training(true);
            for v in l.trainable_vars() {
                v.set(&Tensor::randn(0f32, 0.5, v.dims(), &dev)?)?;
            }
            lins.push(l);
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 6), &dev)?)?;
        let blocks: Vec<ChainBlock> = lins
            .iter()
            .map(|l| {
                let l = l.clone();
                ChainBlock::new(l.trainable_vars(), move |x: &Tensor| {
                    Ok((l.forward(x)?.tanh()?, Some(x.clone())))
                })
            })
            .collect();
        let acc = CheckpointGrads::default();
        let y = checkpoint_chain(x.as_tensor(), blocks, &acc, CheckpointStore::Device)?;
        let mut g = y.sqr()?.sum_all()?.backward()?;
        {
            let map = acc.inner.lock().unwrap_or_else(PoisonError::into_inner);
            assert_eq!(map.len(), 6);
            for (p, gp) in map.values() {
                assert!(!gp.track_op(), "a stored gradient is tracked");
                assert_eq!(gp.dims(), p.dims());
                let (storage, layout) = gp.storage_and_layout();
                let Storage::Cpu(cs) = &*storage else {
                    panic!("not on the CPU")
                };
                assert_eq!(layout.start_offset(), 0);
                assert_eq!(
                    cs.as_slice::<f32>()?.len(),
                    p.elem_count(),
                    "a view of a larger buffer"
                );
            }
        }
        acc.merge_into(&mut g)?;
        // Plain.
        let mut h = x.as_tensor().clone();
        for l in &lins {
            h = (l.forward(&h)?.tanh()? + h)?;
        }
        let plain = h.sqr()?.sum_all()?.backward()?;
        for l in &lins {
            for v in l.trainable_vars() {
                let a = g
                    .get(v.as_tensor())
                    .expect("merged")
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let b = plain
                    .get(v.as_tensor())
                    .expect("plain")
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                assert_eq!(a, b);
            }
        }
        Ok(())
    }

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
        // The same three blocks as one chain, its inputs on the device or in host memory, and
        // the chain's input tracked this time: the same values again, and x0's gradient.
        let x0v = Var::from_tensor(&x0)?;
        let plain_x = {
            let mut h = x0v.as_tensor().clone();
            for (w1, w2) in &ws {
                h = sum_parts(block(w1.clone(), w2.clone())(&h)?)?;
            }
            (h * &weights)?.sum_all()?.backward()?
        };
        for store in [CheckpointStore::Device, CheckpointStore::Host] {
            let blocks = ws
                .iter()
                .map(|(w1, w2)| {
                    ChainBlock::new(vec![w1.clone(), w2.clone()], block(w1.clone(), w2.clone()))
                })
                .collect();
            let h = checkpoint_chain(x0v.as_tensor(), blocks, &acc, store)?;
            let loss = (h * &weights)?.sum_all()?;
            assert_eq!(loss.to_scalar::<f64>()?, plain_loss.to_scalar::<f64>()?);
            let mut g = loss.backward()?;
            assert_eq!(acc.merge_into(&mut g)?, 6, "{store:?}");
            for w in ws.iter().flat_map(|(a, b)| [a, b]).chain([&x0v]) {
                let a = g.get(w.as_tensor()).expect("merged").to_vec2::<f64>()?;
                let b = plain_x
                    .get(w.as_tensor())
                    .expect("plain")
                    .to_vec2::<f64>()?;
                assert_eq!(a, b, "{store:?}");
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

    /// A row-wise two-parameter block over 11 rows in tiles of 4 (4, 4, 3) gives the values and
    /// gradients of the untiled block exactly, with the input's gradient whole and the
    /// parameters' gradients only through the accumulator; a block whose rows mix is not what
    /// it is for, and bad arguments are refused.
    #[test]
    fn row_tiles_give_the_untiled_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, (11, 5), &dev)?;
        let (w1, w2) = (
            Var::randn(0f64, 0.5, (5, 7), &dev)?,
            Var::randn(0f64, 0.5, (7, 3), &dev)?,
        );
        let block = |w1: Var, w2: Var| {
            move |_: usize, x: &Tensor| -> Result<Tensor> {
                Ok(x.matmul(w1.as_tensor())?.tanh()?.matmul(w2.as_tensor())?)
            }
        };
        let r = Tensor::randn(0f64, 1.0, (11, 3), &dev)?;
        // Untiled.
        let xp = Var::from_tensor(&x0)?;
        let yp = block(w1.clone(), w2.clone())(0, xp.as_tensor())?;
        let gp = (&yp * &r)?.sum_all()?.backward()?;
        // Tiled.
        let xt = Var::from_tensor(&x0)?;
        let acc = CheckpointGrads::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let f = block(w1.clone(), w2.clone());
        let yt = checkpoint_rows(
            xt.as_tensor(),
            4,
            vec![w1.clone(), w2.clone()],
            &acc,
            move |t, x| {
                seen2.lock().unwrap().push((t, x.dim(0)?));
                f(t, x)
            },
        )?;
        assert_eq!(yt.to_vec2::<f64>()?, yp.to_vec2::<f64>()?);
        let mut gt = (&yt * &r)?.sum_all()?.backward()?;
        assert!(gt.get(w1.as_tensor()).is_none());
        assert_eq!(acc.merge_into(&mut gt)?, 2);
        for (what, v) in [
            ("x", xt.as_tensor()),
            ("w1", w1.as_tensor()),
            ("w2", w2.as_tensor()),
        ] {
            let want = match what {
                "x" => gp.get(xp.as_tensor()),
                _ => gp.get(v),
            };
            let (a, b) = (gt.get(v).expect(what), want.expect(what));
            let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(err < 1e-12, "{what}: {err}");
        }
        // Forward then backward, each tile once, with its index and rows.
        let order = [(0, 4), (1, 4), (2, 3)];
        let want: Vec<_> = order.iter().chain(order.iter()).copied().collect();
        assert_eq!(*seen.lock().unwrap(), want);
        // An input that tracks nothing with no parameters: the tiles' results, no op.
        let plain = checkpoint_rows(&x0, 4, vec![], &acc, |_, x| Ok(x.clone()))?;
        assert!(!plain.track_op());
        assert_eq!(plain.to_vec2::<f64>()?, x0.to_vec2::<f64>()?);
        // Refused: a 3-D input, a tile of 0, a tile result of other rows or width.
        let three = x0.reshape((11, 5, 1))?;
        assert!(checkpoint_rows(&three, 4, vec![], &acc, |_, x| Ok(x.clone())).is_err());
        assert!(checkpoint_rows(&x0, 0, vec![], &acc, |_, x| Ok(x.clone())).is_err());
        let rows = checkpoint_rows(&x0, 4, vec![], &acc, |_, x| Ok(x.narrow(0, 0, 1)?));
        assert!(rows.unwrap_err().to_string().contains("tile's rows"));
        let width = checkpoint_rows(&x0, 4, vec![], &acc, |t, x| {
            Ok(if t == 0 {
                x.clone()
            } else {
                x.narrow(1, 0, 2)?
            })
        });
        assert!(width.unwrap_err().to_string().contains("width"));
        Ok(())
    }
}
