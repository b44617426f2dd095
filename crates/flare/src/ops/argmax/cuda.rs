//! Host launcher of `argmax_*` (`crates/flare-kernels/src/cu/argmax.cu`): one block per row,
//! or, for a few long rows (greedy decoding's logits; unless `FLARE_ARGMAX_SPLIT=0`),
//! `argmax_part_*` over chunks of [`PART_CHUNK`] columns in parallel and `argmax_final` per row
//! (two launches, same result).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use crate::ops::cuda::rows::{input, rows_cols, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP: &str = "argmax_last_dim (cuda)";
/// `ARGMAX_THREADS` of argmax.cu.
const THREADS: u32 = flare_kernels::launch::ARGMAX_THREADS;
/// Blocks at most (the kernel loops over rows with a grid stride).
const MAX_BLOCKS: usize = 1 << 16;
/// `ARGMAX_PART_THREADS` of argmax.cu.
const PART_THREADS: u32 = flare_kernels::launch::ARGMAX_PART_THREADS;
/// Columns per `argmax_part_*` block.
const PART_CHUNK: usize = 2048;
/// Rows at most, and columns at least, for the two-stage form (with more rows the one-block
/// form already fills the GPU; shorter rows gain nothing from splitting).
const PART_MAX_ROWS: usize = 64;
const PART_MIN_COLS: usize = 2 * PART_CHUNK;

/// The u32 index of each row's maximum of a contiguous `x`.
pub(crate) fn fwd(x: &CudaStorage, lx: &Layout) -> candle_core::Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => run::<f32>([Kernel::ArgmaxF32, Kernel::ArgmaxPartF32], x, lx),
        DType::F16 => run::<f16>([Kernel::ArgmaxF16, Kernel::ArgmaxPartF16], x, lx),
        DType::BF16 => run::<bf16>([Kernel::ArgmaxBF16, Kernel::ArgmaxPartBF16], x, lx),
        dt => Err(unsupported(OP, dt)),
    }
}

/// Whether few long rows take the two-stage form: unless `FLARE_ARGMAX_SPLIT=0`
/// ([`crate::runtime::Settings::argmax_split`]; on by default: per-op batch-1 decode measured
/// 1.7% faster with it on the H100, BENCHMARKS.md).
fn split_enabled() -> bool {
    crate::runtime::settings().argmax_split
}

fn run<T: CudaDType + DeviceRepr>(
    [kernel, part]: [Kernel; 2],
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(OP, lx)?;
    let xs = input::<T>(OP, x, lx)?;
    // SAFETY: every element is written by the kernel below when rows > 0 and cols > 0.
    let mut out = unsafe { dev.alloc::<u32>(rows.max(1)) }?;
    if rows > 0
        && rows <= PART_MAX_ROWS
        && split_enabled()
        && cols >= PART_MIN_COLS
        && cols <= i32::MAX as usize
    {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let parts = cols.div_ceil(PART_CHUNK);
        // SAFETY: every one of the rows * parts pairs is written by argmax_part below before
        // argmax_final (same stream) reads them.
        let mut pv = unsafe { dev.alloc::<f32>(rows * parts) }?;
        // SAFETY: as above.
        let mut pi = unsafe { dev.alloc::<u32>(rows * parts) }?;
        let (cols_a, chunk_a, parts_a) = (cols as i32, PART_CHUNK as i32, parts as i32);
        let mut lb = rt.stream().launch_builder(rt.function(part));
        lb.arg(&xs)
            .arg(&mut pv)
            .arg(&mut pi)
            .arg(&cols_a)
            .arg(&chunk_a);
        let cfg = LaunchConfig {
            grid_dim: (parts as u32, rows as u32, 1),
            block_dim: (PART_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argmax_part_<t>(const T *x, float *pv, unsigned int *pi, int cols, int chunk):
        // x holds rows * cols elements from its start offset (rows = gridDim.y <= 64, cols fits
        // i32); block (p, r) reads columns [p * chunk, min((p + 1) * chunk, cols)) of row r and
        // writes pv/pi[r * parts + p], both of rows * parts elements (parts = gridDim.x). The
        // block is ARGMAX_PART_THREADS (its launch bound), static shared memory only.
        unsafe { lb.launch(cfg) }
            .cuda_ctx("launching argmax_part")
            .map_err(crate::Error::into_candle)?;
        let mut lb = rt.stream().launch_builder(rt.function(Kernel::ArgmaxFinal));
        lb.arg(&pv).arg(&pi).arg(&mut out).arg(&parts_a);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (PART_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argmax_final(const float *pv, const unsigned int *pi, unsigned int *out, int
        // parts): block r reads pv/pi[r * parts .. (r + 1) * parts) (written above, same stream)
        // and writes out[r]; out holds rows elements (gridDim.x = rows). Block of
        // ARGMAX_PART_THREADS, static shared memory only.
        unsafe { lb.launch(cfg) }
            .cuda_ctx("launching argmax_final")
            .map_err(crate::Error::into_candle)?;
    } else if rows > 0 && cols > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let (rows_a, cols_a) = (rows as i64, cols as i32);
        let mut lb = rt.stream().launch_builder(rt.function(kernel));
        lb.arg(&xs).arg(&mut out).arg(&rows_a).arg(&cols_a);
        let cfg = LaunchConfig {
            grid_dim: (rows.min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argmax_<t>(const T *x, unsigned int *out, long long rows, int cols): x holds
        // rows * cols elements from its start offset, out holds rows; the block is the
        // kernel's ARGMAX_THREADS (its launch bound) and it uses only static shared memory.
        unsafe { lb.launch(cfg) }
            .cuda_ctx("launching argmax")
            .map_err(crate::Error::into_candle)?;
    } else if rows > 0 {
        return Err(candle_core::Error::Msg(format!(
            "{OP}: rows of zero elements have no maximum"
        )));
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
