//! One micro-batch's forward, loss and backward ([`StepGraphs::pass`]), replayed as a CUDA
//! graph where that applies.
//!
//! A LoRA step of a small model is bound by the host on a GPU: the Qwen2-0.5B shape at 4x512
//! issues thousands of kernels per step, each a few microseconds of Candle and driver work on
//! the host for a few microseconds of GPU work. [`StepGraphs`] records the pass of a padded
//! batch shape into a CUDA graph the second time the shape is seen, and replays it for that
//! shape from then on: one launch per micro-batch. The first pass of a shape runs op by op and
//! fills every cache the capture relies on (cuBLASLt's autotuned plans, cuDNN's plans, Candle's
//! launch-parameter uploads); the second is captured, then launched.
//!
//! A replay reads the token ids, the targets and the loss scale from input buffers that
//! [`StepGraphs::pass`] fills before each launch, and writes the scaled loss and every
//! parameter's gradient into output buffers that live with the graph. Everything else the pass
//! computes is the graph's own memory. The values are those of the op-by-op pass (same
//! kernels, same order).
//!
//! It applies (otherwise the pass runs op by op) on CUDA with `FLARE_STEP_GRAPH` and
//! `FLARE_LAUNCH_PARAM_CACHE` on ([`crate::runtime::Settings`]), to a padded batch (a packed
//! batch's document boundaries are host data the pass is built around), without LoRA dropout
//! (its masks are seeded per step), without gradient checkpointing (the memory-bound
//! long-context setting, where the GPU, not the host, sets the pace), and in a single process
//! (see [`StepGraphs::new`]). A shape whose capture fails says why on stderr once and runs op
//! by op from then on, as do shapes beyond the first [`MAX_GRAPHS`] captured (padded batches
//! of varied lengths: `--packing false` with examples of one length gives every step one shape).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::data::Batch;
use super::trainer::batch_nll_sum;
use crate::models::Transformer;
use crate::Result;

/// One micro-batch's pass: the loss scaled as asked, a scalar on the device, and the gradient
/// of each parameter (in the order given; `None` for a parameter the loss does not reach).
///
/// A graphed pass's tensors are the graph's output buffers: they hold these values until the
/// next pass of the same shape overwrites them, so copy them (or finish with them, as the
/// optimizer step does) before that.
#[derive(Debug)]
pub struct Pass {
    /// The loss times the scale, a scalar.
    pub loss: Tensor,
    /// Per parameter, its gradient.
    pub grads: Vec<Option<Tensor>>,
    /// Whether a CUDA graph ran the pass.
    pub graphed: bool,
}

/// The most shapes captured at once: each graph keeps its input and output buffers and a
/// reservation in the driver's graph memory, so a run whose padded batches take many lengths
/// captures the first ones seen twice and runs the rest op by op.
pub const MAX_GRAPHS: usize = 16;

/// What is known of one batch shape.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Slot {
    /// Seen once, op by op: the loss dtype it had.
    Warm(DType),
    /// Captured.
    #[cfg(feature = "cuda")]
    Ready(Box<cuda::Captured>),
    /// The capture failed (already reported): op by op.
    Refused,
}

/// The captured passes of one run, by batch shape; see the [module docs](self). It belongs to
/// one model and one parameter list: a graph replays the adapters it was captured with, so
/// changing which adapters are active (or injecting new ones) needs a new `StepGraphs`.
pub struct StepGraphs {
    allowed: bool,
    shapes: HashMap<(usize, usize), Slot>,
}

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraphs")
            .field("allowed", &self.allowed)
            .field("shapes", &self.shapes.len())
            .finish()
    }
}

impl StepGraphs {
    /// The graphs of a run on `device` whose LoRA dropout is `dropout`, in a process group of
    /// `world_size` ranks: they may apply on CUDA, with `FLARE_STEP_GRAPH` and
    /// `FLARE_LAUNCH_PARAM_CACHE` on, no dropout and one rank; elsewhere every pass runs op
    /// by op.
    pub fn new(device: &Device, dropout: f32, world_size: usize) -> Self {
        let s = crate::runtime::settings();
        StepGraphs {
            allowed: device.is_cuda()
                && s.step_graph
                && s.launch_param_cache
                && dropout == 0.0
                && world_size == 1,
            shapes: HashMap::new(),
        }
    }

    /// Whether any pass may run as a graph ([`StepGraphs::new`]'s conditions).
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    /// How many shapes have a captured graph.
    #[cfg(feature = "cuda")]
    fn captured(&self) -> usize {
        self.shapes
            .values()
            .filter(|s| matches!(s, Slot::Ready(_)))
            .count()
    }

    /// Whether [`pass`](Self::pass) of `b` may run as a graph: allowed, a padded batch, no
    /// gradient checkpointing, on CUDA (the pass is then captured the second time its shape
    /// is seen and replayed after, unless its capture failed).
    pub fn applies(&self, model: &Transformer, b: &Batch) -> bool {
        self.allowed
            && b.cu_seqlens.is_none()
            && !model.gradient_checkpointing()
            && model.device().is_cuda()
    }

    /// The pass of `b` through `model`: the summed NLL of its counted targets times `scale`,
    /// and the gradients of `params` (with the checkpointed layers' merged in). The batch's
    /// targets are checked against the vocabulary first, on the host.
    pub fn pass(
        &mut self,
        model: &Transformer,
        params: &[Var],
        b: &Batch,
        scale: f64,
    ) -> Result<Pass> {
        if !self.applies(model, b) {
            return eager_pass(model, params, b, scale);
        }
        let key = (b.batch, b.seq);
        match self.shapes.get(&key) {
            None => {
                let p = eager_pass(model, params, b, scale)?;
                self.shapes.insert(key, Slot::Warm(p.loss.dtype()));
                Ok(p)
            }
            Some(Slot::Refused) => eager_pass(model, params, b, scale),
            #[cfg(feature = "cuda")]
            Some(Slot::Ready(c)) => {
                super::trainer::check_targets(model, b)?;
                c.run(b, scale)
            }
            #[cfg(feature = "cuda")]
            Some(Slot::Warm(_)) if self.captured() >= MAX_GRAPHS => {
                eager_pass(model, params, b, scale)
            }
            #[cfg(feature = "cuda")]
            Some(&Slot::Warm(dtype)) => {
                super::trainer::check_targets(model, b)?;
                match cuda::Captured::capture(model, params, b.batch, b.seq, dtype) {
                    Ok(c) => {
                        let p = c.run(b, scale);
                        self.shapes.insert(key, Slot::Ready(Box::new(c)));
                        p
                    }
                    Err(e) => {
                        eprintln!(
                            "flare: the {}x{} training pass runs op by op: its CUDA graph \
                             capture failed ({e})",
                            b.batch, b.seq
                        );
                        self.shapes.insert(key, Slot::Refused);
                        eager_pass(model, params, b, scale)
                    }
                }
            }
            #[cfg(not(feature = "cuda"))]
            Some(Slot::Warm(_)) => eager_pass(model, params, b, scale),
        }
    }
}

/// The pass op by op: forward and fused loss ([`batch_nll_sum`]), times `scale`, then
/// [`eager_grads`].
pub fn eager_pass(model: &Transformer, params: &[Var], b: &Batch, scale: f64) -> Result<Pass> {
    let loss = (batch_nll_sum(model, b, true)? * scale)?;
    let grads = eager_grads(model, params, &loss)?;
    Ok(Pass {
        loss,
        grads,
        graphed: false,
    })
}

/// The backward half of [`eager_pass`]: `loss.backward()` under the launch-parameter cache,
/// the checkpointed layers' gradients merged, and the gradient of each of `params` (`None`
/// where the loss does not reach it). Public so that `flare bench train` can time the forward
/// and the backward apart on the trainer's own path.
pub fn eager_grads(
    model: &Transformer,
    params: &[Var],
    loss: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let mut grads = {
        let _params = crate::runtime::cache_launch_params(model.device());
        loss.backward()?
    };
    // Checkpointed layers' adapter gradients arrive through the model's accumulator.
    model.merge_checkpoint_grads(&mut grads)?;
    Ok(params
        .iter()
        .map(|p| grads.get(p.as_tensor()).cloned())
        .collect())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::CudaGraph;
    use candle_core::{DType, Device, Tensor, Var};

    use super::Pass;
    use crate::models::Transformer;
    use crate::train::data::Batch;
    use crate::train::trainer::nll_sum_of;
    use crate::{Error, Result};

    /// One shape's graph and the buffers it reads and writes.
    pub(super) struct Captured {
        graph: CudaGraph,
        device: Device,
        ids: Tensor,
        targets: Tensor,
        scale: Tensor,
        loss: Tensor,
        grads: Vec<Option<Tensor>>,
    }

    impl Captured {
        /// Captures the pass of a `batch x seq` padded batch (nothing runs).
        pub(super) fn capture(
            model: &Transformer,
            params: &[Var],
            batch: usize,
            seq: usize,
            loss_dtype: DType,
        ) -> Result<Captured> {
            let device = model.device().clone();
            let Device::Cuda(cuda) = &device else {
                return Err(Error::InvalidArgument {
                    op: "step graph",
                    msg: "a CUDA graph needs a CUDA device".into(),
                });
            };
            // The buffers that outlive a launch, allocated before the capture.
            let ids = Tensor::zeros((batch, seq), DType::U32, &device)?;
            let targets = Tensor::zeros(batch * seq, DType::U32, &device)?;
            let scale = Tensor::zeros((), loss_dtype, &device)?;
            let loss = Tensor::zeros(1, loss_dtype, &device)?;
            let mut grads: Vec<Option<Tensor>> = params
                .iter()
                .map(|p| p.as_tensor().zeros_like().map(Some))
                .collect::<candle_core::Result<_>>()?;
            // Launch once, before the capture, the kernels the graph adds to the op-by-op
            // pass (the loss scaling's product and the copies into the outputs), so none is
            // loaded for the first time while the stream is being captured.
            let _ = scale.broadcast_mul(&scale)?;
            loss.slice_set(&loss.zeros_like()?, 0, 0)?;
            for g in grads.iter().flatten() {
                g.slice_set(&g.zeros_like()?, 0, 0)?;
            }
            crate::runtime::synchronize(&device)?;
            let mut reached = vec![false; params.len()];
            let graph = crate::runtime::cuda::capture_graph(cuda, || {
                let _params = crate::runtime::cache_launch_params(&device);
                let nll = nll_sum_of(model, &ids, &targets, None, true)?;
                let l = nll.broadcast_mul(&scale)?;
                let mut store = l.backward()?;
                model.merge_checkpoint_grads(&mut store)?;
                loss.slice_set(&l.reshape(1)?, 0, 0)?;
                // Into the outputs: a few multi-tensor copy launches instead of one per tensor.
                let mut copies = Vec::with_capacity(params.len());
                for ((p, out), hit) in params.iter().zip(&grads).zip(reached.iter_mut()) {
                    if let (Some(g), Some(out)) = (store.get(p.as_tensor()), out) {
                        copies.push((g.contiguous()?, out));
                        *hit = true;
                    }
                }
                let pairs: Vec<(&Tensor, &Tensor)> = copies.iter().map(|(g, o)| (g, *o)).collect();
                crate::ops::cuda::multi_copy::copy_into_many(&pairs)?;
                Ok(())
            })?;
            for (g, hit) in grads.iter_mut().zip(reached) {
                if !hit {
                    *g = None;
                }
            }
            // The op-by-op pass of this shape left its peak in the device pool; the graph
            // allocates its own memory at the first launch, so give the pool's back first.
            crate::runtime::empty_cache(&device)?;
            Ok(Captured {
                graph,
                device,
                ids,
                targets,
                scale,
                loss,
                grads,
            })
        }

        /// Fills the inputs with `b` and `scale`, launches the graph and returns its outputs.
        pub(super) fn run(&self, b: &Batch, scale: f64) -> Result<Pass> {
            // The graph's own model and shape were fixed at capture; the caller keyed it by
            // `b`'s shape, and `b`'s targets are checked like the op-by-op pass's.
            if self.ids.dims() != [b.batch, b.seq] {
                return Err(Error::InvalidArgument {
                    op: "step graph",
                    msg: format!(
                        "a {}x{} batch given to the graph of {:?}",
                        b.batch,
                        b.seq,
                        self.ids.dims()
                    ),
                });
            }
            let dev = &self.device;
            let ids = Tensor::from_slice(&b.input_ids, (b.batch, b.seq), dev)?;
            let targets = Tensor::from_slice(&b.targets, b.batch * b.seq, dev)?;
            let s = Tensor::new(&[scale], &Device::Cpu)?
                .to_dtype(self.scale.dtype())?
                .to_device(dev)?;
            self.ids.slice_set(&ids, 0, 0)?;
            self.targets.slice_set(&targets, 0, 0)?;
            self.scale.reshape(1)?.slice_set(&s, 0, 0)?;
            crate::runtime::cuda::launch_graph(&self.graph)?;
            Ok(Pass {
                loss: self.loss.squeeze(0)?,
                grads: self.grads.clone(),
                graphed: true,
            })
        }
    }
}
