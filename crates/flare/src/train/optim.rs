//! The optimizer side of training: [`AdamW`] (decoupled weight decay, f32 moments, a fused
//! multi-tensor CUDA update), the learning-rate [`Schedule`] and global-norm gradient clipping
//! ([`global_grad_norm`]: one pass over every gradient, f64 sums, one host read; on CUDA the
//! multi-tensor `crates/flare-kernels/src/cu/grad_norm.cu`; and [`clip_scale`]).
//!
//! The update is torch.optim.AdamW's, in the same order and grouping:
//!
//! ```text
//! g = grad · grad_scale              (grad_scale: the clipping factor, 1 when not clipping)
//! m = β1 m + (1 − β1) g
//! v = β2 v + (1 − β2) g²
//! p = p · (1 − lr · wd)
//! p = p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! On the CPU it runs element by element in f32; on CUDA one launch of `adamw_multi_f32`
//! (`crates/flare-kernels/src/cu/adamw.cu`) updates every parameter, reading each gradient once.
//! Parameters must be f32 (flare trains f32 LoRA weights on an f16/bf16 base).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const OP: &str = "AdamW";

fn invalid(msg: String) -> Error {
    Error::InvalidArgument { op: OP, msg }
}

/// AdamW hyper-parameters (the learning rate comes with each step, from the [`Schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay, in [0, 1).
    pub beta1: f64,
    /// Second-moment decay, in [0, 1).
    pub beta2: f64,
    /// Denominator epsilon, > 0.
    pub eps: f64,
    /// Decoupled weight decay, >= 0.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                return Err(invalid(format!("{name} must be in [0, 1), got {b}")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid(format!("eps must be > 0, got {}", self.eps)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// AdamW over named f32 parameters, with f32 moments on the parameters' device.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use flare::train::{AdamW, AdamWConfig};
/// let p = Var::new(&[1f32, -2.0], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![("p".into(), p.clone())], AdamWConfig { weight_decay: 0.0, ..Default::default() })?;
/// let grads = p.as_tensor().sqr()?.sum_all()?.backward()?;
/// opt.step(&grads, 0.1, 1.0)?;
/// // The first Adam step moves every coordinate by ~lr against its gradient's sign.
/// let v = p.as_tensor().to_vec1::<f32>()?;
/// assert!((v[0] - 0.9).abs() < 1e-4 && (v[1] + 1.9).abs() < 1e-4);
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    names: Vec<String>,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `params` (unique names, f32 tensors on one device), zero moments,
    /// step 0.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = std::collections::HashSet::new();
        let device = params.first().map(|(_, v)| v.device().clone());
        let (mut names, mut vars, mut m, mut v) = (vec![], vec![], vec![], vec![]);
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(invalid(format!("parameter {name:?} is given twice")));
            }
            if var.dtype() != DType::F32 {
                return Err(invalid(format!(
                    "parameter {name:?} is {:?}; AdamW trains f32 parameters",
                    var.dtype()
                )));
            }
            if let Some(d) = &device {
                if !var.device().same_device(d) {
                    return Err(invalid(format!(
                        "parameter {name:?} is on another device than the first parameter"
                    )));
                }
            }
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
            names.push(name);
            vars.push(var);
        }
        Ok(AdamW {
            config,
            names,
            params: vars,
            m,
            v,
            step: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameters, in the order given.
    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// One AdamW step at learning rate `lr`, with every gradient multiplied by `grad_scale`
    /// first (the clipping factor from [`clip_scale`]; 1 for none). A parameter without a
    /// gradient in `grads` (it did not take part in the loss) is left unchanged, moments
    /// included, as PyTorch does for a `None` gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let gs: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| grads.get(p.as_tensor()).cloned())
            .collect();
        self.step_with(&gs, lr, grad_scale)
    }

    /// [`step`](Self::step) with the gradients given per parameter, in the optimizer's order
    /// (`None`: no gradient, no update), e.g. sums over accumulated micro-batches.
    pub fn step_with(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(invalid(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        if !(lr.is_finite() && lr >= 0.0 && grad_scale.is_finite() && grad_scale >= 0.0) {
            return Err(invalid(format!(
                "lr ({lr}) and grad_scale ({grad_scale}) must be finite and >= 0"
            )));
        }
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                if g.dims() != self.params[i].dims() {
                    return Err(Error::ShapeMismatch {
                        op: OP,
                        msg: "a gradient's shape differs from its parameter's",
                        lhs: g.dims().to_vec(),
                        rhs: self.params[i].dims().to_vec(),
                    });
                }
            }
        }
        self.step += 1;
        let t = self.step as i32;
        let c = self.config;
        let h = Hyper {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            wd: c.weight_decay as f32,
            bc1: (1.0 - c.beta1.powi(t)) as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            grad_scale: grad_scale as f32,
        };
        let device = match self.params.first() {
            Some(p) => p.device().clone(),
            None => return Ok(()),
        };
        match device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => self.step_cuda(grads, h),
            _ => self.step_host(grads, h),
        }
    }

    /// The element-wise update on host copies (CPU, and other non-CUDA devices).
    fn step_host(&mut self, grads: &[Option<Tensor>], h: Hyper) -> Result<()> {
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let p = &self.params[i];
            let dev = p.device().clone();
            let shape = p.shape().clone();
            let mut pv = p.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let gv = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut mv = self.m[i].flatten_all()?.to_vec1::<f32>()?;
            let mut vv = self.v[i].flatten_all()?.to_vec1::<f32>()?;
            for k in 0..pv.len() {
                let (pn, mn, vn) = adamw_elem(pv[k], gv[k], mv[k], vv[k], &h);
                pv[k] = pn;
                mv[k] = mn;
                vv[k] = vn;
            }
            p.set(&Tensor::from_vec(pv, shape.clone(), &dev)?)?;
            self.m[i] = Tensor::from_vec(mv, shape.clone(), &dev)?;
            self.v[i] = Tensor::from_vec(vv, shape, &dev)?;
        }
        Ok(())
    }

    /// One launch of the multi-tensor kernel over every parameter with a gradient.
    #[cfg(feature = "cuda")]
    fn step_cuda(&mut self, grads: &[Option<Tensor>], h: Hyper) -> Result<()> {
        use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
        use candle_core::Storage;

        let candle_core::Device::Cuda(dev) = self.params[0].device().clone() else {
            return Err(invalid(
                "internal error: step_cuda on a non-CUDA device".into(),
            ));
        };
        let rt = CudaRuntime::get(&dev)?;
        let stream = rt.stream().clone();
        // The gradients, contiguous f32, kept alive until the launch is queued.
        let gs: Vec<Option<Tensor>> = grads
            .iter()
            .map(|g| {
                g.as_ref()
                    .map(|g| g.to_dtype(DType::F32)?.contiguous())
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        let ptr = |t: &Tensor| -> Result<u64> {
            let (s, l) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*s else {
                return Err(invalid(format!(
                    "a tensor of the CUDA optimizer is on {:?}",
                    t.device().location()
                )));
            };
            if !l.is_contiguous() {
                return Err(invalid(
                    "internal error: a non-contiguous optimizer tensor".into(),
                ));
            }
            let slice = cs.as_cuda_slice::<f32>()?;
            let (p, _sync) = slice.device_ptr(&stream);
            Ok(p + (l.start_offset() * std::mem::size_of::<f32>()) as u64)
        };
        let mut table: Vec<u64> = Vec::new();
        let mut max_len = 0usize;
        for (i, g) in gs.iter().enumerate() {
            let Some(g) = g else { continue };
            let n = self.params[i].elem_count();
            max_len = max_len.max(n);
            table.extend([
                ptr(self.params[i].as_tensor())?,
                ptr(g)?,
                ptr(&self.m[i])?,
                ptr(&self.v[i])?,
                n as u64,
            ]);
        }
        let tensors = table.len() / 5;
        if tensors == 0 {
            return Ok(());
        }
        if tensors > 65535 {
            return Err(invalid(format!(
                "{tensors} parameter tensors exceed one launch's grid (65535)"
            )));
        }
        let table_dev = stream
            .clone_htod(&table)
            .cuda_ctx("copying the AdamW tensor table")?;
        // adamw.cu's block size, from its `#define`.
        const THREADS: usize = flare_kernels::launch::ADAMW_THREADS as usize;
        let blocks = max_len.div_ceil(THREADS).clamp(1, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, tensors as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(rt.function(Kernel::AdamWMultiF32));
        b.arg(&table_dev)
            .arg(&h.lr)
            .arg(&h.beta1)
            .arg(&h.beta2)
            .arg(&h.eps)
            .arg(&h.wd)
            .arg(&h.bc1)
            .arg(&h.bc2_sqrt)
            .arg(&h.grad_scale);
        // SAFETY: adamw_multi_f32(const u64 *table, float lr, beta1, beta2, eps, wd, bc1,
        // bc2_sqrt, grad_scale) reads `tensors` rows of (param, grad, m, v, len) from `table`
        // (5 * tensors u64, just copied). Every pointer is the start of a live, contiguous f32
        // buffer of `len` elements on this device: the parameters, moments and gradients are
        // held by `self` and `gs` until after the launch is queued, and freeing them later is
        // ordered after the kernel on this single stream. Params, m and v are written in place:
        // they are owned by this optimizer (the Vars by the model too, which runs no work
        // concurrently on another stream). ADAMW_THREADS = 256 threads, no shared memory.
        unsafe { b.launch(cfg) }.cuda_ctx("launching adamw_multi_f32")?;
        drop(gs);
        Ok(())
    }

    /// The optimizer state as named tensors: `m.<name>` and `v.<name>` for every parameter,
    /// for a checkpoint (the step count is saved separately, see [`step_count`](Self::step_count)).
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("m.{n}"), self.m[i].clone());
            out.insert(format!("v.{n}"), self.v[i].clone());
        }
        out
    }

    /// Restores the state saved by [`state_tensors`](Self::state_tensors) and the step count.
    /// Every parameter's `m` and `v` must be present with its shape; the error names the
    /// missing or misshapen tensor.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        let mut m = Vec::with_capacity(self.names.len());
        let mut v = Vec::with_capacity(self.names.len());
        for (i, n) in self.names.iter().enumerate() {
            for (key, out) in [(format!("m.{n}"), &mut m), (format!("v.{n}"), &mut v)] {
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| invalid(format!("optimizer state has no tensor `{key}`")))?;
                if t.dims() != self.params[i].dims() {
                    return Err(invalid(format!(
                        "optimizer state tensor `{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        self.params[i].dims()
                    )));
                }
                out.push(
                    t.to_dtype(DType::F32)?
                        .to_device(self.params[i].device())?
                        .contiguous()?
                        .copy()?,
                );
            }
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }
}

/// Per-step scalars of the update, in f32 as the kernel takes them.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    bc1: f32,
    bc2_sqrt: f32,
    grad_scale: f32,
}

/// One element of the update, in f32 exactly as `adamw.cu` computes it.
#[inline]
fn adamw_elem(p: f32, g: f32, m: f32, v: f32, h: &Hyper) -> (f32, f32, f32) {
    let g = g * h.grad_scale;
    let m = h.beta1 * m + (1.0 - h.beta1) * g;
    let v = h.beta2 * v + (1.0 - h.beta2) * g * g;
    let denom = v.sqrt() / h.bc2_sqrt + h.eps;
    let p = p * (1.0 - h.lr * h.wd) - (h.lr / h.bc1) * (m / denom);
    (p, m, v)
}

/// The global L2 norm `sqrt(Σ ‖g‖²)` over the gradients given (`None` skipped), in one pass
/// over all of them with one read back to the host (clipping needs the value there).
///
/// On the CPU (and other non-CUDA devices) a loop over every element, squares and sums in f64.
/// On CUDA two launches of the multi-tensor `grad_norm.cu`, whatever the number of tensors:
/// per-block partial sums over a table of (pointer, length), then one block summing the
/// partials, every square and sum in f64 and in a fixed order (deterministic); it differs from
/// the CPU's loop only by the order of the additions, a relative difference of order 1e-15.
/// Gradients that are not f32 are converted to f32 first (flare's LoRA gradients are f32).
/// All gradients must be on one device.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let gs: Vec<&Tensor> = grads.iter().flatten().collect();
    let Some(first) = gs.first() else {
        return Ok(0.0);
    };
    let device = first.device().clone();
    if let Some(g) = gs.iter().find(|g| !g.device().same_device(&device)) {
        return Err(Error::InvalidArgument {
            op: "global_grad_norm",
            msg: format!(
                "gradients on two devices: {:?} and {:?}",
                device.location(),
                g.device().location()
            ),
        });
    }
    let sumsq = match &device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => sumsq_cuda(dev, &gs)?,
        _ => sumsq_host(&gs)?,
    };
    Ok(sumsq.sqrt())
}

/// `Σ g²` over every element of `gs`, in f64 on the host.
fn sumsq_host(gs: &[&Tensor]) -> Result<f64> {
    let mut total = 0.0f64;
    for g in gs {
        let flat = g.flatten_all()?;
        total += match g.dtype() {
            DType::F64 => flat.to_vec1::<f64>()?.iter().map(|x| x * x).sum::<f64>(),
            DType::F32 => flat
                .to_vec1::<f32>()?
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>(),
            _ => flat
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>(),
        };
    }
    Ok(total)
}

/// `Σ g²` over every element of `gs` by `grad_norm.cu`: two launches, one 8-byte read.
#[cfg(feature = "cuda")]
fn sumsq_cuda(dev: &candle_core::cuda_backend::CudaDevice, gs: &[&Tensor]) -> Result<f64> {
    use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::Storage;

    let rt = CudaRuntime::get(dev)?;
    let stream = rt.stream().clone();
    // Contiguous f32 views (no copy for flare's f32 gradients), alive until the read below.
    let gs: Vec<Tensor> = gs
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let mut table: Vec<u64> = Vec::with_capacity(2 * gs.len());
    let mut max_len = 0usize;
    for g in &gs {
        let n = g.elem_count();
        if n == 0 {
            continue;
        }
        let (st, l) = g.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(invalid(format!(
                "a gradient of the CUDA norm is on {:?}",
                g.device().location()
            )));
        };
        let slice = cs.as_cuda_slice::<f32>()?;
        let (p, _sync) = slice.device_ptr(&stream);
        table.extend([
            p + (l.start_offset() * std::mem::size_of::<f32>()) as u64,
            n as u64,
        ]);
        max_len = max_len.max(n);
    }
    let tensors = table.len() / 2;
    if tensors == 0 {
        return Ok(0.0);
    }
    if tensors > 65535 {
        return Err(invalid(format!(
            "{tensors} gradient tensors exceed one launch's grid (65535)"
        )));
    }
    // grad_norm.cu's block sizes, from its `#define`s.
    const THREADS: usize = flare_kernels::launch::GRAD_NORM_THREADS as usize;
    const FINAL_THREADS: u32 = flare_kernels::launch::GRAD_NORM_FINAL_THREADS;
    // Up to 8 elements per thread before a block is added; at most 32 blocks per tensor.
    let blocks = max_len.div_ceil(THREADS * 8).clamp(1, 32);
    let n_partial = tensors * blocks;
    let table_dev = stream
        .clone_htod(&table)
        .cuda_ctx("copying the gradient-norm tensor table")?;
    let mut partial = stream
        .alloc_zeros::<f64>(n_partial)
        .cuda_ctx("allocating the gradient-norm partial sums")?;
    let mut out = stream
        .alloc_zeros::<f64>(1)
        .cuda_ctx("allocating the gradient norm")?;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, tensors as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(rt.function(Kernel::GradNormPartF32));
    b.arg(&mut partial).arg(&table_dev);
    // SAFETY: grad_norm_part_f32(double *partial, const u64 *table) reads `tensors` rows of
    // (pointer, len) from `table` (2 * tensors u64, just copied); each pointer is the start of
    // a live, contiguous f32 buffer of `len` elements on this device, held by `gs` until after
    // the read below (which waits for both kernels). It writes partial[y * gridDim.x + x] for
    // every block: `blocks * tensors` doubles, the size of `partial`. GRAD_NORM_THREADS = 256
    // threads, static shared memory only.
    unsafe { b.launch(cfg) }.cuda_ctx("launching grad_norm_part_f32")?;
    let n = n_partial as i64;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (FINAL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(rt.function(Kernel::GradNormFinal));
    b.arg(&mut out).arg(&partial).arg(&n);
    // SAFETY: grad_norm_final(double *out, const double *partial, long long n) reads the `n`
    // doubles of `partial` (written by the launch before, on the same stream) and writes
    // out[0], a buffer of one double. GRAD_NORM_FINAL_THREADS = 1024 threads, one block.
    unsafe { b.launch(cfg) }.cuda_ctx("launching grad_norm_final")?;
    let v = stream
        .clone_dtoh(&out)
        .cuda_ctx("reading the gradient norm")?;
    drop(gs);
    Ok(v[0])
}

/// The factor that scales gradients of global norm `norm` down to at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: `min(1, max_norm / (norm + 1e-6))`); 1 when `max_norm` is
/// `None` or not positive.
///
/// ```
/// assert_eq!(flare::train::clip_scale(0.5, Some(1.0)), 1.0);
/// assert!((flare::train::clip_scale(4.0, Some(1.0)) - 0.25).abs() < 1e-6);
/// assert_eq!(flare::train::clip_scale(4.0, None), 1.0);
/// ```
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if max > 0.0 && norm.is_finite() => (max / (norm + 1e-6)).min(1.0),
        _ => 1.0,
    }
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The peak rate throughout.
    Constant,
    /// Linear decay from the peak to 0 at the last step.
    Linear,
    /// Half-cosine decay from the peak to 0 at the last step.
    #[default]
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::InvalidArgument {
                op: "Schedule",
                msg: format!("unknown schedule {other:?} (constant, linear or cosine)"),
            }),
        }
    }
}

impl Schedule {
    /// The rate at optimizer step `step` (0-based) of `total`: `peak · step / warmup` for
    /// `step < warmup`, then this schedule over the remaining steps, as transformers'
    /// `get_{constant,linear,cosine}_schedule_with_warmup` compute it.
    ///
    /// ```
    /// use flare::train::Schedule;
    /// assert_eq!(Schedule::Linear.lr(1e-3, 0, 10, 2), 0.0);
    /// assert_eq!(Schedule::Linear.lr(1e-3, 1, 10, 2), 5e-4);
    /// assert_eq!(Schedule::Linear.lr(1e-3, 2, 10, 2), 1e-3);
    /// assert!((Schedule::Cosine.lr(1e-3, 6, 10, 2) - 5e-4).abs() < 1e-12);
    /// assert_eq!(Schedule::Constant.lr(1e-3, 9, 10, 2), 1e-3);
    /// ```
    pub fn lr(self, peak: f64, step: u64, total: u64, warmup: u64) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self {
            Schedule::Constant => peak,
            Schedule::Linear => peak * (1.0 - progress).max(0.0),
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_monotone_after_warmup() {
        let mut prev = f64::INFINITY;
        for s in 3..20 {
            let lr = Schedule::Cosine.lr(1.0, s, 20, 3);
            assert!(lr <= prev);
            prev = lr;
        }
        assert!(Schedule::Linear.lr(1.0, 20, 20, 3).abs() < 1e-12);
    }

    #[test]
    fn bad_config_is_named() {
        let c = AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("beta1"));
    }
}
