//! CUDA forwards of flare's ops: GEMMs through cuBLASLt, the rest through flare's kernels, all
//! on the per-device [`crate::runtime::cuda::CudaRuntime`].

pub(crate) mod argmax;
pub(crate) mod attention;
pub(crate) mod cross_entropy;
mod elementwise;
pub(crate) mod matmul;
pub(crate) mod rms_norm;
pub(crate) mod rope;
mod rows;
pub(crate) mod softmax;
pub(crate) mod swiglu;
