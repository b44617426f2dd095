//! Host launcher of `attention_decode_*` (`crates/flare-kernels/src/cu/attention.cu`): one
//! block per query row.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType};
use half::{bf16, f16};

use super::elementwise::from_offset;
use super::rows::unsupported;
use crate::ops::attention::AttnPlan;
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP: &str = "attention_decode (cuda)";
/// `ATTN_WARPS` of attention.cu (its block is `32 * ATTN_WARPS` threads).
const WARPS: usize = 8;

/// `softmax(q kᵀ) v` by the plan; a fresh contiguous `[B, G, d]` output.
pub(crate) fn fwd(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    p: &AttnPlan,
) -> candle_core::Result<CudaStorage> {
    match q.dtype() {
        DType::F32 => run::<f32>(Kernel::AttentionDecodeF32, q, k, v, p),
        DType::F16 => run::<f16>(Kernel::AttentionDecodeF16, q, k, v, p),
        DType::BF16 => run::<bf16>(Kernel::AttentionDecodeBF16, q, k, v, p),
        dt => Err(unsupported(OP, dt)),
    }
}

fn run<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    p: &AttnPlan,
) -> candle_core::Result<CudaStorage> {
    let dev = &q.device;
    let n = p.b * p.g * p.d;
    let qs = from_offset::<T>(OP, q, p.q_off)?;
    let ks = from_offset::<T>(OP, k, p.k.0)?;
    let vs = from_offset::<T>(OP, v, p.v.0)?;
    // SAFETY: every element is written by the kernel below (each block writes its row's d
    // outputs; nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    if n > 0 && p.t > 0 {
        let last = |(_, bs, rs): (usize, usize, usize)| (p.b - 1) * bs + (p.t - 1) * rs + p.d - 1;
        if qs.len() < n || last(p.k) >= ks.len() || last(p.v) >= vs.len() {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: internal error: a view reaches past its buffer"
            )));
        }
        if p.g > u32::MAX as usize || p.b > 65535 {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: grid too large ({} rows x {} batches)",
                p.g, p.b
            )));
        }
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let (g, t, d) = (p.g as i32, p.t as i32, p.d as i32);
        let (k_bs, k_rs) = (p.k.1 as i64, p.k.2 as i64);
        let (v_bs, v_rs) = (p.v.1 as i64, p.v.2 as i64);
        let mut lb = rt.stream().launch_builder(rt.function(kernel));
        lb.arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&mut out)
            .arg(&g)
            .arg(&t)
            .arg(&d)
            .arg(&k_bs)
            .arg(&k_rs)
            .arg(&v_bs)
            .arg(&v_rs);
        let cfg = LaunchConfig {
            grid_dim: (p.g as u32, p.b as u32, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: ((p.t + WARPS * p.d) * 4) as u32,
        };
        // SAFETY: attention_decode_<t>(const T *q, const T *k, const T *v, T *out, int g_rows,
        // int t, int d, long long k_bs, k_rs, v_bs, v_rs): q holds B * G * d contiguous
        // elements, the last k and v elements read are inside their views (checked above), out
        // holds B * G * d. The caller bounds t and d so that the dynamic shared
        // memory stay within the default 48 KiB with d <= 256 (the kernel's ATTN_MAX_E lanes of
        // 32); (t + ATTN_WARPS * d) floats are what it uses; the block is ATTN_THREADS (its
        // launch bound).
        unsafe { lb.launch(cfg) }
            .cuda_ctx("launching attention_decode")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
