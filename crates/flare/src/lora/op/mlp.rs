//! [`lora_swiglu_mlp`]: the SwiGLU MLP with LoRA on its three projections as one op on CUDA,
//!   `y = down(silu(gate(x)) · up(x))`, each projection `p(z) = z W_pᵀ + s_p · (z A_pᵀ) B_pᵀ`.
//!
//! The unfused path ([`super::lora_linear_grouped`] for gate/up, [`crate::ops::swiglu_packed`],
//! [`super::lora_linear`] for down) writes the low-rank expansions `s (x Aᵀ) Bᵀ` of gate/up
//! (`[T, 2I]`) and down (`[T, h]`) and, in the backward, `G A` of both input gradients
//! (`[T, h]`, `[T, I]`) to memory, and the base GEMMs read them back (`beta = 1`). On the
//! Llama-3.1-8B shape at 4,096 tokens that is 235 MB written and read per layer for gate/up's
//! forward alone. The fused op instead folds every low-rank term into the reduction of its
//! frozen GEMM: the rank joins the GEMM's `K`,
//!
//! ```text
//! forward    [x | s x Aᵀ] · [W | blockdiag(B)]ᵀ     (K = in + G · r)
//! backward   [dy | s dy B] · [W ; A]                (K = out + G · r)
//! ```
//!
//! so nothing of an output's size is written twice. The weights are stored with spare
//! columns and rows for the factors ([`MlpWeights`], [`MLP_SPARE`]); the activations with
//! spare columns (the SwiGLU kernels write their rows at the padded stride, `x` and `dy` are
//! copied in); see `fold.rs` for the steps (and `mlp_cuda.rs` for their CUDA side).
//!
//! On every other device, dtype or shape (or with weights not laid out by [`MlpWeights`]) it is
//! the unfused composite, the same ops the model runs without it, so the values are those of
//! the separate ops (up to where the fused path rounds: `s x Aᵀ` and `s dy B` are rounded to
//! the base dtype with the scale applied, the low-rank terms are summed with the base product in
//! the GEMM's f32 accumulator instead of rounded to the base dtype first).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::LoraBwdFactors;
use super::{adapter_dtype_ok, check, internal, lora_linear, lora_linear_grouped, stack_rows};
#[cfg(feature = "cuda")]
use super::{as_matrix, cuda_storage};
use crate::ops::{swiglu_packed, StorageSlot};
use crate::{Error, Result};

const OP: &str = "lora_swiglu_mlp";
const OP_BWD: &str = "lora_swiglu_mlp_bwd";

/// Spare columns after every row, and spare rows after the last, of the weights
/// [`MlpWeights`] lays out for the fused op: room for gate and up's `A` and `B` (`2 · r`) and
/// down's (`r2`), so ranks up to `MLP_SPARE / 2` (32) run fused.
pub const MLP_SPARE: usize = 64;

/// The frozen weights of one SwiGLU MLP, as [`lora_swiglu_mlp`] reads them: gate and up stacked
/// (`[2 · I, hidden]`) and down (`[hidden, I]`).
///
/// On CUDA with an f16/bf16 dtype (where the op is fused) each is stored with [`MLP_SPARE`]
/// spare columns after every row and spare rows after the last, zeroed here: the fused op
/// writes the LoRA factors of each call there and runs the low-rank terms inside the frozen
/// GEMMs' reduction (see the module doc). The weights proper are then views of that storage,
/// rows `hidden + MLP_SPARE` and `I + MLP_SPARE` elements apart. Elsewhere they are the tensors
/// given (detached), unpadded.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use flare::lora::op::MlpWeights;
/// let (h, i) = (8, 16);
/// let w_gate_up = Tensor::ones((2 * i, h), DType::F32, &Device::Cpu)?;
/// let w_down = Tensor::ones((h, i), DType::F32, &Device::Cpu)?;
/// let w = MlpWeights::new(&w_gate_up, &w_down)?;
/// assert_eq!((w.gate_up().dims(), w.down().dims()), (&[2 * i, h][..], &[h, i][..]));
/// assert!(!w.is_padded()); // the CPU runs the unfused ops
/// assert!(MlpWeights::new(&w_down, &w_down).is_err());
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MlpWeights {
    gate_up: Tensor,
    down: Tensor,
    /// The padded storages `(gate/up [2I + S, h + S], down [h + S, I + S])` the two views above
    /// belong to, when laid out for the fused op.
    padded: Option<(Tensor, Tensor)>,
}

impl MlpWeights {
    /// The weights `w_gate_up: [2 · I, hidden]` and `w_down: [hidden, I]` (one dtype and
    /// device), padded where the fused op runs (see the type's doc: on CUDA, f16/bf16, `hidden`
    /// and `I` multiples of 8). Errors: [`Error::ShapeMismatch`] for weights of other shapes,
    /// [`Error::DTypeMismatch`] / [`Error::DeviceMismatch`] for weights that disagree.
    pub fn new(w_gate_up: &Tensor, w_down: &Tensor) -> Result<Self> {
        let (hidden, inter) = check_weights(w_gate_up, w_down)?;
        let pad = w_gate_up.device().is_cuda()
            && matches!(w_gate_up.dtype(), DType::F16 | DType::BF16)
            && hidden % 8 == 0
            && inter % 8 == 0;
        Self::laid_out(w_gate_up, w_down, pad)
    }

    /// [`new`](Self::new) padded or not as `pad` says, on any device (a padded layout off
    /// CUDA runs the unfused ops on the strided views: what the model's tests check the
    /// layout's bookkeeping with).
    pub(crate) fn laid_out(w_gate_up: &Tensor, w_down: &Tensor, pad: bool) -> Result<Self> {
        let (hidden, inter) = check_weights(w_gate_up, w_down)?;
        let (gu, d) = (w_gate_up.detach(), w_down.detach());
        if !pad {
            return Ok(MlpWeights {
                gate_up: gu,
                down: d,
                padded: None,
            });
        }
        let spare = |w: &Tensor| -> Result<Tensor> {
            Ok(w.pad_with_zeros(1, 0, MLP_SPARE)?
                .pad_with_zeros(0, 0, MLP_SPARE)?
                .contiguous()?)
        };
        let (pgu, pd) = (spare(&gu)?, spare(&d)?);
        Ok(MlpWeights {
            gate_up: pgu.narrow(0, 0, 2 * inter)?.narrow(1, 0, hidden)?,
            down: pd.narrow(0, 0, hidden)?.narrow(1, 0, inter)?,
            padded: Some((pgu, pd)),
        })
    }

    /// Gate then up, `[2 · I, hidden]` (a strided view when padded).
    pub fn gate_up(&self) -> &Tensor {
        &self.gate_up
    }

    /// Down, `[hidden, I]` (a strided view when padded).
    pub fn down(&self) -> &Tensor {
        &self.down
    }

    /// Whether the weights are laid out for the fused op (stored with spare rows and columns).
    pub fn is_padded(&self) -> bool {
        self.padded.is_some()
    }
}

/// The LoRA factors and scales of one SwiGLU MLP and its frozen weights, for
/// [`lora_swiglu_mlp`].
#[derive(Debug, Clone, Copy)]
pub struct LoraMlp<'a> {
    /// The frozen weights (laid out for the fused op by [`MlpWeights::new`]).
    pub weights: &'a MlpWeights,
    /// The gate projection's `(A [r, hidden], B [I, r])`.
    pub gate: (&'a Tensor, &'a Tensor),
    /// The up projection's `(A [r, hidden], B [I, r])`, of the gate's rank.
    pub up: (&'a Tensor, &'a Tensor),
    /// The down projection's `(A [r2, I], B [hidden, r2])`.
    pub down: (&'a Tensor, &'a Tensor),
    /// The scale of gate and up.
    pub scale_gate_up: f64,
    /// The scale of down.
    pub scale_down: f64,
}

/// Sizes of a fused MLP and the layout of its factor packs: `A` pack `[A_g | A_u | A_d]`, `B`
/// pack `[B_g | B_u | B_d]`, each flattened; the backward's factor gradients in one buffer,
/// the `A` pack's at 0 and the `B` pack's at [`b_start`](Self::b_start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MlpDims {
    pub hidden: usize,
    pub inter: usize,
    /// Rank of gate and up.
    pub r: usize,
    /// Rank of down.
    pub r2: usize,
}

impl MlpDims {
    /// Where `A_d` starts in the `A` pack.
    pub fn a_down(&self) -> usize {
        2 * self.r * self.hidden
    }

    /// Elements of the `A` pack.
    pub fn a_len(&self) -> usize {
        self.a_down() + self.r2 * self.inter
    }

    /// Where `B_d` starts in the `B` pack.
    pub fn b_down(&self) -> usize {
        2 * self.inter * self.r
    }

    /// Elements of the `B` pack.
    pub fn b_len(&self) -> usize {
        self.b_down() + self.hidden * self.r2
    }

    /// Where the `B` pack's gradient starts in the gradient buffer (16-element aligned).
    pub fn b_start(&self) -> usize {
        self.a_len().div_ceil(16) * 16
    }

    /// Elements of the gradient buffer.
    pub fn grad_len(&self) -> usize {
        self.b_start() + self.b_len()
    }

    /// Whether the fused op takes these sizes: the factors fit the weights' spare rows and
    /// columns (`2 r` and `r2` at most [`MLP_SPARE`]), hidden and intermediate sizes multiples
    /// of 8 (16-byte rows), `I` within the SwiGLU kernels' `int`.
    fn fits(&self) -> bool {
        (1..=MLP_SPARE / 2).contains(&self.r)
            && (1..=MLP_SPARE).contains(&self.r2)
            && self.hidden % 8 == 0
            && self.inter % 8 == 0
            && self.inter <= i32::MAX as usize
    }
}

/// `down(silu(gate(x)) · up(x))` with LoRA on the three projections (no biases, no dropout):
/// the values and gradients (of `x` and of the six factors) of
///
/// ```text
/// gu  = lora_linear_grouped(x, w_gate_up, None, [A_g; A_u], [B_g; B_u], s_gu, [I, I])
/// act = swiglu_packed(gu)
/// y   = lora_linear(act, w_down, None, A_d, B_d, s_d)
/// ```
///
/// which is what it runs on the CPU, on Metal, and on CUDA outside the fused op's reach (f32
/// base, weights not padded by [`MlpWeights::new`], ranks above 32, hidden or intermediate
/// sizes not multiples of 8). On CUDA with an f16/bf16 base and padded weights it is one op
/// whose frozen GEMMs take the low-rank terms in their reduction (see the module doc): no
/// `[T, 2I]`, `[T, I]` or `[T, hidden]` expansion is written and read back.
///
/// `x: [..., hidden]`; factors in the base dtype or f32 on an f16/bf16 base (gradients in
/// their dtype); the weights frozen (no gradient). A call writes the factors into the padded
/// weights' spare rows and columns (on the device's stream, where the op's GEMMs then read
/// them): two MLPs sharing one [`MlpWeights`] must not run on different streams at once. Errors, before anything runs: those of
/// [`super::lora_linear`] for each projection ([`Error::ShapeMismatch`],
/// [`Error::DTypeMismatch`], [`Error::DeviceMismatch`], ...), and [`Error::ShapeMismatch`]
/// when the weights disagree with each other.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use flare::lora::op::{lora_swiglu_mlp, LoraMlp, MlpWeights};
/// let dev = Device::Cpu;
/// let (h, i, r) = (8, 16, 2);
/// let x = Var::randn(0f32, 1.0, (3, h), &dev)?;
/// let w_gate_up = Tensor::randn(0f32, 0.3, (2 * i, h), &dev)?;
/// let w_down = Tensor::randn(0f32, 0.3, (h, i), &dev)?;
/// let weights = MlpWeights::new(&w_gate_up, &w_down)?;
/// let f = |rows, cols| Var::randn(0f32, 0.3, (rows, cols), &dev);
/// let (ag, bg, au, bu, ad, bd) = (f(r, h)?, f(i, r)?, f(r, h)?, f(i, r)?, f(r, i)?, f(h, r)?);
/// let m = LoraMlp {
///     weights: &weights,
///     gate: (&ag, &bg),
///     up: (&au, &bu),
///     down: (&ad, &bd),
///     scale_gate_up: 2.0,
///     scale_down: 2.0,
/// };
/// let y = lora_swiglu_mlp(&x, &m)?;
/// assert_eq!(y.dims(), &[3, h]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(ad.as_tensor()).unwrap().dims(), &[r, i]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn lora_swiglu_mlp(x: &Tensor, m: &LoraMlp<'_>) -> Result<Tensor> {
    let d = check_mlp(x, m)?;
    let fused = x.device().is_cuda()
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && d.fits()
        && x.elem_count() > 0;
    match (&m.weights.padded, fused) {
        (Some(padded), true) => fused_mlp(x, m, padded, d),
        _ => composite(x, m),
    }
}

/// The unfused ops.
fn composite(x: &Tensor, m: &LoraMlp<'_>) -> Result<Tensor> {
    let inter = m.weights.down.dims()[1];
    let a = stack_rows(&[m.gate.0, m.up.0])?;
    let b = stack_rows(&[m.gate.1, m.up.1])?;
    let gu = lora_linear_grouped(
        x,
        &m.weights.gate_up,
        None,
        &a,
        &b,
        m.scale_gate_up,
        &[inter, inter],
    )?;
    let act = swiglu_packed(&gu)?;
    lora_linear(
        &act,
        &m.weights.down,
        None,
        m.down.0,
        m.down.1,
        m.scale_down,
    )
}

/// Checks that `w_gate_up` is `[2 · I, hidden]` for `w_down: [hidden, I]`, of one dtype and
/// device; `(hidden, I)`.
fn check_weights(wgu: &Tensor, wd: &Tensor) -> Result<(usize, usize)> {
    if wd.rank() != 2 || wgu.rank() != 2 || wgu.dims() != [2 * wd.dims()[1], wd.dims()[0]] {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "w_gate_up must be [2 · I, hidden] for w_down [hidden, I] (w_gate_up, w_down)",
            lhs: wgu.dims().to_vec(),
            rhs: wd.dims().to_vec(),
        });
    }
    if wd.dtype() != wgu.dtype() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: wgu.dtype(),
            rhs: wd.dtype(),
        });
    }
    if !wd.device().same_device(wgu.device()) {
        return Err(Error::DeviceMismatch {
            op: OP,
            lhs: crate::error::device_name(wgu.device()),
            rhs: crate::error::device_name(wd.device()),
        });
    }
    Ok((wd.dims()[0], wd.dims()[1]))
}

/// Checks every operand (each projection as [`super::lora_linear`] does, and the weights
/// against each other); the sizes.
fn check_mlp(x: &Tensor, m: &LoraMlp<'_>) -> Result<MlpDims> {
    let mismatch = |msg: &'static str, lhs: &Tensor, rhs: &Tensor| Error::ShapeMismatch {
        op: OP,
        msg,
        lhs: lhs.dims().to_vec(),
        rhs: rhs.dims().to_vec(),
    };
    let (wgu, wd) = (&m.weights.gate_up, &m.weights.down);
    let (hidden, inter) = wd.dims2()?;
    let (w_gate, w_up) = (wgu.narrow(0, 0, inter)?, wgu.narrow(0, inter, inter)?);
    check(x, &w_gate, None, m.gate.0, m.gate.1, m.scale_gate_up)?;
    check(x, &w_up, None, m.up.0, m.up.1, m.scale_gate_up)?;
    // Down's input has w_down's in_features, dtype and device: w_down itself stands in for it.
    check(wd, wd, None, m.down.0, m.down.1, m.scale_down)?;
    if wd.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: x.dtype(),
            rhs: wd.dtype(),
        });
    }
    if !wd.device().same_device(x.device()) {
        return Err(Error::DeviceMismatch {
            op: OP,
            lhs: crate::error::device_name(x.device()),
            rhs: crate::error::device_name(wd.device()),
        });
    }
    let (r, r2) = (m.gate.0.dims()[0], m.down.0.dims()[0]);
    if m.up.0.dims()[0] != r {
        return Err(mismatch(
            "gate and up must have one rank (up's lora_a, gate's lora_a)",
            m.up.0,
            m.gate.0,
        ));
    }
    let fdt = m.gate.0.dtype();
    for f in [m.up.0, m.down.0] {
        if f.dtype() != fdt {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: fdt,
                rhs: f.dtype(),
            });
        }
    }
    debug_assert!(adapter_dtype_ok(x.dtype(), fdt));
    Ok(MlpDims {
        hidden,
        inter,
        r,
        r2,
    })
}

/// The fused op on `x` and the two factor packs (each one `stack_rows` launch), on the padded
/// weights `(gate/up, down)` of [`MlpWeights`].
fn fused_mlp(
    x: &Tensor,
    m: &LoraMlp<'_>,
    (w_gu, w_d): &(Tensor, Tensor),
    d: MlpDims,
) -> Result<Tensor> {
    let flat = |t: &Tensor| t.reshape((t.elem_count(), 1));
    let a = stack_rows(&[&flat(m.gate.0)?, &flat(m.up.0)?, &flat(m.down.0)?])?;
    let b = stack_rows(&[&flat(m.gate.1)?, &flat(m.up.1)?, &flat(m.down.1)?])?;
    let op = MlpFwd {
        w_gu: w_gu.clone(),
        w_d: w_d.clone(),
        s_gu: m.scale_gate_up,
        s_d: m.scale_down,
        d,
        saved: Mutex::new(None),
    };
    Ok(x.contiguous()?
        .apply_op3_arc(&a, &b, Arc::new(Box::new(op)))?)
}

/// What the CUDA forward keeps for the backward; nothing without CUDA (the op only runs there).
#[cfg(feature = "cuda")]
type Saved = Arc<super::mlp_cuda::Saved>;
#[cfg(not(feature = "cuda"))]
type Saved = std::convert::Infallible;

/// The forward op `(x [..., hidden], A pack, B pack) -> y [..., hidden]`, the padded weights
/// (`[2I + S, hidden + S]`, `[hidden + S, I + S]`, contiguous) captured.
struct MlpFwd {
    w_gu: Tensor,
    w_d: Tensor,
    s_gu: f64,
    s_d: f64,
    d: MlpDims,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    saved: Mutex<Option<Saved>>,
}

/// The fused op's CPU entry points are never reached: [`lora_swiglu_mlp`] sends every device
/// but CUDA to the composite.
fn cuda_only(op: &str) -> candle_core::Error {
    internal(op, "the fused MLP runs on CUDA only".into())
}

impl CustomOp3 for MlpFwd {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(OP))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (wgs, wgl) = self.w_gu.storage_and_layout();
        let (wds, wdl) = self.w_d.storage_and_layout();
        let w = super::mlp_cuda::Weights {
            w_gu: (cuda_storage(OP, &wgs)?, wgl),
            w_d: (cuda_storage(OP, &wds)?, wdl),
            s_gu: self.s_gu,
            s_d: self.s_d,
        };
        let lx2 = as_matrix(OP, lx)?;
        let (y, saved) = super::mlp_cuda::fwd((sx, &lx2), (sa, la), (sb, lb), &w, &self.d)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(saved));
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_a, need_b) = (x.track_op(), a.track_op(), b.track_op());
        if !(need_dx || need_a || need_b) {
            return Ok((None, None, None));
        }
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .cloned()
            .ok_or_else(|| internal(OP, "backward without a CUDA forward".into()))?;
        let side = Arc::new(StorageSlot::default());
        let d = self.d;
        let op = MlpBwd {
            w_gu: self.w_gu.clone(),
            w_d: self.w_d.clone(),
            s_gu: self.s_gu,
            s_d: self.s_d,
            d,
            b: b.detach(),
            need_dx,
            saved,
            side: side.clone(),
        };
        // Tracked, so that a second derivative errors (`BackwardNotSupported`) instead of
        // silently stopping.
        let main = x.apply_op3_arc(&dy.contiguous()?, a, Arc::new(Box::new(op)))?;
        // With dx, the factor gradients come out through `side` and into the graph by a second
        // op applied to the A pack (see `LoraBwdFactors`).
        let factors = if need_dx {
            a.apply_op1_arc(Arc::new(Box::new(LoraBwdFactors {
                side,
                len: d.grad_len(),
            })))?
        } else {
            main.clone()
        };
        let dx = if need_dx {
            Some(main.narrow(0, 0, x.elem_count())?.reshape(x.dims())?)
        } else {
            None
        };
        let da = if need_a {
            Some(factors.narrow(0, 0, d.a_len())?.reshape(a.dims())?)
        } else {
            None
        };
        let db = if need_b {
            Some(
                factors
                    .narrow(0, d.b_start(), d.b_len())?
                    .reshape(b.dims())?,
            )
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// The backward op `(x, dy, A pack) -> dx` (flat; the factor gradients through `side`) or, when
/// `x` takes no gradient, `-> factor gradients` ([`MlpDims::grad_len`] elements).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct MlpBwd {
    w_gu: Tensor,
    w_d: Tensor,
    s_gu: f64,
    s_d: f64,
    d: MlpDims,
    /// The `B` pack (read when the forward kept no converted copy).
    b: Tensor,
    need_dx: bool,
    saved: Saved,
    side: Arc<StorageSlot>,
}

impl CustomOp3 for MlpBwd {
    fn name(&self) -> &'static str {
        OP_BWD
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(OP_BWD))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sdy: &candle_core::CudaStorage,
        ldy: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (wgs, wgl) = self.w_gu.storage_and_layout();
        let (wds, wdl) = self.w_d.storage_and_layout();
        let (bs, bl) = self.b.storage_and_layout();
        let w = super::mlp_cuda::Weights {
            w_gu: (cuda_storage(OP_BWD, &wgs)?, wgl),
            w_d: (cuda_storage(OP_BWD, &wds)?, wdl),
            s_gu: self.s_gu,
            s_d: self.s_d,
        };
        let (lx2, ldy2) = (as_matrix(OP_BWD, lx)?, as_matrix(OP_BWD, ldy)?);
        let g = super::mlp_cuda::bwd(
            (sx, &lx2),
            (sdy, &ldy2),
            (sa, la),
            (cuda_storage(OP_BWD, &bs)?, bl),
            &w,
            &self.d,
            &self.saved,
            self.need_dx,
        )?;
        match (self.need_dx, g.dx) {
            (true, Some(dx)) => {
                self.side.put(candle_core::Storage::Cuda(g.factors));
                Ok((dx, Shape::from(lx.shape().elem_count())))
            }
            (false, None) => Ok((g.factors, Shape::from(self.d.grad_len()))),
            _ => Err(internal(
                OP_BWD,
                "dx made when not asked, or missing".into(),
            )),
        }
    }
}
