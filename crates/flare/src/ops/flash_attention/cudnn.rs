//! Flash attention on cuDNN's fused attention engine (the one PyTorch's SDPA runs on Hopper),
//! built through cuDNN's graph API ([`crate::runtime::cudnn`]).
//!
//! # When it runs
//! [`applies`]: on CUDA, bf16 / f16, head dim 64 or 128, no sliding window, every sequence of
//! the batch with the same number of queries and keys `s` (a padded batch, or a packed one whose
//! documents all have that length), `s` a multiple of 128 (the lengths cuDNN 9 runs without
//! its padding-mask workaround), causal or not; with `FLARE_ATTENTION_CUDNN` on (the
//! default; its GPU tests pass on an H100 and it times at or under PyTorch SDPA's, BENCHMARKS.md)
//! and cuDNN 9 found, and cuDNN
//! plans the geometry. Everything else (varlen packs, windows, odd lengths)
//! runs flare's own kernel (`cuda.rs`), as does everything when cuDNN is missing:
//! [`super::flash_attention_engine`] says which path a call takes; with the switch on,
//! `flare bench` prints the cuDNN version (or `no cuDNN`) beside the GPU's name.
//!
//! # The graphs
//! The fused-attention patterns cuDNN's engine recognises, as cudnn-frontend writes them for
//! cuDNN 9 (a graph of matmul, pointwise and reduction operations, fused into one kernel by the
//! engine). Layout: flare's `[total, heads, d]` rows are cuDNN's `[b, h, s, d]` with strides
//! `[s·h·d, d, h·d, 1]`; GQA is native (K and V keep `hkv` heads). The forward writes `O` and
//! the softmax statistics `L = max + log(sum exp)` per row (f32, `[b, hq, s, 1]`), which
//! [`Saved::Cudnn`] carries to the backward in place of the kernel's `[hq, total_q]` logsumexp.
//! The backward writes `dQ`, `dK`, `dV` into the op's one output buffer; its `D = rowsum(dO ∘
//! O)` and f32 `dQ` accumulator live in the workspace flare allocates per call.
//!
//! # Plans
//! A graph is built, finalized and planned once per (device, dtype, geometry, pass) and kept
//! ([`plan`]): planning costs milliseconds, an execution microseconds.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::plan::{FaPlan, Saved, OP, OP_BWD};
use crate::ops::cuda::rows::input;
use crate::runtime::cuda::CudaRuntime;
use crate::runtime::cudnn::{DataType, Graph, PointwiseMode as Pw, ReduceMode, TensorDesc};

/// The uids of the graphs' non-virtual tensors.
mod uid {
    pub const Q: i64 = 1;
    pub const K: i64 = 2;
    pub const V: i64 = 3;
    pub const O: i64 = 4;
    pub const STATS: i64 = 5;
    pub const SCALE: i64 = 6;
    pub const NEG_INF: i64 = 7;
    pub const DO: i64 = 8;
    pub const DQ: i64 = 9;
    pub const DK: i64 = 10;
    pub const DV: i64 = 11;
    pub const ONE: i64 = 12;
    pub const SUM: i64 = 13;
    pub const DQ_ACC: i64 = 14;
}

/// The geometry a plan is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Geometry {
    dtype: DataType,
    b: i64,
    hq: i64,
    hkv: i64,
    s: i64,
    d: i64,
    causal: bool,
}

/// The shortest sequence length cuDNN's engine takes without its padding workaround, and the
/// multiple every length must be.
const SEQ_MULTIPLE: usize = 128;

/// The geometry of `p` if cuDNN's attention runs it (module doc, "When it runs"), else `None`.
/// Does not consult the setting or load cuDNN: [`applies`] does.
pub(super) fn geometry(p: &FaPlan, dtype: DType) -> Option<Geometry> {
    let dt = match dtype {
        DType::BF16 => DataType::BFloat16,
        DType::F16 => DataType::Half,
        _ => return None,
    };
    if !matches!(p.d, 64 | 128) || p.window.is_some() || p.batch() == 0 {
        return None;
    }
    let s = p.cu_q[1] - p.cu_q[0];
    let uniform = (0..p.batch()).all(|b| {
        let (_, sq, _, sk) = p.seq(b);
        sq == s && sk == s
    });
    if !uniform || s == 0 || s % SEQ_MULTIPLE != 0 {
        return None;
    }
    Some(Geometry {
        dtype: dt,
        b: p.batch() as i64,
        hq: p.hq as i64,
        hkv: p.hkv as i64,
        s: s as i64,
        d: p.d as i64,
        causal: p.causal,
    })
}

/// Whether this call runs on cuDNN: the geometry fits, `FLARE_ATTENTION_CUDNN` is on, the
/// device's cuDNN handle exists, and cuDNN plans both passes of this geometry (built here the
/// first time and kept). A geometry cuDNN refuses (an engine missing in an older cuDNN, say)
/// runs on flare's kernel, and stderr says so once, with cuDNN's reason.
pub(super) fn applies(rt: &CudaRuntime, p: &FaPlan, dtype: DType) -> Option<Geometry> {
    if !crate::runtime::settings().attention_cudnn {
        return None;
    }
    let g = geometry(p, dtype)?;
    rt.cudnn().ok()?;
    for pass in [Pass::Fwd, Pass::Bwd] {
        plan(rt, g, pass).ok()?;
    }
    Some(g)
}

/// Which graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    Fwd,
    Bwd,
}

type PlanKey = (DeviceId, Geometry, Pass);
type Planned = std::result::Result<Arc<crate::runtime::cudnn::Plan>, String>;

/// The plan of (`rt`'s device, `g`, `pass`), built the first time; a refusal is kept too (and
/// reported on stderr when it happens).
fn plan(rt: &CudaRuntime, g: Geometry, pass: Pass) -> Planned {
    static PLANS: OnceLock<Mutex<HashMap<PlanKey, Planned>>> = OnceLock::new();
    let key = (rt.device().id(), g, pass);
    let plans = PLANS.get_or_init(Default::default);
    if let Some(p) = plans.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return p.clone();
    }
    let built = build(rt, g, pass);
    if let Err(e) = &built {
        eprintln!(
            "flare: cuDNN does not run attention {pass:?} for {g:?}; flare's kernel runs it \
             ({e})"
        );
    }
    plans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, built.clone());
    built
}

fn build(rt: &CudaRuntime, g: Geometry, pass: Pass) -> Planned {
    let handle = rt.cudnn().map_err(str::to_string)?;
    let what = match pass {
        Pass::Fwd => "planning cuDNN's attention forward",
        Pass::Bwd => "planning cuDNN's attention backward",
    };
    match pass {
        Pass::Fwd => fwd_graph(&g),
        Pass::Bwd => bwd_graph(&g),
    }
    .and_then(|graph| graph.build(handle, what))
    .map(Arc::new)
    .map_err(|e| e.to_string())
}

/// The kept plan of a geometry [`applies`] accepted.
fn planned(
    rt: &CudaRuntime,
    g: Geometry,
    pass: Pass,
    op: &str,
) -> candle_core::Result<Arc<crate::runtime::cudnn::Plan>> {
    plan(rt, g, pass).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{op} (cudnn): internal error: no plan for {g:?}: {e}"
        ))
    })
}

/// `[b, h, s, d]` over flare's `[b·s, h, d]` rows.
fn bhsd(h: i64, s: i64, d: i64, b: i64) -> ([i64; 4], [i64; 4]) {
    ([b, h, s, d], [s * h * d, d, h * d, 1])
}

/// `[b, h, d, s]` (the transpose of [`bhsd`]'s view, same memory).
fn bhds(h: i64, s: i64, d: i64, b: i64) -> ([i64; 4], [i64; 4]) {
    ([b, h, d, s], [s * h * d, d, 1, h * d])
}

/// A contiguous `[b, h, r, c]` tensor's strides.
fn packed(b: i64, h: i64, r: i64, c: i64) -> ([i64; 4], [i64; 4]) {
    ([b, h, r, c], [h * r * c, r * c, c, 1])
}

/// The tensors both graphs start from.
struct Common {
    scale: TensorDesc,
    neg_inf: TensorDesc,
}

fn scalar(gr: &mut Graph, uid: i64) -> crate::Result<TensorDesc> {
    gr.tensor(
        DataType::Float,
        &[1, 1, 1, 1],
        &[1, 1, 1, 1],
        Some(uid),
        false,
        true,
    )
}

fn common(gr: &mut Graph) -> crate::Result<Common> {
    Ok(Common {
        scale: scalar(gr, uid::SCALE)?,
        neg_inf: scalar(gr, uid::NEG_INF)?,
    })
}

/// The non-virtual tensor `uid` (an input or output the variant pack names) of `dims` /
/// `strides` and type `dt`.
fn io(
    gr: &mut Graph,
    dt: DataType,
    (dims, strides): ([i64; 4], [i64; 4]),
    uid: i64,
) -> crate::Result<TensorDesc> {
    gr.tensor(dt, &dims, &strides, Some(uid), false, false)
}

/// A virtual tensor of `dims` / `strides` and type `dt`.
fn virt(
    gr: &mut Graph,
    dt: DataType,
    (dims, strides): ([i64; 4], [i64; 4]),
) -> crate::Result<TensorDesc> {
    gr.tensor(dt, &dims, &strides, None, true, false)
}

/// `S ← select(row >= col, S, -inf)`: the causal mask (top-left aligned: every sequence has as
/// many queries as keys here), as cudnn-frontend's composite diagonal band mask writes it.
fn causal_mask(
    gr: &mut Graph,
    g: &Geometry,
    c: &Common,
    s: TensorDesc,
) -> crate::Result<TensorDesc> {
    let sq = packed(g.b, g.hq, g.s, g.s);
    let row = virt(gr, DataType::Int32, sq)?;
    gr.pointwise(Pw::GenIndex, &s, None, None, &row, Some(2), DataType::Float)?;
    let col = virt(gr, DataType::Int32, sq)?;
    gr.pointwise(Pw::GenIndex, &s, None, None, &col, Some(3), DataType::Float)?;
    let keep = virt(gr, DataType::Boolean, sq)?;
    gr.pointwise(
        Pw::CmpGe,
        &row,
        Some(&col),
        None,
        &keep,
        None,
        DataType::Boolean,
    )?;
    let out = virt(gr, DataType::Float, sq)?;
    gr.pointwise(
        Pw::BinarySelect,
        &s,
        Some(&c.neg_inf),
        Some(&keep),
        &out,
        None,
        DataType::Float,
    )?;
    Ok(out)
}

/// The forward: `S = scale · Q Kᵀ` (masked), `L = max + log Σ exp(S − max)`, `O = softmax(S) V`.
fn fwd_graph(g: &Geometry) -> crate::Result<Graph> {
    let mut gr = Graph::new();
    let f = DataType::Float;
    let qo = bhsd(g.hq, g.s, g.d, g.b);
    let q = io(&mut gr, g.dtype, qo, uid::Q)?;
    let kt = io(&mut gr, g.dtype, bhds(g.hkv, g.s, g.d, g.b), uid::K)?;
    let v = io(&mut gr, g.dtype, bhsd(g.hkv, g.s, g.d, g.b), uid::V)?;
    let o = io(&mut gr, g.dtype, qo, uid::O)?;
    let stats = io(&mut gr, f, packed(g.b, g.hq, g.s, 1), uid::STATS)?;
    let c = common(&mut gr)?;

    let sq = packed(g.b, g.hq, g.s, g.s);
    let s0 = virt(&mut gr, f, sq)?;
    gr.matmul(&q, &kt, &s0)?;
    let mut s = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Mul, &s0, Some(&c.scale), None, &s, None, f)?;
    if g.causal {
        s = causal_mask(&mut gr, g, &c, s)?;
    }
    let row = packed(g.b, g.hq, g.s, 1);
    let max = virt(&mut gr, f, row)?;
    gr.reduction(ReduceMode::Max, &s, &max)?;
    let sub = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Sub, &s, Some(&max), None, &sub, None, f)?;
    let e = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Exp, &sub, None, None, &e, None, f)?;
    let sum = virt(&mut gr, f, row)?;
    gr.reduction(ReduceMode::Add, &e, &sum)?;
    let log = virt(&mut gr, f, row)?;
    gr.pointwise(Pw::Log, &sum, None, None, &log, None, f)?;
    gr.pointwise(Pw::Add, &max, Some(&log), None, &stats, None, f)?;
    let p = virt(&mut gr, g.dtype, sq)?;
    gr.pointwise(Pw::Div, &e, Some(&sum), None, &p, None, f)?;
    gr.matmul(&p, &v, &o)?;
    Ok(gr)
}

/// The backward: `D = rowsum(dO ∘ O)`, `P = exp(scale · Q Kᵀ − L)` (masked), `dV = Pᵀ dO`,
/// `dS = P ∘ (dO Vᵀ − D) · scale`, `dK = dSᵀ Q`, `dQ = dS K` (accumulated in f32); with GQA
/// `dK`, `dV` are summed over each kv head's query heads.
fn bwd_graph(g: &Geometry) -> crate::Result<Graph> {
    let mut gr = Graph::new();
    let f = DataType::Float;
    let (qo, kv, kvt) = (
        bhsd(g.hq, g.s, g.d, g.b),
        bhsd(g.hkv, g.s, g.d, g.b),
        bhds(g.hkv, g.s, g.d, g.b),
    );
    let q = io(&mut gr, g.dtype, qo, uid::Q)?;
    let kt = io(&mut gr, g.dtype, kvt, uid::K)?;
    let vt = io(&mut gr, g.dtype, kvt, uid::V)?;
    let o = io(&mut gr, g.dtype, qo, uid::O)?;
    let dout = io(&mut gr, g.dtype, qo, uid::DO)?;
    let stats = io(&mut gr, f, packed(g.b, g.hq, g.s, 1), uid::STATS)?;
    let dq = io(&mut gr, g.dtype, qo, uid::DQ)?;
    let dk = io(&mut gr, g.dtype, kv, uid::DK)?;
    let dv = io(&mut gr, g.dtype, kv, uid::DV)?;
    let c = common(&mut gr)?;
    let one = scalar(&mut gr, uid::ONE)?;
    let gqa = g.hq != g.hkv;

    // D = rowsum(dO ∘ O), non-virtual f32 in the workspace.
    let prod = virt(
        &mut gr,
        f,
        (qo.0, [g.hq * g.s * g.d, g.s * g.d, g.hq * g.d, 1]),
    )?;
    gr.pointwise(Pw::Mul, &dout, Some(&o), None, &prod, None, f)?;
    let row = packed(g.b, g.hq, g.s, 1);
    let rsum = virt(&mut gr, f, row)?;
    gr.reduction(ReduceMode::Add, &prod, &rsum)?;
    let dsum = io(&mut gr, f, row, uid::SUM)?;
    gr.pointwise(Pw::Mul, &rsum, Some(&one), None, &dsum, None, f)?;

    // P = exp(scale · Q Kᵀ − L), masked.
    let sq = packed(g.b, g.hq, g.s, g.s);
    let s0 = virt(&mut gr, f, sq)?;
    gr.matmul(&q, &kt, &s0)?;
    let s1 = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Mul, &s0, Some(&c.scale), None, &s1, None, f)?;
    let mut s2 = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Sub, &s1, Some(&stats), None, &s2, None, f)?;
    if g.causal {
        s2 = causal_mask(&mut gr, g, &c, s2)?;
    }
    let p = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Exp, &s2, None, None, &p, None, f)?;

    // dV = Pᵀ dO (per query head, then summed over each kv head's group).
    let sk = ([g.b, g.hq, g.s, g.s], [g.hq * g.s * g.s, g.s * g.s, 1, g.s]);
    let pt = virt(&mut gr, g.dtype, sk)?;
    gr.reshape(&p, &pt)?;
    if gqa {
        let full = virt(&mut gr, g.dtype, packed(g.b, g.hq, g.s, g.d))?;
        gr.matmul(&pt, &dout, &full)?;
        gr.reduction(ReduceMode::Add, &full, &dv)?;
    } else {
        gr.matmul(&pt, &dout, &dv)?;
    }

    // dS = P ∘ (dO Vᵀ − D) · scale.
    let dp = virt(&mut gr, f, sq)?;
    gr.matmul(&dout, &vt, &dp)?;
    let dp1 = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Sub, &dp, Some(&dsum), None, &dp1, None, f)?;
    let dp2 = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Mul, &dp1, Some(&p), None, &dp2, None, f)?;
    let ds = virt(&mut gr, f, sq)?;
    gr.pointwise(Pw::Mul, &dp2, Some(&c.scale), None, &ds, None, f)?;

    // dK = dSᵀ Q.
    let dst = virt(&mut gr, g.dtype, sk)?;
    gr.reshape(&ds, &dst)?;
    if gqa {
        let full = virt(&mut gr, g.dtype, packed(g.b, g.hq, g.s, g.d))?;
        gr.matmul(&dst, &q, &full)?;
        gr.reduction(ReduceMode::Add, &full, &dk)?;
    } else {
        gr.matmul(&dst, &q, &dk)?;
    }

    // dQ = dS K, accumulated in f32 in the workspace, then converted.
    let k = virt(&mut gr, f, packed(g.b, g.hkv, g.s, g.d))?;
    gr.reshape(&kt, &k)?;
    let acc = io(&mut gr, f, packed(g.b, g.hq, g.s, g.d), uid::DQ_ACC)?;
    gr.matmul(&ds, &k, &acc)?;
    gr.pointwise(Pw::Identity, &acc, None, None, &dq, None, f)?;
    Ok(gr)
}

/// `-inf` for the mask, as cuDNN 9.10 and newer take it (older ones want the lowest float).
fn neg_inf() -> f32 {
    match crate::runtime::cudnn::available() {
        Ok(v) if v < 91_000 => f32::MIN,
        _ => f32::NEG_INFINITY,
    }
}

/// The variant pack's uids and pointers without `-inf` when the graph has no causal mask (the
/// only operation that reads it): a pack names exactly the graph's non-virtual tensors.
fn without_mask(g: &Geometry, uids: &[i64], ptrs: &[*mut c_void]) -> (Vec<i64>, Vec<*mut c_void>) {
    uids.iter()
        .zip(ptrs)
        .filter(|(u, _)| g.causal || **u != uid::NEG_INF)
        .map(|(u, p)| (*u, *p))
        .unzip()
}

/// Bytes of the backward's f32 row sums `D`, rounded up to keep the accumulator 16-byte aligned.
fn sum_bytes(g: &Geometry) -> usize {
    ((g.b * g.hq * g.s) as usize * 4).div_ceil(256) * 256
}

/// The forward on cuDNN: `O` and the statistics for the backward.
pub(super) fn fwd(
    rt: &CudaRuntime,
    g: Geometry,
    p: &FaPlan,
    [(q, lq), (k, lk), (v, lv)]: [(&CudaStorage, &Layout); 3],
) -> candle_core::Result<(CudaStorage, Saved)> {
    match q.dtype() {
        DType::BF16 => fwd_t::<bf16>(rt, g, p, [(q, lq), (k, lk), (v, lv)]),
        DType::F16 => fwd_t::<f16>(rt, g, p, [(q, lq), (k, lk), (v, lv)]),
        dt => Err(candle_core::Error::Msg(format!(
            "{OP} (cudnn): unsupported dtype {dt:?}"
        ))),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    rt: &CudaRuntime,
    g: Geometry,
    p: &FaPlan,
    [(q, lq), (k, lk), (v, lv)]: [(&CudaStorage, &Layout); 3],
) -> candle_core::Result<(CudaStorage, Saved)> {
    let plan = planned(rt, g, Pass::Fwd, OP)?;
    let dev = &q.device;
    let stream = rt.stream();
    let qs = input::<T>(OP, q, lq)?;
    let ks = input::<T>(OP, k, lk)?;
    let vs = input::<T>(OP, v, lv)?;
    // SAFETY: the graph writes every element of O ([b, hq, s, d] = total_q · hq · d) and of the
    // statistics ([b, hq, s]): the engine computes every row of every (sequence, head).
    let mut o = unsafe { dev.alloc::<T>(p.total_q * p.hq * p.d) }?;
    let mut stats = unsafe { dev.alloc::<f32>(p.hq * p.total_q) }?;
    let mut ws = unsafe { dev.alloc::<u8>(plan.workspace.max(1)) }?;
    let (scale, ninf) = (p.scale as f32, neg_inf());
    {
        let (qp, _g1) = qs.device_ptr(stream);
        let (kp, _g2) = ks.device_ptr(stream);
        let (vp, _g3) = vs.device_ptr(stream);
        let (op, _g4) = o.device_ptr_mut(stream);
        let (lp, _g5) = stats.device_ptr_mut(stream);
        let (wp, _g6) = ws.device_ptr_mut(stream);
        let uids = [
            uid::Q,
            uid::K,
            uid::V,
            uid::O,
            uid::STATS,
            uid::SCALE,
            uid::NEG_INF,
        ];
        let ptrs: [*mut c_void; 7] = [
            qp as *mut c_void,
            kp as *mut c_void,
            vp as *mut c_void,
            op as *mut c_void,
            lp as *mut c_void,
            (&scale as *const f32).cast_mut().cast(),
            (&ninf as *const f32).cast_mut().cast(),
        ];
        let (uids, ptrs) = without_mask(&g, &uids, &ptrs);
        let handle = rt
            .cudnn()
            .map_err(|e| candle_core::Error::Msg(format!("{OP}: {e}")))?;
        // SAFETY: q, k, v, o hold the [b, h, s, d] rows the graph's tensors describe (the op
        // checked the layouts: contiguous, total_q = b·s rows of hq·d, total_k rows of hkv·d),
        // stats holds b·hq·s floats, the workspace has the plan's size; scale and -inf are host
        // scalars read during the call; o and stats are fresh allocations, so no output aliases
        // an input; everything lives until the stream has run the work (Candle's buffers are
        // freed in stream order).
        unsafe { plan.execute(handle, &uids, &ptrs, wp as *mut c_void) }
            .map_err(crate::Error::into_candle)?;
    }
    drop(ws);
    Ok((
        CudaStorage::wrap_cuda_slice(o, dev.clone()),
        Saved::Cudnn { stats },
    ))
}

/// The backward on cuDNN: `[dQ, dK, dV]` flattened, from the forward's statistics.
pub(super) fn bwd(
    rt: &CudaRuntime,
    g: Geometry,
    p: &FaPlan,
    x: &super::cuda::BwdInputs<'_>,
    stats: &CudaSlice<f32>,
) -> candle_core::Result<CudaStorage> {
    match x.q.0.dtype() {
        DType::BF16 => bwd_t::<bf16>(rt, g, p, x, stats),
        DType::F16 => bwd_t::<f16>(rt, g, p, x, stats),
        dt => Err(candle_core::Error::Msg(format!(
            "{OP_BWD} (cudnn): unsupported dtype {dt:?}"
        ))),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    rt: &CudaRuntime,
    g: Geometry,
    p: &FaPlan,
    x: &super::cuda::BwdInputs<'_>,
    stats: &CudaSlice<f32>,
) -> candle_core::Result<CudaStorage> {
    let plan = planned(rt, g, Pass::Bwd, OP_BWD)?;
    let dev = &x.q.0.device;
    let stream = rt.stream();
    let qs = input::<T>(OP_BWD, x.q.0, x.q.1)?;
    let ks = input::<T>(OP_BWD, x.k.0, x.k.1)?;
    let vs = input::<T>(OP_BWD, x.v.0, x.v.1)?;
    let os = input::<T>(OP_BWD, x.o.0, x.o.1)?;
    let dos = input::<T>(OP_BWD, x.dout.0, x.dout.1)?;
    if stats.len() != p.hq * p.total_q || os.len() != qs.len() || dos.len() != qs.len() {
        return Err(candle_core::Error::Msg(format!(
            "{OP_BWD} (cudnn): internal error: {} statistics, o {} and the output gradient {} \
             elements for q of {}",
            stats.len(),
            os.len(),
            dos.len(),
            qs.len()
        )));
    }
    let nq = p.total_q * p.hq * p.d;
    let nk = p.total_k * p.hkv * p.d;
    // SAFETY: the graph writes every element of dQ, dK and dV (every row of every sequence and
    // head; dK, dV rows no query sees get zeros from the matmuls over masked probabilities).
    let mut out = unsafe { dev.alloc::<T>(nq + 2 * nk) }?;
    // The workspace: D (f32 row sums), then the f32 dQ accumulator, then the plan's own. cuDNN
    // before 9.6 adds into the accumulator, so there it starts zeroed; newer ones initialise it.
    let sum = sum_bytes(&g);
    let acc = nq * 4;
    let bytes = sum + acc + plan.workspace.max(1);
    let mut ws = match crate::runtime::cudnn::available() {
        Ok(v) if v >= 90_600 => {
            // SAFETY: the graph writes D before reading it and (cuDNN >= 9.6) initialises the
            // accumulator itself; the plan's workspace is cuDNN's scratch.
            unsafe { dev.alloc::<u8>(bytes) }?
        }
        _ => dev.alloc_zeros::<u8>(bytes)?,
    };
    let (scale, ninf, one) = (p.scale as f32, neg_inf(), 1f32);
    {
        let (qp, _g1) = qs.device_ptr(stream);
        let (kp, _g2) = ks.device_ptr(stream);
        let (vp, _g3) = vs.device_ptr(stream);
        let (op, _g4) = os.device_ptr(stream);
        let (dop, _g5) = dos.device_ptr(stream);
        let (lp, _g6) = stats.device_ptr(stream);
        let (outp, _g7) = out.device_ptr_mut(stream);
        let (wp, _g8) = ws.device_ptr_mut(stream);
        let el = std::mem::size_of::<T>() as u64;
        let uids = [
            uid::Q,
            uid::K,
            uid::V,
            uid::O,
            uid::DO,
            uid::STATS,
            uid::DQ,
            uid::DK,
            uid::DV,
            uid::SCALE,
            uid::NEG_INF,
            uid::ONE,
            uid::SUM,
            uid::DQ_ACC,
        ];
        let ptrs: [*mut c_void; 14] = [
            qp as *mut c_void,
            kp as *mut c_void,
            vp as *mut c_void,
            op as *mut c_void,
            dop as *mut c_void,
            lp as *mut c_void,
            outp as *mut c_void,
            (outp + nq as u64 * el) as *mut c_void,
            (outp + (nq + nk) as u64 * el) as *mut c_void,
            (&scale as *const f32).cast_mut().cast(),
            (&ninf as *const f32).cast_mut().cast(),
            (&one as *const f32).cast_mut().cast(),
            wp as *mut c_void,
            (wp + sum as u64) as *mut c_void,
        ];
        let (uids, ptrs) = without_mask(&g, &uids, &ptrs);
        let handle = rt
            .cudnn()
            .map_err(|e| candle_core::Error::Msg(format!("{OP_BWD}: {e}")))?;
        // SAFETY: the inputs hold the [b, h, s, d] rows the graph describes (layouts checked by
        // the op, contiguous), stats b·hq·s floats from this geometry's forward; `out` holds
        // dQ (nq), dK and dV (nk each) at the offsets given, 16-byte aligned (nq and nk are
        // multiples of the head dim, 64 or 128); the workspace holds D (sum bytes), the zeroed
        // f32 accumulator (nq floats) and the plan's workspace; host scalars are read during the
        // call; outputs are fresh and never alias the inputs.
        unsafe {
            plan.execute(
                handle,
                &uids,
                &ptrs,
                (wp + (sum + acc) as u64) as *mut c_void,
            )
        }
        .map_err(crate::Error::into_candle)?;
    }
    drop(ws);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
