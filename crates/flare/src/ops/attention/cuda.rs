//! Host launcher of `attention_split_*` and `attention_combine_*`
//! (`crates/flare-kernels/src/cu/attention.cu`): flash-decoding, the keys split in chunks over
//! many blocks, then one merge.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType};
use half::{bf16, f16};

use super::plan::AttnPlan;
use crate::ops::cuda::elementwise::from_offset;
use crate::ops::cuda::rows::unsupported;
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP: &str = "attention_decode (cuda)";
/// `ATTN_THREADS` of attention.cu.
const THREADS: u32 = flare_kernels::launch::ATTN_THREADS;
/// Dynamic shared memory the split kernel may use (the default limit, no opt-in).
const SMEM_LIMIT: usize = 48 * 1024;
/// Blocks the split aims for (a couple per SM of an H100) and the chunk bounds.
const TARGET_BLOCKS: usize = 264;
const MIN_CHUNK: usize = 16;
const MAX_CHUNK: usize = 128;

/// Floats of dynamic shared memory of one split block.
fn smem_floats(g: usize, d: usize, chunk: usize) -> usize {
    g * d + chunk * (d + 1) + g * chunk
}

/// Whether `G` query rows of head dim `d` fit the split kernel (with the smallest chunk).
pub(crate) fn fits(g: usize, d: usize) -> bool {
    smem_floats(g, d, MIN_CHUNK) * 4 <= SMEM_LIMIT
}

/// Keys per block: enough blocks to fill the GPU, within the shared memory limit.
fn chunk_for(p: &AttnPlan) -> usize {
    let mut chunk = (p.t * p.b)
        .div_ceil(TARGET_BLOCKS)
        .clamp(MIN_CHUNK, MAX_CHUNK);
    while chunk > MIN_CHUNK && smem_floats(p.g, p.d, chunk) * 4 > SMEM_LIMIT {
        chunk /= 2;
    }
    chunk.max(MIN_CHUNK)
}

/// `softmax(q kᵀ) v` by the plan; a fresh contiguous `[B, G, d]` output.
pub(crate) fn fwd(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    p: &AttnPlan,
) -> candle_core::Result<CudaStorage> {
    match q.dtype() {
        DType::F32 => run::<f32>(
            [Kernel::AttentionSplitF32, Kernel::AttentionCombineF32],
            q,
            k,
            v,
            p,
        ),
        DType::F16 => run::<f16>(
            [Kernel::AttentionSplitF16, Kernel::AttentionCombineF16],
            q,
            k,
            v,
            p,
        ),
        DType::BF16 => run::<bf16>(
            [Kernel::AttentionSplitBF16, Kernel::AttentionCombineBF16],
            q,
            k,
            v,
            p,
        ),
        dt => Err(unsupported(OP, dt)),
    }
}

fn run<T: CudaDType + DeviceRepr>(
    [split, combine]: [Kernel; 2],
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
        let chunk = chunk_for(p);
        let smem = smem_floats(p.g, p.d, chunk) * 4;
        if smem > SMEM_LIMIT || p.g * p.d > i32::MAX as usize || p.t > i32::MAX as usize {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: internal error: {} query rows of {} do not fit the kernel",
                p.g, p.d
            )));
        }
        let chunks = p.t.div_ceil(chunk);
        if chunks > u32::MAX as usize {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: too many keys ({})",
                p.t
            )));
        }
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        // SAFETY: every partial is written by the split kernel (block (c, z) writes its G rows
        // of d outputs and G (m, l) pairs) before the combine kernel, on the same stream, reads it.
        let mut ws_o = unsafe { dev.alloc::<f32>(p.b * chunks * p.g * p.d) }?;
        // SAFETY: as above.
        let mut ws_ml = unsafe { dev.alloc::<f32>(p.b * chunks * p.g * 2) }?;
        let (g, t, d, chunk_a, chunks_a) = (
            p.g as i32,
            p.t as i32,
            p.d as i32,
            chunk as i32,
            chunks as i32,
        );
        let (k_bs, k_rs) = (p.k.1 as i64, p.k.2 as i64);
        let (v_bs, v_rs) = (p.v.1 as i64, p.v.2 as i64);
        let mut lb = rt.stream().launch_builder(rt.function(split));
        lb.arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&mut ws_o)
            .arg(&mut ws_ml)
            .arg(&g)
            .arg(&t)
            .arg(&d)
            .arg(&chunk_a)
            .arg(&k_bs)
            .arg(&k_rs)
            .arg(&v_bs)
            .arg(&v_rs);
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, p.b as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: attention_split_<t>(const T *q, const T *k, const T *v, float *ws_o, float
        // *ws_ml, int G, int t, int d, int chunk, long long k_bs, k_rs, v_bs, v_rs): q holds
        // B * G * d contiguous elements, the last k and v elements read (key t - 1 of batch
        // B - 1) are inside their views (checked above); block (c, z) with c < chunks =
        // ceil(t / chunk) reads keys [c * chunk, min(t, (c + 1) * chunk)) and writes
        // ws_o[z][c][G][d] and ws_ml[z][c][G][2], both allocated for B * chunks * G rows. Its
        // dynamic shared memory is (G * d + chunk * (d + 1) + G * chunk) floats, under 48 KiB
        // (checked above); the block is ATTN_THREADS (its launch bound).
        unsafe { lb.launch(cfg) }
            .cuda_ctx("launching attention_split")
            .map_err(crate::Error::into_candle)?;
        let mut lb = rt.stream().launch_builder(rt.function(combine));
        lb.arg(&ws_o)
            .arg(&ws_ml)
            .arg(&mut out)
            .arg(&g)
            .arg(&d)
            .arg(&chunks_a);
        let cfg = LaunchConfig {
            grid_dim: (p.g as u32, p.b as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_combine_<t>(const float *ws_o, const float *ws_ml, T *out, int G,
        // int d, int chunks): block (g, z) reads the `chunks` partials of row g of batch z
        // (written above, same stream) and writes out[(z * G + g) * d ..][..d]; out holds
        // B * G * d elements. Block of ATTN_THREADS, no shared memory.
        unsafe { lb.launch(cfg) }
            .cuda_ctx("launching attention_combine")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
