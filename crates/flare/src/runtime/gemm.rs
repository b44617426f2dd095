//! The cuBLASLt layer: one handle, one workspace and a cache of GEMM plans per device.
//!
//! A [`Gemm`] is created once per device by [`super::cuda::CudaRuntime`]. A *plan* is everything
//! cuBLASLt needs to run one GEMM shape: the operation descriptor, the three matrix layouts and
//! the algorithm chosen by `cublasLtMatmulAlgoGetHeuristic` (top-1, allowed the whole
//! workspace). A plan is built the first time its [`GemmParams`] (plus dtype, compute type,
//! pointer alignment and whether `beta` is zero) is seen and reused afterwards, so a cached
//! call costs one mutex lock, one hash lookup and one `cublasLtMatmul` on the runtime's stream:
//! no descriptor is created, no heuristic is queried and nothing is allocated per call.
//!
//! The one entry point, [`Gemm::matmul`], follows cuBLAS's column-major convention,
//! `C[m, n] = alpha * op(A) op(B) + beta * C` over a strided batch, so the same call serves a
//! forward product (`beta = 0`), the input and weight gradients accumulated into an existing
//! buffer (`beta = 1`) and the LoRA low-rank update accumulated into a base output.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUdeviceptr};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::DType;

use super::cuda::CudaResultExt;
use super::{BLAS_HANDLES_CREATED, GEMM_PLANS_CREATED};
use crate::{Error, Result};

/// Workspace on compute capability >= 9 (Hopper and later), as NVIDIA recommends.
const WORKSPACE_BYTES_SM90: usize = 32 << 20;
/// Workspace on older GPUs.
const WORKSPACE_BYTES_OLDER: usize = 4 << 20;

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
/// operands swapped, with `m` and `n` swapped (see `ops::cuda::matmul` for an example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmParams {
    /// Element type of `A`, `B` and `C`: f32, f16 or bf16.
    pub dtype: DType,
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
        p
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
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm")
            .field("workspace_bytes", &self.workspace_bytes)
            .field("plans", &self.plans.try_lock().map(|m| m.len()).ok())
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
        })
    }

    /// Size of the cuBLASLt workspace, in bytes.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }

    /// Number of GEMM plans cached on this device.
    pub fn plans_cached(&self) -> usize {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Runs `C = alpha * op(A) op(B) + beta * C` (column-major, strided batch; see
    /// [`GemmParams`]) on the runtime's stream, with `f32` scaling and `f32` accumulation
    /// (TF32 tensor cores for f32 inputs when [`super::allow_tf32`] is on).
    ///
    /// The first call with given params, dtype, compute type, pointer alignment and
    /// `beta == 0`-ness builds a plan (descriptors plus the heuristic's algorithm); every later
    /// call reuses it: one mutex lock, one hash lookup and one `cublasLtMatmul`.
    ///
    /// With `beta == 0`, `C` is written without being read (its contents may be garbage, even
    /// NaN). With `beta == 1`, the product is accumulated into `C` (gradients, LoRA updates).
    /// An empty product (`m`, `n` or `batch` of 0) does nothing; `k == 0` with `beta == 1`
    /// does nothing, and `k == 0` with any other `beta` is refused (the caller must scale or
    /// zero `C` itself).
    ///
    /// # Safety
    /// `a`, `b` and `c` must be device pointers on this runtime's device, each aligned to the
    /// size of `p.dtype`, to memory holding elements of `p.dtype` that covers every element
    /// the params address (for each batch index `i < batch`, matrix `i` at `ptr + i * stride`
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
            Entry::Vacant(e) => e.insert(self.build_plan(&key)?),
        };
        let cu_stream = self.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: the plan's descriptors are live (owned by the cache, which is locked) and
        // describe exactly `p`; the caller guarantees that `a`, `b`, `c` cover those shapes on
        // this device and are ready on this stream; `alpha`/`beta` are host f32 values as the
        // descriptor's default host pointer mode and f32 scale type expect, read before the
        // call returns; the workspace is ours, as large as the heuristic was told, and only
        // used by GEMMs on this one stream, which run in order. C is passed as D (in place).
        let status = unsafe {
            sys::cublasLtMatmul(
                self.handle.0,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                plan.c,
                c as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                self.workspace_bytes,
                cu_stream,
            )
        };
        check_for(status, "cublasLtMatmul", &key)
    }

    /// Creates the descriptors of `key` and asks the heuristic for its algorithm. Called with
    /// the plan mutex held.
    fn build_plan(&self, key: &GemmKey) -> Result<Plan> {
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
        let layout = |rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(dt, rows as u64, cols as u64, ld as i64)
                .cuda_ctx("creating a cuBLASLt matrix layout")
        };
        plan.a = layout(ar, ac, p.lda)?;
        plan.b = layout(br, bc, p.ldb)?;
        plan.c = layout(p.m, p.n, p.ldc)?;
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
        let mut result = std::mem::MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::zeroed();
        let mut count: std::ffi::c_int = 0;
        // SAFETY: all descriptors are live and describe the GEMM; `result` has room for the one
        // result requested and `count` receives how many were written.
        let status = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle.0,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                pref.0,
                1,
                result.as_mut_ptr(),
                &mut count,
            )
        };
        check_for(status, "cuBLASLt algorithm heuristic", key)?;
        if count < 1 {
            return Err(Error::Cuda {
                context: "cuBLASLt algorithm heuristic",
                msg: format!("no algorithm supports {key:?}"),
            });
        }
        // SAFETY: the heuristic reported writing one result; the zeroed init also makes every
        // field a valid value of its type.
        let result = unsafe { result.assume_init() };
        check_for(result.state, "cuBLASLt algorithm heuristic result", key)?;
        plan.algo = result.algo;
        GEMM_PLANS_CREATED.fetch_add(1, Ordering::Relaxed);
        Ok(plan)
    }
}
