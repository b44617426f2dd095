//! CUDA forward of [`crate::ops::matmul`]: one kernel launch per call, with strided,
//! transposed and broadcast operands read in place (see [`MatLayout`]).
//!
//! Small products (at most [`SMALL_GEMM_MAX`] multiply-adds over the whole batch and a reduction
//! of at most [`SMALL_GEMM_MAX_K`]) run on flare's own `gemm_small_*` kernel
//! (`crates/flare-kernels/src/cu/gemm_small.cu`), launched straight from the runtime's
//! pre-resolved function table: one `cuLaunchKernel`, none of cuBLASLt's per-call host work
//! (plan lookup, descriptor checks, `cublasLtMatmul`'s own dispatch), which dominates at these
//! sizes. That kernel computes in exact f32 (one FMA per k, in increasing k order, no TF32
//! whatever [`crate::runtime::set_allow_tf32`] says) and reads operands through element strides.
//! Set the environment variable `FLARE_SMALL_GEMM=0` (read once, with every other switch:
//! [`crate::runtime::Settings`]) to send
//! every product to cuBLASLt instead, e.g. to measure the difference.
//!
//! Skinny products `x @ w.T` of at most [`GEMV_MAX_M`] rows against a weight stored row-major
//! (a linear layer at decode time: one row per sequence) run on `gemv_*`
//! (`crates/flare-kernels/src/cu/gemv.cu`): one warp per output column reads the weight once,
//! four 16-byte loads per lane in flight, with one plain launch instead of cuBLASLt's heavier
//! host path. Exact f32 accumulation like `gemm_small`. On by default; `FLARE_GEMV=0` (read
//! once) sends them back to cuBLASLt / `gemm_small`. History: the first version (one load in
//! flight per lane) was slower than cuBLASLt on the H100; with the unrolled loads and the
//! flash-decoding attention, whole-model decoding (2026-11-24, Qwen2-0.5B shape, bf16, 512 +
//! 128 tokens) went from 213-276 to 295-317 tokens/s at batch 1 and from 1471-1738 to
//! 1958-2014 at batch 8 (both switches off against both on; with 64 new tokens, gemv alone:
//! 230 -> 272 and 1511 -> 1730).
//!
//! Everything else is one cuBLASLt GEMM, with the plan cached per shape by
//! [`crate::runtime::gemm::Gemm`].
//!
//! Candle's tensors are row-major and cuBLASLt is column-major. A row-major `C = A · B` is the
//! column-major `Cᵀ = Bᵀ · Aᵀ`, and a row-major matrix read as column-major *is* its
//! transpose, so the GEMM is called with the operands swapped (`B` first), `m` and `n`
//! swapped, and no transpose flag at all for row-major operands; an operand stored
//! column-major (a transposed view, `MatLayout::transposed`) gets the flag instead.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorageSlice};
use candle_core::{CudaStorage, DType, Layout, Shape};

use super::plan::MatLayout;
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use crate::runtime::gemm::GemmParams;

const OP: &str = "matmul";

/// Products of at most this many multiply-adds, `batch * m * n * k` (2^21: one 128^3 GEMM, or
/// eight 64^3), run on `gemm_small_*` rather than cuBLASLt. Below it the GEMM itself is a few
/// microseconds of device time at most (a 64^3 product is four blocks of two 32-wide k slabs,
/// about 2 us), while cuBLASLt's host overhead is about 9 us per call on an H100 (12.7 us per
/// 64^3 bf16 matmul in a burst, against 3.3 us for a bare kernel launch): the host cost
/// dominates, and skipping it is the win. Above it cuBLASLt's tensor-core kernels win.
pub(crate) const SMALL_GEMM_MAX: usize = 1 << 21;

/// The longest reduction `gemm_small_*` takes. One block owns a 32 x 32 tile of the output and
/// walks all of `k` in 32-wide slabs, so a product with few output tiles and a long `k` is
/// serial on one SM (about 0.3 us per slab: 16 slabs, about 5 us, at this bound), where
/// cuBLASLt would split `k` across SMs.
pub(crate) const SMALL_GEMM_MAX_K: usize = 512;

/// Threads per block of `gemm_small_*` (gemm_small.cu's `SMALL_GEMM_THREADS`).
const SMALL_GEMM_THREADS: u32 = flare_kernels::launch::SMALL_GEMM_THREADS;
/// Rows and columns of the output tile of one `gemm_small_*` block (`SMALL_GEMM_TILE`).
const SMALL_GEMM_TILE: usize = flare_kernels::launch::SMALL_GEMM_TILE as usize;
/// The grid's z dimension limit (the kernel loops over the batch beyond it).
const MAX_GRID_Z: usize = 65535;

/// Rows of `x` that `gemv_*` takes at most (`GEMV_MAX_M` of gemv.cu).
pub(crate) const GEMV_MAX_M: usize = flare_kernels::launch::GEMV_MAX_M as usize;
/// Output columns per `gemv_*` block (`GEMV_WARPS`) and its threads (`GEMV_THREADS`).
const GEMV_WARPS: usize = flare_kernels::launch::GEMV_WARPS as usize;
const GEMV_THREADS: u32 = flare_kernels::launch::GEMV_THREADS;

/// Whether skinny products use `gemv_*`: not when `FLARE_GEMV=0` (see the module doc and
/// [`crate::runtime::Settings::gemv`]).
fn gemv_enabled() -> bool {
    crate::runtime::settings().gemv
}

/// Whether small products may skip cuBLASLt: not when `FLARE_SMALL_GEMM=0`
/// ([`crate::runtime::Settings::small_gemm`]).
fn small_gemm_enabled() -> bool {
    crate::runtime::settings().small_gemm
}

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
    /// Whether this (non-empty) product runs on `gemm_small_*`; see [`SMALL_GEMM_MAX`].
    fn is_small(&self) -> bool {
        let work = self.batch as u128 * self.m as u128 * self.n as u128 * self.k as u128;
        work <= SMALL_GEMM_MAX as u128 && self.k <= SMALL_GEMM_MAX_K && small_gemm_enabled()
    }

    /// Whether this (non-empty) product runs on `gemv_*`: one matrix, at most
    /// [`GEMV_MAX_M`] row-major rows of `a`, and `b` a transposed row-major weight (`w.T`).
    fn is_gemv(&self) -> bool {
        self.batch == 1
            && self.a.batch == 1
            && self.b.batch == 1
            && self.m <= GEMV_MAX_M
            && !self.a.transposed
            && self.b.transposed
            && self.n <= i32::MAX as usize
            && self.k <= i32::MAX as usize
            && gemv_enabled()
    }

    /// The column-major GEMM computing this row-major product: `Cᵀ[n, m] = Bᵀ · Aᵀ`.
    fn gemm_params(&self, dtype: DType) -> GemmParams {
        // An operand with a batch of one is broadcast over the other's batch.
        let stride = |l: &MatLayout| if l.batch == 1 { 0 } else { l.batch_stride };
        GemmParams {
            dtype,
            c_dtype: None,
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
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(y)) => {
            run(x, y, DType::F32, Kernel::GemmSmallF32, &pb, dev)?
        }
        (CudaStorageSlice::F16(x), CudaStorageSlice::F16(y)) => {
            run(x, y, DType::F16, Kernel::GemmSmallF16, &pb, dev)?
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(y)) => {
            run(x, y, DType::BF16, Kernel::GemmSmallBF16, &pb, dev)?
        }
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

/// Allocates the output and runs the GEMM: `small` (the `gemm_small_*` kernel of this dtype)
/// for small products, cuBLASLt otherwise.
fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    dtype: DType,
    small: Kernel,
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
    if pb.is_gemv() {
        return run_gemv(x, y, dtype, pb, &rt, dev);
    }
    if pb.is_small() {
        return run_small(x, y, small, pb, &rt, dev);
    }
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

/// `(row stride, column stride, batch stride)` in elements of the logical `[batch, rows, cols]`
/// matrix `l` describes: `(ld, 1)` row-major, `(1, ld)` transposed, batch stride 0 when the
/// operand is broadcast or has a batch of one.
fn small_strides(l: &MatLayout) -> (i64, i64, i64) {
    let (rs, cs) = if l.transposed { (1, l.ld) } else { (l.ld, 1) };
    let bs = if l.batch == 1 { 0 } else { l.batch_stride };
    (rs as i64, cs as i64, bs as i64)
}

/// The elements of `s` from `offset` on.
fn from<'a, T>(
    s: &'a CudaSlice<T>,
    offset: usize,
    which: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    s.try_slice(offset..).ok_or_else(|| {
        internal(format!(
            "{which} offset {offset} outside a buffer of {} elements",
            s.len()
        ))
    })
}

/// Runs a small product (`pb.is_small()`, every size at least 1) on `gemm_small_*`: one launch,
/// no cuBLASLt.
fn run_small<T: CudaDType + DeviceRepr>(
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    kernel: Kernel,
    pb: &Problem,
    rt: &CudaRuntime,
    dev: &CudaDevice,
) -> candle_core::Result<CudaStorage> {
    let elems = pb.batch * pb.m * pb.n;
    let (a, b) = (from(x, pb.a.offset, "lhs")?, from(y, pb.b.offset, "rhs")?);
    // SAFETY: the kernel below writes every element of the output (each of the `batch` matrices
    // of `m * n`, contiguous) before anything can read it.
    let mut out = unsafe { dev.alloc::<T>(elems) }?;
    // All fit: `is_small` bounds batch * m * n * k (each at least 1) by 2^21.
    let (m, n, k, batch) = (pb.m as i32, pb.n as i32, pb.k as i32, pb.batch as i32);
    let (a_rs, a_cs, a_bs) = small_strides(&pb.a);
    let (b_rs, b_cs, b_bs) = small_strides(&pb.b);
    let tiles = pb.m.div_ceil(SMALL_GEMM_TILE) * pb.n.div_ceil(SMALL_GEMM_TILE);
    let cfg = LaunchConfig {
        grid_dim: (
            tiles.min(i32::MAX as usize) as u32,
            1,
            pb.batch.min(MAX_GRID_Z) as u32,
        ),
        block_dim: (SMALL_GEMM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut lb = rt.stream().launch_builder(rt.function(kernel));
    lb.arg(&a)
        .arg(&b)
        .arg(&mut out)
        .arg(&m)
        .arg(&n)
        .arg(&k)
        .arg(&a_rs)
        .arg(&a_cs)
        .arg(&a_bs)
        .arg(&b_rs)
        .arg(&b_cs)
        .arg(&b_bs)
        .arg(&batch);
    // SAFETY: gemm_small_<t>(const T *A, const T *B, T *C, int M, int N, int K, long long a_rs,
    // a_cs, a_bs, b_rs, b_cs, b_bs, int batch), with T the element type of `x`, `y` and `out`
    // (the kernel was chosen by dtype). `a` and `b` start at the operands' start offsets, and
    // the strides are those of their layouts (`MatLayout` only normalizes strides of unit dims
    // and uses batch stride 0 for a broadcast), so every element A_z[i, l] and B_z[l, j] the
    // kernel reads, for z < batch, i < m, l < k, j < n, is inside the Candle storage (it forms
    // no address outside those ranges). `out` is a fresh allocation of exactly batch * m * n
    // elements, disjoint from both inputs, which the kernel writes contiguously row-major. The
    // block is the kernel's 256 threads (its `__launch_bounds__`), it uses only static shared
    // memory, and any grid is correct (it loops over tiles and batch). All buffers are on this
    // device and ordered on its one stream.
    unsafe { lb.launch(cfg) }
        .cuda_ctx("launching gemm_small")
        .map_err(crate::Error::into_candle)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Runs a skinny product (`pb.is_gemv()`, every size at least 1) on `gemv_*`: one launch.
fn run_gemv<T: CudaDType + DeviceRepr>(
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    dtype: DType,
    pb: &Problem,
    rt: &CudaRuntime,
    dev: &CudaDevice,
) -> candle_core::Result<CudaStorage> {
    let kernel = match dtype {
        DType::F32 => Kernel::GemvF32,
        DType::F16 => Kernel::GemvF16,
        DType::BF16 => Kernel::GemvBF16,
        dt => return Err(internal(format!("gemv for dtype {dt:?}"))),
    };
    let elems = pb.m * pb.n;
    let (a, b) = (from(x, pb.a.offset, "lhs")?, from(y, pb.b.offset, "rhs")?);
    // The last elements the kernel reads: x[m - 1, k - 1] and w[n - 1, k - 1].
    let (a_last, b_last) = (
        (pb.m - 1) * pb.a.ld + pb.k - 1,
        (pb.n - 1) * pb.b.ld + pb.k - 1,
    );
    if a_last >= a.len() || b_last >= b.len() {
        return Err(internal(format!(
            "gemv operands reach past their buffers ({a_last} of {}, {b_last} of {})",
            a.len(),
            b.len()
        )));
    }
    // SAFETY: the kernel below writes every element of the [m, n] output before anything can
    // read it.
    let mut out = unsafe { dev.alloc::<T>(elems) }?;
    let (m, n, k) = (pb.m as i32, pb.n as i32, pb.k as i32);
    let (ldx, ldw) = (pb.a.ld as i64, pb.b.ld as i64);
    let blocks = pb.n.div_ceil(GEMV_WARPS).min(i32::MAX as usize);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (GEMV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut lb = rt.stream().launch_builder(rt.function(kernel));
    lb.arg(&a)
        .arg(&b)
        .arg(&mut out)
        .arg(&m)
        .arg(&n)
        .arg(&k)
        .arg(&ldx)
        .arg(&ldw);
    // SAFETY: gemv_<t>(const T *x, const T *w, T *y, int m, int n, int k, long long ldx,
    // long long ldw), T the element type of all three (chosen by dtype). `a` is the row-major
    // lhs from its start offset, rows ldx apart; `b` is the rhs `w.T` from its start offset,
    // i.e. w row-major with rows ldw apart; the last elements read are inside both views
    // (checked above). m <= GEMV_MAX_M (the kernel's accumulator count). `out` is a fresh
    // allocation of exactly m * n elements, written contiguously row-major. The block is the
    // kernel's GEMV_THREADS (its launch bound), no shared memory; any grid is correct (it loops
    // over columns). All buffers are on this device, ordered on its one stream.
    unsafe { lb.launch(cfg) }
        .cuda_ctx("launching gemv")
        .map_err(crate::Error::into_candle)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
