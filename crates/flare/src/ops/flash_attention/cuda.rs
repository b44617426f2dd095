//! Host launchers of flash attention on CUDA (`crates/flare-kernels/src/cu/flash_attention.cu`,
//! FlashAttention-2 on `mma.sync` tensor cores; its header states the ABI and launch shapes).
//!
//! - [`fwd`]: one launch, `flash_attn_fwd_d{64,128}_{bf16,f16}`, writes `O` and the logsumexp
//!   `L` (f32 `[hq, total_q]`); the offsets are uploaded once (`cu_q` then `cu_k`, i32, one
//!   buffer) and both `L` and the offsets go back to the op as [`Saved::Device`] for the
//!   backward.
//! - [`bwd`]: three launches over the forward's `L` and offsets: `bwd_pre` (`D = rowsum(dO ∘ O)`
//!   and the f32 `dQ` workspace zeroed, as the kernel's conventions say), `bwd` (`dK`, `dV` per
//!   block of 64 keys, `dQ` added to the workspace with f32 atomics; dynamic shared memory,
//!   over 48 KiB for head dim 128, so the function's limit is raised once per device), and
//!   `bwd_convert` (`dQ` to the dtype). `dQ`, `dK`, `dV` are written into one buffer, in that
//!   order (the op's flattened output, as on the CPU).
//!
//! bf16 and f16, head dims 64 and 128: `mod.rs` sends only those here.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::plan::{
    bwd_block_keys, bwd_smem_bytes, bwd_threads, fwd_block_rows, FaPlan, Saved, FA_THREADS, OP,
    OP_BWD,
};
use crate::ops::cuda::rows::{input, DEFAULT_SMEM_LIMIT};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

/// Block size of `bwd_pre` (one warp per row) and `bwd_convert` (`__launch_bounds__(256)`).
const ROW_THREADS: u32 = 256;
/// Grid cap of `bwd_convert` (a grid-stride loop).
const CONVERT_MAX_BLOCKS: usize = 8192;
/// The grid's y and z limit (heads, sequences).
const MAX_GRID_YZ: usize = 65_535;

/// The four kernels of one (dtype, head dim).
struct Kernels {
    fwd: Kernel,
    pre: Kernel,
    bwd: Kernel,
    convert: Kernel,
}

fn kernels(op: &'static str, dtype: DType, d: usize) -> candle_core::Result<Kernels> {
    use Kernel::*;
    let [fwd, pre, bwd, convert] = match (dtype, d) {
        (DType::BF16, 64) => [
            FlashAttnFwdD64BF16,
            FlashAttnBwdPreD64BF16,
            FlashAttnBwdD64BF16,
            FlashAttnBwdConvertD64BF16,
        ],
        (DType::BF16, 128) => [
            FlashAttnFwdD128BF16,
            FlashAttnBwdPreD128BF16,
            FlashAttnBwdD128BF16,
            FlashAttnBwdConvertD128BF16,
        ],
        (DType::F16, 64) => [
            FlashAttnFwdD64F16,
            FlashAttnBwdPreD64F16,
            FlashAttnBwdD64F16,
            FlashAttnBwdConvertD64F16,
        ],
        (DType::F16, 128) => [
            FlashAttnFwdD128F16,
            FlashAttnBwdPreD128F16,
            FlashAttnBwdD128F16,
            FlashAttnBwdConvertD128F16,
        ],
        (dt, d) => {
            return Err(candle_core::Error::Msg(format!(
                "{op} (cuda): no kernel for {dt:?} with head_dim {d} (bf16 / f16, head_dim 64 / \
                 128); flare::ops::flash_attention routes other cases to its composed path"
            )))
        }
    };
    Ok(Kernels {
        fwd,
        pre,
        bwd,
        convert,
    })
}

/// Refuses geometry the kernel's `int` arguments and grid cannot hold.
fn check_limits(op: &'static str, p: &FaPlan) -> candle_core::Result<()> {
    let int = i32::MAX as usize;
    let bad = |what: String| Err(candle_core::Error::Msg(format!("{op} (cuda): {what}")));
    if p.total_q > int || p.total_k > int {
        return bad(format!(
            "{} query / {} key rows exceed the kernel's 32-bit offsets",
            p.total_q, p.total_k
        ));
    }
    if p.hq > MAX_GRID_YZ || p.batch() > MAX_GRID_YZ {
        return bad(format!(
            "{} heads / {} sequences exceed the grid's {MAX_GRID_YZ}",
            p.hq,
            p.batch()
        ));
    }
    Ok(())
}

/// The elements of a contiguous `[rows, heads, d]` input, refusing a start that is not 16-byte
/// aligned (the kernel's `cp.async` copies 16 bytes; `mod.rs` copies such inputs first).
fn aligned_input<'a, T: CudaDType>(
    op: &'static str,
    what: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    if l.start_offset() * std::mem::size_of::<T>() % 16 != 0 {
        return Err(candle_core::Error::Msg(format!(
            "{op} (cuda): internal error: {what} starts at element {}, not 16-byte aligned",
            l.start_offset()
        )));
    }
    input::<T>(op, s, l)
}

/// The offsets as the kernel's `int` arrays, `cu_q` then `cu_k` in one buffer.
fn offsets_i32(p: &FaPlan) -> Vec<i32> {
    // Bounded by total_q / total_k, checked against i32::MAX in check_limits.
    p.cu_q.iter().chain(&p.cu_k).map(|&c| c as i32).collect()
}

/// Raises `kernel`'s dynamic shared memory limit to `bytes` on `rt`'s device, once per
/// (device, kernel, size).
fn allow_smem(rt: &CudaRuntime, kernel: Kernel, bytes: usize) -> candle_core::Result<()> {
    static DONE: OnceLock<Mutex<HashSet<(DeviceId, Kernel, usize)>>> = OnceLock::new();
    let key = (rt.device().id(), kernel, bytes);
    let mut done = DONE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if done.contains(&key) {
        return Ok(());
    }
    rt.function(kernel)
        .set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .cuda_ctx("raising the shared memory limit of flash_attn_bwd")
        .map_err(crate::Error::into_candle)?;
    done.insert(key);
    Ok(())
}

/// The forward: `O` (`[total_q, hq, d]`, the inputs' dtype) and what the backward needs.
pub(super) fn fwd(
    p: &FaPlan,
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Saved)> {
    check_limits(OP, p)?;
    let rt = CudaRuntime::get(&q.device).map_err(crate::Error::into_candle)?;
    if let Some(g) = super::cudnn::applies(&rt, p, q.dtype()) {
        return super::cudnn::fwd(&rt, g, p, [(q, lq), (k, lk), (v, lv)]);
    }
    let ks = kernels(OP, q.dtype(), p.d)?;
    match q.dtype() {
        DType::BF16 => fwd_t::<bf16>(p, &ks, [(q, lq), (k, lk), (v, lv)]),
        DType::F16 => fwd_t::<f16>(p, &ks, [(q, lq), (k, lk), (v, lv)]),
        dt => Err(candle_core::Error::Msg(format!(
            "{OP} (cuda): unsupported dtype {dt:?}"
        ))),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    p: &FaPlan,
    ks: &Kernels,
    [(q, lq), (k, lk), (v, lv)]: [(&CudaStorage, &Layout); 3],
) -> candle_core::Result<(CudaStorage, Saved)> {
    let dev = &q.device;
    let qs = aligned_input::<T>(OP, "q", q, lq)?;
    let kv = aligned_input::<T>(OP, "k", k, lk)?;
    let vv = aligned_input::<T>(OP, "v", v, lv)?;
    // Uploaded once per call; Candle's launch-parameter cache serves it from the device while
    // `runtime::cache_launch_params` is held (the trainer's passes).
    let cu: CudaSlice<i32> = dev.clone_htod(&offsets_i32(p))?;
    let nb = p.batch() + 1;
    // SAFETY: every element of `o` and `lse` is written by the kernel below: each row of every
    // sequence by the block that owns it (rows that see no key get O = 0, L = -inf); when
    // max_sq == 0 there are no rows (total_q == 0) and nothing to write.
    let mut o = unsafe { dev.alloc::<T>(p.total_q * p.hq * p.d) }?;
    let mut lse = unsafe { dev.alloc::<f32>(p.hq * p.total_q) }?;
    let (max_sq, _) = p.max_lens();
    if max_sq > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let (cu_q, cu_k) = (cu.slice(0..nb), cu.slice(nb..2 * nb));
        let (hq, hkv, total_q) = (p.hq as i32, p.hkv as i32, p.total_q as i32);
        let (scale, causal, window) = (p.scale as f32, i32::from(p.causal), p.window_arg());
        let cfg = LaunchConfig {
            grid_dim: (
                max_sq.div_ceil(fwd_block_rows(p.d)) as u32,
                p.hq as u32,
                p.batch() as u32,
            ),
            block_dim: (FA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = rt.stream().launch_builder(rt.function(ks.fwd));
        b.arg(&mut o)
            .arg(&mut lse)
            .arg(&qs)
            .arg(&kv)
            .arg(&vv)
            .arg(&cu_q)
            .arg(&cu_k)
            .arg(&hq)
            .arg(&hkv)
            .arg(&total_q)
            .arg(&scale)
            .arg(&causal)
            .arg(&window);
        // SAFETY: flash_attn_fwd_d<D>_<t>(T *o, float *lse, const T *q, const T *k, const T *v,
        // const int *cu_q, const int *cu_k, int hq, int hkv, int total_q, float scale,
        // int causal, int window): q and o hold total_q * hq * d elements, k and v
        // total_k * hkv * d (FaPlan::ranges checked the layouts, all contiguous and 16-byte
        // aligned), lse hq * total_q floats; cu_q and cu_k hold batch + 1 offsets from 0 to
        // total_q / total_k, non-decreasing (checked by `flash_attention`); hq is a multiple
        // of hkv; the grid is (ceil(max_sq / FA_FWD_BM(D)), hq, batch) of FA_THREADS threads
        // with static shared memory only, as the kernel's header specifies.
        unsafe { b.launch(cfg) }
            .cuda_ctx("launching flash_attn_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(o, dev.clone()),
        Saved::Device { lse, cu },
    ))
}

/// The backward's tensors: `q`, `k`, `v` (the forward's inputs), `o` (its output) and `dout`
/// (the output gradient, the inputs' dtype), each contiguous and 16-byte aligned.
pub(super) struct BwdInputs<'a> {
    /// `[total_q, hq, d]`.
    pub q: (&'a CudaStorage, &'a Layout),
    /// `[total_k, hkv, d]`.
    pub k: (&'a CudaStorage, &'a Layout),
    /// `[total_k, hkv, d]`.
    pub v: (&'a CudaStorage, &'a Layout),
    /// `[total_q, hq, d]`.
    pub o: (&'a CudaStorage, &'a Layout),
    /// `[total_q, hq, d]`.
    pub dout: (&'a CudaStorage, &'a Layout),
}

/// The backward: `[dQ, dK, dV]` flattened, from the forward's `L` and offsets.
pub(super) fn bwd(
    p: &FaPlan,
    x: &BwdInputs<'_>,
    lse: &CudaSlice<f32>,
    cu: &CudaSlice<i32>,
) -> candle_core::Result<CudaStorage> {
    check_limits(OP_BWD, p)?;
    let dtype = x.q.0.dtype();
    for (what, (s, _)) in [
        ("k", x.k),
        ("v", x.v),
        ("o", x.o),
        ("the output gradient", x.dout),
    ] {
        if s.dtype() != dtype {
            return Err(candle_core::Error::Msg(format!(
                "{OP_BWD} (cuda): internal error: {what} is {:?}, q is {dtype:?}",
                s.dtype()
            )));
        }
    }
    let nb = p.batch() + 1;
    if lse.len() != p.hq * p.total_q || cu.len() != 2 * nb {
        return Err(candle_core::Error::Msg(format!(
            "{OP_BWD} (cuda): internal error: the carried logsumexp has {} values and the \
             offsets {} (expected {} and {})",
            lse.len(),
            cu.len(),
            p.hq * p.total_q,
            2 * nb
        )));
    }
    let ks = kernels(OP_BWD, dtype, p.d)?;
    match dtype {
        DType::BF16 => bwd_t::<bf16>(p, &ks, x, lse, cu),
        DType::F16 => bwd_t::<f16>(p, &ks, x, lse, cu),
        dt => Err(candle_core::Error::Msg(format!(
            "{OP_BWD} (cuda): unsupported dtype {dt:?}"
        ))),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    p: &FaPlan,
    ks: &Kernels,
    x: &BwdInputs<'_>,
    lse: &CudaSlice<f32>,
    cu: &CudaSlice<i32>,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.q.0.device;
    let qs = aligned_input::<T>(OP_BWD, "q", x.q.0, x.q.1)?;
    let kv = aligned_input::<T>(OP_BWD, "k", x.k.0, x.k.1)?;
    let vv = aligned_input::<T>(OP_BWD, "v", x.v.0, x.v.1)?;
    let os = aligned_input::<T>(OP_BWD, "o", x.o.0, x.o.1)?;
    let dos = aligned_input::<T>(OP_BWD, "the output gradient", x.dout.0, x.dout.1)?;
    for (what, n) in [("o", os.len()), ("the output gradient", dos.len())] {
        if n != qs.len() {
            return Err(candle_core::Error::Msg(format!(
                "{OP_BWD} (cuda): internal error: {what} has {n} elements, q {}",
                qs.len()
            )));
        }
    }
    let nq = p.total_q * p.hq * p.d;
    let nk = p.total_k * p.hkv * p.d;
    let rows = p.total_q * p.hq;
    // SAFETY: every element is written below: dQ ([0, nq)) by bwd_convert from the workspace
    // (all of it, when nq > 0), dK and dV ([nq, nq + 2 nk)) by the bwd kernel, which writes
    // every key row of every sequence (zeros where no query sees it) whenever max_sk > 0 (and
    // nk == 0 otherwise), or with a split by bwd_convert from the zeroed f32 sums the kernel
    // adds into (all 2 nk of them). `delta` is written by bwd_pre for every row before bwd
    // reads it, and `dq_acc` is zeroed by bwd_pre (the kernel's convention) before bwd
    // accumulates into it.
    let mut out = unsafe { dev.alloc::<T>(nq + 2 * nk) }?;
    let mut delta = unsafe { dev.alloc::<f32>(rows) }?;
    let mut dq_acc = unsafe { dev.alloc::<f32>(nq) }?;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let (hq, hkv, total_q) = (p.hq as i32, p.hkv as i32, p.total_q as i32);
    let (scale, causal, window) = (p.scale as f32, i32::from(p.causal), p.window_arg());
    let split = p.bwd_split(rt.sm_count as usize);
    // With split > 1 the blocks of one kv head add their dK, dV parts into these f32 sums
    // (zeroed here), converted into `out` after the kernel.
    let dkv_acc = if split > 1 && nk > 0 {
        Some(
            stream
                .alloc_zeros::<f32>(2 * nk)
                .cuda_ctx("allocating the dK / dV sums")
                .map_err(crate::Error::into_candle)?,
        )
    } else {
        None
    };
    let (mut dq, mut dkv) = out.split_at_mut(nq);

    if rows > 0 {
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil((ROW_THREADS / 32) as usize) as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(rt.function(ks.pre));
        b.arg(&mut delta)
            .arg(&mut dq_acc)
            .arg(&os)
            .arg(&dos)
            .arg(&total_q)
            .arg(&hq);
        // SAFETY: flash_attn_bwd_pre_d<D>_<t>(float *delta, float *dq_acc, const T *o,
        // const T *dout, int total_q, int hq): one warp per (row, head) pair, 8 per 256-thread
        // block, rows = total_q * hq of them, each reading d elements of o and dout (nq each)
        // and writing delta[h * total_q + i] (rows floats) and its d floats of dq_acc (nq).
        unsafe { b.launch(cfg) }
            .cuda_ctx("launching flash_attn_bwd_pre")
            .map_err(crate::Error::into_candle)?;
    }
    let (_, max_sk) = p.max_lens();
    if max_sk > 0 {
        let nb = p.batch() + 1;
        let (cu_q, cu_k) = (cu.slice(0..nb), cu.slice(nb..2 * nb));
        let smem = bwd_smem_bytes(p.d);
        if smem > DEFAULT_SMEM_LIMIT {
            allow_smem(&rt, ks.bwd, smem)?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                max_sk.div_ceil(bwd_block_keys(p.d)) as u32,
                (p.hkv * split) as u32,
                p.batch() as u32,
            ),
            block_dim: (bwd_threads(p.d), 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (mut dk, mut dv) = dkv.split_at_mut(nk);
        // The f32 sums' halves (dK, dV), or null pointers (the kernel ignores them at split 1).
        let acc_guard = dkv_acc.as_ref().map(|acc| acc.device_ptr(stream));
        let (acc_k, acc_v) = match &acc_guard {
            Some((ptr, _)) => (*ptr, *ptr + (nk * std::mem::size_of::<f32>()) as u64),
            None => (0, 0),
        };
        let split_arg = split as i32;
        let mut b = stream.launch_builder(rt.function(ks.bwd));
        b.arg(&mut dk)
            .arg(&mut dv)
            .arg(&mut dq_acc)
            .arg(&qs)
            .arg(&kv)
            .arg(&vv)
            .arg(&dos)
            .arg(lse)
            .arg(&delta)
            .arg(&cu_q)
            .arg(&cu_k)
            .arg(&hq)
            .arg(&hkv)
            .arg(&total_q)
            .arg(&scale)
            .arg(&causal)
            .arg(&window)
            .arg(&acc_k)
            .arg(&acc_v)
            .arg(&split_arg);
        // SAFETY: flash_attn_bwd_d<D>_<t>(T *dk, T *dv, float *dq_acc, const T *q, const T *k,
        // const T *v, const T *dout, const float *lse, const float *delta, const int *cu_q,
        // const int *cu_k, int hq, int hkv, int total_q, float scale, int causal, int window,
        // float *dk_acc, float *dv_acc, int split): dk and dv are disjoint nk-element views
        // of `out`, dq_acc and q, dout hold nq elements, k and v nk, lse (the forward's, length
        // checked) and delta hq * total_q floats; the offsets are the forward's (batch + 1
        // each, checked by `flash_attention`). `split` divides hq / hkv (`bwd_split`); when it
        // is > 1, dk_acc and dv_acc are the two nk-float halves of `dkv_acc` (zeroed above,
        // alive until the convert below has been queued on this stream), else null and unread.
        // The grid is (ceil(max_sk / FA_BWD_BN(D)), hkv * split, batch) of FA_BWD_THREADS(D)
        // threads with FA_BWD_SMEM(D) bytes of dynamic shared memory (the limit raised above
        // when over 48 KiB), as the kernel's header specifies.
        unsafe { b.launch(cfg) }
            .cuda_ctx("launching flash_attn_bwd")
            .map_err(crate::Error::into_candle)?;
    }
    if let Some(acc) = &dkv_acc {
        let n = (2 * nk) as i64;
        let cfg = LaunchConfig {
            grid_dim: (
                (2 * nk)
                    .div_ceil(ROW_THREADS as usize)
                    .min(CONVERT_MAX_BLOCKS) as u32,
                1,
                1,
            ),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(rt.function(ks.convert));
        b.arg(&mut dkv).arg(acc).arg(&n);
        // SAFETY: flash_attn_bwd_convert_d<D>_<t>(T *out, const float *acc, long long n): a
        // grid-stride loop over n = 2 nk elements; `dkv` is the last 2 nk elements of `out`
        // (dK then dV), `acc` the 2 nk f32 sums in the same order, written by the bwd kernel
        // queued before on this stream.
        unsafe { b.launch(cfg) }
            .cuda_ctx("launching flash_attn_bwd_convert (dK, dV)")
            .map_err(crate::Error::into_candle)?;
    }
    if nq > 0 {
        let n = nq as i64;
        let cfg = LaunchConfig {
            grid_dim: (
                nq.div_ceil(ROW_THREADS as usize).min(CONVERT_MAX_BLOCKS) as u32,
                1,
                1,
            ),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(rt.function(ks.convert));
        b.arg(&mut dq).arg(&dq_acc).arg(&n);
        // SAFETY: flash_attn_bwd_convert_d<D>_<t>(T *dq, const float *dq_acc, long long n):
        // a grid-stride loop over n = nq elements; dq is the first nq elements of `out`,
        // dq_acc holds nq floats.
        unsafe { b.launch(cfg) }
            .cuda_ctx("launching flash_attn_bwd_convert")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
