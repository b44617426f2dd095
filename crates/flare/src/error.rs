//! The one error type of the flare library.
//!
//! Every fallible function in flare returns [`Result`]. Variants carry the op, the shapes and
//! the dtypes involved, so that a message names what was wrong without a debugger. Errors from
//! Candle are wrapped unchanged.

use candle_core::DType;

/// The result type of the flare library.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in flare.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- shapes, dtypes, devices -------------------------------------------------------------
    /// A tensor has fewer dimensions than the op needs.
    #[error("{op}: expected a tensor of rank >= {min}, got shape {shape:?}")]
    Rank {
        /// The op that refused the input.
        op: &'static str,
        /// The smallest rank the op accepts.
        min: usize,
        /// The shape it was given.
        shape: Vec<usize>,
    },
    /// Two inputs have shapes that do not fit together.
    #[error("{op}: {msg}: {lhs:?} and {rhs:?}")]
    ShapeMismatch {
        /// The op that refused the input.
        op: &'static str,
        /// What does not fit.
        msg: &'static str,
        /// The first shape.
        lhs: Vec<usize>,
        /// The second shape.
        rhs: Vec<usize>,
    },
    /// The op has no implementation for this dtype on this device.
    #[error("{op}: unsupported dtype {dtype:?} on {device}")]
    UnsupportedDType {
        /// The op that refused the input.
        op: &'static str,
        /// The dtype it was given.
        dtype: DType,
        /// The device, as text (`cpu`, `cuda:0`, ...).
        device: String,
    },
    /// Two inputs that must share a dtype do not.
    #[error("{op}: dtype mismatch: {lhs:?} and {rhs:?}")]
    DTypeMismatch {
        /// The op that refused the input.
        op: &'static str,
        /// The first dtype.
        lhs: DType,
        /// The second dtype.
        rhs: DType,
    },
    /// Two inputs that must be on one device are not.
    #[error("{op}: inputs are on different devices: {lhs} and {rhs}")]
    DeviceMismatch {
        /// The op that refused the input.
        op: &'static str,
        /// The first device.
        lhs: String,
        /// The second device.
        rhs: String,
    },
    /// An argument is out of its valid range (a negative epsilon, say).
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument {
        /// The op that refused the argument.
        op: &'static str,
        /// What is wrong with it.
        msg: String,
    },

    /// A line of a training data file is malformed (bad JSON, missing or mistyped fields).
    #[error("{file}:{line}: {msg}")]
    Data {
        /// The data file.
        file: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        msg: String,
    },

    // ---- training runs ----------------------------------------------------------------------
    /// A checkpoint belongs to another run than the one being resumed.
    #[error(
        "cannot resume from {checkpoint}: it belongs to another run: {}. Resume with the \
         checkpoint's settings and inputs, or start a new run in another output directory",
        differences.join("; ")
    )]
    RunMismatch {
        /// The checkpoint directory.
        checkpoint: String,
        /// Each field that differs, with both values.
        differences: Vec<String>,
    },
    /// A fresh run was pointed at an output directory that holds another run.
    #[error(
        "output directory {dir} already holds a training run ({holds}): resume it (flare train \
         --resume), or use another output directory (or delete this one)"
    )]
    OutputDirInUse {
        /// The output directory.
        dir: String,
        /// What it holds.
        holds: String,
    },
    /// A training step produced a non-finite loss or gradient norm.
    #[error(
        "step {step}: the loss is {loss} and the gradient norm {grad_norm}: training stopped \
         before this step's update, so the adapter and the last checkpoint keep finite \
         weights (lower the learning rate, or check the model's weights and the data)"
    )]
    NonFinite {
        /// The step that failed (1-based).
        step: u64,
        /// Its loss.
        loss: f64,
        /// Its global gradient norm.
        grad_norm: f64,
    },

    // ---- data-parallel training ---------------------------------------------------------------
    /// Data-parallel training could not start or go on: a bad world description in the
    /// environment (`RANK`, `WORLD_SIZE`, ...), a failed rendezvous, a build or device without
    /// NCCL, or a failed collective ([`crate::train::distributed`]).
    #[error("data-parallel training: {msg}")]
    Distributed {
        /// What went wrong, naming the variable, address or rank concerned.
        msg: String,
    },

    // ---- runtime ----------------------------------------------------------------------------
    /// A CUDA driver, cuBLASLt or kernel-launch call failed.
    #[error("CUDA: {context}: {msg}")]
    Cuda {
        /// What flare was doing.
        context: &'static str,
        /// The error the CUDA layer reported.
        msg: String,
    },

    /// A training run would need more memory than the device has available (the rough
    /// estimate of [`crate::train::memory`]).
    #[error(
        "not enough memory on {device}: the run needs about {needed} ({detail}), {available} is \
         available; lower lora_r, batch_size or max_seq_len, train fewer target_modules, or use \
         dtype bf16"
    )]
    OutOfMemory {
        /// The device, as text.
        device: String,
        /// The estimate, as text (`21.70 GiB`).
        needed: String,
        /// The memory available, as text.
        available: String,
        /// The estimate by part.
        detail: String,
    },

    // ---- wrapped ----------------------------------------------------------------------------
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error, with the path or action it concerned.
    #[error("{context}: {source}")]
    Io {
        /// The file or action concerned.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Turns a flare error into a Candle error, for code that must return Candle's result type
    /// (custom-op callbacks). [`Error::Candle`] is unwrapped rather than wrapped twice.
    pub fn into_candle(self) -> candle_core::Error {
        match self {
            Error::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Describes a device the way error messages name it.
pub(crate) fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Shorthand of the CUDA layer: maps any `Debug` error into [`Error::Cuda`] with a context.
#[cfg(feature = "cuda")]
pub(crate) trait CudaResultExt<T> {
    /// Attaches `context` to a CUDA-layer error.
    fn cuda_ctx(self, context: &'static str) -> Result<T>;
}

#[cfg(feature = "cuda")]
impl<T, E: std::fmt::Debug> CudaResultExt<T> for std::result::Result<T, E> {
    fn cuda_ctx(self, context: &'static str) -> Result<T> {
        self.map_err(|e| Error::Cuda {
            context,
            msg: format!("{e:?}"),
        })
    }
}
