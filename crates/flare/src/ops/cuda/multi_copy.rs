//! Many tensors copied into many others in a few launches (`multi_copy_16` of
//! `crates/flare-kernels/src/cu/multi_copy.cu`): the training step graph's gradient outputs,
//! which one `slice_set` copy per parameter tensor (448 in a Llama-3.1-8B step with adapters on
//! all seven projections) turned into a tail of tiny launches.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::{Storage, Tensor};

use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use crate::Result;

/// Entries per launch (`MULTI_COPY_MAX` of the kernel file).
const MAX: usize = flare_kernels::launch::MULTI_COPY_MAX as usize;
/// Threads per block (`MULTI_COPY_THREADS`).
const THREADS: u32 = flare_kernels::launch::MULTI_COPY_THREADS;

/// The kernel's by-value parameter: `MultiCopyList` of the kernel file, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct List {
    src: [u64; MAX],
    dst: [u64; MAX],
    packs: [i64; MAX],
}

// SAFETY: `List` is `repr(C)` plain data laid out as the kernel's `MultiCopyList` (three arrays
// of MAX 8-byte values); the kernel receives it by value.
unsafe impl DeviceRepr for List {}

/// Copies every `src` into its `dst` (each pair of one dtype, element count and CUDA device):
/// in launches of up to [`MAX`] pairs where both tensors are contiguous, 16-byte aligned and a
/// whole number of 16-byte packs; every other pair by `dst.slice_set(src)`. The destinations
/// are written in place (the caller owns them), so no source may overlap a destination.
pub(crate) fn copy_into_many(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    let mut batch: Vec<(u64, u64, i64)> = Vec::with_capacity(pairs.len());
    let mut first: Option<&Tensor> = None;
    for &(src, dst) in pairs {
        match (packed_ptr(src)?, packed_ptr(dst)?) {
            (Some((s, n)), Some((d, m)))
                if n == m
                    && src.dtype() == dst.dtype()
                    && src.device().same_device(dst.device()) =>
            {
                if first.is_some_and(|f| !f.device().same_device(src.device())) {
                    dst.slice_set(src, 0, 0)?;
                    continue;
                }
                first.get_or_insert(src);
                batch.push((s, d, n as i64));
            }
            _ => dst.slice_set(src, 0, 0)?,
        }
    }
    let Some(first) = first else { return Ok(()) };
    let candle_core::Device::Cuda(dev) = first.device() else {
        return Ok(());
    };
    let rt = CudaRuntime::get(dev)?;
    for chunk in batch.chunks(MAX) {
        let mut list = List {
            src: [0; MAX],
            dst: [0; MAX],
            packs: [0; MAX],
        };
        let mut most = 0i64;
        for (i, &(s, d, n)) in chunk.iter().enumerate() {
            list.src[i] = s;
            list.dst[i] = d;
            list.packs[i] = n;
            most = most.max(n);
        }
        let blocks = (most as usize).div_ceil(THREADS as usize).clamp(1, 64) as u32;
        let mut b = rt.stream().launch_builder(rt.function(Kernel::MultiCopy16));
        b.arg(&list);
        // SAFETY: multi_copy_16(MultiCopyList list) with gridDim.y = chunk.len() entries, each a
        // (source, destination, packs) of two live, contiguous, 16-byte aligned device buffers
        // of `packs` 16-byte packs on this runtime's device (`packed_ptr`); the tensors are the
        // caller's, alive until the launch is queued, and freeing them later is ordered after
        // the kernel on this single stream. The destinations are written in place: the caller
        // owns them and no source overlaps one.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (blocks, chunk.len() as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .cuda_ctx("launching multi_copy_16")?;
    }
    Ok(())
}

/// The device address of `t`'s first element and its number of 16-byte packs, when `t` is a
/// contiguous CUDA tensor starting on a 16-byte boundary with a whole number of packs.
fn packed_ptr(t: &Tensor) -> Result<Option<(u64, usize)>> {
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    if !t.is_contiguous() || bytes % 16 != 0 || bytes == 0 {
        return Ok(None);
    }
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        return Ok(None);
    };
    let rt = CudaRuntime::get(&cs.device)?;
    let Some(base) = crate::runtime::offload::slice_ptr(&cs.slice, rt.stream()) else {
        return Ok(None);
    };
    let p = base + (l.start_offset() * t.dtype().size_in_bytes()) as u64;
    Ok((p % 16 == 0).then_some((p, bytes / 16)))
}
