//! Shared plumbing of the elementwise-style launchers (RoPE, SwiGLU, argmax): the grid of a
//! one-thread-per-item kernel with a grid-stride loop, and typed views of strided inputs.

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::CudaStorage;

/// Threads per block of the one-thread-per-item kernels.
pub(crate) const THREADS: u32 = 256;
/// Blocks at most (the kernels loop with a grid stride beyond it).
const MAX_BLOCKS: usize = 1 << 16;

/// The launch of `items` independent items (`items > 0`).
pub(crate) fn items_config(items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The elements of `s` from `offset` to the end of its buffer (a strided input is read through
/// its strides from there).
pub(crate) fn from_offset<'a, T: CudaDType>(
    op: &'static str,
    s: &'a CudaStorage,
    offset: usize,
) -> candle_core::Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    slice.try_slice(offset..).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: internal error: offset {offset} outside a buffer of {} elements",
            slice.len()
        ))
    })
}
