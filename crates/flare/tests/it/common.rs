//! Helpers shared by the integration tests: seeded random tensors, the relative-error metric,
//! per-dtype tolerances, finite-difference gradients, and the macro that expands one test body
//! into a `cpu` and a `cuda` test.
//!
//! Every test body is `fn name(dev: &Device) -> Result<()>`. [`device_test!`] turns it into
//! `name::cpu` and `name::cuda`; the CUDA variant prints `skipped: no CUDA device` and passes
//! when the crate is built without the `cuda` feature or no device can be opened.
//!
//! All CUDA tests share one `Device` (flare keys its per-device runtime by Candle's device id,
//! and a real program opens a device once). Tests run in parallel threads of one process; the
//! few that read global state (runtime counters, the TF32 switch, memory-pool reuse) take
//! [`exclusive_lock`], every other test takes [`shared_lock`], so they never overlap.

use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

pub use flare::Result;

/// Injects a `cfg` adapter named `default` into every projection of `model` (module `i`
/// seeded with `i`), active and in training mode; returns the trainable variables, `A` then `B`
/// of each module in module order. `B` starts at zero, as PEFT's does.
pub fn add_training_adapters(
    model: &mut flare::models::Transformer,
    cfg: &flare::lora::LoraConfig,
) -> Result<Vec<Var>> {
    let mut vars = Vec::new();
    for (i, (_, layer)) in model.lora_modules_mut().into_iter().enumerate() {
        layer.add_adapter("default", cfg, i as u64)?;
        layer.set_active(Some("default"))?;
        layer.set_training(true);
        vars.extend(layer.trainable_vars());
    }
    Ok(vars)
}

// ---- test expansion and process-wide state --------------------------------------------------

/// Expands test bodies `fn name(dev: &Device) -> Result<()>` into `name::cpu` and `name::cuda`.
/// `exclusive: a, b` runs the listed bodies alone (no other test of this binary at the same
/// time).
macro_rules! device_test {
    (@one $lock:ident, $name:ident) => {
        mod $name {
            #[test]
            fn cpu() -> $crate::common::Result<()> {
                let _guard = $crate::common::$lock();
                super::$name(&candle_core::Device::Cpu)
            }

            #[test]
            fn cuda() -> $crate::common::Result<()> {
                let _guard = $crate::common::$lock();
                match $crate::common::cuda_device() {
                    Some(dev) => super::$name(&dev),
                    None => Ok(()),
                }
            }
        }
    };
    (exclusive: $($name:ident),+ $(,)?) => {
        $( device_test!(@one exclusive_lock, $name); )+
    };
    ($($name:ident),+ $(,)?) => {
        $( device_test!(@one shared_lock, $name); )+
    };
}
pub(crate) use device_test;

fn test_lock() -> &'static RwLock<()> {
    static LOCK: RwLock<()> = RwLock::new(());
    &LOCK
}

/// Taken by every ordinary test: many may hold it at once.
pub fn shared_lock() -> RwLockReadGuard<'static, ()> {
    test_lock().read().unwrap_or_else(|p| p.into_inner())
}

/// Taken by tests that read or change process-wide state: no other test runs meanwhile.
pub fn exclusive_lock() -> RwLockWriteGuard<'static, ()> {
    test_lock().write().unwrap_or_else(|p| p.into_inner())
}

/// The one CUDA device of the test process, or `None` (after printing
/// `skipped: no CUDA device`) without the `cuda` feature or without a usable device.
pub fn cuda_device() -> Option<Device> {
    static DEV: OnceLock<Option<Device>> = OnceLock::new();
    let dev = DEV
        .get_or_init(|| {
            #[cfg(feature = "cuda")]
            {
                Device::new_cuda(0).ok()
            }
            #[cfg(not(feature = "cuda"))]
            {
                None
            }
        })
        .clone();
    if dev.is_none() {
        println!("skipped: no CUDA device");
    }
    dev
}

/// The dtypes every op must support on `dev`: f32, f16, bf16, plus f64 on CPU.
pub fn dtypes(dev: &Device) -> Vec<DType> {
    let mut v = vec![DType::F32, DType::F16, DType::BF16];
    if dev.is_cpu() {
        v.push(DType::F64);
    }
    v
}

/// The relative-error bound ‖out − ref‖ / ‖ref‖ of a forward (or gradient) at `dtype`.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        other => panic!("no tolerance for {other:?}"),
    }
}

// ---- seeded random tensors ------------------------------------------------------------------

/// A stable 64-bit seed from a test name and a case description (FNV-1a), so every case gets
/// its own inputs and every run gets the same ones.
pub fn seed(parts: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `n` samples of N(0, 1) in f64 (Box-Muller on a seeded `StdRng`).
pub fn normals(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// A tensor of N(0, 1) samples of `shape` and `dtype` on `dev`, from `seed`. Made in f64 on the
/// CPU, rounded to `dtype`, then moved, so a CPU and a CUDA call with one seed agree exactly.
pub fn randn(shape: &[usize], dtype: DType, dev: &Device, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = Tensor::from_vec(normals(n, seed), shape, &Device::Cpu)?;
    Ok(t.to_dtype(dtype)?.to_device(dev)?)
}

/// Like [`randn`], scaled and shifted: `mean + std * N(0, 1)`.
pub fn randn_scaled(
    shape: &[usize],
    mean: f64,
    std: f64,
    dtype: DType,
    dev: &Device,
    seed: u64,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v = normals(n, seed)
        .into_iter()
        .map(|x| mean + std * x)
        .collect();
    let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
    Ok(t.to_dtype(dtype)?.to_device(dev)?)
}

// ---- comparing ------------------------------------------------------------------------------

/// The tensor's values as f64 on the CPU, flattened.
pub fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// The tensor upcast to f64 on the CPU (a reference computation's input).
pub fn f64_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
}

/// ‖a − b‖ / ‖b‖ in Frobenius norm, computed in f64 on the CPU (‖a − b‖ when ‖b‖ is 0).
/// NaN if either holds a NaN.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "rel_err: shapes differ");
    let (a, b) = (to_f64_vec(a)?, to_f64_vec(b)?);
    Ok(rel_err_vec(&a, &b))
}

/// [`rel_err`] of two flat vectors.
pub fn rel_err_vec(a: &[f64], b: &[f64]) -> f64 {
    let mut num = 0.0;
    let mut den = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Asserts that `out` matches `reference` within relative error `tol`, has its shape, holds
/// no NaN, and is finite wherever the reference is. `what` names the case in failures.
pub fn assert_close(out: &Tensor, reference: &Tensor, tol: f64, what: &str) -> Result<()> {
    if let Some(msg) = check_close(out, reference, tol, what)? {
        panic!("{msg}");
    }
    Ok(())
}

/// [`assert_close`]'s checks, returning the failure message instead of panicking, so that a
/// test can run all its cases and report every failing one.
pub fn check_close(
    out: &Tensor,
    reference: &Tensor,
    tol: f64,
    what: &str,
) -> Result<Option<String>> {
    if out.dims() != reference.dims() {
        return Ok(Some(format!(
            "{what}: shape {:?}, expected {:?}",
            out.dims(),
            reference.dims()
        )));
    }
    let (o, r) = (to_f64_vec(out)?, to_f64_vec(reference)?);
    if let Some(i) = o.iter().position(|v| v.is_nan()) {
        return Ok(Some(format!(
            "{what}: NaN in the output at flat index {i} (reference {})",
            r[i]
        )));
    }
    if let Some(i) = (0..o.len()).find(|&i| r[i].is_finite() && !o[i].is_finite()) {
        return Ok(Some(format!(
            "{what}: output[{i}] = {} where the reference is {}",
            o[i], r[i]
        )));
    }
    // Entries where the reference itself is infinite must match exactly and are left out of
    // the norm.
    let (mut of, mut rf) = (Vec::with_capacity(o.len()), Vec::with_capacity(o.len()));
    for (i, (&x, &y)) in o.iter().zip(&r).enumerate() {
        if y.is_finite() {
            of.push(x);
            rf.push(y);
        } else if x != y {
            return Ok(Some(format!("{what}: output[{i}] = {x}, reference {y}")));
        }
    }
    let err = rel_err_vec(&of, &rf);
    if err <= tol {
        return Ok(None);
    }
    let (imax, max_abs) = of
        .iter()
        .zip(&rf)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold((0, 0.0), |acc, (i, d)| if d > acc.1 { (i, d) } else { acc });
    Ok(Some(format!(
        "{what}: relative error {err:.3e} > {tol:.1e} (max abs diff {max_abs:.3e} at flat index \
         {imax}: got {}, expected {})",
        of[imax], rf[imax]
    )))
}

/// Collects the failures of many cases and panics once, listing all of them.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    /// Records `check_close`'s verdict.
    pub fn check(&mut self, out: &Tensor, reference: &Tensor, tol: f64, what: &str) -> Result<()> {
        if let Some(msg) = check_close(out, reference, tol, what)? {
            self.0.push(msg);
        }
        Ok(())
    }

    /// Panics listing every recorded failure, if any.
    pub fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} failing case(s):\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Asserts that no element of `t` is NaN.
pub fn assert_no_nan(t: &Tensor, what: &str) -> Result<()> {
    let v = to_f64_vec(t)?;
    let nans = v.iter().filter(|x| x.is_nan()).count();
    assert_eq!(nans, 0, "{what}: {nans} NaN of {} elements", v.len());
    Ok(())
}

// ---- gradients ------------------------------------------------------------------------------

/// Central finite differences of the scalar `f` with respect to every element of the f64 CPU
/// tensor `x`: `(f(x + h e_i) − f(x − h e_i)) / 2h`.
pub fn fd_grad(f: impl Fn(&Tensor) -> Result<f64>, x: &Tensor, h: f64) -> Result<Tensor> {
    assert_eq!(x.dtype(), DType::F64, "fd_grad wants an f64 tensor");
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let mut g = Vec::with_capacity(base.len());
    let mut p = base.clone();
    for i in 0..base.len() {
        p[i] = base[i] + h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), &Device::Cpu)?)?;
        p[i] = base[i] - h;
        let fm = f(&Tensor::from_vec(p.clone(), x.shape(), &Device::Cpu)?)?;
        p[i] = base[i];
        g.push((fp - fm) / (2.0 * h));
    }
    Ok(Tensor::from_vec(g, x.shape(), &Device::Cpu)?)
}

/// The step used by the finite-difference checks.
pub const FD_H: f64 = 1e-6;
/// The relative error allowed between an f64 analytic gradient and finite differences.
pub const FD_TOL: f64 = 1e-6;

/// `sum(y * r)` as a scalar tensor (`r` on `y`'s device and dtype): the loss of the
/// finite-difference checks, in which every output element matters.
pub fn weighted_loss(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    Ok(y.mul(r)?.sum_all()?)
}

/// One finite-difference gradient check of an op on `dev`: the analytic gradients of a scalar
/// loss with respect to some inputs against central finite differences ([`fd_grad`], step
/// [`FD_H`]) of the same loss computed in f64 on the CPU. Inputs and constants are f64 CPU
/// tensors; on the CPU the analytic gradients are f64 too, compared at [`FD_TOL`]; on CUDA they
/// are f32 on the device, from f32 copies of the inputs (exact when the inputs come from
/// [`FdCheck::input`]), compared at the f32 tolerance.
pub struct FdCheck<'a> {
    dev: &'a Device,
    what: String,
}

/// A constant of an [`FdCheck`]'s loss (a weight that is not checked, the loss's `r`, a mask):
/// the f64 CPU tensor the finite differences use and its copy on the device.
pub struct FdConst {
    cpu: Tensor,
    dev: Tensor,
}

impl FdConst {
    /// The copy that goes with `t`, one of the loss's inputs: the CPU one beside an f64 CPU
    /// input (the finite differences, and the analytic side on the CPU), else the device's.
    pub fn like(&self, t: &Tensor) -> &Tensor {
        if t.device().is_cpu() && t.dtype() == DType::F64 {
            &self.cpu
        } else {
            &self.dev
        }
    }
}

impl<'a> FdCheck<'a> {
    /// A check on `dev`; `what` names it in failures and seeds its inputs.
    pub fn new(dev: &'a Device, what: impl Into<String>) -> Self {
        FdCheck {
            dev,
            what: what.into(),
        }
    }

    /// The check's name.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// A random f64 CPU tensor whose values f32 holds exactly, seeded by the check's name and
    /// `tag` (an empty tag: the name alone).
    pub fn input(&self, shape: &[usize], tag: &str) -> Result<Tensor> {
        let s = if tag.is_empty() {
            seed(&self.what)
        } else {
            seed(&format!("{} {tag}", self.what))
        };
        f32_exact(&randn(shape, DType::F64, &Device::Cpu, s)?)
    }

    /// The dtype of the analytic gradients: f64 on the CPU, f32 on CUDA.
    pub fn dtype(&self) -> DType {
        if self.dev.is_cpu() {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// The relative error allowed between the analytic gradients and finite differences.
    pub fn bound(&self) -> f64 {
        if self.dev.is_cpu() {
            FD_TOL
        } else {
            tol(DType::F32)
        }
    }

    /// The f64 CPU tensor `t` on the device, in [`dtype`](Self::dtype) when it is a float.
    pub fn up(&self, t: &Tensor) -> Result<Tensor> {
        let t = if t.dtype().is_float() {
            t.to_dtype(self.dtype())?
        } else {
            t.clone()
        };
        Ok(t.to_device(self.dev)?)
    }

    /// `t` (f64 CPU, or an integer mask) as a constant of the loss.
    pub fn constant(&self, t: &Tensor) -> Result<FdConst> {
        Ok(FdConst {
            cpu: t.clone(),
            dev: self.up(t)?,
        })
    }

    /// Checks the gradients of `loss(inputs)` with respect to each named input (f64 CPU
    /// tensors) against finite differences; returns the analytic gradients (keyed by the `Var`s
    /// made from the inputs' device copies) for further checks. `loss` gets the inputs in order,
    /// all on the CPU in f64 or all on the device, and takes its constants with
    /// [`FdConst::like`].
    pub fn check(
        &self,
        inputs: &[(&str, &Tensor)],
        loss: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<candle_core::backprop::GradStore> {
        let vars = inputs
            .iter()
            .map(|(_, t)| var(&self.up(t)?))
            .collect::<Result<Vec<_>>>()?;
        let on_dev: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss(&on_dev)?.backward()?;
        for (i, (name, x)) in inputs.iter().enumerate() {
            let fd = fd_grad(
                |xi| {
                    let mut all: Vec<Tensor> = inputs.iter().map(|(_, t)| (*t).clone()).collect();
                    all[i] = xi.clone();
                    Ok(loss(&all)?.to_scalar::<f64>()?)
                },
                x,
                FD_H,
            )?;
            let what = format!("{} {name}", self.what);
            assert_close(
                &grad_of(&grads, vars[i].as_tensor(), &what),
                &fd,
                self.bound(),
                &what,
            )?;
        }
        Ok(grads)
    }
}

/// Makes a `Var` holding a copy of `t` (same device and dtype).
pub fn var(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(t)?)
}

/// The gradient of `t` in `grads`, panicking with `what` if it is missing.
pub fn grad_of(grads: &candle_core::backprop::GradStore, t: &Tensor, what: &str) -> Tensor {
    match grads.get(t) {
        Some(g) => g.clone(),
        None => panic!("{what}: no gradient"),
    }
}

/// Rounds an f64 tensor through f32, so that an f32 copy of it holds exactly the same values.
pub fn f32_exact(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_dtype(DType::F64)?)
}

// ---- memory poisoning -----------------------------------------------------------------------

/// Fills freshly allocated device memory with NaN and frees it, so that the allocator's pool
/// is likely to hand the same bytes to the next allocations. On the CPU this does nothing
/// useful (Candle's CPU outputs are fresh `Vec`s), so the CPU variants of the "every element
/// written" tests only check for NaN; the check is meaningful on CUDA, whose stream-ordered
/// memory pool reuses freed blocks. Reuse is likely, not guaranteed: a pass is evidence, a
/// failure is proof.
pub fn poison(dev: &Device, dtype: DType, elems: &[usize]) -> Result<()> {
    let mut keep = Vec::new();
    for &n in elems {
        let t = match dtype {
            DType::F32 => Tensor::full(f32::NAN, n, dev)?,
            DType::F64 => Tensor::full(f64::NAN, n, dev)?,
            DType::F16 => Tensor::full(half::f16::NAN, n, dev)?,
            DType::BF16 => Tensor::full(half::bf16::NAN, n, dev)?,
            other => panic!("poison: no NaN in {other:?}"),
        };
        keep.push(t);
    }
    dev.synchronize()?;
    // Check that the poison really is NaN (a constant fill that produced zeros would make the
    // test vacuous).
    for t in &keep {
        if t.elem_count() > 0 {
            let first = to_f64_vec(&t.narrow(0, 0, 1)?)?;
            assert!(first[0].is_nan(), "poison buffer is not NaN");
        }
    }
    drop(keep);
    dev.synchronize()?;
    Ok(())
}

/// Short name of a dtype for case descriptions.
pub fn dt(d: DType) -> &'static str {
    d.as_str()
}
