//! The device memory pool's usage counters, read through the driver.
use std::sync::Arc;

use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext};
use candle_core::cuda_backend::CudaDevice;

/// Reads and resets the memory counters of a device's current memory pool, the pool cudarc
/// allocates from with `cuMemAllocAsync`.
pub struct PoolMeter {
    ctx: Arc<CudaContext>,
    pool: sys::CUmemoryPool,
}

impl PoolMeter {
    /// The meter of `dev`'s current pool.
    pub fn new(dev: &CudaDevice) -> Result<PoolMeter> {
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        // SAFETY: `cu_device` comes from a live context; the returned pool handle is owned
        // by the driver and lives as long as the device (we never destroy it).
        let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }
            .map_err(|e| anyhow!("querying the device memory pool: {e:?}"))?;
        Ok(PoolMeter { ctx, pool })
    }

    fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let mut v: u64 = 0;
        // SAFETY: `pool` is the live device pool; the USED_MEM_* attributes are cuuint64_t,
        // and `v` is a u64 that outlives the call.
        unsafe { result::mem_pool::get_attribute(self.pool, attr, (&mut v as *mut u64).cast()) }
            .map_err(|e| anyhow!("reading the memory pool's {attr:?}: {e:?}"))?;
        Ok(v)
    }

    /// Bytes of the pool currently allocated to the program.
    pub fn used(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// Bytes the pool holds from the driver (in use, or freed and kept for reuse).
    pub fn reserved(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
    }

    /// The high-water mark of [`Self::used`] since the last [`Self::reset_high`], plus that of
    /// the device's CUDA-graph memory (the memory a replayed graph allocates lives in the
    /// driver's graph pool, not in this one; the two marks are added, an upper bound of the
    /// two pools' use at any one time).
    pub fn high(&self) -> Result<u64> {
        Ok(
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?
                + self.graph_high()?,
        )
    }

    /// The high-water mark of the device's CUDA-graph memory since the last reset.
    fn graph_high(&self) -> Result<u64> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let mut v: u64 = 0;
        // SAFETY: the device is live; CU_GRAPH_MEM_ATTR_USED_MEM_HIGH is a cuuint64_t, and `v`
        // is a u64 that outlives the call.
        unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                self.ctx.cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                (&mut v as *mut u64).cast(),
            )
            .result()
        }
        .map_err(|e| anyhow!("reading the graph memory's high-water mark: {e:?}"))?;
        Ok(v)
    }

    /// Resets the high-water mark (the driver accepts only 0, which restarts the mark from
    /// the current usage).
    pub fn reset_high(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let mut zero: u64 = 0;
        // SAFETY: `pool` is the live device pool; USED_MEM_HIGH takes a cuuint64_t that
        // must be 0, and `zero` is a u64 that outlives the call.
        unsafe {
            result::mem_pool::set_attribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .map_err(|e| anyhow!("resetting the memory pool's high-water mark: {e:?}"))?;
        let mut zero: u64 = 0;
        // SAFETY: the device is live; USED_MEM_HIGH of the graph memory takes a cuuint64_t
        // that must be 0, and `zero` is a u64 that outlives the call.
        unsafe {
            sys::cuDeviceSetGraphMemAttribute(
                self.ctx.cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
            .result()
        }
        .map_err(|e| anyhow!("resetting the graph memory's high-water mark: {e:?}"))
    }
}
