//! `flare bench floors`: what one dispatch costs on this machine, piece by piece.
//!
//! The dispatch-bound rows of `flare bench ops` (a 64x64 softmax, a 64³ matmul) are sums of
//! host costs: the kernel launch, the output's allocation and free, the library call, Candle's
//! tensor bookkeeping. This command times each piece alone in a back-to-back burst between two
//! device synchronisations, so a slow row can be traced to its part. CUDA only.

use anyhow::Result;
use clap::Args;

/// Arguments of `flare bench floors`.
#[derive(Debug, Args)]
pub struct FloorsArgs {
    /// CUDA device: cuda (= cuda:0) or cuda:N.
    #[arg(long, default_value = "cuda", value_name = "DEVICE")]
    pub device: String,

    /// Calls per burst.
    #[arg(long, default_value_t = 2000)]
    pub burst: usize,
}

/// Runs the floors and prints one line per piece.
#[cfg(not(feature = "cuda"))]
pub fn run_floors(_args: &FloorsArgs) -> Result<()> {
    anyhow::bail!("flare was built without CUDA; rebuild with --features cuda")
}

/// Runs the floors and prints one line per piece.
#[cfg(feature = "cuda")]
pub fn run_floors(args: &FloorsArgs) -> Result<()> {
    use std::time::Instant;

    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::{DType, Device, Storage, Tensor};
    use flare::runtime::cuda::{CudaRuntime, Kernel};
    use flare::runtime::gemm::GemmParams;

    let dev = args.device.parse::<crate::device::DeviceSpec>()?.open()?;
    let Device::Cuda(cdev) = &dev else {
        anyhow::bail!("bench floors needs a CUDA device, got {}", args.device);
    };
    let rt = CudaRuntime::get(cdev)?;
    let stream = rt.stream().clone();
    let n = args.burst.max(1);
    let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        for _ in 0..50 {
            f()?;
        }
        let mut samples = Vec::new();
        for _ in 0..7 {
            dev.synchronize()?;
            let t0 = Instant::now();
            for _ in 0..n {
                f()?;
            }
            dev.synchronize()?;
            samples.push(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        println!(
            "{name:<58} {:>8.3} us/call",
            crate::report::median(&samples)
        );
        Ok(())
    };

    let x = Tensor::randn(0f32, 1.0, (64, 64), &dev)?;
    let (src, mut dst) = {
        let (s, _) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*s else {
            anyhow::bail!("expected CUDA storage")
        };
        let src = stream
            .clone_dtod(cs.as_cuda_slice::<f32>()?)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let dst = stream
            .alloc_zeros::<f32>(64 * 64)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        (src, dst)
    };
    let func = rt.function(Kernel::SoftmaxFwdF32).clone();
    time(
        "raw launch: softmax_fwd_f32 64x64, preallocated",
        &mut || {
            let (rows, cols, group) = (64i64, 64i32, 2i32);
            let mut b = stream.launch_builder(&func);
            b.arg(&src).arg(&mut dst).arg(&rows).arg(&cols).arg(&group);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: softmax_fwd_f32(x, y, rows, cols, group) on 64x64 buffers; group 2 with a
            // 128-thread block covers 64 rows of 64 columns.
            unsafe { b.launch(cfg) }.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok(())
        },
    )?;
    time("alloc + free 16 KiB (cudarc, the pool)", &mut || {
        // SAFETY: the buffer is never read.
        let b = unsafe { stream.alloc::<f32>(64 * 64) }.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        drop(b);
        Ok(())
    })?;
    time(
        "flare::ops::softmax_last_dim 64x64 f32 (whole op)",
        &mut || {
            let _ = flare::ops::softmax_last_dim(&x)?;
            Ok(())
        },
    )?;
    time("candle_nn::ops::softmax_last_dim 64x64 f32", &mut || {
        let _ = candle_nn::ops::softmax_last_dim(&x)?;
        Ok(())
    })?;
    time(
        "Tensor::affine 64x64 f32 (Candle's elementwise op)",
        &mut || {
            let _ = x.affine(1.0, 0.0)?;
            Ok(())
        },
    )?;

    let a = Tensor::randn(0f32, 1.0, (64, 64), &dev)?.to_dtype(DType::BF16)?;
    let bm = Tensor::randn(0f32, 1.0, (64, 64), &dev)?.to_dtype(DType::BF16)?;
    let ptr = |t: &Tensor| -> Result<u64> {
        let (s, _) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*s else {
            anyhow::bail!("expected CUDA storage")
        };
        let (p, _guard) = cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream);
        Ok(p)
    };
    let c = Tensor::zeros((64, 64), DType::BF16, &dev)?;
    let (pa, pb, pc) = (ptr(&a)?, ptr(&bm)?, ptr(&c)?);
    let params = GemmParams {
        dtype: DType::BF16,
        c_dtype: None,
        transa: false,
        transb: false,
        m: 64,
        n: 64,
        k: 64,
        lda: 64,
        ldb: 64,
        ldc: 64,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    };
    time(
        "raw cublasLtMatmul 64^3 bf16, cached plan, preallocated",
        &mut || {
            // SAFETY: three live 64x64 bf16 buffers; `c` is only written.
            unsafe { rt.gemm().matmul(&params, pb, pa, pc, 1.0, 0.0) }?;
            Ok(())
        },
    )?;
    time("flare::ops::matmul 64^3 bf16 (whole op)", &mut || {
        let _ = flare::ops::matmul(&a, &bm)?;
        Ok(())
    })?;
    time("candle Tensor::matmul 64^3 bf16", &mut || {
        let _ = a.matmul(&bm)?;
        Ok(())
    })?;
    Ok(())
}
