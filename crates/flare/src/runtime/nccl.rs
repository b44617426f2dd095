//! The NCCL communicator of a rank (cudarc's bindings, through candle-core's `nccl`
//! feature) and the all-reduce of a bucket on the device's stream.

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::train::distributed::{dist_err, Rendezvous, World};
use crate::Result;

/// One rank's communicator, on its device's stream.
pub(crate) struct Comm {
    comm: NcclComm,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it
// overlap (NCCL's thread-safety rules); `Comm` is not `Sync`, so whichever thread owns it
// is the only one that can call it. The stream it holds is an `Arc<CudaStream>`, already
// `Send + Sync`.
unsafe impl Send for Comm {}

impl Comm {
    /// Rank 0 makes the unique id, the rendezvous hands it to the others, and every rank
    /// joins the communicator (NCCL's `ncclCommInitRank` returns once all ranks have).
    pub(crate) fn connect(
        world: &World,
        dev: &CudaDevice,
        rendezvous: &Rendezvous,
    ) -> Result<Self> {
        let ours = if world.is_main() {
            let id = Id::new().map_err(|e| dist_err(format!("ncclGetUniqueId: {e:?}")))?;
            Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        let blob = rendezvous.share(world, ours.as_deref())?;
        let internal: [std::ffi::c_char; 128] = blob
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                dist_err(format!(
                    "rank 0 sent a {}-byte NCCL unique id, 128 expected",
                    blob.len()
                ))
            })?;
        let comm = NcclComm::from_rank(
            dev.cuda_stream(),
            world.rank,
            world.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| {
            dist_err(format!(
                "rank {} of {}: ncclCommInitRank on cuda:{}: {e:?}",
                world.rank, world.world_size, world.local_rank
            ))
        })?;
        Ok(Comm { comm })
    }

    /// The sum over the ranks of the contiguous f32 vector `flat`, a new tensor.
    pub(crate) fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let op = AllReduceSum { comm: &self.comm };
        // The bucket holds gradient values, not part of any graph: no backward to keep.
        Ok(flat.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

/// NCCL's sum all-reduce as a Candle op (its output is a fresh device buffer).
struct AllReduceSum<'a> {
    comm: &'a NcclComm,
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let src = s.as_cuda_slice::<f32>()?;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous bucket");
        };
        let src = src.slice(start..end);
        let dev = s.device.clone();
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        // The communicator was built on this device's stream, which orders the reduce
        // after the kernels that wrote the bucket.
        debug_assert!(std::sync::Arc::ptr_eq(
            &self.comm.stream(),
            &dev.cuda_stream()
        ));
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
