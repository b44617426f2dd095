//! Host copies of device tensors in page-locked memory: the store of activation checkpointing's
//! offload ([`crate::models::checkpoint::CheckpointStore::Host`]).
//!
//! A [`HostCopy`] is made by one asynchronous device-to-host copy on the device's stream (the
//! stream every flare and Candle op runs on) into a page-locked buffer, and turned back into a
//! device tensor by one asynchronous host-to-device copy on the same stream. Nothing waits for
//! either copy: the stream orders them after the work that wrote the tensor and before the work
//! that reads it back, and a device buffer freed after the copy was queued is freed in stream
//! order too. Page-locked memory lets the DMA engine read and write it directly, at PCIe or
//! NVLink-C2C bandwidth; pageable memory (a `Vec`, which is what `Tensor::to_device(&Cpu)`
//! gives) makes the driver stage every chunk through a pinned bounce buffer and blocks the
//! host until the copy has finished, and a fresh `Vec` of gigabytes first faults in every page.
//!
//! Pinning memory is slow (the kernel locks every page), so the buffers are allocated once and
//! reused: a dropped [`HostCopy`] returns its buffer to its device's pool
//! ([`super::cuda::CudaRuntime`]), where the next copy of the same size or smaller takes it.
//! A training step that offloads `n` layer inputs pins `n` buffers in its first step and none
//! after. [`super::empty_cache`] frees the pool (after waiting for the queued copies).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use super::cuda::{CudaResultExt, CudaRuntime};
use crate::{Error, Result};

const OP: &str = "checkpoint offload";

/// A device tensor's contents in a page-locked host buffer (see the module docs). Dropping it
/// gives the buffer back to the device's pool.
pub(crate) struct HostCopy {
    /// `None` only after [`Drop`] took it.
    buf: Option<PinnedHostSlice<u8>>,
    runtime: Arc<CudaRuntime>,
    shape: Shape,
    dtype: DType,
    bytes: usize,
}

impl std::fmt::Debug for HostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCopy")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// The device address of the first element of a storage's buffer (`None` for the dtypes the
/// offload does not copy). Also the multi-tensor copy's (`ops::cuda::multi_copy`).
pub(crate) fn slice_ptr(slice: &CudaStorageSlice, stream: &Arc<CudaStream>) -> Option<u64> {
    Some(match slice {
        CudaStorageSlice::U8(s) => s.device_ptr(stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(stream).0,
        CudaStorageSlice::I64(s) => s.device_ptr(stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(stream).0,
        CudaStorageSlice::F32(s) => s.device_ptr(stream).0,
        CudaStorageSlice::F64(s) => s.device_ptr(stream).0,
        _ => return None,
    })
}

/// The device address of `t`'s first element and `t`'s size in bytes (contiguous `t` on CUDA).
fn device_bytes(t: &Tensor, dev: &CudaDevice) -> Result<(u64, usize)> {
    let stream = dev.cuda_stream();
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "the tensor is not on a CUDA device".into(),
        });
    };
    let Some(base) = slice_ptr(&cs.slice, &stream) else {
        return Err(Error::UnsupportedDType {
            op: OP,
            dtype: t.dtype(),
            device: "cuda".into(),
        });
    };
    let size = t.dtype().size_in_bytes();
    Ok((
        base + (layout.start_offset() * size) as u64,
        t.elem_count() * size,
    ))
}

impl HostCopy {
    /// Queues the copy of `t` (on a CUDA device) into a page-locked buffer and returns at once.
    ///
    /// Errors: `t` not on CUDA or of an unsupported dtype; the host memory cannot be pinned
    /// (the error says how much was asked); the copy cannot be queued.
    pub(crate) fn new(t: &Tensor) -> Result<HostCopy> {
        let candle_core::Device::Cuda(dev) = t.device() else {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "the tensor is not on a CUDA device".into(),
            });
        };
        let t = t.contiguous()?;
        let runtime = CudaRuntime::get(dev)?;
        let (src, bytes) = device_bytes(&t, dev)?;
        let mut buf = runtime.take_pinned(bytes)?;
        let stream = runtime.stream();
        stream
            .context()
            .bind_to_thread()
            .cuda_ctx("binding the CUDA context")?;
        if bytes > 0 {
            let dst = buf
                .as_mut_ptr()
                .cuda_ctx("reading a pinned buffer's address")?;
            // SAFETY: `buf` is a page-locked buffer of at least `bytes` bytes that this copy owns
            // until it is dropped (and a dropped buffer is only reused by copies queued later on
            // this same stream); `src` is the address of `t`'s `bytes` contiguous bytes, and `t`
            // lives until this function returns, after which its memory is freed in stream
            // order, after the copy. The stream is the one every op on the device runs on.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(dst, bytes);
                candle_core::cuda_backend::cudarc::driver::result::memcpy_dtoh_async(
                    dst,
                    src,
                    stream.cu_stream(),
                )
            }
            .cuda_ctx("queuing a device-to-host copy")?;
        }
        Ok(HostCopy {
            buf: Some(buf),
            runtime,
            shape: t.shape().clone(),
            dtype: t.dtype(),
            bytes,
        })
    }

    /// Queues the copy back into a new tensor on `like`'s device (any tensor on the device the
    /// copy was made from) and returns it at once; the buffer goes back to the pool.
    pub(crate) fn restore(self, like: &Tensor) -> Result<Tensor> {
        Ok(like.apply_op1_no_bwd(&Restore(&self))?)
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.runtime.give_pinned(buf);
        }
    }
}

/// The host-to-device copy of a [`HostCopy`], as an op whose output is the restored tensor (its
/// input only names the device).
struct Restore<'a>(&'a HostCopy);

impl CustomOp1 for Restore<'_> {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{OP}: a host copy is restored onto its CUDA device, not the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let h = self.0;
        let dev = s.device();
        if dev.id() != h.runtime.device().id() {
            candle_core::bail!("{OP}: a host copy is restored onto the device it came from");
        }
        let n = h.shape.elem_count();
        // SAFETY (each arm): the allocation is fully written by the copy below before any op
        // reads it (both are queued on the device's one stream, the copy first).
        let slice = unsafe {
            match h.dtype {
                DType::U8 => CudaStorageSlice::U8(dev.alloc::<u8>(n)?),
                DType::U32 => CudaStorageSlice::U32(dev.alloc::<u32>(n)?),
                DType::I64 => CudaStorageSlice::I64(dev.alloc::<i64>(n)?),
                DType::BF16 => CudaStorageSlice::BF16(dev.alloc::<half::bf16>(n)?),
                DType::F16 => CudaStorageSlice::F16(dev.alloc::<half::f16>(n)?),
                DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(n)?),
                DType::F64 => CudaStorageSlice::F64(dev.alloc::<f64>(n)?),
                other => candle_core::bail!("{OP}: unsupported dtype {other:?}"),
            }
        };
        let out = CudaStorage {
            slice,
            device: dev.clone(),
        };
        let stream = dev.cuda_stream();
        let Some(dst) = slice_ptr(&out.slice, &stream) else {
            candle_core::bail!("{OP}: unsupported dtype {:?}", h.dtype);
        };
        if let (Some(buf), true) = (&h.buf, h.bytes > 0) {
            // SAFETY: `dst` is the new allocation of exactly `h.bytes` bytes; the source is the
            // first `h.bytes` bytes of the page-locked buffer, whose device-to-host copy was
            // queued earlier on this same stream (so it has landed before this copy reads it),
            // and which is only reused by copies queued after this one on the same stream.
            unsafe {
                let src = std::slice::from_raw_parts(
                    buf.as_ptr().map_err(|e| {
                        candle_core::Error::Msg(format!("{OP}: reading the host buffer: {e:?}"))
                    })?,
                    h.bytes,
                );
                candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async(
                    dst,
                    src,
                    stream.cu_stream(),
                )
            }
            .map_err(|e| candle_core::Error::Msg(format!("{OP}: queuing the copy back: {e:?}")))?;
        }
        Ok((out, h.shape.clone()))
    }
}
