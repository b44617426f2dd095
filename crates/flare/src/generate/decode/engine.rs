//! The engine on CUDA: its stream, the capture of the launch plan into a CUDA graph, the replay
//! of one step (graph launch, 4-byte token copy, synchronisation) and the profile of one step
//! (each launch between two timing events).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaGraph, CudaStream, LaunchConfig, PushKernelArg,
};
use candle_core::Tensor;

use super::plan::{cache_ptr, Arg, Geometry, Launch, Plan};
use super::{KvCache, LaunchTime, Transformer, EMPTY_KERNEL, OP};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use crate::{Error, Result};

/// The engine behind [`super::DecodeGraph`].
pub(super) struct Engine {
    rt: Arc<CudaRuntime>,
    stream: Arc<CudaStream>,
    /// Recorded on Candle's stream, waited for by `stream`, before each step.
    event: CudaEvent,
    graph: Option<CudaGraph>,
    launches: Vec<Launch>,
    /// Every tensor whose pointer a launch holds (weights, cache, buffers).
    _keep: Vec<Tensor>,
    logits: Tensor,
    token_ptr: u64,
    pos_ptr: u64,
    /// The pointer of the cache's first key tensor: which cache this engine writes.
    cache_ptr: u64,
    pos: usize,
    max_len: usize,
    table_len: usize,
    vocab: usize,
    /// Bytes per element of the model's dtype.
    elem: usize,
    started: bool,
}

impl Engine {
    /// Builds the engine in four steps: the engine's stream and event, the step's
    /// [`Geometry`], the launch [`Plan`] (buffers, pointers, launches) and, with `graph`, its
    /// capture. The caller checked that the engine applies.
    pub(super) fn new(model: &Transformer, cache: &KvCache, graph: bool) -> Result<Self> {
        let candle_core::Device::Cuda(cdev) = model.device() else {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "the model is not on a CUDA device".into(),
            });
        };
        let rt = CudaRuntime::get(cdev)?;
        let parts = model
            .decode_parts()
            .map_err(|msg| Error::InvalidArgument { op: OP, msg })?;
        let stream = rt
            .stream()
            .context()
            .new_stream()
            .cuda_ctx("creating the decode engine's stream")?;
        let event = rt
            .stream()
            .context()
            .new_event(None)
            .cuda_ctx("creating the decode engine's event")?;
        let geo = Geometry::new(model.config(), cache.max_len(), rt.sm_count).ok_or_else(|| {
            Error::InvalidArgument {
                op: OP,
                msg: "the attention heads do not fit the kernel's shared memory".into(),
            }
        })?;
        let plan = Plan::build(&rt, &stream, model, cache, &parts, &geo)?;
        // The buffers were zeroed on Candle's stream: done before the engine's stream uses
        // them (and before a capture, which runs nothing).
        rt.stream()
            .synchronize()
            .cuda_ctx("synchronizing before the decode engine")?;
        let mut engine = Engine {
            rt,
            stream,
            event,
            graph: None,
            launches: plan.launches,
            _keep: plan.keep,
            logits: plan.logits,
            token_ptr: plan.token_ptr,
            pos_ptr: plan.pos_ptr,
            cache_ptr: plan.cache_ptr,
            pos: cache.len(),
            max_len: geo.max_len,
            table_len: parts.rope_cos.dims().first().copied().unwrap_or(0),
            vocab: geo.vocab,
            elem: model.dtype().size_in_bytes(),
            started: false,
        };
        if graph {
            engine.graph = Some(engine.capture()?);
        }
        Ok(engine)
    }

    /// Captures the launch list into a graph (nothing runs).
    fn capture(&self) -> Result<CudaGraph> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .cuda_ctx("beginning the decode graph's capture")?;
        let launched = self.launch_all();
        // End the capture whatever happened, so the stream is usable again.
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .cuda_ctx("ending the decode graph's capture");
        launched?;
        let graph = graph?.ok_or_else(|| Error::Cuda {
            context: "capturing the decode graph",
            msg: "the capture produced no graph".into(),
        })?;
        graph.upload().cuda_ctx("uploading the decode graph")?;
        Ok(graph)
    }

    /// Launches the step's kernels on the engine's stream.
    fn launch_all(&self) -> Result<()> {
        for l in &self.launches {
            self.launch_one(l, true)?;
        }
        Ok(())
    }

    /// Launches one kernel of the step on the engine's stream, with programmatic stream
    /// serialisation where the launch allows it and `pdl` asks for it.
    fn launch_one(&self, l: &Launch, pdl: bool) -> Result<()> {
        let mut params: Vec<*mut std::ffi::c_void> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::Ptr(v) => v as *const u64 as *mut std::ffi::c_void,
                Arg::I32(v) => v as *const i32 as *mut std::ffi::c_void,
                Arg::I64(v) => v as *const i64 as *mut std::ffi::c_void,
                Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
            })
            .collect();
        // SAFETY: CUlaunchAttribute is plain data (an id and a union of integers); all
        // zeros is a valid value, then the id and its field are set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: l.grid.0,
            gridDimY: l.grid.1,
            gridDimZ: 1,
            blockDimX: l.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: l.smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl && l.pdl),
        };
        self.stream
            .context()
            .bind_to_thread()
            .cuda_ctx("binding the decode engine's context")?;
        // SAFETY: each launch's arguments match its kernel's signature in decode.cu or
        // argmax.cu (pointers as 64-bit addresses, `int`, `long long`, `float`), as built in
        // `new`; `params` points at them (in `self.launches`, alive for the call) in order.
        // Every pointer is the address of a live tensor held in `_keep` (weights, the
        // cache's tensors, the engine's buffers), sized for what the kernel addresses: the
        // gemv reads n rows of k and writes n outputs; the RoPE/append kernel writes cache
        // row `pos` < max_len (checked on the host before every step); the attention reads
        // rows 0..=pos and writes its workspace of kv_heads x chunks x G rows; the argmax
        // writes `parts` pairs, the token and the position. Grid, block and dynamic shared
        // memory respect the kernels' launch bounds and the 48 KiB default (checked by
        // `unsupported`). A launch marked `pdl` is of a decode.cu kernel that calls
        // `griddepcontrol.wait` before touching anything but weights. `cfg` and `attr`
        // outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                self.rt.function(l.kernel).cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .cuda_ctx("launching a decode engine kernel")?;
        Ok(())
    }

    pub(super) fn uses_graph(&self) -> bool {
        self.graph.is_some()
    }

    pub(super) fn position(&self) -> usize {
        self.pos
    }

    /// Refuses a cache other than the one the engine was built for.
    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        if cache_ptr(cache, &self.stream)? != self.cache_ptr {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "the cache is not the one the engine was built for".into(),
            });
        }
        Ok(())
    }

    pub(super) fn start(&mut self, token: u32, cache: &KvCache) -> Result<()> {
        self.check_cache(cache)?;
        if token as usize >= self.vocab {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("token id {token} out of the vocabulary ({})", self.vocab),
            });
        }
        let pos = cache.len();
        let host_token = [token];
        let host_pos = [pos as u32];
        self.event
            .record(self.rt.stream())
            .cuda_ctx("recording Candle's stream")?;
        self.stream
            .wait(&self.event)
            .cuda_ctx("waiting for Candle's stream")?;
        // SAFETY: token_ptr and pos_ptr address live 4-byte device buffers (held in
        // `_keep`); the host arrays outlive the copies, which complete before the
        // synchronisation below returns; no step is in flight (each one synchronises).
        unsafe {
            result::memcpy_htod_async(self.token_ptr, &host_token, self.stream.cu_stream())
                .cuda_ctx("setting the decode engine's token")?;
            result::memcpy_htod_async(self.pos_ptr, &host_pos, self.stream.cu_stream())
                .cuda_ctx("setting the decode engine's position")?;
        }
        self.stream
            .synchronize()
            .cuda_ctx("synchronizing the decode engine")?;
        self.pos = pos;
        self.started = true;
        Ok(())
    }

    pub(super) fn step(&mut self, cache: &mut KvCache) -> Result<u32> {
        self.step_with(cache, false).map(|(t, _)| t)
    }

    pub(super) fn profile_step(&mut self, cache: &mut KvCache) -> Result<(u32, Vec<LaunchTime>)> {
        self.step_with(cache, true)
    }

    /// Queues the step's launches behind a spin kernel, each between two timing events;
    /// returns the events (launch i runs between events i and i + 1).
    fn launch_timed(&self) -> Result<Vec<CudaEvent>> {
        let ctx = self.stream.context();
        let events = (0..self.launches.len() + 2)
            .map(|_| ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .cuda_ctx("creating the profiler's events")?;
        // Long enough for the host to queue every launch (a few microseconds each).
        let spin = |ns: u64| -> Result<()> {
            let mut lb = self
                .stream
                .launch_builder(self.rt.function(Kernel::DecodeSpin));
            lb.arg(&ns);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: decode_spin takes one `unsigned long long` and touches no memory.
            unsafe { lb.launch(cfg) }.cuda_ctx("launching the profiler's spin kernel")?;
            Ok(())
        };
        spin(10_000 * self.launches.len() as u64)?;
        for (l, ev) in self.launches.iter().zip(&events) {
            ev.record(&self.stream)
                .cuda_ctx("recording a profiler event")?;
            self.launch_one(l, false)?;
        }
        // Last, an empty kernel: what a launch between two events costs by itself.
        let n = self.launches.len();
        events[n]
            .record(&self.stream)
            .cuda_ctx("recording a profiler event")?;
        spin(0)?;
        events[n + 1]
            .record(&self.stream)
            .cuda_ctx("recording a profiler event")?;
        Ok(events)
    }

    fn step_with(&mut self, cache: &mut KvCache, profile: bool) -> Result<(u32, Vec<LaunchTime>)> {
        if !self.started {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "step before start: no token to feed".into(),
            });
        }
        self.check_cache(cache)?;
        if cache.len() != self.pos {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "the cache holds {} positions, the engine expects {}: call start again",
                    cache.len(),
                    self.pos
                ),
            });
        }
        if self.pos >= self.max_len {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "cache full: position {} >= max_len {}",
                    self.pos, self.max_len
                ),
            });
        }
        if self.pos >= self.table_len {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "position {} is past the RoPE table ({} positions)",
                    self.pos, self.table_len
                ),
            });
        }
        self.event
            .record(self.rt.stream())
            .cuda_ctx("recording Candle's stream")?;
        self.stream
            .wait(&self.event)
            .cuda_ctx("waiting for Candle's stream")?;
        let events = if profile {
            Some(self.launch_timed()?)
        } else {
            match &self.graph {
                Some(g) => g.launch().cuda_ctx("launching the decode graph")?,
                None => self.launch_all()?,
            }
            None
        };
        let mut host = [0u32];
        // SAFETY: token_ptr addresses a live 4-byte device buffer; `host` outlives the copy,
        // which completes before the synchronisation below returns.
        unsafe {
            result::memcpy_dtoh_async(&mut host, self.token_ptr, self.stream.cu_stream())
                .cuda_ctx("copying the decode engine's token")?;
        }
        self.stream
            .synchronize()
            .cuda_ctx("synchronizing the decode engine")?;
        // The step wrote position `pos` of every layer.
        cache.advance(1);
        self.pos += 1;
        let mut times = Vec::new();
        if let Some(ev) = events {
            for (i, l) in self.launches.iter().enumerate() {
                let ms = ev[i]
                    .elapsed_ms(&ev[i + 1])
                    .cuda_ctx("reading a profiler event")?;
                times.push(LaunchTime {
                    name: l.name,
                    n: l.n,
                    k: l.k,
                    bytes: l.n * l.k * self.elem,
                    us: ms as f64 * 1e3,
                });
            }
            let n = self.launches.len();
            let ms = ev[n]
                .elapsed_ms(&ev[n + 1])
                .cuda_ctx("reading a profiler event")?;
            times.push(LaunchTime {
                name: EMPTY_KERNEL,
                n: 0,
                k: 0,
                bytes: 0,
                us: ms as f64 * 1e3,
            });
        }
        let t = host[0];
        if t as usize >= self.vocab {
            self.started = false;
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "the logits have no maximum (all NaN)".into(),
            });
        }
        Ok((t, times))
    }

    pub(super) fn logits(&self) -> Result<Tensor> {
        Ok(self.logits.copy()?)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Nothing of the engine's may still run when its buffers go back to Candle's pool.
        let _ = self.stream.synchronize();
    }
}
