//! The cuBLASLt layer: one handle, one workspace and a cache of GEMM plans per device.
//!
//! A [`Gemm`] is created once per device by [`super::cuda::CudaRuntime`]. A *plan* is everything
//! cuBLASLt needs to run one GEMM shape: the operation descriptor, the three matrix layouts and
//! the algorithm chosen by `cublasLtMatmulAlgoGetHeuristic` (top-1, allowed the whole
//! workspace; for large problems the fastest of its top candidates, timed once, see below). A
//! plan is built the first time its [`GemmParams`] (plus dtype, compute type, pointer alignment
//! and whether `beta` is zero) is seen and reused afterwards, so a cached call costs one mutex
//! lock, one hash lookup and one `cublasLtMatmul` on the runtime's stream: no descriptor is
//! created, no heuristic is queried and nothing is allocated per call.
//!
//! **Autotuning.** The heuristic's first choice is not always the fastest kernel. When a plan is
//! built for a large problem (`m * n * k * batch >= `[`AUTOTUNE_MIN_MACS`]), the heuristic is
//! asked for up to [`AUTOTUNE_CANDIDATES`] algorithms ([`AUTOTUNE_CANDIDATES_SKINNY`] for a
//! skinny product, one of `m`, `n`, `k` at most [`SKINNY_DIM`], where the first choice is most
//! often poor: a LoRA rank, split-K or not) and each is timed with CUDA events on the
//! operands of that first call (one warm-up and [`AUTOTUNE_TIMED_RUNS`] timed launches each,
//! queued back to back behind a short host-side hold of the stream); the lowest median wins
//! (the heuristic's first choice stays unless another is at least 1% faster) and is stored in
//! the plan. With `beta != 0` the candidates write a scratch `C` (up to 256 MiB; above that the
//! first choice is kept). This synchronizes the stream once per large plan; cached calls never
//! synchronize. `FLARE_GEMM_AUTOTUNE=0` turns it off (top-1, as for small problems);
//! `FLARE_GEMM_DEBUG=1` prints each tune (key, candidates, times, winner) to stderr.
//! [`Gemm::autotunes`] counts the tunes.
//!
//! The one entry point, [`Gemm::matmul`], follows cuBLAS's column-major convention,
//! `C[m, n] = alpha * op(A) op(B) + beta * C` over a strided batch, so the same call serves a
//! forward product (`beta = 0`), the input and weight gradients accumulated into an existing
//! buffer (`beta = 1`) and the LoRA low-rank update accumulated into a base output.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::result as driver_result;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUdeviceptr, CUevent_flags, CUstreamCaptureStatus,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
};
use candle_core::DType;

use super::{BLAS_HANDLES_CREATED, GEMMS_LAUNCHED, GEMM_PLANS_CREATED};
use crate::error::CudaResultExt;
use crate::{Error, Result};

/// Workspace on compute capability >= 9 (Hopper and later), as NVIDIA recommends.
const WORKSPACE_BYTES_SM90: usize = 32 << 20;
/// Workspace on older GPUs.
const WORKSPACE_BYTES_OLDER: usize = 4 << 20;

/// Plans for GEMMs with at least this many multiply-adds (`m * n * k * batch`) are autotuned
/// (see the module docs). 2^26 is, e.g., a 4096 × 4096 × 4 product or a 1024 × 1024 × 64 one:
/// it covers the memory-bound skinny products of LoRA (4096 × 4096 × 16 = 2^28, tokens × in ×
/// rank and the like), which run for ten microseconds or more and whose heuristic choice can be
/// several times slower than the best kernel. Tuning happens once per plan (a one-off
/// synchronization), so the low threshold costs nothing on cached calls.
pub const AUTOTUNE_MIN_MACS: u128 = 1 << 26;
/// How many algorithms the heuristic is asked for when autotuning.
pub const AUTOTUNE_CANDIDATES: usize = 8;
/// How many for a skinny product (see [`SKINNY_DIM`]): more tile shapes and split-K variants.
pub const AUTOTUNE_CANDIDATES_SKINNY: usize = 16;
/// A product with `m`, `n` or `k` at most this is skinny.
pub const SKINNY_DIM: usize = 64;
/// Timed launches per candidate (after one warm-up); the median counts.
pub const AUTOTUNE_TIMED_RUNS: usize = 3;
/// Another candidate replaces the heuristic's first choice only when its median is at least
/// this fraction faster, so that timing noise does not overrule the heuristic on a tie.
const AUTOTUNE_MIN_GAIN: f32 = 0.01;
/// With `beta != 0` the candidates are timed into a scratch `C` (the real one is read, so it
/// must not be overwritten); above this size the plan keeps the heuristic's first choice.
const AUTOTUNE_SCRATCH_MAX_BYTES: usize = 256 << 20;
/// How long the stream is held (by a host function that sleeps) while the timed launches are
/// queued behind it, so that they run back to back and the events time the kernels rather
/// than the host's launch overhead (which exceeds a small GEMM's run time).
const AUTOTUNE_HOLD: Duration = Duration::from_micros(2000);

/// Host function queued on the stream ahead of the timed launches: it blocks the stream for
/// [`AUTOTUNE_HOLD`] while the host queues them. It makes no CUDA call (which a host function
/// must not) and reads nothing through its argument (null).
extern "C" fn hold_stream(_: *mut c_void) {
    std::thread::sleep(AUTOTUNE_HOLD);
}

/// One GEMM in cuBLAS's column-major convention:
/// `C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]`, for each of `batch` matrices.
///
/// All sizes, leading dimensions and strides are in elements. `A` is stored `m × k`
/// column-major with leading dimension `lda >= m` when `transa` is false, and `k × m` with
/// `lda >= k` when it is true (likewise `B`: `k × n` / `n × k` with `ldb`). `C` is always
/// `m × n` column-major with `ldc >= m`. Matrix `i` of the batch starts `i * stride_*`
/// elements after the first; a stride of 0 broadcasts `A` or `B` over the batch (never `C`).
/// The strides are ignored when `batch == 1`.
///
/// A row-major product `C = A · B` is the column-major product `Cᵀ = Bᵀ · Aᵀ`: pass the
/// operands swapped, with `m` and `n` swapped (see `ops::matmul::cuda` for an example).
///
/// `C` (read with `beta != 0`, and written as `D`, in place) has the element type `dtype` unless
/// [`c_dtype`](Self::c_dtype) says otherwise: `Some(DType::F32)` with f16 or bf16 `A` and `B`
/// writes the f32 accumulator without rounding it to the half type (a weight gradient kept in
/// f32, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmParams {
    /// Element type of `A` and `B` (and of `C` unless `c_dtype` is set): f32, f16 or bf16.
    pub dtype: DType,
    /// Element type of `C` and `D` when it differs from `dtype`; `None` (the usual case): the
    /// same as `dtype`. The one mixed combination taken is f16 or bf16 `A`/`B` with f32 `C`/`D`
    /// (cuBLASLt's `cublasLtMatmul` supports it with `CUBLAS_COMPUTE_32F` and an f32 scale
    /// type: A/B `CUDA_R_16F` or `CUDA_R_16BF`, C/D `CUDA_R_32F`); any other is refused with
    /// [`Error::InvalidArgument`] when the plan is built.
    pub c_dtype: Option<DType>,
    /// Whether `A` is used transposed (`op(A) = Aᵀ`).
    pub transa: bool,
    /// Whether `B` is used transposed (`op(B) = Bᵀ`).
    pub transb: bool,
    /// Rows of `op(A)` and of `C`.
    pub m: usize,
    /// Columns of `op(B)` and of `C`.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`: the reduction length.
    pub k: usize,
    /// Leading dimension of `A` (distance between its columns as stored).
    pub lda: usize,
    /// Leading dimension of `B`.
    pub ldb: usize,
    /// Leading dimension of `C`.
    pub ldc: usize,
    /// Number of matrices in the batch (1 for a plain GEMM).
    pub batch: usize,
    /// Distance between consecutive `A` matrices (0 broadcasts one `A`).
    pub stride_a: usize,
    /// Distance between consecutive `B` matrices (0 broadcasts one `B`).
    pub stride_b: usize,
    /// Distance between consecutive `C` matrices (must be non-zero when `batch > 1`).
    pub stride_c: usize,
}

impl GemmParams {
    /// The params with the batch strides zeroed when they mean nothing (a batch of one), so
    /// that equal GEMMs share one plan.
    fn normalized(&self) -> GemmParams {
        let mut p = *self;
        if p.batch <= 1 {
            p.stride_a = 0;
            p.stride_b = 0;
            p.stride_c = 0;
        }
        if p.c_dtype == Some(p.dtype) {
            p.c_dtype = None;
        }
        p
    }

    /// The element type of `C` and `D`: [`c_dtype`](Self::c_dtype), else `dtype`.
    pub fn c_type(&self) -> DType {
        self.c_dtype.unwrap_or(self.dtype)
    }

    /// Multiply-adds of the whole product: `m * n * k * batch`.
    fn macs(&self) -> u128 {
        self.m as u128 * self.n as u128 * self.k as u128 * self.batch.max(1) as u128
    }

    /// Bytes from the first to one past the last element of `C` the params address, or `None`
    /// on overflow.
    fn c_extent_bytes(&self) -> Option<usize> {
        let batches = self.batch.max(1) - 1;
        let elems = batches
            .checked_mul(self.stride_c)?
            .checked_add(self.n.checked_sub(1)?.checked_mul(self.ldc)?)?
            .checked_add(self.m)?;
        elems.checked_mul(self.c_type().size_in_bytes())
    }

    /// Stored `(rows, cols)` of `A` and `B` in column-major terms.
    fn stored_dims(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (a, b)
    }

    /// Checks everything cuBLASLt would refuse less clearly. Run only when a plan is built: a
    /// cached plan means its params already passed.
    fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::InvalidArgument {
                op: "gemm",
                msg: format!("{msg} in {self:?}"),
            })
        };
        let mixed_ok = matches!(
            (self.dtype, self.c_type()),
            (DType::F16 | DType::BF16, DType::F32)
        );
        if self.c_type() != self.dtype && !mixed_ok {
            return bad(format!(
                "C of {:?} with A and B of {:?} (only f16/bf16 A and B with f32 C mix)",
                self.c_type(),
                self.dtype
            ));
        }
        let ((ar, _), (br, _)) = self.stored_dims();
        if self.lda < ar.max(1) {
            return bad(format!("lda {} < {} rows of stored A", self.lda, ar));
        }
        if self.ldb < br.max(1) {
            return bad(format!("ldb {} < {} rows of stored B", self.ldb, br));
        }
        if self.ldc < self.m.max(1) {
            return bad(format!("ldc {} < m {}", self.ldc, self.m));
        }
        if self.batch > i32::MAX as usize {
            return bad(format!("batch {} does not fit cuBLASLt's i32", self.batch));
        }
        if self.batch > 1 && self.stride_c == 0 {
            return bad("stride_c is 0 with batch > 1 (every matrix would write one C)".into());
        }
        let too_big = [
            self.m,
            self.n,
            self.k,
            self.lda,
            self.ldb,
            self.ldc,
            self.stride_a,
            self.stride_b,
            self.stride_c,
        ]
        .iter()
        .any(|&v| v > i64::MAX as usize);
        if too_big {
            return bad("a size does not fit cuBLASLt's i64".into());
        }
        Ok(())
    }
}

/// Everything a plan depends on: the params, the compute type, whether `beta` is zero and the
/// alignment of the three pointers (the heuristic may pick kernels that need 16-byte or more
/// alignment, which a view with an odd start offset does not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GemmKey {
    params: GemmParams,
    /// f32 only: TF32 tensor cores allowed (`CUBLAS_COMPUTE_32F_FAST_TF32`).
    tf32: bool,
    /// `beta == 0`: `C` is not read. Kept in the key so an epilogue or preference that depends
    /// on it can be added without mixing plans.
    beta_zero: bool,
    /// log2 of the alignment of the A, B and C/D pointers, capped at 8 (256 bytes).
    align_log2: [u8; 3],
}

/// log2 of the largest power of two dividing `ptr`, capped at 8 (256 bytes, cuBLASLt's default
/// assumption).
fn align_log2(ptr: CUdeviceptr) -> u8 {
    ptr.trailing_zeros().min(8) as u8
}

/// A small FxHash-style hasher: the key is a few dozen machine words, hashed once per call, and
/// SipHash's DoS resistance buys nothing for it.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }

    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type PlanMap = HashMap<GemmKey, Plan, BuildHasherDefault<KeyHasher>>;

/// One algorithm offered by `cublasLtMatmulAlgoGetHeuristic`.
type Candidate = sys::cublasLtMatmulHeuristicResult_t;

/// Reads one configuration attribute of `algo`, or `None` if cuBLASLt refuses (e.g. a size
/// that is not the attribute's).
fn algo_config<T: Copy + Default>(
    algo: &sys::cublasLtMatmulAlgo_t,
    attr: sys::cublasLtMatmulAlgoConfigAttributes_t,
) -> Option<T> {
    let mut value = T::default();
    let mut written = 0usize;
    // SAFETY: `algo` is a valid algorithm value (from the heuristic); `value` is a writable
    // buffer of exactly `size_of::<T>()` bytes, and cuBLASLt writes at most that many (it
    // refuses a size that does not match the attribute).
    let status = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            attr,
            &mut value as *mut T as *mut c_void,
            std::mem::size_of::<T>(),
            &mut written,
        )
    };
    (status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && written == std::mem::size_of::<T>())
        .then_some(value)
}

/// The configuration of `algo`, for `FLARE_GEMM_DEBUG` output.
fn algo_desc(algo: &sys::cublasLtMatmulAlgo_t) -> String {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
    let show = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    format!(
        "algo={} tile={} stages={} splitk={} swizzle={} cluster={}",
        show(algo_config::<i32>(algo, C::CUBLASLT_ALGO_CONFIG_ID).map(|v| v as u32)),
        show(algo_config::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_TILE_ID)),
        show(algo_config::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_STAGES_ID)),
        show(algo_config::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM)),
        show(algo_config::<u32>(
            algo,
            C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING
        )),
        show(algo_config::<u16>(algo, C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID).map(u32::from)),
    )
}

/// Maps a cuBLASLt status to [`Error::Cuda`].
fn check(status: sys::cublasStatus_t, context: &'static str) -> Result<()> {
    match status {
        sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        other => Err(Error::Cuda {
            context,
            msg: format!("{other:?}"),
        }),
    }
}

/// Like [`check`], naming the GEMM in the message.
fn check_for(status: sys::cublasStatus_t, context: &'static str, key: &GemmKey) -> Result<()> {
    check(status, context).map_err(|e| match e {
        Error::Cuda { context, msg } => Error::Cuda {
            context,
            msg: format!("{msg} for {key:?}"),
        },
        other => other,
    })
}

/// The cuBLASLt handle.
struct Handle(sys::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle is a host-side object that may be used from any thread. flare only
// ever issues work through it under `Gemm::plans`' mutex (plan building and every
// `cublasLtMatmul`), so it is never used by two threads at once; it is destroyed once, in Drop,
// when no other reference to the `Gemm` exists.
unsafe impl Send for Handle {}
// SAFETY: see `Send` above; shared references only reach the handle under the mutex.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle was created by `cublasLtCreate`, is destroyed only here, and
            // every plan using it has been dropped before (field order in `Gemm`). A failure
            // cannot be reported from Drop and leaves nothing to clean up.
            let _ = unsafe { lt::destroy_handle(self.0) };
        }
    }
}

/// One cached GEMM: its descriptors and algorithm, created once.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    /// The heuristic's first choice, or the autotuned winner among its candidates.
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are host-side cuBLASLt objects, never modified after the plan is
// built (they are only read by `cublasLtMatmul`), and every use happens under `Gemm::plans`'
// mutex. They are destroyed once, in Drop.
unsafe impl Send for Plan {}
// SAFETY: see `Send` above.
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created by the matching cuBLASLt create call and
        // is destroyed only here. `cublasLtMatmul` has consumed them at launch, so GEMMs still
        // running on the GPU do not need them. Failures cannot be reported from Drop.
        unsafe {
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
        }
    }
}

/// A heuristic preference descriptor, destroyed when the plan has been built.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `cublasLtMatmulPreferenceCreate`, destroyed only here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Sets one attribute of a matmul descriptor.
///
/// # Safety
/// `desc` must be a live descriptor and `T` the attribute's documented type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
    key: &GemmKey,
) -> Result<()> {
    let status = sys::cublasLtMatmulDescSetAttribute(
        desc,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    );
    check_for(status, "setting a cuBLASLt matmul attribute", key)
}

/// Sets one attribute of a matrix layout.
///
/// # Safety
/// `layout` must be a live layout and `T` the attribute's documented type.
unsafe fn set_layout<T>(
    layout: sys::cublasLtMatrixLayout_t,
    attr: sys::cublasLtMatrixLayoutAttribute_t,
    value: &T,
    key: &GemmKey,
) -> Result<()> {
    let status = sys::cublasLtMatrixLayoutSetAttribute(
        layout,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    );
    check_for(status, "setting a cuBLASLt layout attribute", key)
}

/// Sets one attribute of a heuristic preference.
///
/// # Safety
/// `pref` must be a live preference and `T` the attribute's documented type.
unsafe fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    value: &T,
    key: &GemmKey,
) -> Result<()> {
    let status = sys::cublasLtMatmulPreferenceSetAttribute(
        pref,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    );
    check_for(status, "setting a cuBLASLt preference", key)
}

/// The cuBLASLt data type of a flare GEMM dtype.
fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

/// The cuBLASLt handle, workspace and GEMM plan cache of one device.
pub struct Gemm {
    // Field order is drop order: plans before the handle they were built with.
    plans: Mutex<PlanMap>,
    handle: Handle,
    _workspace: CudaSlice<u8>,
    workspace_ptr: CUdeviceptr,
    workspace_bytes: usize,
    stream: Arc<CudaStream>,
    /// Plans autotuned (candidates timed) on this device.
    autotunes: AtomicUsize,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm")
            .field("workspace_bytes", &self.workspace_bytes)
            .field("plans", &self.plans.try_lock().map(|m| m.len()).ok())
            .field("autotunes", &self.autotunes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // GEMMs queued by this handle may still be running; let them finish before the handle
        // and (stream-ordered) workspace go. A failure here cannot be reported from Drop.
        let _ = self.stream.synchronize();
    }
}

impl Gemm {
    /// Creates the cuBLASLt handle and allocates the workspace (32 MiB on compute capability
    /// 9 and later, 4 MiB before) for the device of `stream`, on which every GEMM will run.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        ctx.bind_to_thread()
            .cuda_ctx("binding the CUDA context for cuBLASLt")?;
        let major = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .cuda_ctx("reading the compute capability")?;
        let bytes = if major >= 9 {
            WORKSPACE_BYTES_SM90
        } else {
            WORKSPACE_BYTES_OLDER
        };
        // SAFETY: the workspace is scratch memory for cuBLASLt; its contents are never read
        // before cuBLASLt writes them.
        let workspace =
            unsafe { stream.alloc::<u8>(bytes) }.cuda_ctx("allocating the workspace")?;
        let workspace_ptr = {
            let (ptr, _guard) = workspace.device_ptr(&stream);
            ptr
        };
        let handle = Handle(lt::create_handle().cuda_ctx("creating the cuBLASLt handle")?);
        BLAS_HANDLES_CREATED.fetch_add(1, Ordering::Relaxed);
        Ok(Gemm {
            plans: Mutex::new(PlanMap::default()),
            handle,
            _workspace: workspace,
            workspace_ptr,
            workspace_bytes: bytes,
            stream,
            autotunes: AtomicUsize::new(0),
        })
    }

    /// Size of the cuBLASLt workspace, in bytes.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }

    /// Number of GEMM plans autotuned on this device (their candidates timed on the GPU; see
    /// the module docs). A plan whose tuning was skipped (autotuning off, a small problem, a
    /// capturing stream, no scratch `C`) is not counted.
    pub fn autotunes(&self) -> usize {
        self.autotunes.load(Ordering::Relaxed)
    }

    /// Runs `C = alpha * op(A) op(B) + beta * C` (column-major, strided batch; see
    /// [`GemmParams`]) on the runtime's stream, with `f32` scaling and `f32` accumulation
    /// (TF32 tensor cores for f32 inputs when [`super::allow_tf32`] is on).
    ///
    /// The first call with given params, dtype, compute type, pointer alignment and
    /// `beta == 0`-ness builds a plan (descriptors plus the heuristic's algorithm); every later
    /// call reuses it: one mutex lock, one hash lookup and one `cublasLtMatmul`. For a large
    /// problem that first call also autotunes the algorithm (see the module docs): it launches
    /// the GEMM a few dozen times (with `beta == 0` into `c` itself, which the real call then
    /// overwrites; otherwise into a scratch buffer) and synchronizes the stream once.
    ///
    /// With `beta == 0`, `C` is written without being read (its contents may be garbage, even
    /// NaN). With `beta == 1`, the product is accumulated into `C` (gradients, LoRA updates).
    /// An empty product (`m`, `n` or `batch` of 0) does nothing; `k == 0` with `beta == 1`
    /// does nothing, and `k == 0` with any other `beta` is refused (the caller must scale or
    /// zero `C` itself).
    ///
    /// # Safety
    /// `a` and `b` must be device pointers on this runtime's device, each aligned to the size
    /// of `p.dtype`, to memory holding elements of `p.dtype`, and `c` one aligned to the size of
    /// [`GemmParams::c_type`], to memory holding elements of that type, each covering every
    /// element the params address (for each batch index `i < batch`, matrix `i` at `ptr + i * stride`
    /// with the stored dims and leading dimension described in [`GemmParams`]). `c` must not
    /// overlap `a` or `b`. All three must be ready in stream order on the runtime's stream
    /// (written by earlier work on it, or synchronized) and stay allocated until the GEMM has
    /// run (a stream-ordered free after this call is fine).
    pub unsafe fn matmul(
        &self,
        p: &GemmParams,
        a: CUdeviceptr,
        b: CUdeviceptr,
        c: CUdeviceptr,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if p.m == 0 || p.n == 0 || p.batch == 0 {
            return Ok(());
        }
        if p.k == 0 {
            if beta == 1.0 {
                return Ok(());
            }
            return Err(Error::InvalidArgument {
                op: "gemm",
                msg: format!("k == 0 with beta = {beta}: scale or zero C instead, in {p:?}"),
            });
        }
        GEMMS_LAUNCHED.fetch_add(1, Ordering::Relaxed);
        let key = GemmKey {
            params: p.normalized(),
            tf32: p.dtype == DType::F32 && super::allow_tf32(),
            beta_zero: beta == 0.0,
            align_log2: [align_log2(a), align_log2(b), align_log2(c)],
        };
        // Cheap (one cuCtxGetCurrent when already bound); keeps the launch on the right
        // context when the calling thread last used another device.
        self.stream
            .context()
            .bind_to_thread()
            .cuda_ctx("binding the CUDA context for cuBLASLt")?;
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let tune =
                    super::settings().gemm_autotune && key.params.macs() >= AUTOTUNE_MIN_MACS;
                let q = &key.params;
                let skinny = q.m.min(q.n).min(q.k) <= SKINNY_DIM;
                let requested = match (tune, skinny) {
                    (false, _) => 1,
                    (true, false) => AUTOTUNE_CANDIDATES,
                    (true, true) => AUTOTUNE_CANDIDATES_SKINNY,
                };
                let (mut plan, candidates) = self.build_plan(&key, requested)?;
                if tune {
                    // SAFETY: the caller's contract for `a`, `b`, `c` (see above) is exactly
                    // what `autotune` needs; `plan` was just built for `key` and `candidates`
                    // are its heuristic's results. The plan mutex is held.
                    let chosen =
                        unsafe { self.autotune(&key, &plan, &candidates, a, b, c, alpha, beta)? };
                    if let Some(i) = chosen {
                        plan.algo = candidates[i].algo;
                    }
                }
                e.insert(plan)
            }
        };
        // SAFETY: the plan's descriptors are live (owned by the cache, which is locked) and
        // describe exactly `p`, and its algorithm came from their heuristic within our
        // workspace; the caller guarantees that `a`, `b`, `c` cover those shapes on this device
        // and are ready on this stream. C is passed as D (in place).
        let status = unsafe { self.launch(plan, &plan.algo, a, b, c, alpha, beta) };
        check_for(status, "cublasLtMatmul", &key)
    }

    /// Queues one `cublasLtMatmul` of `plan` with `algo` on the runtime's stream, reading `C`
    /// from and writing `D` to `d`, and returns its status.
    ///
    /// # Safety
    /// `plan`'s descriptors must be live (the plan mutex held, or the plan not yet shared) and
    /// `algo` must come from their heuristic with a workspace need within ours. `a`, `b` and
    /// `d` must satisfy [`Gemm::matmul`]'s contract for `a`, `b` and `c` and the plan's params.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        a: CUdeviceptr,
        b: CUdeviceptr,
        d: CUdeviceptr,
        alpha: f32,
        beta: f32,
    ) -> sys::cublasStatus_t {
        let cu_stream = self.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: see the function's contract for the descriptors, the algorithm and the
        // pointers; `alpha`/`beta` are host f32 values as the descriptor's default host pointer
        // mode and f32 scale type expect, read before the call returns; the workspace is ours,
        // as large as the heuristic was told, and only used by GEMMs on this one stream, which
        // run in order. C is passed as D (in place).
        unsafe {
            sys::cublasLtMatmul(
                self.handle.0,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                &beta as *const f32 as *const c_void,
                d as *const c_void,
                plan.c,
                d as *mut c_void,
                plan.c,
                algo,
                self.workspace_ptr as *mut c_void,
                self.workspace_bytes,
                cu_stream,
            )
        }
    }

    /// Creates the descriptors of `key` and asks the heuristic for up to `requested`
    /// algorithms. Returns the plan, holding the heuristic's first usable algorithm, and every
    /// usable one (status success, workspace within ours) in the heuristic's order, so never
    /// empty. Called with the plan mutex held.
    fn build_plan(&self, key: &GemmKey, requested: usize) -> Result<(Plan, Vec<Candidate>)> {
        let p = &key.params;
        p.validate()?;
        let dt = data_type(p.dtype).ok_or_else(|| Error::UnsupportedDType {
            op: "gemm",
            dtype: p.dtype,
            device: "cuda".to_string(),
        })?;
        let compute = if key.tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let ((ar, ac), (br, bc)) = p.stored_dims();

        // Each descriptor goes into `plan` as soon as it exists, so that an error half-way
        // destroys exactly what was created (Plan's Drop skips null pointers).
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
            .cuda_ctx("creating a cuBLASLt matmul descriptor")?;
        let (ta, tb) = (p.transa as i32, p.transb as i32);
        // SAFETY: `plan.desc` is live; TRANSA/TRANSB take an int32 `cublasOperation_t`
        // (0 = N, 1 = T).
        unsafe {
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta,
                key,
            )?;
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb,
                key,
            )?;
        }
        // `validate` checked that every size fits in i64 (so in u64).
        // C and D share one layout (D is written in place over C), of C's type: with f16/bf16
        // A and B that may be f32 (`validate` refused every other mix). cuBLASLt supports both
        // with CUBLAS_COMPUTE_32F and the CUDA_R_32F scale type set above: A/B CUDA_R_16F with
        // C/D CUDA_R_16F or CUDA_R_32F, likewise CUDA_R_16BF.
        let c_dt = data_type(p.c_type()).ok_or_else(|| Error::UnsupportedDType {
            op: "gemm",
            dtype: p.c_type(),
            device: "cuda".to_string(),
        })?;
        let layout = |dt: sys::cudaDataType, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(dt, rows as u64, cols as u64, ld as i64)
                .cuda_ctx("creating a cuBLASLt matrix layout")
        };
        plan.a = layout(dt, ar, ac, p.lda)?;
        plan.b = layout(dt, br, bc, p.ldb)?;
        plan.c = layout(c_dt, p.m, p.n, p.ldc)?;
        if p.batch > 1 {
            let count = p.batch as i32;
            for (l, stride) in [
                (plan.a, p.stride_a),
                (plan.b, p.stride_b),
                (plan.c, p.stride_c),
            ] {
                let stride = stride as i64;
                // SAFETY: `l` is live; BATCH_COUNT is int32, STRIDED_BATCH_OFFSET int64.
                unsafe {
                    set_layout(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count,
                        key,
                    )?;
                    set_layout(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride,
                        key,
                    )?;
                }
            }
        }

        let pref = Pref(lt::create_matmul_pref().cuda_ctx("creating a cuBLASLt preference")?);
        let ws = self.workspace_bytes as u64;
        let [al_a, al_b, al_c] = key.align_log2.map(|l| 1u32 << l);
        use sys::cublasLtMatmulPreferenceAttributes_t as A;
        // SAFETY: `pref.0` is live; MAX_WORKSPACE_BYTES is uint64.
        unsafe {
            set_pref(
                pref.0,
                A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws,
                key,
            )?
        };
        for (attr, align) in [
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al_a),
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al_b),
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al_c),
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al_c),
        ] {
            // SAFETY: `pref.0` is live; MIN_ALIGNMENT_*_BYTES are uint32.
            unsafe { set_pref(pref.0, attr, &align, key)? };
        }

        self.stream
            .context()
            .bind_to_thread()
            .cuda_ctx("binding the CUDA context for cuBLASLt")?;
        let requested = requested.clamp(1, AUTOTUNE_CANDIDATES.max(AUTOTUNE_CANDIDATES_SKINNY));
        // SAFETY: `cublasLtMatmulHeuristicResult_t` is plain C data (integers, a float and the
        // `cublasStatus_t` enum, whose 0 is CUBLAS_STATUS_SUCCESS), so all-zero bytes are a
        // valid value.
        let zero: Candidate = unsafe { std::mem::zeroed() };
        let mut results = vec![zero; requested];
        let mut count: std::ffi::c_int = 0;
        // SAFETY: all descriptors are live and describe the GEMM; `results` has room for the
        // `requested` results asked for and `count` receives how many were written.
        let status = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle.0,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                pref.0,
                requested as std::ffi::c_int,
                results.as_mut_ptr(),
                &mut count,
            )
        };
        check_for(status, "cuBLASLt algorithm heuristic", key)?;
        let count = usize::try_from(count).unwrap_or(0).min(requested);
        if count < 1 {
            return Err(Error::Cuda {
                context: "cuBLASLt algorithm heuristic",
                msg: format!("no algorithm supports {key:?}"),
            });
        }
        results.truncate(count);
        let first_state = results[0].state;
        results.retain(|r| {
            r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && r.workspaceSize <= self.workspace_bytes
        });
        let Some(first) = results.first() else {
            check_for(first_state, "cuBLASLt algorithm heuristic result", key)?;
            return Err(Error::Cuda {
                context: "cuBLASLt algorithm heuristic",
                msg: format!("no algorithm fits the workspace for {key:?}"),
            });
        };
        plan.algo = first.algo;
        GEMM_PLANS_CREATED.fetch_add(1, Ordering::Relaxed);
        Ok((plan, results))
    }

    /// Times `cands` (the heuristic's usable algorithms for `plan`, its first choice first) on
    /// the operands of the first call and returns the index of the one to keep, or `None` to
    /// keep the first without timing (the stream is being captured into a graph, or
    /// `beta != 0` and no scratch `C` could be had). Every candidate is launched once to
    /// check that it runs (and load its kernel); then, with the stream held by
    /// [`hold_stream`], each gets one warm-up and [`AUTOTUNE_TIMED_RUNS`] launches between
    /// events, queued back to back; one stream synchronization reads them all. A candidate
    /// whose launch fails is skipped. With `beta == 0` the launches write `c`, which the real
    /// call overwrites; otherwise they write a zeroed scratch copy of `C`'s extent.
    ///
    /// # Safety
    /// `a`, `b` and `c` must satisfy [`Gemm::matmul`]'s contract for `key.params`; `plan` must
    /// be `key`'s and `cands` its heuristic's results. Called with the plan mutex held.
    #[allow(clippy::too_many_arguments)]
    unsafe fn autotune(
        &self,
        key: &GemmKey,
        plan: &Plan,
        cands: &[Candidate],
        a: CUdeviceptr,
        b: CUdeviceptr,
        c: CUdeviceptr,
        alpha: f32,
        beta: f32,
    ) -> Result<Option<usize>> {
        let debug = super::settings().gemm_debug;
        let skip = |why: &str| {
            if debug {
                eprintln!("flare gemm autotune: skipped ({why}) for {key:?}");
            }
            Ok(None)
        };
        if cands.len() < 2 {
            return skip("the heuristic offered one algorithm");
        }
        match self.stream.capture_status() {
            Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) => {}
            _ => return skip("the stream is being captured"),
        }

        // Where the candidates write: `c` itself when it is not read, else a scratch buffer.
        let mut scratch = if beta == 0.0 {
            None
        } else {
            let Some(bytes) = key.params.c_extent_bytes() else {
                return skip("C's extent overflows");
            };
            if bytes > AUTOTUNE_SCRATCH_MAX_BYTES {
                return skip("beta != 0 and C is too large for a scratch copy");
            }
            match self.stream.alloc_zeros::<u8>(bytes) {
                Ok(s) => Some(s),
                Err(_) => return skip("beta != 0 and the scratch C could not be allocated"),
            }
        };
        let scratch_ptr = scratch.as_mut().map(|s| s.device_ptr_mut(&self.stream));
        let d = match &scratch_ptr {
            None => c,
            Some((ptr, _guard)) => {
                // The candidates were chosen for `c`'s alignment; the scratch must have at
                // least as much (the pool gives 256-byte or better, so this holds).
                if align_log2(*ptr) < key.align_log2[2] {
                    return skip("the scratch C is less aligned than C");
                }
                *ptr
            }
        };

        // Probe: one launch each, which also loads each kernel before the timed batch.
        let mut alive: Vec<bool> = cands
            .iter()
            .map(|cand| {
                // SAFETY: the plan is `key`'s, the algorithm came from its heuristic within our
                // workspace, `a` and `b` are the caller's and `d` is `c` (written, not read,
                // with beta == 0) or a zeroed scratch covering C's extent, aligned as `c`.
                let status = unsafe { self.launch(plan, &cand.algo, a, b, d, alpha, beta) };
                status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            })
            .collect();

        let ctx = self.stream.context();
        let mut events: Vec<Vec<CudaEvent>> = Vec::with_capacity(cands.len());
        for _ in cands {
            let evs = (0..=AUTOTUNE_TIMED_RUNS)
                .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .cuda_ctx("creating GEMM autotuning events")?;
            events.push(evs);
        }

        // Hold the stream so that the batch below runs back to back, not at the host's pace.
        // SAFETY: `hold_stream` makes no CUDA call and ignores its (null) argument; the stream
        // is the runtime's live stream.
        let held = unsafe {
            driver_result::stream::launch_host_function(
                self.stream.cu_stream(),
                hold_stream,
                std::ptr::null_mut(),
            )
        }
        .is_ok();
        let queued = Instant::now();
        for ((cand, evs), ok) in cands.iter().zip(&events).zip(alive.iter_mut()) {
            if !*ok {
                continue;
            }
            // SAFETY: as for the probe above.
            let warm = unsafe { self.launch(plan, &cand.algo, a, b, d, alpha, beta) };
            if warm != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                *ok = false;
                continue;
            }
            evs[0]
                .record(&self.stream)
                .cuda_ctx("recording a GEMM autotuning event")?;
            for ev in &evs[1..] {
                // SAFETY: as for the probe above.
                let status = unsafe { self.launch(plan, &cand.algo, a, b, d, alpha, beta) };
                if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    *ok = false;
                    break;
                }
                ev.record(&self.stream)
                    .cuda_ctx("recording a GEMM autotuning event")?;
            }
        }
        let queued = queued.elapsed();
        self.stream
            .synchronize()
            .cuda_ctx("synchronizing after GEMM autotuning")?;
        drop(scratch_ptr);
        drop(scratch);

        let mut timings: Vec<(usize, [f32; AUTOTUNE_TIMED_RUNS], f32)> = Vec::new();
        for (i, (evs, _)) in events
            .iter()
            .zip(&alive)
            .enumerate()
            .filter(|(_, (_, ok))| **ok)
        {
            let mut times = [0f32; AUTOTUNE_TIMED_RUNS];
            for (t, pair) in times.iter_mut().zip(evs.windows(2)) {
                *t = pair[0]
                    .elapsed_ms(&pair[1])
                    .cuda_ctx("reading a GEMM autotuning event")?;
            }
            let mut sorted = times;
            sorted.sort_by(f32::total_cmp);
            timings.push((i, times, sorted[AUTOTUNE_TIMED_RUNS / 2]));
        }
        self.autotunes.fetch_add(1, Ordering::Relaxed);

        let best = timings
            .iter()
            .min_by(|x, y| x.2.total_cmp(&y.2))
            .map(|t| (t.0, t.2));
        let first = timings.iter().find(|t| t.0 == 0).map(|t| t.2);
        let chosen = match (best, first) {
            (None, _) => None,
            (Some((_, best_ms)), Some(first_ms))
                if best_ms > first_ms * (1.0 - AUTOTUNE_MIN_GAIN) =>
            {
                Some(0)
            }
            (Some((i, _)), _) => Some(i),
        };

        if debug {
            let mut msg = format!(
                "flare gemm autotune: {key:?}\n  {} candidates, {} timed; batch queued in {:.0} us \
                 (stream {}held {} us)\n",
                cands.len(),
                timings.len(),
                queued.as_secs_f64() * 1e6,
                if held { "" } else { "NOT " },
                AUTOTUNE_HOLD.as_micros(),
            );
            let flop = 2.0 * key.params.macs() as f64;
            for (i, cand) in cands.iter().enumerate() {
                let _ = write!(
                    msg,
                    "  [{i}] {} ws={} waves={:.2}: ",
                    algo_desc(&cand.algo),
                    cand.workspaceSize,
                    cand.wavesCount
                );
                let _ = match timings.iter().find(|t| t.0 == i) {
                    Some((_, times, median)) => writeln!(
                        msg,
                        "median {:.1} us ({:.0} TFLOP/s), runs {:?} us",
                        median * 1e3,
                        flop / (*median as f64 * 1e-3) / 1e12,
                        times.map(|t| (t * 1e4).round() / 10.0)
                    ),
                    None => writeln!(msg, "failed to launch"),
                };
            }
            let _ = match (chosen, first) {
                (Some(i), Some(f)) => writeln!(
                    msg,
                    "  winner: [{i}] ({:.2}x the heuristic's first choice)",
                    f / timings.iter().find(|t| t.0 == i).map_or(f, |t| t.2)
                ),
                (Some(i), None) => writeln!(msg, "  winner: [{i}] (the first choice failed)"),
                (None, _) => writeln!(msg, "  no candidate ran; keeping [0]"),
            };
            eprint!("{msg}");
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 5 × 3 × 7 product with `A`/`B` of `dtype` and `C` of `c_dtype`.
    fn params(dtype: DType, c_dtype: Option<DType>) -> GemmParams {
        GemmParams {
            dtype,
            c_dtype,
            transa: false,
            transb: false,
            m: 5,
            n: 3,
            k: 7,
            lda: 5,
            ldb: 7,
            ldc: 5,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// Half-precision `A`/`B` with an f32 `C` is taken and keys its own plan; `C` of the
    /// operands' dtype is the default's plan; every other mix is refused with a clear error;
    /// `C`'s extent counts `C`'s element size (the autotuner's scratch copy).
    #[test]
    fn c_dtype_is_validated_normalized_and_sized() {
        for half in [DType::BF16, DType::F16] {
            let mixed = params(half, Some(DType::F32));
            assert!(mixed.validate().is_ok(), "{half:?} A/B with f32 C");
            assert_eq!(mixed.c_type(), DType::F32);
            assert_ne!(mixed.normalized(), params(half, None).normalized());
            assert_eq!(
                params(half, Some(half)).normalized(),
                params(half, None).normalized()
            );
            // (n - 1) · ldc + m elements of C.
            assert_eq!(mixed.c_extent_bytes(), Some((2 * 5 + 5) * 4));
            assert_eq!(params(half, None).c_extent_bytes(), Some((2 * 5 + 5) * 2));
        }
        for (ab, c) in [
            (DType::F32, DType::BF16),
            (DType::F32, DType::F16),
            (DType::BF16, DType::F16),
            (DType::F16, DType::BF16),
            (DType::BF16, DType::F64),
        ] {
            match params(ab, Some(c)).validate() {
                Err(Error::InvalidArgument { op, msg }) => {
                    assert_eq!(op, "gemm");
                    assert!(msg.contains("only f16/bf16 A and B with f32 C"), "{msg}");
                }
                other => panic!("{ab:?} A/B with {c:?} C: {other:?}"),
            }
        }
    }
}
