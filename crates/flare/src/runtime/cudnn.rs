//! cuDNN's graph ("backend") API, opened at run time: the vendor library flare's training
//! attention runs on where it applies (cuDNN's fused flash attention, the engine PyTorch's SDPA
//! picks on Hopper; see `ops::flash_attention`).
//!
//! - **Loading.** `libcudnn.so.9` is opened with the dynamic loader the first time an op asks
//!   for it (`api`), never at link time: a flare binary built with `cuda` runs on a machine
//!   without cuDNN, and then [`available`] says why and the caller takes flare's own kernel
//!   (`flare bench` prints `no cuDNN` beside the GPU's name; `flare::runtime::cudnn_version`
//!   gives the loader's message). The library comes
//!   from `LD_LIBRARY_PATH` (e.g. PyTorch's `site-packages/nvidia/cudnn/lib`).
//! - **Handles.** One cuDNN handle per device, bound to Candle's stream, created once with the
//!   device's runtime ([`super::cuda::CudaRuntime::cudnn`]).
//! - **Graphs.** `Graph` builds an operation graph from tensors, pointwise, reduction and
//!   matmul operations (the backend's descriptors, by their attribute names), asks the
//!   heuristics for engine configurations and keeps the first that finalizes into an execution
//!   `Plan`. Plans are built once per shape by their callers and reused.
//!
//! The constants below are the cuDNN 9 header's values (`cudnn_graph.h`); they are part of its
//! stable ABI.

use std::ffi::{c_char, c_void, CStr};
use std::rc::Rc;
use std::sync::OnceLock;

use crate::{Error, Result};

type Status = i32;
type RawHandle = *mut c_void;
type RawDesc = *mut c_void;

/// Descriptor types (`cudnnBackendDescriptorType_t`: an enum counted from
/// `CUDNN_BACKEND_POINTWISE_DESCRIPTOR = 0` in the header's order).
#[allow(missing_docs)]
pub(crate) mod kind {
    pub const POINTWISE: u32 = 0;
    pub const ENGINECFG: u32 = 3;
    pub const ENGINEHEUR: u32 = 4;
    pub const EXECUTION_PLAN: u32 = 5;
    pub const OPERATION_POINTWISE: u32 = 13;
    pub const OPERATIONGRAPH: u32 = 15;
    pub const VARIANT_PACK: u32 = 16;
    pub const TENSOR: u32 = 17;
    pub const MATMUL: u32 = 18;
    pub const OPERATION_MATMUL: u32 = 19;
    pub const REDUCTION: u32 = 21;
    pub const OPERATION_REDUCTION: u32 = 22;
    pub const OPERATION_RESHAPE: u32 = 31;
}

/// Attribute names (`cudnnBackendAttributeName_t`).
#[allow(missing_docs)]
pub(crate) mod attr {
    pub const POINTWISE_MODE: u32 = 0;
    pub const POINTWISE_MATH_PREC: u32 = 1;
    pub const POINTWISE_AXIS: u32 = 9;
    pub const ENGINEHEUR_MODE: u32 = 200;
    pub const ENGINEHEUR_OPERATION_GRAPH: u32 = 201;
    pub const ENGINEHEUR_RESULTS: u32 = 202;
    pub const EXECUTION_PLAN_HANDLE: u32 = 400;
    pub const EXECUTION_PLAN_ENGINE_CONFIG: u32 = 401;
    pub const EXECUTION_PLAN_WORKSPACE_SIZE: u32 = 402;
    pub const OPERATION_POINTWISE_PW_DESCRIPTOR: u32 = 750;
    pub const OPERATION_POINTWISE_XDESC: u32 = 751;
    pub const OPERATION_POINTWISE_BDESC: u32 = 752;
    pub const OPERATION_POINTWISE_YDESC: u32 = 753;
    pub const OPERATION_POINTWISE_TDESC: u32 = 758;
    pub const OPERATIONGRAPH_HANDLE: u32 = 800;
    pub const OPERATIONGRAPH_OPS: u32 = 801;
    pub const TENSOR_BYTE_ALIGNMENT: u32 = 900;
    pub const TENSOR_DATA_TYPE: u32 = 901;
    pub const TENSOR_DIMENSIONS: u32 = 902;
    pub const TENSOR_STRIDES: u32 = 903;
    pub const TENSOR_UNIQUE_ID: u32 = 906;
    pub const TENSOR_IS_VIRTUAL: u32 = 907;
    pub const TENSOR_IS_BY_VALUE: u32 = 908;
    pub const VARIANT_PACK_UNIQUE_IDS: u32 = 1000;
    pub const VARIANT_PACK_DATA_POINTERS: u32 = 1001;
    pub const VARIANT_PACK_WORKSPACE: u32 = 1003;
    pub const MATMUL_COMP_TYPE: u32 = 1500;
    pub const OPERATION_MATMUL_ADESC: u32 = 1520;
    pub const OPERATION_MATMUL_BDESC: u32 = 1521;
    pub const OPERATION_MATMUL_CDESC: u32 = 1522;
    pub const OPERATION_MATMUL_DESC: u32 = 1523;
    pub const REDUCTION_OPERATOR: u32 = 1600;
    pub const REDUCTION_COMP_TYPE: u32 = 1601;
    pub const OPERATION_REDUCTION_XDESC: u32 = 1610;
    pub const OPERATION_REDUCTION_YDESC: u32 = 1611;
    pub const OPERATION_REDUCTION_DESC: u32 = 1612;
    pub const OPERATION_RESHAPE_XDESC: u32 = 2200;
    pub const OPERATION_RESHAPE_YDESC: u32 = 2201;
}

/// Attribute value types (`cudnnBackendAttributeType_t`).
#[allow(missing_docs)]
pub(crate) mod ty {
    pub const HANDLE: u32 = 0;
    pub const DATA_TYPE: u32 = 1;
    pub const BOOLEAN: u32 = 2;
    pub const INT64: u32 = 3;
    pub const VOID_PTR: u32 = 6;
    pub const HEUR_MODE: u32 = 8;
    pub const POINTWISE_MODE: u32 = 14;
    pub const BACKEND_DESCRIPTOR: u32 = 15;
    pub const REDUCTION_OPERATOR_TYPE: u32 = 18;
}

/// Element types (`cudnnDataType_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub(crate) enum DataType {
    /// f32.
    Float = 0,
    /// f16.
    Half = 2,
    /// i32.
    Int32 = 4,
    /// bf16.
    BFloat16 = 9,
    /// bool.
    Boolean = 11,
}

/// Pointwise modes (`cudnnPointwiseMode_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub(crate) enum PointwiseMode {
    Add = 0,
    Mul = 1,
    Div = 6,
    Sub = 9,
    Exp = 13,
    Log = 15,
    Identity = 21,
    CmpGe = 303,
    GenIndex = 501,
    BinarySelect = 601,
}

/// Reduction operators (`cudnnReduceTensorOp_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub(crate) enum ReduceMode {
    Add = 0,
    Max = 3,
}

/// Heuristics mode A (`CUDNN_HEUR_MODE_A`), the one cudnn-frontend uses for attention.
const HEUR_MODE_A: u32 = 3;

/// The library's entry points, resolved once.
struct Api {
    _lib: libloading::Library,
    version: usize,
    create: unsafe extern "C" fn(*mut RawHandle) -> Status,
    set_stream: unsafe extern "C" fn(RawHandle, *mut c_void) -> Status,
    create_desc: unsafe extern "C" fn(u32, *mut RawDesc) -> Status,
    destroy_desc: unsafe extern "C" fn(RawDesc) -> Status,
    set_attr: unsafe extern "C" fn(RawDesc, u32, u32, i64, *const c_void) -> Status,
    get_attr: unsafe extern "C" fn(RawDesc, u32, u32, i64, *mut i64, *mut c_void) -> Status,
    finalize: unsafe extern "C" fn(RawDesc) -> Status,
    execute: unsafe extern "C" fn(RawHandle, RawDesc, RawDesc) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    last_error: unsafe extern "C" fn(*mut c_char, usize),
}

/// The library names tried, in order.
const LIB_NAMES: [&str; 2] = ["libcudnn.so.9", "libcudnn.so"];
/// The oldest cuDNN whose fused attention flare's graphs are written for (9.0).
const MIN_VERSION: usize = 90_000;

fn load() -> std::result::Result<Api, String> {
    let mut tried = Vec::new();
    for name in LIB_NAMES {
        // SAFETY: opening libcudnn runs its initialisers, which have no preconditions; the
        // library is kept alive in `Api` for as long as any resolved function is used.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return resolve(lib),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "cuDNN 9 was not found by the dynamic loader ({}); put its lib directory on \
         LD_LIBRARY_PATH (e.g. PyTorch's site-packages/nvidia/cudnn/lib)",
        tried.join("; ")
    ))
}

fn resolve(lib: libloading::Library) -> std::result::Result<Api, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is cuDNN 9's exported C function of that name, and the field
            // it is stored in has the header's signature for it.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("libcudnn has no {}: {e}", $name))?
        };
    }
    let get_version: unsafe extern "C" fn() -> usize = sym!("cudnnGetVersion");
    // SAFETY: cudnnGetVersion takes nothing and only returns the compiled-in version number.
    let version = unsafe { get_version() };
    if version < MIN_VERSION {
        return Err(format!(
            "libcudnn is version {version}; flare's attention graphs need cuDNN 9.0 or newer"
        ));
    }
    Ok(Api {
        version,
        create: sym!("cudnnCreate"),
        set_stream: sym!("cudnnSetStream"),
        create_desc: sym!("cudnnBackendCreateDescriptor"),
        destroy_desc: sym!("cudnnBackendDestroyDescriptor"),
        set_attr: sym!("cudnnBackendSetAttribute"),
        get_attr: sym!("cudnnBackendGetAttribute"),
        finalize: sym!("cudnnBackendFinalize"),
        execute: sym!("cudnnBackendExecute"),
        error_string: sym!("cudnnGetErrorString"),
        last_error: sym!("cudnnGetLastErrorString"),
        _lib: lib,
    })
}

fn api() -> std::result::Result<&'static Api, &'static str> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|e| e.as_str())
}

/// Whether cuDNN could be opened: its version (e.g. `91300` for 9.13.0), or why not.
pub fn available() -> std::result::Result<usize, String> {
    api().map(|a| a.version).map_err(str::to_string)
}

/// A failed cuDNN call as flare's error: what flare was doing, the status and cuDNN's own
/// last message.
fn check(status: Status, context: &'static str) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    let mut msg = format!("cuDNN status {status}");
    if let Ok(a) = api() {
        // SAFETY: cudnnGetErrorString returns a static NUL-terminated string for any status.
        let s = unsafe { CStr::from_ptr((a.error_string)(status)) };
        msg = format!("{} ({status})", s.to_string_lossy());
        let mut buf = vec![0 as c_char; 1024];
        // SAFETY: `buf` holds `buf.len()` bytes; cuDNN writes at most that many, NUL included.
        unsafe { (a.last_error)(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: the buffer is NUL-terminated (zero-filled, and cuDNN terminates what it writes).
        let last = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        if !last.trim().is_empty() {
            msg = format!("{msg}: {}", last.trim());
        }
    }
    Err(Error::Cuda { context, msg })
}

fn api_or_err(context: &'static str) -> Result<&'static Api> {
    api().map_err(|e| Error::Cuda {
        context,
        msg: e.to_string(),
    })
}

/// One cuDNN handle, bound to a stream.
pub struct Handle {
    raw: RawHandle,
}

// SAFETY: a cuDNN handle may be used from any thread as long as calls on it are not concurrent;
// flare issues all of a device's work from the thread that holds Candle's device, in order,
// and every execution takes `&Handle` through the device's runtime, which Candle's stream
// serialises.
unsafe impl Send for Handle {}
// SAFETY: see `Send`; cudnnBackendExecute only reads the handle's stream binding.
unsafe impl Sync for Handle {}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("cudnn::Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Creates a handle whose work is issued on `stream` (a raw `CUstream`).
    pub(crate) fn new(stream: *mut c_void) -> Result<Self> {
        let a = api_or_err("opening cuDNN")?;
        let mut raw: RawHandle = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; cudnnCreate initialises it on success.
        check(unsafe { (a.create)(&mut raw) }, "creating a cuDNN handle")?;
        // SAFETY: `raw` is the handle just created and `stream` a live stream of the current
        // context (Candle's, which outlives the runtime that owns this handle).
        check(
            unsafe { (a.set_stream)(raw, stream) },
            "binding the cuDNN handle to Candle's stream",
        )?;
        Ok(Handle { raw })
    }
}

/// One backend descriptor, destroyed on drop.
pub(crate) struct Desc {
    raw: RawDesc,
}

impl Drop for Desc {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: `raw` was created by cudnnBackendCreateDescriptor and is destroyed once.
            unsafe { (a.destroy_desc)(self.raw) };
        }
    }
}

impl Desc {
    /// A new descriptor of type `kind`.
    pub(crate) fn new(kind: u32, context: &'static str) -> Result<Self> {
        let a = api_or_err(context)?;
        let mut raw: RawDesc = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        check(unsafe { (a.create_desc)(kind, &mut raw) }, context)?;
        Ok(Desc { raw })
    }

    fn set<T>(&mut self, name: u32, t: u32, values: &[T], context: &'static str) -> Result<()> {
        let a = api_or_err(context)?;
        let named = |e: Error| match e {
            Error::Cuda { context, msg } => Error::Cuda {
                context,
                msg: format!("setting attribute {name} (type {t}): {msg}"),
            },
            e => e,
        };
        // SAFETY: `values` holds `values.len()` elements of the C type that `t` names (each
        // caller below pairs them), read during the call only.
        check(
            unsafe {
                (a.set_attr)(
                    self.raw,
                    name,
                    t,
                    values.len() as i64,
                    values.as_ptr().cast(),
                )
            },
            context,
        )
        .map_err(named)
    }

    /// Sets an `i64` array attribute.
    pub(crate) fn i64s(&mut self, name: u32, v: &[i64], cx: &'static str) -> Result<()> {
        self.set(name, ty::INT64, v, cx)
    }

    /// Sets a boolean attribute.
    pub(crate) fn boolean(&mut self, name: u32, v: bool, cx: &'static str) -> Result<()> {
        self.set(name, ty::BOOLEAN, &[v], cx)
    }

    /// Sets an enum attribute of attribute type `t`.
    pub(crate) fn enumeration(
        &mut self,
        name: u32,
        t: u32,
        v: u32,
        cx: &'static str,
    ) -> Result<()> {
        self.set(name, t, &[v as i32], cx)
    }

    /// Sets a descriptor-array attribute.
    pub(crate) fn descs(&mut self, name: u32, v: &[&Desc], cx: &'static str) -> Result<()> {
        let raw: Vec<RawDesc> = v.iter().map(|d| d.raw).collect();
        self.set(name, ty::BACKEND_DESCRIPTOR, &raw, cx)
    }

    /// Sets the handle attribute `name`.
    pub(crate) fn handle(&mut self, name: u32, h: &Handle, cx: &'static str) -> Result<()> {
        self.set(name, ty::HANDLE, &[h.raw], cx)
    }

    /// Finalizes the descriptor (after which it is immutable).
    pub(crate) fn finalize(&mut self, cx: &'static str) -> Result<()> {
        let a = api_or_err(cx)?;
        // SAFETY: `raw` is a live descriptor with its required attributes set by the caller;
        // cuDNN reports a missing one as an error status.
        check(unsafe { (a.finalize)(self.raw) }, cx)
    }

    /// Reads one `i64` attribute of a finalized descriptor.
    pub(crate) fn get_i64(&self, name: u32, cx: &'static str) -> Result<i64> {
        let a = api_or_err(cx)?;
        let (mut v, mut n) = (0i64, 0i64);
        // SAFETY: one i64 is requested into `v`; `n` receives the count.
        check(
            unsafe {
                (a.get_attr)(
                    self.raw,
                    name,
                    ty::INT64,
                    1,
                    &mut n,
                    (&mut v as *mut i64).cast(),
                )
            },
            cx,
        )?;
        Ok(v)
    }
}

/// A tensor of a graph (its descriptor; the variant pack names it by the uid it was built with).
pub(crate) struct TensorDesc {
    desc: Rc<Desc>,
}

/// One operation graph under construction: tensors and operations, in order.
///
/// Every descriptor a graph refers to (tensors, operations and their mode descriptors, engine
/// configurations) stays alive with the graph and then with its [`Plan`]: the backend's
/// attributes hold descriptors by handle, and the documentation does not promise a copy.
pub(crate) struct Graph {
    ops: Vec<Desc>,
    modes: Vec<Desc>,
    keep: Vec<Rc<Desc>>,
    next_uid: i64,
}

const CX_TENSOR: &str = "building a cuDNN tensor descriptor";
const CX_OP: &str = "building a cuDNN operation";

impl Graph {
    /// An empty graph.
    pub(crate) fn new() -> Self {
        Graph {
            ops: Vec::new(),
            modes: Vec::new(),
            keep: Vec::new(),
            next_uid: 1,
        }
    }

    /// A tensor: `uid` names it in the variant pack (`None` gives it the next free id, for
    /// virtual tensors); `virt` tensors live only inside the fused kernel; `by_value` scalars
    /// are passed by host pointer.
    pub(crate) fn tensor(
        &mut self,
        dtype: DataType,
        dims: &[i64],
        strides: &[i64],
        uid: Option<i64>,
        virt: bool,
        by_value: bool,
    ) -> Result<TensorDesc> {
        let uid = uid.unwrap_or_else(|| {
            self.next_uid += 1;
            1000 + self.next_uid
        });
        let mut d = Desc::new(kind::TENSOR, CX_TENSOR)?;
        d.enumeration(
            attr::TENSOR_DATA_TYPE,
            ty::DATA_TYPE,
            dtype as u32,
            CX_TENSOR,
        )?;
        d.i64s(attr::TENSOR_DIMENSIONS, dims, CX_TENSOR)?;
        d.i64s(attr::TENSOR_STRIDES, strides, CX_TENSOR)?;
        d.i64s(attr::TENSOR_UNIQUE_ID, &[uid], CX_TENSOR)?;
        d.i64s(attr::TENSOR_BYTE_ALIGNMENT, &[16], CX_TENSOR)?;
        if virt {
            d.boolean(attr::TENSOR_IS_VIRTUAL, true, CX_TENSOR)?;
        }
        if by_value {
            d.boolean(attr::TENSOR_IS_BY_VALUE, true, CX_TENSOR)?;
        }
        d.finalize(CX_TENSOR)?;
        let desc = Rc::new(d);
        self.keep.push(desc.clone());
        Ok(TensorDesc { desc })
    }

    /// A pointwise operation `y = mode(x, b, t)` computed in `prec` (`axis` for GEN_INDEX).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pointwise(
        &mut self,
        mode: PointwiseMode,
        x: &TensorDesc,
        b: Option<&TensorDesc>,
        t: Option<&TensorDesc>,
        y: &TensorDesc,
        axis: Option<i64>,
        prec: DataType,
    ) -> Result<()> {
        let mut pw = Desc::new(kind::POINTWISE, CX_OP)?;
        pw.enumeration(attr::POINTWISE_MODE, ty::POINTWISE_MODE, mode as u32, CX_OP)?;
        pw.enumeration(attr::POINTWISE_MATH_PREC, ty::DATA_TYPE, prec as u32, CX_OP)?;
        if let Some(axis) = axis {
            pw.i64s(attr::POINTWISE_AXIS, &[axis], CX_OP)?;
        }
        pw.finalize(CX_OP)?;
        let mut op = Desc::new(kind::OPERATION_POINTWISE, CX_OP)?;
        op.descs(attr::OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw], CX_OP)?;
        op.descs(attr::OPERATION_POINTWISE_XDESC, &[&x.desc], CX_OP)?;
        if let Some(b) = b {
            op.descs(attr::OPERATION_POINTWISE_BDESC, &[&b.desc], CX_OP)?;
        }
        if let Some(t) = t {
            op.descs(attr::OPERATION_POINTWISE_TDESC, &[&t.desc], CX_OP)?;
        }
        op.descs(attr::OPERATION_POINTWISE_YDESC, &[&y.desc], CX_OP)?;
        op.finalize(CX_OP)?;
        self.ops.push(op);
        self.modes.push(pw);
        Ok(())
    }

    /// A reduction `y = mode(x)` over the dimensions where `y` has extent 1, in f32.
    pub(crate) fn reduction(
        &mut self,
        mode: ReduceMode,
        x: &TensorDesc,
        y: &TensorDesc,
    ) -> Result<()> {
        let mut r = Desc::new(kind::REDUCTION, CX_OP)?;
        r.enumeration(
            attr::REDUCTION_OPERATOR,
            ty::REDUCTION_OPERATOR_TYPE,
            mode as u32,
            CX_OP,
        )?;
        r.enumeration(
            attr::REDUCTION_COMP_TYPE,
            ty::DATA_TYPE,
            DataType::Float as u32,
            CX_OP,
        )?;
        r.finalize(CX_OP)?;
        let mut op = Desc::new(kind::OPERATION_REDUCTION, CX_OP)?;
        op.descs(attr::OPERATION_REDUCTION_DESC, &[&r], CX_OP)?;
        op.descs(attr::OPERATION_REDUCTION_XDESC, &[&x.desc], CX_OP)?;
        op.descs(attr::OPERATION_REDUCTION_YDESC, &[&y.desc], CX_OP)?;
        op.finalize(CX_OP)?;
        self.ops.push(op);
        self.modes.push(r);
        Ok(())
    }

    /// A reshape (here: a transposed view) `y = x` with `y`'s dims and strides.
    pub(crate) fn reshape(&mut self, x: &TensorDesc, y: &TensorDesc) -> Result<()> {
        let mut op = Desc::new(kind::OPERATION_RESHAPE, CX_OP)?;
        op.descs(attr::OPERATION_RESHAPE_XDESC, &[&x.desc], CX_OP)?;
        op.descs(attr::OPERATION_RESHAPE_YDESC, &[&y.desc], CX_OP)?;
        op.finalize(CX_OP)?;
        self.ops.push(op);
        Ok(())
    }

    /// A batched matmul `c = a b` with f32 accumulation (dims `[.., m, k] x [.., k, n]`).
    pub(crate) fn matmul(&mut self, a: &TensorDesc, b: &TensorDesc, c: &TensorDesc) -> Result<()> {
        let mut m = Desc::new(kind::MATMUL, CX_OP)?;
        m.enumeration(
            attr::MATMUL_COMP_TYPE,
            ty::DATA_TYPE,
            DataType::Float as u32,
            CX_OP,
        )?;
        m.finalize(CX_OP)?;
        let mut op = Desc::new(kind::OPERATION_MATMUL, CX_OP)?;
        op.descs(attr::OPERATION_MATMUL_DESC, &[&m], CX_OP)?;
        op.descs(attr::OPERATION_MATMUL_ADESC, &[&a.desc], CX_OP)?;
        op.descs(attr::OPERATION_MATMUL_BDESC, &[&b.desc], CX_OP)?;
        op.descs(attr::OPERATION_MATMUL_CDESC, &[&c.desc], CX_OP)?;
        op.finalize(CX_OP)?;
        self.ops.push(op);
        self.modes.push(m);
        Ok(())
    }

    /// Finalizes the graph on `handle` and keeps the first engine configuration of heuristics
    /// mode A that builds an execution plan. The error carries every configuration's refusal.
    pub(crate) fn build(self, handle: &Handle, what: &'static str) -> Result<Plan> {
        const CX: &str = "building a cuDNN operation graph";
        let a = api_or_err(CX)?;
        let mut g = Desc::new(kind::OPERATIONGRAPH, CX)?;
        g.handle(attr::OPERATIONGRAPH_HANDLE, handle, CX)?;
        let ops: Vec<&Desc> = self.ops.iter().collect();
        g.descs(attr::OPERATIONGRAPH_OPS, &ops, CX)?;
        g.finalize(CX)?;

        const CXH: &str = "querying cuDNN's engine heuristics";
        let mut heur = Desc::new(kind::ENGINEHEUR, CXH)?;
        heur.descs(attr::ENGINEHEUR_OPERATION_GRAPH, &[&g], CXH)?;
        heur.enumeration(attr::ENGINEHEUR_MODE, ty::HEUR_MODE, HEUR_MODE_A, CXH)?;
        heur.finalize(CXH)?;
        const MAX_CFGS: usize = 16;
        let cfgs = (0..MAX_CFGS)
            .map(|_| Desc::new(kind::ENGINECFG, CXH))
            .collect::<Result<Vec<_>>>()?;
        let mut raw: Vec<RawDesc> = cfgs.iter().map(|d| d.raw).collect();
        let mut n = 0i64;
        // SAFETY: `raw` holds MAX_CFGS engine-config descriptors created above, which cuDNN
        // fills (the first `n` of them); they stay owned by `cfgs`.
        check(
            unsafe {
                (a.get_attr)(
                    heur.raw,
                    attr::ENGINEHEUR_RESULTS,
                    ty::BACKEND_DESCRIPTOR,
                    MAX_CFGS as i64,
                    &mut n,
                    raw.as_mut_ptr().cast(),
                )
            },
            CXH,
        )?;
        let mut refusals = Vec::new();
        let mut chosen = None;
        for cfg in cfgs.iter().take(n.max(0) as usize) {
            // cudnn-frontend (1.18, on cuDNN 9.19) sets only the engine configuration; older
            // cuDNN releases documented the plan's handle as required: without it first, then
            // with it.
            let plan = |with_handle: bool| -> Result<Desc> {
                const CXP: &str = "building a cuDNN execution plan";
                let mut p = Desc::new(kind::EXECUTION_PLAN, CXP)?;
                if with_handle {
                    p.handle(attr::EXECUTION_PLAN_HANDLE, handle, CXP)?;
                }
                p.descs(attr::EXECUTION_PLAN_ENGINE_CONFIG, &[cfg], CXP)?;
                p.finalize(CXP)?;
                Ok(p)
            };
            let built = plan(false).or_else(|_| plan(true));
            match built {
                Ok(plan) => {
                    chosen = Some(plan);
                    break;
                }
                Err(e) => refusals.push(e.to_string()),
            }
        }
        if let Some(plan) = chosen {
            let workspace = plan.get_i64(
                attr::EXECUTION_PLAN_WORKSPACE_SIZE,
                "reading a plan's workspace",
            )?;
            return Ok(Plan {
                desc: plan,
                _graph: g,
                _parts: (cfgs, heur, self),
                workspace: workspace.max(0) as usize,
            });
        }
        Err(Error::Cuda {
            context: what,
            msg: format!(
                "cuDNN has no engine for this graph ({n} configurations from the heuristics{})",
                if refusals.is_empty() {
                    String::new()
                } else {
                    format!(": {}", refusals.join(" | "))
                }
            ),
        })
    }
}

/// A finalized execution plan with the workspace it needs.
pub(crate) struct Plan {
    desc: Desc,
    _graph: Desc,
    /// What the plan was built from (see [`Graph`]), dropped with it.
    _parts: (Vec<Desc>, Desc, Graph),
    /// Bytes of device workspace an execution needs.
    pub workspace: usize,
}

// SAFETY: a finalized plan is immutable; executions go through the device's one handle on
// Candle's stream (see `Handle`). The `Rc`s of its graph's tensors are its only owners by then
// (the tensor handles the graph's builder held are dropped before `Graph::build` returns), so
// no reference count is shared with another thread.
unsafe impl Send for Plan {}
// SAFETY: as `Send`: executing only reads the plan.
unsafe impl Sync for Plan {}

impl Plan {
    /// Runs the plan on `handle`'s stream with these tensors (`uids[i]` at `ptrs[i]`: device
    /// addresses, or host addresses for by-value scalars) and `workspace` (at least
    /// [`Plan::workspace`] bytes, or null when that is 0).
    ///
    /// # Safety
    /// Every pointer must address memory of the size and type the tensor of that uid was
    /// declared with, live until the work queued on the stream has run (host scalars: during
    /// the call); outputs must not alias inputs.
    pub(crate) unsafe fn execute(
        &self,
        handle: &Handle,
        uids: &[i64],
        ptrs: &[*mut c_void],
        workspace: *mut c_void,
    ) -> Result<()> {
        const CX: &str = "running a cuDNN plan";
        let a = api_or_err(CX)?;
        let mut vp = Desc::new(kind::VARIANT_PACK, CX)?;
        vp.i64s(attr::VARIANT_PACK_UNIQUE_IDS, uids, CX)?;
        vp.set(attr::VARIANT_PACK_DATA_POINTERS, ty::VOID_PTR, ptrs, CX)?;
        vp.set(attr::VARIANT_PACK_WORKSPACE, ty::VOID_PTR, &[workspace], CX)?;
        vp.finalize(CX)?;
        // SAFETY: the plan is finalized on this handle; the caller guarantees the pointers.
        check(
            unsafe { (a.execute)(handle.raw, self.desc.raw, vp.raw) },
            CX,
        )
    }
}
