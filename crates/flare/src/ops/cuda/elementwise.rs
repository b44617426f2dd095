//! Shared plumbing of the elementwise-style launchers (RoPE, SwiGLU, attention): typed views of
//! strided inputs.

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::CudaDType;
use candle_core::CudaStorage;

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
