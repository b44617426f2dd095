//! CUDA forwards of flare's ops: GEMMs through cuBLASLt, the rest through flare's kernels, all
//! on the per-device [`crate::runtime::cuda::CudaRuntime`].

pub(crate) mod elementwise;
pub(crate) mod rows;
