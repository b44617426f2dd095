//! Host launcher of `argmax_*` (`crates/flare-kernels/src/cu/argmax.cu`): one block per row.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::rows::{input, rows_cols, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP: &str = "argmax_last_dim (cuda)";
/// `ARGMAX_THREADS` of argmax.cu.
const THREADS: u32 = 1024;
/// Blocks at most (the kernel loops over rows with a grid stride).
const MAX_BLOCKS: usize = 1 << 16;

/// The u32 index of each row's maximum of a contiguous `x`.
pub(crate) fn fwd(x: &CudaStorage, lx: &Layout) -> candle_core::Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => run::<f32>(Kernel::ArgmaxF32, x, lx),
        DType::F16 => run::<f16>(Kernel::ArgmaxF16, x, lx),
        DType::BF16 => run::<bf16>(Kernel::ArgmaxBF16, x, lx),
        dt => Err(unsupported(OP, dt)),
    }
}

fn run<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(OP, lx)?;
    let xs = input::<T>(OP, x, lx)?;
    // SAFETY: every element is written by the kernel below when rows > 0 and cols > 0.
    let mut out = unsafe { dev.alloc::<u32>(rows.max(1)) }?;
    if rows > 0 && cols > 0 {
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
