//! CUDA forward of [`crate::ops::matmul`]: one cuBLASLt GEMM per call, with strided and
//! transposed operands read in place (see [`MatLayout`]) and the plan cached per shape by
//! [`crate::runtime::gemm::Gemm`].
//!
//! Candle's tensors are row-major and cuBLASLt is column-major. A row-major `C = A · B` is the
//! column-major `Cᵀ = Bᵀ · Aᵀ`, and a row-major matrix read as column-major *is* its
//! transpose, so the GEMM is called with the operands swapped (`B` first), `m` and `n`
//! swapped, and no transpose flag at all for row-major operands; an operand stored
//! column-major (a transposed view, `MatLayout::transposed`) gets the flag instead.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorageSlice};
use candle_core::{CudaStorage, DType, Layout, Shape};

use crate::ops::matmul::MatLayout;
use crate::runtime::cuda::CudaRuntime;
use crate::runtime::gemm::GemmParams;

const OP: &str = "matmul";

fn internal(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("{OP}: internal error: {msg}"))
}

/// The shape of one product: operands, batch and sizes, in row-major terms.
#[derive(Debug, Clone, Copy)]
struct Problem {
    /// `[batch?, m, k]`.
    a: MatLayout,
    /// `[batch?, k, n]`.
    b: MatLayout,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl Problem {
    /// The column-major GEMM computing this row-major product: `Cᵀ[n, m] = Bᵀ · Aᵀ`.
    fn gemm_params(&self, dtype: DType) -> GemmParams {
        // An operand with a batch of one is broadcast over the other's batch.
        let stride = |l: &MatLayout| if l.batch == 1 { 0 } else { l.batch_stride };
        GemmParams {
            dtype,
            transa: self.b.transposed,
            transb: self.a.transposed,
            m: self.n,
            n: self.m,
            k: self.k,
            lda: self.b.ld,
            ldb: self.a.ld,
            ldc: self.n,
            batch: self.batch,
            stride_a: stride(&self.b),
            stride_b: stride(&self.a),
            stride_c: self.m * self.n,
        }
    }
}

/// `a @ b` on CUDA for operands of rank 2 or 3 with equal (or one-sided unit) batch dims, f32,
/// f16 or bf16, in any layout [`MatLayout::of`] accepts. Returns a fresh contiguous row-major
/// tensor of shape `[batch, m, n]` (rank 3 if either operand is) or `[m, n]`.
pub(crate) fn fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (r1, r2) = (l1.dims().len(), l2.dims().len());
    let a = MatLayout::of(l1).ok_or_else(|| {
        internal(format!(
            "lhs layout not readable by a GEMM: dims {:?}, strides {:?}",
            l1.dims(),
            l1.stride()
        ))
    })?;
    let b = MatLayout::of(l2).ok_or_else(|| {
        internal(format!(
            "rhs layout not readable by a GEMM: dims {:?}, strides {:?}",
            l2.dims(),
            l2.stride()
        ))
    })?;
    if a.cols != b.rows {
        return Err(internal(format!(
            "inner dimensions differ: {:?} and {:?}",
            l1.dims(),
            l2.dims()
        )));
    }
    let batch = match (a.batch, b.batch) {
        (x, y) if x == y => x,
        (1, y) => y,
        (x, 1) => x,
        _ => {
            return Err(internal(format!(
                "batch dimensions differ: {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )))
        }
    };
    let pb = Problem {
        a,
        b,
        batch,
        m: a.rows,
        n: b.cols,
        k: a.cols,
    };
    let shape = if r1 == 3 || r2 == 3 {
        Shape::from((pb.batch, pb.m, pb.n))
    } else {
        Shape::from((pb.m, pb.n))
    };
    let dev = &s1.device;
    let out = match (&s1.slice, &s2.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(y)) => run(x, y, DType::F32, &pb, dev)?,
        (CudaStorageSlice::F16(x), CudaStorageSlice::F16(y)) => run(x, y, DType::F16, &pb, dev)?,
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y)) => run(x, y, DType::BF16, &pb, dev)?,
        _ if s1.dtype() != s2.dtype() => {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: dtype mismatch on CUDA: {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            )))
        }
        _ => {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: unsupported dtype {:?} on CUDA (f32, f16 and bf16 are)",
                s1.dtype()
            )))
        }
    };
    Ok((out, shape))
}

/// Allocates the output and runs the GEMM.
fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    dtype: DType,
    pb: &Problem,
    dev: &CudaDevice,
) -> candle_core::Result<CudaStorage> {
    let elems = pb.batch * pb.m * pb.n;
    if elems == 0 || pb.k == 0 {
        // An empty output, or a sum over nothing: zeros, no GEMM. At least one element is
        // allocated because a zero-byte allocation is an error on some drivers; the tensor's
        // layout covers only the `elems` it has.
        let out = dev.alloc_zeros::<T>(elems.max(1))?;
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    // SAFETY: cuBLASLt writes every element of the output (beta = 0, ldc = n, stride m * n
    // covers exactly `elems`) before anything can read it.
    let mut out = unsafe { dev.alloc::<T>(elems) }?;
    let p = pb.gemm_params(dtype);
    let size = std::mem::size_of::<T>() as u64;
    {
        let (xp, _x_guard) = x.device_ptr(stream);
        let (yp, _y_guard) = y.device_ptr(stream);
        let (op, _out_guard) = out.device_ptr_mut(stream);
        // SAFETY: `x` and `y` are Candle storages whose layouts `l1`, `l2` (described by
        // `pb.a`, `pb.b`, which only normalize strides of unit dims) address only elements
        // inside them from their start offsets, so every element the params reach is in
        // bounds; the offsets are in elements of `T`. `out` is a fresh allocation of exactly
        // `elems` elements, disjoint from both inputs. All three live on this device and are
        // ordered on its one stream (Candle's), and the guards keep them borrowed until the
        // launch has been queued.
        unsafe {
            rt.gemm().matmul(
                &p,
                yp + pb.b.offset as u64 * size,
                xp + pb.a.offset as u64 * size,
                op,
                1.0,
                0.0,
            )
        }
        .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
