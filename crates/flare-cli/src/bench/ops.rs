//! `flare bench ops`: times flare's ops against Candle's equivalents in one process, on the
//! same random inputs, with the same method for both sides.
//!
//! The harness is deliberately plain (see [`OPS_LONG_ABOUT`] for the user-facing description):
//! warm-up, then per repeat a device synchronisation, the clock, a back-to-back burst of `N`
//! calls, a second synchronisation and the clock again; the per-call time is the burst time
//! divided by `N`, and the reported figure is the median over repeats. `N` is chosen per case so
//! that a timed region is long against the synchronisation's own latency (and is at least the
//! case's minimum burst, which is large for the dispatch-bound cases). Inputs rotate through
//! several sets when one set fits in the last-level cache, so that cache is not what is measured.
//! flare and Candle alternate repeat by repeat (and swap who goes first) so that clock and
//! thermal drift hit both alike.
//!
//! The pure parts (median, rates, the table, the JSON rows, the case list) are unit-tested
//! below; the rest needs a device.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use clap::Args;
use serde::Serialize;

use super::{input_sets, matches_filter, Budget, Call, Config, Pass};
use crate::device::{hardware_name, DeviceSpec};
use crate::report::{fmt_num, json_dir, median, write_json};

/// The long help of `flare bench ops`.
pub const OPS_LONG_ABOUT: &str = "\
Time flare's ops against Candle's equivalents, in the same process, on the same random inputs.

Pairs timed (flare | Candle):
  matmul        flare::ops::matmul              | Tensor::matmul
  softmax       flare::ops::softmax_last_dim    | candle_nn::ops::softmax_last_dim
  rms_norm      flare::ops::rms_norm            | candle_nn::ops::rms_norm
  add_rms_norm  flare::ops::add_rms_norm        | (x + r), then candle_nn::ops::rms_norm
  copy          raw memcpy (CUDA: dtod)         | Tensor::copy  (the bandwidth reference)
  flash_attention  flare::ops::flash_attention  | composed attention from Candle ops (CUDA only)
fwd+bwd rows run forward then `.backward()` from the output (Candle seeds it with ones) on Vars
(every input is a Var: x and the weight for the norms, both operands for matmul). Candle's
fused softmax/rms_norm have no backward, so its side uses composites there:
candle_nn::ops::softmax(x, -1) and x * (mean(x^2, -1) + eps)^-1/2 * w computed in f32.

Method: warm-up (every input set once, then whole bursts), then per repeat: synchronise the
device, start the clock, run a burst of N back-to-back calls, synchronise, stop the clock;
per-call time = burst time / N; the table shows the median over repeats. N is large for the
dispatch-bound cases (64x64, 64^3) and otherwise chosen so that a burst lasts ~2 ms on CUDA
(~5 ms on CPU). When one input set fits in L2 (50 MB on H100), calls rotate through several
sets. Inputs are random normal, never zeros. flare and Candle alternate repeat by repeat.
Before timing, each case compares flare's output (or input gradients, under a random upstream
gradient) with Candle's side run on the same inputs in f32, and reports the max difference
relative to the reference's max magnitude ('check': ok, or DIFF above 1e-3 for f32, 2e-2 for
tf32, 3e-2 for bf16).

flare's runtime is created before any input, so on CUDA both sides run with cudarc's
per-allocation event tracking off (flare's default; FLARE_CUDA_EVENT_TRACKING=1 keeps it on).

flash_attention (CUDA only; on the CPU its rows are skipped with a note): causal bf16 over a
padded batch B x T with H query heads, KV key/value heads and head dim D, at the shapes of issue
13 (B8 H14 T1024 D64, B2 H14 T4096 D64, B1 H32/KV8 T8192 D128; --quick: the first). flare runs
cu/flash_attention.cu (forward; fwd+bwd: forward, bwd_pre, bwd, convert). Candle's side is
attention composed from Candle ops (K/V repeated to H heads, q k^T, scale, a -inf causal mask,
softmax, p v; fwd uses candle_nn::ops::softmax_last_dim, fwd+bwd the composite softmax), with
the whole [B, H, T, T] score matrix in memory. Its check runs the composed side in f32, and is
skipped ('-') where those f32 scores would exceed 4 GiB.

Rates: matmul in TFLOP/s, counting 2*m*n*k per product (fwd+bwd: 3 products, 6*m*n*k).
flash_attention in TFLOP/s as FlashAttention counts it: fwd 4*B*H*T^2*D/2 (causal: half the
scores), fwd+bwd 3.5x that.
Memory-bound ops in GB/s (1e9 bytes/s), counting each input read once and each output written
once (N = rows*cols elements, H = cols, times the dtype's size):
  softmax fwd 2N, fwd+bwd 5N (y, dy read; dx written)
  rms_norm fwd 2N+H, fwd+bwd 5N+3H (x, w, dy read; dx, dw written)
  add_rms_norm fwd 4N+H (x, r, w read; y, x+r written), fwd+bwd 7N+3H
  copy 2x the buffer (read + write)
On CUDA, '% copy' is a row's rate as a fraction of the raw memcpy bandwidth measured in the
same run.

Columns: op, shape (matmul: m x k x n), dtype ('tf32' is f32 with TF32 allowed on both sides;
plain f32 matmul has TF32 off on both), pass, flare us, candle us, candle/flare (>1: flare is
faster), rates, % copy, and the correctness check. The table is printed when all cases are
done; progress goes to stderr. A failing case is reported and the others still run (exit
status 1 at the end).

Examples:
  flare bench ops --quick
  flare bench ops --device cuda --json ops.json
  flare bench ops --device cuda:1 --filter 'softmax,rms_norm' --repeats 50
  flare bench ops --device cuda --list";

/// Arguments of `flare bench ops`.
#[derive(Debug, Args)]
pub struct OpsArgs {
    /// Device to run on: cpu, cuda (= cuda:0) or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,

    /// Also write the results as a JSON list of rows to PATH (atomically: temp file, fsync,
    /// rename).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Much smaller shapes and fewer repeats (a smoke test: a few seconds on CPU).
    #[arg(long)]
    pub quick: bool,

    /// Run only the cases whose label ("op shape dtype pass", e.g. "softmax 8192x8192 bf16
    /// fwd") contains SUBSTR, case-insensitively; a comma-separated list matches any of them.
    #[arg(long, value_name = "SUBSTR")]
    pub filter: Option<String>,

    /// Timed repeats per case and side [default: 25 on CUDA, 10 on CPU, 5 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: Option<u32>,

    /// Print the labels of the cases that would run (after --filter) and exit, without
    /// opening the device.
    #[arg(long)]
    pub list: bool,
}

// ---- cases --------------------------------------------------------------------------------------

/// Element type of a case. `Tf32` is f32 data with TF32 tensor cores allowed on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prec {
    /// f32, TF32 off.
    F32,
    /// f32 with TF32 allowed (matmul only).
    Tf32,
    /// bfloat16.
    Bf16,
}

impl Prec {
    /// The tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            Prec::F32 | Prec::Tf32 => DType::F32,
            Prec::Bf16 => DType::BF16,
        }
    }

    /// The label in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Prec::F32 => "f32",
            Prec::Tf32 => "tf32",
            Prec::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.dtype().size_in_bytes()
    }

    /// Largest accepted difference between flare and Candle, relative to Candle's max
    /// magnitude.
    fn tolerance(self) -> f64 {
        match self {
            Prec::F32 => 1e-3,
            Prec::Tf32 => 2e-2,
            Prec::Bf16 => 3e-2,
        }
    }
}

/// What a case computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Device-to-device copy of a buffer of this many bytes.
    Copy {
        /// Buffer size in bytes.
        bytes: usize,
    },
    /// `[m, k] @ [k, n]`.
    Matmul {
        /// Rows of the output.
        m: usize,
        /// The inner dimension.
        k: usize,
        /// Columns of the output.
        n: usize,
    },
    /// Softmax over the last dim of `[rows, cols]`.
    Softmax {
        /// Rows.
        rows: usize,
        /// Length of the reduced dim.
        cols: usize,
    },
    /// RMSNorm over the last dim of `[rows, cols]` with a `[cols]` weight.
    RmsNorm {
        /// Rows.
        rows: usize,
        /// Length of the normalised dim.
        cols: usize,
    },
    /// `h = x + r`, `y = rms_norm(h)`, both returned.
    AddRmsNorm {
        /// Rows.
        rows: usize,
        /// Length of the normalised dim.
        cols: usize,
    },
    /// Causal attention over a padded batch, packed `[b * t, heads, d]`.
    FlashAttention {
        /// Sequences.
        b: usize,
        /// Query heads.
        hq: usize,
        /// Key / value heads.
        hkv: usize,
        /// Sequence length.
        t: usize,
        /// Head dim.
        d: usize,
    },
}

/// What a case's rate counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Work {
    /// Floating-point operations per call (rate in TFLOP/s).
    Flops(f64),
    /// Bytes moved per call (rate in GB/s).
    Bytes(f64),
}

impl Work {
    /// The rate of one call taking `us` microseconds, in the unit of [`Work::unit`].
    pub fn rate(self, us: f64) -> f64 {
        if us.is_nan() || us <= 0.0 {
            return f64::NAN;
        }
        match self {
            Work::Flops(f) => f / (us * 1e-6) / 1e12,
            Work::Bytes(b) => b / (us * 1e-6) / 1e9,
        }
    }

    /// `TFLOP/s` or `GB/s`.
    pub fn unit(self) -> &'static str {
        match self {
            Work::Flops(_) => "TFLOP/s",
            Work::Bytes(_) => "GB/s",
        }
    }
}

/// One benchmark case: an op, a precision, a pass, and the smallest burst to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// What is computed.
    pub op: Op,
    /// Element type.
    pub prec: Prec,
    /// Forward or forward+backward.
    pub pass: Pass,
    /// Smallest number of back-to-back calls per timed region (large for dispatch-bound cases).
    pub min_burst: usize,
}

/// Formats a byte count as `16MiB`, `1GiB`, or plain bytes.
pub fn fmt_bytes(b: usize) -> String {
    const GIB: usize = 1 << 30;
    const MIB: usize = 1 << 20;
    if b >= GIB && b % GIB == 0 {
        format!("{}GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{}MiB", b / MIB)
    } else {
        format!("{b}B")
    }
}

impl Case {
    const fn new(op: Op, prec: Prec, pass: Pass) -> Case {
        Case {
            op,
            prec,
            pass,
            min_burst: 1,
        }
    }

    const fn burst(mut self, n: usize) -> Case {
        self.min_burst = n;
        self
    }

    /// The op's name in tables and JSON.
    pub fn op_name(&self) -> &'static str {
        match self.op {
            Op::Copy { .. } => "copy",
            Op::Matmul { .. } => "matmul",
            Op::Softmax { .. } => "softmax",
            Op::RmsNorm { .. } => "rms_norm",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::FlashAttention { .. } => "flash_attention",
        }
    }

    /// The shape label: `m x k x n` for matmul, `rows x cols` for row ops, a size for copy.
    pub fn shape(&self) -> String {
        match self.op {
            Op::Copy { bytes } => fmt_bytes(bytes),
            Op::Matmul { m, k, n } => format!("{m}x{k}x{n}"),
            Op::Softmax { rows, cols }
            | Op::RmsNorm { rows, cols }
            | Op::AddRmsNorm { rows, cols } => format!("{rows}x{cols}"),
            Op::FlashAttention { b, hq, hkv, t, d } if hq == hkv => {
                format!("B{b}.H{hq}.T{t}.D{d}")
            }
            Op::FlashAttention { b, hq, hkv, t, d } => format!("B{b}.H{hq}/KV{hkv}.T{t}.D{d}"),
        }
    }

    /// `op shape dtype pass`, what `--filter` matches against.
    pub fn label(&self) -> String {
        format!(
            "{} {} {} {}",
            self.op_name(),
            self.shape(),
            self.prec.label(),
            self.pass.label()
        )
    }

    /// The work one call does, for the rate column (see [`OPS_LONG_ABOUT`] for the counts).
    pub fn work(&self) -> Work {
        let s = self.prec.size() as f64;
        let bwd = self.pass == Pass::FwdBwd;
        match self.op {
            Op::Copy { bytes } => Work::Bytes(2.0 * bytes as f64),
            Op::Matmul { m, k, n } => {
                let f = 2.0 * m as f64 * n as f64 * k as f64;
                Work::Flops(if bwd { 3.0 * f } else { f })
            }
            Op::Softmax { rows, cols } => {
                let n = (rows * cols) as f64;
                Work::Bytes(if bwd { 5.0 } else { 2.0 } * n * s)
            }
            Op::RmsNorm { rows, cols } => {
                let (n, h) = ((rows * cols) as f64, cols as f64);
                Work::Bytes(if bwd { 5.0 * n + 3.0 * h } else { 2.0 * n + h } * s)
            }
            Op::AddRmsNorm { rows, cols } => {
                let (n, h) = ((rows * cols) as f64, cols as f64);
                Work::Bytes(if bwd { 7.0 * n + 3.0 * h } else { 4.0 * n + h } * s)
            }
            Op::FlashAttention { b, hq, t, d, .. } => {
                // 4 B H T^2 D for the two products, halved by the causal mask.
                let f = 4.0 * (b * hq * d) as f64 * (t as f64).powi(2) / 2.0;
                Work::Flops(if bwd { 3.5 * f } else { f })
            }
        }
    }

    /// Bytes of one input set plus the outputs of one call, to decide on rotation.
    pub fn footprint(&self) -> usize {
        let s = self.prec.size();
        let bwd = if self.pass == Pass::FwdBwd { 2 } else { 1 };
        match self.op {
            Op::Copy { bytes } => 2 * bytes,
            Op::Matmul { m, k, n } => (m * k + k * n + m * n) * s * bwd,
            Op::Softmax { rows, cols } => 2 * rows * cols * s * bwd,
            Op::RmsNorm { rows, cols } => (2 * rows * cols + cols) * s * bwd,
            Op::AddRmsNorm { rows, cols } => (4 * rows * cols + cols) * s * bwd,
            // q, k, v, o (and their gradients).
            Op::FlashAttention { b, hq, hkv, t, d } => b * t * (2 * hq + 2 * hkv) * d * s * bwd,
        }
    }
}

/// The cases for a device; `cuda` picks the GPU shapes, `quick` the smoke-test ones.
pub fn cases(cuda: bool, quick: bool) -> Vec<Case> {
    use Op::*;
    use Pass::{Fwd, FwdBwd};
    use Prec::{Bf16, Tf32, F32};
    let c = Case::new;
    let mm = |m, k, n| Matmul { m, k, n };
    let sm = |rows, cols| Softmax { rows, cols };
    let rn = |rows, cols| RmsNorm { rows, cols };
    let arn = |rows, cols| AddRmsNorm { rows, cols };
    let fa = |b, hq, hkv, t, d| FlashAttention { b, hq, hkv, t, d };
    match (cuda, quick) {
        (true, false) => vec![
            c(Copy { bytes: 1 << 30 }, F32, Fwd),
            c(mm(64, 64, 64), Bf16, Fwd).burst(200),
            c(mm(1024, 1024, 1024), Bf16, Fwd).burst(20),
            c(mm(4096, 4096, 4096), Bf16, Fwd),
            c(mm(4096, 4096, 4096), F32, Fwd),
            c(mm(4096, 4096, 4096), Tf32, Fwd),
            c(sm(8192, 8192), F32, Fwd),
            c(sm(8192, 8192), Bf16, Fwd),
            c(rn(8192, 8192), F32, Fwd),
            c(rn(8192, 8192), Bf16, Fwd),
            c(arn(8192, 8192), Bf16, Fwd),
            c(sm(64, 64), F32, Fwd).burst(200),
            c(rn(64, 64), F32, Fwd).burst(200),
            c(mm(4096, 4096, 4096), Bf16, FwdBwd),
            c(sm(4096, 4096), F32, FwdBwd),
            c(sm(4096, 4096), Bf16, FwdBwd),
            c(rn(4096, 4096), F32, FwdBwd),
            c(rn(4096, 4096), Bf16, FwdBwd),
            c(arn(4096, 4096), Bf16, FwdBwd),
            c(fa(8, 14, 14, 1024, 64), Bf16, Fwd),
            c(fa(2, 14, 14, 4096, 64), Bf16, Fwd),
            c(fa(1, 32, 8, 8192, 128), Bf16, Fwd),
            c(fa(8, 14, 14, 1024, 64), Bf16, FwdBwd),
            c(fa(2, 14, 14, 4096, 64), Bf16, FwdBwd),
            c(fa(1, 32, 8, 8192, 128), Bf16, FwdBwd),
        ],
        (true, true) => vec![
            c(Copy { bytes: 256 << 20 }, F32, Fwd),
            c(mm(64, 64, 64), Bf16, Fwd).burst(100),
            c(mm(1024, 1024, 1024), Bf16, Fwd).burst(10),
            c(sm(2048, 2048), F32, Fwd),
            c(rn(2048, 2048), Bf16, Fwd),
            c(arn(2048, 2048), Bf16, Fwd),
            c(sm(64, 64), F32, Fwd).burst(100),
            c(rn(64, 64), F32, Fwd).burst(100),
            c(sm(1024, 1024), F32, FwdBwd),
            c(rn(1024, 1024), Bf16, FwdBwd),
            c(fa(8, 14, 14, 1024, 64), Bf16, Fwd),
            c(fa(8, 14, 14, 1024, 64), Bf16, FwdBwd),
        ],
        (false, false) => vec![
            c(Copy { bytes: 64 << 20 }, F32, Fwd),
            c(mm(64, 64, 64), F32, Fwd).burst(20),
            c(mm(512, 512, 512), F32, Fwd),
            c(sm(1024, 4096), F32, Fwd),
            c(sm(1024, 4096), Bf16, Fwd),
            c(rn(1024, 4096), F32, Fwd),
            c(rn(1024, 4096), Bf16, Fwd),
            c(arn(1024, 4096), F32, Fwd),
            c(sm(64, 64), F32, Fwd).burst(50),
            c(rn(64, 64), F32, Fwd).burst(50),
            c(mm(256, 256, 256), F32, FwdBwd),
            c(sm(1024, 4096), F32, FwdBwd),
            c(rn(1024, 4096), F32, FwdBwd),
            c(arn(1024, 4096), F32, FwdBwd),
        ],
        (false, true) => vec![
            c(Copy { bytes: 16 << 20 }, F32, Fwd),
            c(mm(64, 64, 64), F32, Fwd).burst(10),
            c(mm(128, 128, 128), F32, Fwd),
            c(sm(256, 1024), F32, Fwd),
            c(sm(256, 1024), Bf16, Fwd),
            c(rn(256, 1024), F32, Fwd),
            c(arn(256, 1024), F32, Fwd),
            c(sm(64, 64), F32, Fwd).burst(20),
            c(rn(64, 64), F32, Fwd).burst(20),
            c(mm(128, 128, 128), F32, FwdBwd),
            c(sm(256, 1024), F32, FwdBwd),
            c(rn(256, 1024), F32, FwdBwd),
            c(arn(256, 1024), F32, FwdBwd),
        ],
    }
}

// ---- statistics, rows, table, JSON --------------------------------------------------------------

/// One result row, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// `matmul`, `softmax`, `rms_norm`, `add_rms_norm` or `copy`.
    pub op: String,
    /// See [`Case::shape`].
    pub shape: String,
    /// `f32`, `tf32` or `bf16`.
    pub dtype: String,
    /// `fwd` or `fwd+bwd`.
    pub pass: String,
    /// Median microseconds per call, flare.
    pub flare_us: f64,
    /// Median microseconds per call, Candle.
    pub candle_us: f64,
    /// `candle_us / flare_us` (above 1: flare is faster).
    pub ratio: f64,
    /// flare's rate at its median time.
    pub flare_rate: f64,
    /// Candle's rate at its median time.
    pub candle_rate: f64,
    /// `TFLOP/s` or `GB/s`.
    pub rate_unit: String,
    /// flare's rate in percent of the copy bandwidth of the same run (memory-bound rows on CUDA).
    pub flare_pct_copy: Option<f64>,
    /// Candle's rate in percent of the copy bandwidth.
    pub candle_pct_copy: Option<f64>,
    /// Fastest repeat, flare.
    pub flare_min_us: f64,
    /// Fastest repeat, Candle.
    pub candle_min_us: f64,
    /// Max |flare - reference| over max |reference|, the reference being Candle's side run on
    /// the same inputs in f32 (outputs, or input gradients for fwd+bwd).
    pub check_rel_diff: Option<f64>,
    /// Whether that difference is within the dtype's tolerance.
    pub check_ok: Option<bool>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The hardware (GPU name, or CPU thread count).
    pub device_name: String,
    /// Timed repeats per side.
    pub repeats: usize,
    /// Calls per timed region.
    pub burst: usize,
    /// Input sets rotated through.
    pub input_sets: usize,
    /// What the flare column times.
    pub flare_impl: String,
    /// What the Candle column times.
    pub candle_impl: String,
}

/// Fills the `% copy` fields of the memory-bound rows from the copy row's flare (raw memcpy)
/// rate. Does nothing without a copy row.
pub fn fill_pct_copy(rows: &mut [Row]) {
    let Some(copy) = rows
        .iter()
        .find(|r| r.op == "copy")
        .map(|r| r.flare_rate)
        .filter(|r| r.is_finite() && *r > 0.0)
    else {
        return;
    };
    for r in rows.iter_mut().filter(|r| r.rate_unit == "GB/s") {
        r.flare_pct_copy = Some(100.0 * r.flare_rate / copy);
        r.candle_pct_copy = Some(100.0 * r.candle_rate / copy);
    }
}

/// The results as an aligned text table (numbers right-aligned). The `% copy` columns appear
/// only when some row has them.
pub fn format_table(rows: &[Row]) -> String {
    let with_pct = rows.iter().any(|r| r.flare_pct_copy.is_some());
    let mut header = vec![
        "op",
        "shape",
        "dtype",
        "pass",
        "flare us",
        "candle us",
        "candle/flare",
        "flare rate",
        "candle rate",
        "unit",
    ];
    if with_pct {
        header.extend(["flare %copy", "candle %copy"]);
    }
    header.push("check");
    let pct = |p: Option<f64>| p.map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v = vec![
                r.op.clone(),
                r.shape.clone(),
                r.dtype.clone(),
                r.pass.clone(),
                fmt_num(r.flare_us),
                fmt_num(r.candle_us),
                if r.ratio.is_finite() {
                    format!("{:.2}x", r.ratio)
                } else {
                    "-".into()
                },
                fmt_num(r.flare_rate),
                fmt_num(r.candle_rate),
                r.rate_unit.clone(),
            ];
            if with_pct {
                v.push(pct(r.flare_pct_copy));
                v.push(pct(r.candle_pct_copy));
            }
            v.push(match (r.check_ok, r.check_rel_diff) {
                (Some(true), _) => "ok".into(),
                (Some(false), Some(d)) => format!("DIFF {d:.1e}"),
                _ => "-".into(),
            });
            v
        })
        .collect();
    let ncol = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &body {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    // Text columns (op, shape, dtype, pass, unit, check) left-aligned, numbers right-aligned.
    let left = |i: usize| i < 4 || header[i] == "unit" || header[i] == "check";
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if left(i) {
                let _ = write!(s, "{cell:<w$}", w = width[i]);
            } else {
                let _ = write!(s, "{cell:>w$}", w = width[i]);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(
        &mut out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    let rule: Vec<String> = (0..ncol).map(|i| "-".repeat(width[i])).collect();
    line(&mut out, &rule);
    for row in &body {
        line(&mut out, row);
    }
    out
}

// ---- the harness --------------------------------------------------------------------------------

/// Per-case budget of `bench ops`.
const OPS_CASE_BUDGET: Budget = [0.5, 5.0, 4.0];

/// A case ready to time: both sides' calls over their input sets, and the check result.
struct Prepared {
    sets: usize,
    flare: Call,
    candle: Call,
    flare_impl: &'static str,
    candle_impl: &'static str,
    check: Option<f64>,
    /// Undoes global settings made for the case (TF32), run when the case is done.
    restore: Option<Box<dyn FnOnce()>>,
}

const EPS: f32 = 1e-6;

fn randn(dev: &Device, shape: &[usize], dt: DType) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(dt)?)
}

/// Max |a - b| over max |b|, in f32; infinite when either holds a NaN or an infinity.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    let finite =
        |t: &Tensor| -> Result<bool> { Ok(t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite()) };
    if !finite(&a)? || !finite(&b)? {
        return Ok(f64::INFINITY);
    }
    let num = (&a - &b)?.abs()?.max(0)?.to_scalar::<f32>()? as f64;
    let den = b.abs()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(num / den.max(1e-30))
}

type Fwd = fn(&[Tensor]) -> Result<Vec<Tensor>>;

/// Candle's composite RMSNorm, computed in f32 (it has a backward, unlike the fused one).
fn candle_rms_norm_composite(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let wf = w.to_dtype(DType::F32)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    Ok(xf.broadcast_mul(&r)?.broadcast_mul(&wf)?.to_dtype(dt)?)
}

mod impls {
    //! The two sides of every op, as plain functions over an input set.
    use super::*;

    pub fn flare_matmul(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![flare::ops::matmul(&t[0], &t[1])?])
    }
    pub fn candle_matmul(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![t[0].matmul(&t[1])?])
    }
    pub fn flare_softmax(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![flare::ops::softmax_last_dim(&t[0])?])
    }
    pub fn candle_softmax(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![candle_nn::ops::softmax_last_dim(&t[0])?])
    }
    pub fn candle_softmax_composite(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![candle_nn::ops::softmax(&t[0], D::Minus1)?])
    }
    pub fn flare_rms_norm(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![flare::ops::rms_norm(&t[0], &t[1], EPS)?])
    }
    pub fn candle_rms_norm(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![candle_nn::ops::rms_norm(&t[0], &t[1], EPS)?])
    }
    pub fn candle_rms_norm_composite(t: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![super::candle_rms_norm_composite(&t[0], &t[1], EPS)?])
    }
    pub fn flare_add_rms_norm(t: &[Tensor]) -> Result<Vec<Tensor>> {
        let (y, h) = flare::ops::add_rms_norm(&t[0], &t[1], &t[2], EPS)?;
        Ok(vec![y, h])
    }
    pub fn candle_add_rms_norm(t: &[Tensor]) -> Result<Vec<Tensor>> {
        let h = (&t[0] + &t[1])?;
        Ok(vec![candle_nn::ops::rms_norm(&h, &t[2], EPS)?, h])
    }
    pub fn candle_add_rms_norm_composite(t: &[Tensor]) -> Result<Vec<Tensor>> {
        let h = (&t[0] + &t[1])?;
        Ok(vec![super::candle_rms_norm_composite(&h, &t[2], EPS)?, h])
    }
}

/// Builds `n` input sets of the given shapes; with `vars`, every input is a `Var` (created here,
/// outside any timed region, since making a Var copies).
fn input_sets_of(
    dev: &Device,
    shapes: &[Vec<usize>],
    dt: DType,
    n: usize,
    vars: bool,
) -> Result<Vec<Vec<Tensor>>> {
    (0..n)
        .map(|_| {
            shapes
                .iter()
                .map(|s| {
                    let t = randn(dev, s, dt)?;
                    Ok(if vars {
                        Var::from_tensor(&t)?.as_tensor().clone()
                    } else {
                        t
                    })
                })
                .collect()
        })
        .collect()
}

/// The inputs of `set` in f32, as Vars when `vars` (the check's reference runs on these).
fn upcast(set: &[Tensor], vars: bool) -> Result<Vec<Tensor>> {
    set.iter()
        .map(|t| {
            let t = t.detach().to_dtype(DType::F32)?;
            Ok(if vars {
                Var::from_tensor(&t)?.as_tensor().clone()
            } else {
                t
            })
        })
        .collect()
}

/// A forward-only pair over shared input sets. The check compares flare's outputs on the first
/// set with Candle's on the same inputs in f32.
fn fwd_pair(sets: Vec<Vec<Tensor>>, flare: Fwd, candle: Fwd) -> Result<(Option<f64>, Call, Call)> {
    let (a, b) = (flare(&sets[0])?, candle(&upcast(&sets[0], false)?)?);
    let mut check = 0f64;
    for (x, y) in a.iter().zip(&b) {
        check = check.max(rel_diff(x, y)?);
    }
    let n = sets.len();
    let s1 = sets.clone();
    let f: Call = Box::new(move |i| {
        flare(&s1[i % n])?;
        Ok(())
    });
    let c: Call = Box::new(move |i| {
        candle(&sets[i % n])?;
        Ok(())
    });
    Ok((Some(check), f, c))
}

/// Gradients of `sum(out[0] * g)` with respect to every input of the set.
fn grads_with(
    set: &[Tensor],
    fwd: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    g: &Tensor,
) -> Result<Vec<Tensor>> {
    let y = fwd(set)?.swap_remove(0);
    let loss = (y.to_dtype(DType::F32)? * g)?.sum_all()?;
    let grads = loss.backward()?;
    set.iter()
        .map(|t| {
            grads
                .get(t)
                .cloned()
                .context("no gradient reached an input")
        })
        .collect()
}

/// A forward+backward pair over shared input sets of Vars: each call runs the forward and
/// `.backward()` from the first output.
fn fwd_bwd_pair(
    dev: &Device,
    sets: Vec<Vec<Tensor>>,
    flare: Fwd,
    candle: Fwd,
) -> Result<(Option<f64>, Call, Call)> {
    // The check compares flare's input gradients with Candle's computed in f32, under a random
    // upstream gradient (Candle's ones seed would make softmax's input gradient vanish, and a
    // check of noise means nothing).
    let reference = upcast(&sets[0], true)?;
    let y = candle(&reference)?.swap_remove(0);
    let g = randn(dev, y.dims(), DType::F32)?;
    let (ga, gb) = (
        grads_with(&sets[0], &flare, &g)?,
        grads_with(&reference, &candle, &g)?,
    );
    let mut check = 0f64;
    for (x, y) in ga.iter().zip(&gb) {
        check = check.max(rel_diff(x, y)?);
    }
    let n = sets.len();
    let s1 = sets.clone();
    let f: Call = Box::new(move |i| {
        let y = flare(&s1[i % n])?.swap_remove(0);
        let _grads = y.backward()?;
        Ok(())
    });
    let c: Call = Box::new(move |i| {
        let y = candle(&sets[i % n])?.swap_remove(0);
        let _grads = y.backward()?;
        Ok(())
    });
    Ok((Some(check), f, c))
}

/// The copy case: a raw device-to-device memcpy (flare column) and `Tensor::copy` (Candle
/// column) of a random buffer.
fn prepare_copy(dev: &Device, bytes: usize) -> Result<Prepared> {
    let n = bytes / 4;
    let src_t = randn(dev, &[n], DType::F32)?;
    let t2 = src_t.clone();
    let candle: Call = Box::new(move |_| {
        let _ = t2.copy()?;
        Ok(())
    });
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cdev) = dev {
        use candle_core::Storage;
        let stream = cdev.cuda_stream();
        let src = {
            let (s, _) = src_t.storage_and_layout();
            let Storage::Cuda(cs) = &*s else {
                bail!("expected CUDA storage");
            };
            stream
                .clone_dtod(cs.as_cuda_slice::<f32>()?)
                .map_err(|e| anyhow::anyhow!("cloning the copy source: {e:?}"))?
        };
        let mut dst = stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| anyhow::anyhow!("allocating the copy destination: {e:?}"))?;
        let flare: Call = Box::new(move |_| {
            stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| anyhow::anyhow!("memcpy_dtod: {e:?}"))
        });
        return Ok(Prepared {
            sets: 1,
            flare,
            candle,
            flare_impl: "cuMemcpyDtoDAsync (raw)",
            candle_impl: "Tensor::copy",
            check: None,
            restore: None,
        });
    }
    let src: Vec<f32> = src_t.to_vec1()?;
    let mut dst = vec![1f32; n];
    let flare: Call = Box::new(move |_| {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        Ok(())
    });
    Ok(Prepared {
        sets: 1,
        flare,
        candle,
        flare_impl: "memcpy (copy_from_slice)",
        candle_impl: "Tensor::copy",
        check: None,
        restore: None,
    })
}

/// Largest f32 score matrix (`[B, H, T, T]`, bytes) the flash-attention check computes.
const FA_CHECK_MAX_SCORES: usize = 4 << 30;

/// Candle's side of the flash-attention rows: causal attention composed from Candle ops, over
/// `q: [b * t, hq, d]`, `k, v: [b * t, hkv, d]` (K and V repeated to `hq` heads), with the
/// `[t, t]` additive mask (0 / -inf) of `q`'s dtype; `composite` picks the softmax with a
/// backward.
fn candle_attention(
    s: &[Tensor],
    (b, hq, hkv, t, d): (usize, usize, usize, usize, usize),
    mask: &Tensor,
    composite: bool,
) -> Result<Tensor> {
    let heads = |x: &Tensor, h: usize| -> Result<Tensor> {
        let x = x.reshape((b, t, h, d))?.transpose(1, 2)?;
        Ok(if h == hq {
            x.contiguous()?
        } else {
            x.unsqueeze(2)?
                .expand((b, h, hq / h, t, d))?
                .reshape((b, hq, t, d))?
        })
    };
    let (q, k, v) = (heads(&s[0], hq)?, heads(&s[1], hkv)?, heads(&s[2], hkv)?);
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(mask)?;
    let p = if composite {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    Ok(p.matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * t, hq, d))?)
}

/// The flash-attention case: flare's op (the CUDA kernel) against [`candle_attention`].
fn prepare_flash_attention(dev: &Device, case: &Case, cfg: &Config) -> Result<Prepared> {
    let Op::FlashAttention { b, hq, hkv, t, d } = case.op else {
        bail!("not a flash-attention case: {}", case.label());
    };
    if !dev.is_cuda() {
        bail!("flash_attention rows time the CUDA kernel: run with --device cuda");
    }
    let geom = (b, hq, hkv, t, d);
    let dt = case.prec.dtype();
    let bwd = case.pass == Pass::FwdBwd;
    let sets = input_sets(case.footprint(), cfg.cache_bytes, cfg.max_sets);
    let shapes = [vec![b * t, hq, d], vec![b * t, hkv, d], vec![b * t, hkv, d]];
    let input = input_sets_of(dev, &shapes, dt, sets, bwd)?;
    let p = flare::ops::FlashAttnParams::padded(b, t, t).causal(true);
    let mask_f32: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask_f32 = Tensor::from_vec(mask_f32, (t, t), dev)?;
    let mask = mask_f32.to_dtype(dt)?;
    let flare_fwd = move |s: &[Tensor]| -> Result<Vec<Tensor>> {
        Ok(vec![flare::ops::flash_attention(&s[0], &s[1], &s[2], &p)?])
    };
    let candle_fwd = move |s: &[Tensor]| -> Result<Vec<Tensor>> {
        let m = if s[0].dtype() == DType::F32 {
            &mask_f32
        } else {
            &mask
        };
        Ok(vec![candle_attention(s, geom, m, bwd)?])
    };
    let check = if b * hq * t * t * 4 > FA_CHECK_MAX_SCORES {
        None
    } else if bwd {
        let reference = upcast(&input[0], true)?;
        let y = candle_fwd(&reference)?.swap_remove(0);
        let g = randn(dev, y.dims(), DType::F32)?;
        let (ga, gb) = (
            grads_with(&input[0], &flare_fwd, &g)?,
            grads_with(&reference, &candle_fwd, &g)?,
        );
        let mut worst = 0f64;
        for (x, y) in ga.iter().zip(&gb) {
            worst = worst.max(rel_diff(x, y)?);
        }
        Some(worst)
    } else {
        let a = flare_fwd(&input[0])?.swap_remove(0);
        let r = candle_fwd(&upcast(&input[0], false)?)?.swap_remove(0);
        Some(rel_diff(&a, &r)?)
    };
    let n = input.len();
    let (fi, ci) = (input.clone(), input);
    let (flare, candle): (Call, Call) = (
        Box::new(move |i| {
            let y = flare_fwd(&fi[i % n])?.swap_remove(0);
            if bwd {
                let _grads = y.backward()?;
            }
            Ok(())
        }),
        Box::new(move |i| {
            let y = candle_fwd(&ci[i % n])?.swap_remove(0);
            if bwd {
                let _grads = y.backward()?;
            }
            Ok(())
        }),
    );
    Ok(Prepared {
        sets,
        flare,
        candle,
        flare_impl: "flare::ops::flash_attention (cu/flash_attention.cu)",
        candle_impl: if bwd {
            "composed: matmul, mask, candle_nn::ops::softmax, matmul"
        } else {
            "composed: matmul, mask, candle_nn::ops::softmax_last_dim, matmul"
        },
        check,
        restore: None,
    })
}

/// Builds the inputs and both sides' calls of a case.
fn prepare(dev: &Device, case: &Case, cfg: &Config) -> Result<Prepared> {
    use impls::*;
    let dt = case.prec.dtype();
    let sets = input_sets(case.footprint(), cfg.cache_bytes, cfg.max_sets);
    let bwd = case.pass == Pass::FwdBwd;
    let (shapes, flare, candle, candle_bwd, fi, ci, cbi): (
        Vec<Vec<usize>>,
        Fwd,
        Fwd,
        Fwd,
        _,
        _,
        _,
    ) = match case.op {
        Op::Copy { bytes } => return prepare_copy(dev, bytes),
        Op::FlashAttention { .. } => return prepare_flash_attention(dev, case, cfg),
        Op::Matmul { m, k, n } => (
            vec![vec![m, k], vec![k, n]],
            flare_matmul,
            candle_matmul,
            candle_matmul,
            "flare::ops::matmul",
            "Tensor::matmul",
            "Tensor::matmul",
        ),
        Op::Softmax { rows, cols } => (
            vec![vec![rows, cols]],
            flare_softmax,
            candle_softmax,
            candle_softmax_composite,
            "flare::ops::softmax_last_dim",
            "candle_nn::ops::softmax_last_dim",
            "candle_nn::ops::softmax (composite)",
        ),
        Op::RmsNorm { rows, cols } => (
            vec![vec![rows, cols], vec![cols]],
            flare_rms_norm,
            candle_rms_norm,
            candle_rms_norm_composite,
            "flare::ops::rms_norm",
            "candle_nn::ops::rms_norm",
            "composite rms_norm in f32",
        ),
        Op::AddRmsNorm { rows, cols } => (
            vec![vec![rows, cols], vec![rows, cols], vec![cols]],
            flare_add_rms_norm,
            candle_add_rms_norm,
            candle_add_rms_norm_composite,
            "flare::ops::add_rms_norm",
            "add + candle_nn::ops::rms_norm",
            "add + composite rms_norm in f32",
        ),
    };
    let restore: Option<Box<dyn FnOnce()>> = if matches!(case.op, Op::Matmul { .. }) {
        let tf32 = case.prec == Prec::Tf32;
        let (old_flare, old_candle) = (
            flare::runtime::allow_tf32(),
            candle_core::cuda::gemm_reduced_precision_f32(),
        );
        flare::runtime::set_allow_tf32(tf32);
        candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
        Some(Box::new(move || {
            flare::runtime::set_allow_tf32(old_flare);
            candle_core::cuda::set_gemm_reduced_precision_f32(old_candle);
        }))
    } else {
        None
    };
    let input = input_sets_of(dev, &shapes, dt, sets, bwd)?;
    let (check, f, c) = if bwd {
        fwd_bwd_pair(dev, input, flare, candle_bwd)?
    } else {
        fwd_pair(input, flare, candle)?
    };
    Ok(Prepared {
        sets,
        flare: f,
        candle: c,
        flare_impl: fi,
        candle_impl: if bwd { cbi } else { ci },
        check,
        restore,
    })
}

/// Times one burst of `burst` calls between two synchronisations; returns microseconds per call.
fn time_burst(
    sync: &dyn Fn() -> Result<()>,
    call: &mut Call,
    burst: usize,
    next: &mut usize,
) -> Result<f64> {
    sync()?;
    let t0 = Instant::now();
    for _ in 0..burst {
        call(*next)?;
        *next += 1;
    }
    sync()?;
    Ok(t0.elapsed().as_secs_f64() * 1e6 / burst as f64)
}

/// Per-call samples of both sides, and the burst and repeat count used.
struct Timing {
    flare: Vec<f64>,
    candle: Vec<f64>,
    burst: usize,
}

fn measure(dev: &Device, case: &Case, cfg: &Config, p: &mut Prepared) -> Result<Timing> {
    let flare_sync = || -> Result<()> { Ok(flare::runtime::synchronize(dev)?) };
    let candle_sync = || -> Result<()> { Ok(dev.synchronize()?) };
    let (mut fi, mut ci) = (0usize, 0usize);
    // Warm-up: every input set once (allocator pools, GEMM plans, kernel loading), then two
    // single calls per side whose minimum sizes the burst.
    time_burst(&flare_sync, &mut p.flare, p.sets, &mut fi)?;
    time_burst(&candle_sync, &mut p.candle, p.sets, &mut ci)?;
    let mut single = f64::INFINITY;
    for _ in 0..2 {
        single = single.min(time_burst(&flare_sync, &mut p.flare, 1, &mut fi)?);
        single = single.min(time_burst(&candle_sync, &mut p.candle, 1, &mut ci)?);
    }
    let burst = ((cfg.target_region_us / single.max(1e-3)).ceil() as usize)
        .clamp(1, cfg.max_burst)
        .max(case.min_burst);
    let mut per_repeat_s = 0.0;
    for _ in 0..cfg.warmup_bursts {
        let t = time_burst(&flare_sync, &mut p.flare, burst, &mut fi)?
            + time_burst(&candle_sync, &mut p.candle, burst, &mut ci)?;
        per_repeat_s = t * burst as f64 * 1e-6;
    }
    let repeats = if per_repeat_s * cfg.repeats as f64 > cfg.budget_s {
        ((cfg.budget_s / per_repeat_s) as usize).clamp(3, cfg.repeats)
    } else {
        cfg.repeats
    };
    let (mut fs, mut cs) = (Vec::with_capacity(repeats), Vec::with_capacity(repeats));
    for r in 0..repeats {
        // Alternate who goes first, so drift within a repeat hits both sides alike.
        if r % 2 == 0 {
            fs.push(time_burst(&flare_sync, &mut p.flare, burst, &mut fi)?);
            cs.push(time_burst(&candle_sync, &mut p.candle, burst, &mut ci)?);
        } else {
            cs.push(time_burst(&candle_sync, &mut p.candle, burst, &mut ci)?);
            fs.push(time_burst(&flare_sync, &mut p.flare, burst, &mut fi)?);
        }
    }
    Ok(Timing {
        flare: fs,
        candle: cs,
        burst,
    })
}

/// Prepares, checks and times one case.
fn run_case(dev: &Device, spec: DeviceSpec, hw: &str, case: &Case, cfg: &Config) -> Result<Row> {
    let mut p = prepare(dev, case, cfg)?;
    let timing = measure(dev, case, cfg, &mut p);
    if let Some(restore) = p.restore.take() {
        restore();
    }
    let t = timing?;
    let (flare_us, candle_us) = (median(&t.flare), median(&t.candle));
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let work = case.work();
    Ok(Row {
        op: case.op_name().into(),
        shape: case.shape(),
        dtype: case.prec.label().into(),
        pass: case.pass.label().into(),
        flare_us,
        candle_us,
        ratio: candle_us / flare_us,
        flare_rate: work.rate(flare_us),
        candle_rate: work.rate(candle_us),
        rate_unit: work.unit().into(),
        flare_pct_copy: None,
        candle_pct_copy: None,
        flare_min_us: min(&t.flare),
        candle_min_us: min(&t.candle),
        check_rel_diff: p.check,
        check_ok: p.check.map(|d| d <= case.prec.tolerance()),
        device: spec.name(),
        device_name: hw.to_string(),
        repeats: t.flare.len(),
        burst: t.burst,
        input_sets: p.sets,
        flare_impl: p.flare_impl.into(),
        candle_impl: p.candle_impl.into(),
    })
}

/// Runs `flare bench ops`.
pub fn run_ops(args: &OpsArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    if let Some(path) = &args.json {
        let dir = json_dir(path);
        if !dir.is_dir() {
            bail!(
                "--json {}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    let cuda = matches!(spec, DeviceSpec::Cuda(_));
    let all = cases(cuda, args.quick);
    if !cuda && matches_filter("flash_attention", args.filter.as_deref()) {
        eprintln!(
            "flash_attention: skipped on the cpu (its rows time the CUDA kernel, \
             cu/flash_attention.cu; run with --device cuda)"
        );
    }
    if args.list {
        for c in all
            .iter()
            .filter(|c| matches_filter(&c.label(), args.filter.as_deref()))
        {
            println!("{}", c.label());
        }
        return Ok(());
    }
    let dev = spec.open()?;
    // Create flare's per-device runtime before any input exists, as a program does at start-up.
    // On CUDA this also turns off cudarc's per-allocation event tracking for later allocations
    // (flare's default), so both sides run on equal terms.
    let probe = Tensor::randn(0f32, 1f32, (2, 8), &dev)?;
    flare::ops::softmax_last_dim(&probe).context("initialising flare on the device")?;
    flare::runtime::synchronize(&dev)?;
    let cfg = Config::new(cuda, args.quick, args.repeats, OPS_CASE_BUDGET);
    let mut selected: Vec<Case> = all
        .iter()
        .copied()
        .filter(|c| matches_filter(&c.label(), args.filter.as_deref()))
        .collect();
    if selected.is_empty() {
        let labels: Vec<String> = all.iter().map(|c| format!("  {}", c.label())).collect();
        bail!(
            "no case matches --filter {:?}; the cases are:\n{}",
            args.filter.as_deref().unwrap_or(""),
            labels.join("\n")
        );
    }
    // The memory-bound rows are read against the copy bandwidth of the same run.
    let needs_copy = cuda
        && selected.iter().any(|c| matches!(c.work(), Work::Bytes(_)))
        && !selected.iter().any(|c| matches!(c.op, Op::Copy { .. }));
    if needs_copy {
        if let Some(copy) = all.iter().find(|c| matches!(c.op, Op::Copy { .. })) {
            selected.insert(0, *copy);
        }
    }
    let _ = dev.set_seed(0x5EED); // unsupported on CPU, where inputs are unseeded
    let hw = hardware_name(&dev);
    eprintln!(
        "flare bench ops: {} ({hw}), {} cases, {} repeats{}",
        spec.name(),
        selected.len(),
        cfg.repeats,
        if args.quick { ", quick" } else { "" }
    );
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; flare's own CPU code is unoptimised here, so its \
             timings mean little. Use a --release build for numbers."
        );
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for case in &selected {
        let label = case.label();
        match run_case(&dev, spec, &hw, case, &cfg) {
            Ok(row) => {
                eprintln!(
                    "  {label:<40} flare {:>10} us  candle {:>10} us  {:>6.2}x{}",
                    fmt_num(row.flare_us),
                    fmt_num(row.candle_us),
                    row.ratio,
                    match row.check_ok {
                        Some(false) => format!(
                            "  WARNING: flare differs from the f32 reference by {:.2e} (relative)",
                            row.check_rel_diff.unwrap_or(f64::NAN)
                        ),
                        _ => String::new(),
                    }
                );
                rows.push(row);
                // Written after every case, so a run cut short keeps what it measured.
                if let Some(path) = &args.json {
                    write_json(path, &rows)?;
                }
            }
            Err(e) => {
                eprintln!("  {label:<40} FAILED: {e:#}");
                failed.push(label);
            }
        }
    }
    if cuda {
        fill_pct_copy(&mut rows);
    }
    let s = flare::runtime::stats();
    eprintln!(
        "done in {:.1} s; flare runtime: {} runtimes, {} BLAS handles, {} modules, {} functions, \
         {} GEMM plans",
        started.elapsed().as_secs_f64(),
        s.runtimes_created,
        s.blas_handles_created,
        s.modules_loaded,
        s.functions_loaded,
        s.gemm_plans_created
    );
    if let Some(path) = &args.json {
        // Again with the % copy fields, which need the whole run.
        write_json(path, &rows)?;
        eprintln!("wrote {}", path.display());
    }
    println!("{}", format_table(&rows));
    if !failed.is_empty() {
        bail!("{} case(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn row(op: &str, unit: &str, flare_us: f64, candle_us: f64, rate: f64) -> Row {
        Row {
            op: op.into(),
            shape: "8192x8192".into(),
            dtype: "bf16".into(),
            pass: "fwd".into(),
            flare_us,
            candle_us,
            ratio: candle_us / flare_us,
            flare_rate: rate,
            candle_rate: rate / 2.0,
            rate_unit: unit.into(),
            flare_pct_copy: None,
            candle_pct_copy: None,
            flare_min_us: flare_us,
            candle_min_us: candle_us,
            check_rel_diff: Some(1e-4),
            check_ok: Some(true),
            device: "cuda:0".into(),
            device_name: "test".into(),
            repeats: 5,
            burst: 1,
            input_sets: 1,
            flare_impl: "a".into(),
            candle_impl: "b".into(),
        }
    }

    #[test]
    fn rates() {
        // 2*4096^3 flops in 1 ms = 137.4 TFLOP/s.
        let c = Case::new(
            Op::Matmul {
                m: 4096,
                k: 4096,
                n: 4096,
            },
            Prec::Bf16,
            Pass::Fwd,
        );
        assert!((c.work().rate(1000.0) - 137.438953472).abs() < 1e-6);
        assert_eq!(c.work().unit(), "TFLOP/s");
        // softmax f32 1024x1024 fwd: 8 MiB moved.
        let s = Case::new(
            Op::Softmax {
                rows: 1024,
                cols: 1024,
            },
            Prec::F32,
            Pass::Fwd,
        );
        assert_eq!(s.work(), Work::Bytes(8.0 * 1024.0 * 1024.0));
        assert!((s.work().rate(1.0) - 8.388608e6 / 1e3).abs() < 1e-6);
        let sb = Case {
            pass: Pass::FwdBwd,
            ..s
        };
        assert_eq!(sb.work(), Work::Bytes(20.0 * 1024.0 * 1024.0));
        let r = Case::new(Op::RmsNorm { rows: 2, cols: 8 }, Prec::Bf16, Pass::Fwd);
        assert_eq!(r.work(), Work::Bytes(((2 * 16 + 8) * 2) as f64));
        let a = Case::new(Op::AddRmsNorm { rows: 2, cols: 8 }, Prec::F32, Pass::Fwd);
        assert_eq!(a.work(), Work::Bytes(((4 * 16 + 8) * 4) as f64));
        let cp = Case::new(Op::Copy { bytes: 1 << 30 }, Prec::F32, Pass::Fwd);
        assert_eq!(cp.work(), Work::Bytes(2.0 * (1u64 << 30) as f64));
        assert_eq!(cp.shape(), "1GiB");
        assert!(Work::Bytes(1.0).rate(0.0).is_nan());
    }

    #[test]
    fn flash_attention_rows() {
        let gpu: Vec<String> = cases(true, false).iter().map(Case::label).collect();
        for want in [
            "flash_attention B8.H14.T1024.D64 bf16 fwd",
            "flash_attention B2.H14.T4096.D64 bf16 fwd",
            "flash_attention B1.H32/KV8.T8192.D128 bf16 fwd",
            "flash_attention B8.H14.T1024.D64 bf16 fwd+bwd",
            "flash_attention B2.H14.T4096.D64 bf16 fwd+bwd",
            "flash_attention B1.H32/KV8.T8192.D128 bf16 fwd+bwd",
        ] {
            assert!(gpu.iter().any(|l| l == want), "missing {want}");
        }
        assert!(cases(true, true)
            .iter()
            .any(|c| matches!(c.op, Op::FlashAttention { .. }) && c.pass == Pass::FwdBwd));
        // CPU runs (and --quick there) have no flash-attention rows: they time the CUDA kernel.
        for quick in [false, true] {
            assert!(!cases(false, quick)
                .iter()
                .any(|c| matches!(c.op, Op::FlashAttention { .. })));
        }
        // The SDPA figures with its FLOP count: 0.288 ms fwd+bwd at B8 H14 T1024 D64 is
        // 183 TFLOP/s, 3.944 ms at B1 H32/KV8 T8192 D128 is 488.
        let fa = |b, hq, hkv, t, d, pass| {
            Case::new(Op::FlashAttention { b, hq, hkv, t, d }, Prec::Bf16, pass)
        };
        let r = fa(8, 14, 14, 1024, 64, Pass::FwdBwd).work().rate(288.0);
        assert!((r - 182.7).abs() < 0.1, "{r}");
        let r = fa(1, 32, 8, 8192, 128, Pass::FwdBwd).work().rate(3944.0);
        assert!((r - 487.9).abs() < 0.1, "{r}");
        // The forward alone is 1 / 3.5 of it.
        let f = fa(1, 32, 8, 8192, 128, Pass::Fwd).work().rate(3944.0);
        assert!((3.5 * f - r).abs() < 1e-9, "{f} {r}");
    }

    #[test]
    fn case_lists_are_sane() {
        for (cuda, quick) in [(true, false), (true, true), (false, false), (false, true)] {
            let cs = cases(cuda, quick);
            let mut labels: Vec<String> = cs.iter().map(Case::label).collect();
            let n = labels.len();
            labels.sort();
            labels.dedup();
            assert_eq!(
                labels.len(),
                n,
                "duplicate labels for cuda={cuda} quick={quick}"
            );
            assert!(cs.iter().any(|c| matches!(c.op, Op::Copy { .. })));
            assert!(cs.iter().any(|c| c.pass == Pass::FwdBwd));
        }
        let gpu: Vec<String> = cases(true, false).iter().map(Case::label).collect();
        for want in [
            "matmul 4096x4096x4096 bf16 fwd",
            "matmul 4096x4096x4096 f32 fwd",
            "matmul 4096x4096x4096 tf32 fwd",
            "matmul 64x64x64 bf16 fwd",
            "softmax 8192x8192 f32 fwd",
            "softmax 8192x8192 bf16 fwd",
            "rms_norm 8192x8192 f32 fwd",
            "rms_norm 8192x8192 bf16 fwd",
            "softmax 64x64 f32 fwd",
            "add_rms_norm 8192x8192 bf16 fwd",
            "copy 1GiB f32 fwd",
        ] {
            assert!(gpu.iter().any(|l| l == want), "missing {want}");
        }
    }

    #[test]
    fn pct_of_copy() {
        let mut rows = vec![
            row("copy", "GB/s", 1.0, 2.0, 2000.0),
            row("softmax", "GB/s", 1.0, 2.0, 1600.0),
            row("matmul", "TFLOP/s", 1.0, 2.0, 600.0),
        ];
        fill_pct_copy(&mut rows);
        assert_eq!(rows[1].flare_pct_copy, Some(80.0));
        assert_eq!(rows[1].candle_pct_copy, Some(40.0));
        assert_eq!(rows[2].flare_pct_copy, None);
        let mut no_copy = vec![row("softmax", "GB/s", 1.0, 2.0, 1600.0)];
        fill_pct_copy(&mut no_copy);
        assert_eq!(no_copy[0].flare_pct_copy, None);
    }

    #[test]
    fn table_layout() {
        let mut rows = vec![
            row("copy", "GB/s", 700.0, 800.0, 3000.0),
            row("softmax", "GB/s", 150.0, 450.0, 1800.0),
        ];
        let plain = format_table(&rows);
        assert!(!plain.contains("%copy"));
        fill_pct_copy(&mut rows);
        rows[1].check_ok = Some(false);
        rows[1].check_rel_diff = Some(0.25);
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("op "));
        for h in [
            "flare us",
            "candle us",
            "candle/flare",
            "unit",
            "flare %copy",
            "check",
        ] {
            assert!(lines[0].contains(h), "header lacks {h}: {}", lines[0]);
        }
        assert!(lines[1].chars().all(|c| c == '-' || c == ' '));
        assert!(lines[3].contains("softmax"));
        assert!(lines[3].contains("3.00x"));
        assert!(lines[3].contains("60.0%"));
        assert!(lines[3].contains("DIFF 2.5e-1"));
        assert!(lines[2].contains("ok"));
        // Right-aligned numbers: the "flare us" column ends at the same offset in every line.
        let end = lines[0].find("flare us").unwrap() + "flare us".len();
        assert_eq!(&lines[2][end - 5..end], "700.0");
        assert_eq!(&lines[3][end - 5..end], "150.0");
    }

    #[test]
    fn byte_format() {
        assert_eq!(fmt_bytes(16 << 20), "16MiB");
        assert_eq!(fmt_bytes(3 << 30), "3GiB");
        assert_eq!(fmt_bytes(1000), "1000B");
    }

    #[test]
    fn json_shape_and_atomic_write() {
        let dir = std::env::temp_dir().join(format!("flare-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ops.json");
        let mut rows = vec![row("softmax", "GB/s", 1.0, 2.0, 10.0)];
        write_json(&path, &rows).unwrap();
        rows[0].flare_us = 3.0;
        write_json(&path, &rows).unwrap(); // overwrites in place
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), 1);
        let o = list[0].as_object().unwrap();
        for k in [
            "op",
            "shape",
            "dtype",
            "pass",
            "flare_us",
            "candle_us",
            "ratio",
            "flare_rate",
            "candle_rate",
            "rate_unit",
            "device",
            "flare_pct_copy",
            "check_rel_diff",
        ] {
            assert!(o.contains_key(k), "missing key {k}");
        }
        assert_eq!(o["flare_us"], 3.0);
        assert_eq!(o["pass"], "fwd");
        assert!(o["flare_pct_copy"].is_null());
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
