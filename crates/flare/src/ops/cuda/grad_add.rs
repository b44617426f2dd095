//! The backward pass's gradient accumulation on CUDA: `a + b` of two contiguous tensors of one
//! shape and dtype (`grad_add_*` of `crates/flare-kernels/src/cu/grad_add.cu`, 16-byte packs),
//! installed into Candle's `GradStore` ([`candle_core::backprop::set_accumulate_add`]) when a
//! device's runtime is created. Candle's own add, which it replaces there, reads and writes one
//! 2-byte element per access: in the Llama-3.1-8B training step its five accumulations per layer
//! took 15 ms (BENCHMARKS.md). The values are Candle's: each sum is computed in f32 and rounded
//! once.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::ops::cuda::elementwise::from_offset;
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP: &str = "gradient add (cuda)";

/// Threads per block (`GRAD_ADD_THREADS` of the kernel file).
const THREADS: u32 = flare_kernels::launch::GRAD_ADD_THREADS;

/// `sum + grad` by `grad_add_*` when both are contiguous CUDA tensors of one shape, dtype (f32,
/// f16, bf16) and device whose first elements are 16-byte aligned; `None` for every other pair
/// (Candle's add handles it). The [`candle_core::backprop::AccumulateAdd`] flare installs.
pub(crate) fn accumulate_add(sum: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let both_cuda = sum.device().is_cuda() && grad.device().same_device(sum.device());
    let supported = matches!(sum.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !both_cuda
        || !supported
        || sum.dtype() != grad.dtype()
        || sum.shape() != grad.shape()
        || !sum.is_contiguous()
        || !grad.is_contiguous()
    {
        return Ok(None);
    }
    // Allocations are at least 256-byte aligned: a start offset that is a multiple of 16 bytes
    // keeps the packs aligned.
    let size = sum.dtype().size_in_bytes();
    let aligned = |t: &Tensor| (t.layout().start_offset() * size) % 16 == 0;
    if !aligned(sum) || !aligned(grad) {
        return Ok(None);
    }
    Ok(Some(sum.apply_op2_no_bwd(grad, &GradAdd)?))
}

/// The op behind [`accumulate_add`] (CUDA only; its checks are made before it is applied).
struct GradAdd;

impl CustomOp2 for GradAdd {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{OP}: internal error: applied to CPU tensors")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match a.dtype() {
            DType::F32 => run::<f32>(Kernel::GradAddF32, a, la, b, lb)?,
            DType::F16 => run::<f16>(Kernel::GradAddF16, a, la, b, lb)?,
            DType::BF16 => run::<bf16>(Kernel::GradAddBF16, a, la, b, lb)?,
            dt => candle_core::bail!("{OP}: internal error: dtype {dt:?}"),
        };
        Ok((out, la.shape().clone()))
    }
}

fn run<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> candle_core::Result<CudaStorage> {
    let n = la.shape().elem_count();
    if !la.is_contiguous() || !lb.is_contiguous() || lb.shape().elem_count() != n {
        candle_core::bail!("{OP}: internal error: operands not contiguous or of other sizes");
    }
    let dev = &a.device;
    let av = from_offset::<T>(OP, a, la.start_offset())?;
    let bv = from_offset::<T>(OP, b, lb.start_offset())?;
    if av.len() < n || bv.len() < n {
        candle_core::bail!("{OP}: internal error: operands shorter than their shape");
    }
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    if n == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let aligned = {
        let (ap, _ga) = av.device_ptr(rt.stream());
        let (bp, _gb) = bv.device_ptr(rt.stream());
        ap % 16 == 0 && bp % 16 == 0
    };
    if !aligned {
        candle_core::bail!("{OP}: internal error: operands not 16-byte aligned");
    }
    let packs = n / (16 / std::mem::size_of::<T>());
    let blocks = packs
        .div_ceil(THREADS as usize)
        .clamp(1, 32 * rt.sm_count.max(1) as usize) as u32;
    let n64 = n as i64;
    let mut launch = rt.stream().launch_builder(rt.function(kernel));
    launch.arg(&av).arg(&bv).arg(&mut out).arg(&n64);
    // SAFETY: grad_add_<t>(const T *a, const T *b, T *out, long long n): a and b hold at least n
    // elements from their (16-byte aligned, checked above) first elements, out is a fresh
    // allocation of n; the kernel strides over the n / V packs and adds the n % V tail elements
    // one by one, all with bound checks.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .cuda_ctx("launching grad_add")
    .map_err(crate::Error::into_candle)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
