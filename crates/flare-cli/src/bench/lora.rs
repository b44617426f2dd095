//! `flare bench lora`: the fused LoRA linear against the plain linear it extends and against
//! the unfused composite of Candle ops, in time and in peak device memory.
//!
//! Timing follows `flare bench ops` (see [`super::ops`]): warm-up, then per repeat a device
//! synchronisation, the clock, a burst of back-to-back calls, a second synchronisation; the
//! per-call time is the burst time over its length, and a row's figure is the median over
//! repeats. All cases share the same random input sets and are timed in turn within each repeat
//! (the starting case rotating), so drift hits them alike. On CUDA each case's peak memory is the
//! high-water mark of the device's memory pool over one isolated call, minus what was in use
//! before it (the inputs).
//!
//! The pure parts (defaults, rows, ratios, the table, targets, the JSON round trip) are
//! unit-tested below; the rest needs a device.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{input_sets, Budget, Call, Config, Pass};
use crate::device::{hardware_name, DeviceSpec};
use crate::report::{fmt_num, json_dir, median, write_json};

/// The LoRA scale `s = alpha / r` of every case (alpha 32 at r 16).
pub const SCALE: f64 = 2.0;

/// `flare lora fwd` may take at most this many times `base linear fwd` (CUDA target).
pub const TARGET_FWD_VS_BASE: f64 = 1.10;

/// `flare lora fwd+bwd` may take at most this fraction of PyTorch's unfused LoRA fwd+bwd (CUDA
/// target).
pub const TARGET_FWD_BWD_VS_TORCH: f64 = 0.5;

/// The long help of `flare bench lora`.
pub const LORA_LONG_ABOUT: &str = "\
Time the fused LoRA linear (flare::lora::lora_linear) against the plain linear it extends and
against the unfused composite of Candle ops, and measure each case's peak device memory.

  y = x W^T + s (x A^T) B^T     x [tokens, in], W [out, in] (frozen), A [r, in], B [out, r], s = 2

Cases (x, A and B are Vars in every row: the forward of a training step):
  base linear                 flare::ops::matmul(x, W^T); fwd+bwd: gradient of x only
  flare lora                  flare::lora::lora_linear(x, W, None, A, B, s); gradients of x, A, B
                              (the backward never computes W's)
  composite lora (W frozen)   Candle: x.matmul(W^T) + (x.matmul(A^T) * s).matmul(B^T), W a plain
                              tensor. Candle's Matmul backward computes the gradient of both
                              operands whether or not they are tracked (candle-core backprop.rs),
                              so this row still computes (and drops) an [out, in] gradient of W
  composite lora (W Var)      the same with W a Var (fwd+bwd only): naive LoRA on Candle, W's
                              gradient kept
fwd+bwd rows run the forward and `.backward()` from the output (Candle seeds it with ones; the
PyTorch anchor passes ones_like(y) as the upstream gradient).

Default shapes: CUDA 4096 tokens, 4096 -> 4096, r 16, bf16; CPU 256 tokens, 512 -> 512, r 16,
f32; --quick: CUDA 1024, 1024 -> 1024, r 16; CPU 64, 128 -> 128, r 8.

Method (as `flare bench ops`): warm-up (every input set once, then whole bursts), then per
repeat: synchronise, start the clock, a burst of N back-to-back calls, synchronise, stop the
clock; per-call time = burst time / N; the table shows the median over repeats. N makes a burst
last ~2 ms on CUDA (~5 ms on CPU). All cases share the random-normal input sets (several when one
set fits in L2) and run in turn within each repeat. Before timing, each case is checked against
flare::lora::lora_linear_reference (or x W^T) run in f32 on the same inputs: outputs for fwd,
the gradients of x, A, B under a random upstream gradient for fwd+bwd ('check': ok, or DIFF
above 1e-3 for f32, 3e-2 for bf16/f16, relative to the reference's max magnitude).

Memory (CUDA): the device memory pool's high-water mark (CU_MEMPOOL_ATTR_USED_MEM_HIGH), reset
before one isolated call of the case, minus the pool's memory in use before it (the inputs), in
MiB. flare's runtime keeps freed memory in the pool, so the mark covers every allocation of the
call. CPU: '-'. The notes above the table say whether a gradient of W's size appeared in flare's
fwd+bwd: its peak minus the base linear's fwd+bwd peak (which holds y, dy and dx too), against
out*in*sizeof(dtype).

Columns: case, pass, us (median per call), vs base (us / base linear us of the same pass),
vs flare (us / flare lora us), peak MiB, check. With --torch-json (bench/anchor_lora.py --json),
the PyTorch rows of the same shape and dtype join the table and the targets are judged (CUDA):
  flare lora fwd     <= 1.10 x base linear fwd
  flare lora fwd+bwd <= 0.50 x torch lora fwd+bwd (PyTorch's unfused LoRA)

Examples:
  flare bench lora --quick
  flare bench lora --device cuda --json lora.json
  flare bench lora --device cuda --tokens 8192 --in 4096 --out 11008 --r 64
  flare bench lora --report lora.json --torch-json torch_lora.json";

/// Arguments of `flare bench lora`.
#[derive(Debug, Args)]
pub struct LoraArgs {
    /// Device to run on: cpu, cuda (= cuda:0) or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,

    /// Also write the results as a JSON list of rows to PATH (atomically).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Small shapes and few repeats (a smoke test).
    #[arg(long)]
    pub quick: bool,

    /// Tokens (rows of x) [default: 4096 on CUDA, 256 on CPU].
    #[arg(long, value_name = "N", value_parser = positive)]
    pub tokens: Option<usize>,

    /// in_features [default: 4096 on CUDA, 512 on CPU].
    #[arg(long = "in", value_name = "N", value_parser = positive)]
    pub in_features: Option<usize>,

    /// out_features [default: 4096 on CUDA, 512 on CPU].
    #[arg(long = "out", value_name = "N", value_parser = positive)]
    pub out_features: Option<usize>,

    /// LoRA rank [default: 16].
    #[arg(long, value_name = "N", value_parser = positive)]
    pub r: Option<usize>,

    /// Element type: f32, bf16 or f16 [default: bf16 on CUDA, f32 on CPU].
    #[arg(long, value_name = "DTYPE", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,

    /// Timed repeats [default: 25 on CUDA, 10 on CPU, 5 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: Option<u32>,

    /// bench/anchor_lora.py's JSON: adds PyTorch's rows of the same shape and dtype to the table
    /// and judges the fwd+bwd target against them.
    #[arg(long, value_name = "PATH")]
    pub torch_json: Option<PathBuf>,

    /// Print the table and targets of an earlier run's --json file instead of measuring.
    #[arg(long, value_name = "PATH", conflicts_with = "json")]
    pub report: Option<PathBuf>,
}

fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a positive integer, got '{s}'")),
    }
}

// ---- shapes and cases ---------------------------------------------------------------------------

/// The problem size: `x [tokens, inf]`, `W [out, inf]`, `A [r, inf]`, `B [out, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Rows of x.
    pub tokens: usize,
    /// in_features.
    pub inf: usize,
    /// out_features.
    pub out: usize,
    /// LoRA rank.
    pub r: usize,
}

impl Shape {
    /// `tokens x in x out rR`, e.g. `4096x4096x4096 r16` (the anchor writes the same).
    pub fn label(&self) -> String {
        format!("{}x{}x{} r{}", self.tokens, self.inf, self.out, self.r)
    }

    /// Bytes of a W-sized buffer (`out * in` elements of `dt`).
    pub fn w_bytes(&self, dt: DType) -> usize {
        self.out * self.inf * dt.size_in_bytes()
    }

    /// Bytes of one input set plus one fwd+bwd's outputs (x, W, A, B, y, dy, dx), to decide
    /// on rotating input sets.
    pub fn footprint(&self, dt: DType) -> usize {
        let (t, i, o, r) = (self.tokens, self.inf, self.out, self.r);
        (2 * t * i + o * i + r * i + o * r + 2 * t * o) * dt.size_in_bytes()
    }
}

/// The default shape and dtype for a device, before `--tokens` etc. override them.
pub fn default_shape(cuda: bool, quick: bool) -> (Shape, DType) {
    let s = |tokens, inf, out, r| Shape {
        tokens,
        inf,
        out,
        r,
    };
    match (cuda, quick) {
        (true, false) => (s(4096, 4096, 4096, 16), DType::BF16),
        (true, true) => (s(1024, 1024, 1024, 16), DType::BF16),
        (false, false) => (s(256, 512, 512, 16), DType::F32),
        (false, true) => (s(64, 128, 128, 8), DType::F32),
    }
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => bail!("unsupported dtype '{s}': expected f32, bf16 or f16"),
    })
}

fn dtype_label(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// What a case computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// `flare::ops::matmul(x, Wᵀ)`.
    Base,
    /// `flare::lora::lora_linear`.
    Flare,
    /// Candle's unfused composite, W a plain tensor.
    Composite,
    /// Candle's unfused composite, W a Var (its gradient is computed).
    CompositeWVar,
}

impl Impl {
    /// The case's name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Base => BASE,
            Impl::Flare => FLARE,
            Impl::Composite => "composite lora (W frozen)",
            Impl::CompositeWVar => "composite lora (W Var)",
        }
    }

    /// What the row times, for the JSON.
    fn description(self) -> &'static str {
        match self {
            Impl::Base => "flare::ops::matmul(x, W^T)",
            Impl::Flare => "flare::lora::lora_linear(x, W, None, A, B, s)",
            Impl::Composite => "x.matmul(W^T) + (x.matmul(A^T) * s).matmul(B^T), W a Tensor",
            Impl::CompositeWVar => "x.matmul(W^T) + (x.matmul(A^T) * s).matmul(B^T), W a Var",
        }
    }
}

const BASE: &str = "base linear";
const FLARE: &str = "flare lora";
const TORCH_BASE: &str = "torch base linear";
const TORCH_LORA: &str = "torch lora";

/// The cases, in table order.
pub fn cases() -> Vec<(Impl, Pass)> {
    use Impl::*;
    vec![
        (Base, Pass::Fwd),
        (Flare, Pass::Fwd),
        (Composite, Pass::Fwd),
        (Base, Pass::FwdBwd),
        (Flare, Pass::FwdBwd),
        (Composite, Pass::FwdBwd),
        (CompositeWVar, Pass::FwdBwd),
    ]
}

// ---- rows, table, targets -----------------------------------------------------------------------

/// One result row, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraRow {
    /// `base linear`, `flare lora`, `composite lora (W frozen)`, `composite lora (W Var)`.
    pub case: String,
    /// `fwd` or `fwd+bwd`.
    pub pass: String,
    /// See [`Shape::label`].
    pub shape: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Median microseconds per call.
    pub us: f64,
    /// Peak device memory of one call above what was in use before it, MiB (CUDA only).
    pub peak_mib: Option<f64>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The hardware (GPU name, or CPU thread count).
    pub device_name: String,
    /// Fastest repeat.
    pub min_us: f64,
    /// Timed repeats.
    pub repeats: usize,
    /// Calls per timed region.
    pub burst: usize,
    /// Input sets rotated through.
    pub input_sets: usize,
    /// Max |row - f32 reference| over max |reference| (outputs, or gradients of x, A, B).
    pub check_rel_diff: Option<f64>,
    /// Whether that difference is within the dtype's tolerance.
    pub check_ok: Option<bool>,
    /// Rows of x.
    pub tokens: usize,
    /// in_features.
    pub in_features: usize,
    /// out_features.
    pub out_features: usize,
    /// LoRA rank.
    pub r: usize,
    /// LoRA scale.
    pub scale: f64,
    /// What the row times.
    #[serde(rename = "impl")]
    pub implementation: String,
}

/// A row of the printed table (flare's rows and, with `--torch-json`, PyTorch's).
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// Case name.
    pub case: String,
    /// `fwd` or `fwd+bwd`.
    pub pass: String,
    /// Median us per call.
    pub us: f64,
    /// Peak MiB, if measured.
    pub peak_mib: Option<f64>,
    /// Check result: `(rel_diff, ok)`.
    pub check: Option<(f64, bool)>,
}

impl From<&LoraRow> for TableRow {
    fn from(r: &LoraRow) -> TableRow {
        TableRow {
            case: r.case.clone(),
            pass: r.pass.clone(),
            us: r.us,
            peak_mib: r.peak_mib,
            check: r.check_rel_diff.zip(r.check_ok),
        }
    }
}

/// PyTorch's rows of `shape` and `dtype` from bench/anchor_lora.py's JSON (other rows and
/// malformed entries are skipped).
pub fn torch_rows(v: &serde_json::Value, shape: &str, dtype: &str) -> Vec<TableRow> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter(|r| r["shape"] == shape && r["dtype"] == dtype)
        .filter_map(|r| {
            Some(TableRow {
                case: r["case"].as_str()?.to_string(),
                pass: r["pass"].as_str()?.to_string(),
                us: r["us"].as_f64()?,
                peak_mib: r["peak_mib"].as_f64(),
                check: None,
            })
        })
        .collect()
}

/// The time of `case`'s `pass` row, if present.
fn us_of(rows: &[TableRow], case: &str, pass: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.case == case && r.pass == pass)
        .map(|r| r.us)
}

/// The peak of `case`'s `pass` row, if present and measured.
fn peak_of(rows: &[TableRow], case: &str, pass: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.case == case && r.pass == pass)
        .and_then(|r| r.peak_mib)
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if a.is_finite() && b.is_finite() && b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// Formats a table: left-aligned text columns (`left(i)`), right-aligned numbers.
fn aligned(header: &[&str], body: &[Vec<String>], left: impl Fn(usize) -> bool) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in body {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
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
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    line(&width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for row in body {
        line(row);
    }
    out
}

/// The table: case, pass, us, vs base, vs flare, peak MiB, check. A PyTorch row's "vs base" is
/// against PyTorch's own base linear of the same pass; every "vs flare" is against flare lora.
pub fn format_table(rows: &[TableRow]) -> String {
    let header = [
        "case", "pass", "us", "vs base", "vs flare", "peak MiB", "check",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let base = if r.case.starts_with("torch") {
                TORCH_BASE
            } else {
                BASE
            };
            vec![
                r.case.clone(),
                r.pass.clone(),
                fmt_num(r.us),
                ratio(r.us, us_of(rows, base, &r.pass)),
                ratio(r.us, us_of(rows, FLARE, &r.pass)),
                r.peak_mib.map_or_else(|| "-".into(), |m| format!("{m:.1}")),
                match r.check {
                    Some((_, true)) => "ok".into(),
                    Some((d, false)) => format!("DIFF {d:.1e}"),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    aligned(&header, &body, |i| i < 2 || i == 6)
}

/// The targets (judged PASS/FAIL when `judge`, i.e. on CUDA; otherwise shown as information).
pub fn format_targets(rows: &[TableRow], judge: bool) -> String {
    let mut out = String::new();
    let verdict = |ok: bool| {
        if !judge {
            "(info: the targets are for CUDA)"
        } else if ok {
            "PASS"
        } else {
            "FAIL"
        }
    };
    let fwd = us_of(rows, FLARE, "fwd").zip(us_of(rows, BASE, "fwd"));
    let _ = match fwd {
        Some((f, b)) => writeln!(
            out,
            "target: flare lora fwd <= {TARGET_FWD_VS_BASE:.2} x base linear fwd: {:.3}x  {}",
            f / b,
            verdict(f / b <= TARGET_FWD_VS_BASE)
        ),
        None => writeln!(
            out,
            "target: flare lora fwd <= {TARGET_FWD_VS_BASE:.2} x base linear fwd: -  (missing rows)"
        ),
    };
    let bwd = us_of(rows, FLARE, "fwd+bwd").zip(us_of(rows, TORCH_LORA, "fwd+bwd"));
    let _ = match bwd {
        Some((f, t)) => writeln!(
            out,
            "target: flare lora fwd+bwd <= {TARGET_FWD_BWD_VS_TORCH:.2} x PyTorch unfused LoRA \
             fwd+bwd: {:.3}x ({} us vs {} us)  {}",
            f / t,
            fmt_num(f),
            fmt_num(t),
            verdict(f / t <= TARGET_FWD_BWD_VS_TORCH)
        ),
        None => writeln!(
            out,
            "target: flare lora fwd+bwd <= {TARGET_FWD_BWD_VS_TORCH:.2} x PyTorch unfused LoRA \
             fwd+bwd: -  (no PyTorch row: pass --torch-json from bench/anchor_lora.py)"
        ),
    };
    out
}

/// Whether a gradient of W's size showed up in flare's fwd+bwd: flare's peak above the base
/// linear's fwd+bwd peak (which already holds y, dy and dx) compared with W's size; and, as the
/// detector's own control, the two composite rows' peaks above the same base (both form W's
/// gradient).
pub fn format_w_grad_note(rows: &[TableRow], w_mib: f64) -> String {
    let mut out = String::new();
    let (Some(flare), Some(base)) = (
        peak_of(rows, FLARE, "fwd+bwd"),
        peak_of(rows, BASE, "fwd+bwd"),
    ) else {
        out.push_str("W-sized gradient buffer: - (peak memory is measured on CUDA only)\n");
        return out;
    };
    let extra = flare - base;
    let appeared = extra >= 0.9 * w_mib;
    let _ = writeln!(
        out,
        "W-sized gradient buffer in flare lora fwd+bwd: {} (peak {flare:.1} MiB = base linear \
         fwd+bwd {base:.1} MiB {extra:+.1} MiB; W is {w_mib:.1} MiB)",
        if appeared { "APPEARED" } else { "none" }
    );
    // The detector's control: Candle's composite, whose Matmul backward forms W's gradient
    // (frozen or not).
    for imp in [Impl::Composite, Impl::CompositeWVar] {
        if let Some(p) = peak_of(rows, imp.name(), "fwd+bwd") {
            let _ = writeln!(
                out,
                "  control: {} fwd+bwd peaks {p:.1} MiB = base linear {:+.1} MiB",
                imp.name(),
                p - base
            );
        }
    }
    out
}

/// Measures the peak device memory of one call of `f` above what was in use before it, in MiB;
/// `None` where there is no pool to read (CPU).
struct Meter {
    #[cfg(feature = "cuda")]
    pool: Option<super::pool::PoolMeter>,
}

impl Meter {
    fn new(dev: &Device) -> Result<Meter> {
        #[cfg(feature = "cuda")]
        {
            let pool = match dev {
                Device::Cuda(c) => Some(super::pool::PoolMeter::new(c)?),
                _ => None,
            };
            Ok(Meter { pool })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dev;
            Ok(Meter {})
        }
    }

    fn peak_mib(&self, dev: &Device, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            flare::runtime::synchronize(dev)?;
            let before = p.used()?;
            p.reset_high()?;
            f()?;
            flare::runtime::synchronize(dev)?;
            let high = p.high()?;
            return Ok(Some(
                high.saturating_sub(before) as f64 / (1u64 << 20) as f64,
            ));
        }
        let _ = (dev, f);
        Ok(None)
    }
}

// ---- the harness --------------------------------------------------------------------------------

/// One input set: x, A, B as Vars; W frozen, and a Var copy of W for the naive composite.
struct Set {
    x: Tensor,
    w: Tensor,
    w_var: Tensor,
    a: Tensor,
    b: Tensor,
}

fn randn(dev: &Device, shape: (usize, usize), dt: DType) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(dt)?)
}

fn var(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(t)?.as_tensor().clone())
}

fn make_set(dev: &Device, s: Shape, dt: DType) -> Result<Set> {
    let w = randn(dev, (s.out, s.inf), dt)?;
    Ok(Set {
        x: var(&randn(dev, (s.tokens, s.inf), dt)?)?,
        w_var: var(&w)?,
        w,
        a: var(&randn(dev, (s.r, s.inf), dt)?)?,
        b: var(&randn(dev, (s.out, s.r), dt)?)?,
    })
}

/// Candle's unfused LoRA linear, as written in plain Candle ops.
fn composite(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let base = x.matmul(&w.t()?)?;
    let low = (x.matmul(&a.t()?)? * SCALE)?.matmul(&b.t()?)?;
    Ok((base + low)?)
}

/// The forward of a case on one input set.
fn forward(imp: Impl, s: &Set) -> Result<Tensor> {
    Ok(match imp {
        Impl::Base => flare::ops::matmul(&s.x, &s.w.t()?)?,
        Impl::Flare => flare::lora::lora_linear(&s.x, &s.w, None, &s.a, &s.b, SCALE)?,
        Impl::Composite => composite(&s.x, &s.w, &s.a, &s.b)?,
        Impl::CompositeWVar => composite(&s.x, &s.w_var, &s.a, &s.b)?,
    })
}

/// The inputs whose gradients a case's check compares.
fn grad_targets(imp: Impl, s: &Set) -> Vec<Tensor> {
    match imp {
        Impl::Base => vec![s.x.clone()],
        _ => vec![s.x.clone(), s.a.clone(), s.b.clone()],
    }
}

/// The f32 reference of a case: `x Wᵀ`, or flare's `lora_linear_reference`.
fn reference(imp: Impl, s: &Set) -> Result<Tensor> {
    Ok(match imp {
        Impl::Base => s.x.matmul(&s.w.t()?)?,
        _ => flare::lora::lora_linear_reference(&s.x, &s.w, None, &s.a, &s.b, SCALE)?,
    })
}

/// `s` in f32, with x, A, B as Vars and W frozen.
fn upcast(s: &Set) -> Result<Set> {
    let f = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().to_dtype(DType::F32)?) };
    let w = f(&s.w)?;
    Ok(Set {
        x: var(&f(&s.x)?)?,
        w_var: var(&w)?,
        w,
        a: var(&f(&s.a)?)?,
        b: var(&f(&s.b)?)?,
    })
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

/// Gradients of `sum(y * g)` with respect to `targets`.
fn grads(y: &Tensor, g: &Tensor, targets: &[Tensor]) -> Result<Vec<Tensor>> {
    let loss = (y.to_dtype(DType::F32)? * g)?.sum_all()?;
    let gs = loss.backward()?;
    targets
        .iter()
        .map(|t| gs.get(t).cloned().context("no gradient reached an input"))
        .collect()
}

/// The case's largest relative difference from the f32 reference on `s`.
fn check(imp: Impl, pass: Pass, s: &Set, r: &Set, dev: &Device) -> Result<f64> {
    let y = forward(imp, s)?;
    let y_ref = reference(imp, r)?;
    if pass == Pass::Fwd {
        return rel_diff(&y, &y_ref);
    }
    let g = Tensor::randn(0f32, 1f32, y_ref.dims(), dev)?;
    let (ga, gb) = (
        grads(&y, &g, &grad_targets(imp, s))?,
        grads(&y_ref, &g, &grad_targets(imp, r))?,
    );
    let mut worst = 0f64;
    for (a, b) in ga.iter().zip(&gb) {
        worst = worst.max(rel_diff(a, b)?);
    }
    Ok(worst)
}

fn tolerance(dt: DType) -> f64 {
    if dt == DType::F32 {
        1e-3
    } else {
        3e-2
    }
}

/// Whole-run budget of `bench lora` (see [`Config`]).
const LORA_RUN_BUDGET: Budget = [3.0, 30.0, 25.0];

/// A case being timed.
struct Runner {
    imp: Impl,
    pass: Pass,
    call: Call,
    next: usize,
    burst: usize,
    /// Seconds of one timed burst, from the warm-up.
    region_s: f64,
    samples: Vec<f64>,
    peak_mib: Option<f64>,
    check: Option<f64>,
}

impl Runner {
    fn label(&self) -> String {
        format!("{} {}", self.imp.name(), self.pass.label())
    }

    /// Times a burst of `n` calls between two synchronisations; microseconds per call.
    fn time(&mut self, dev: &Device, n: usize) -> Result<f64> {
        flare::runtime::synchronize(dev)?;
        let t0 = Instant::now();
        for _ in 0..n {
            (self.call)(self.next)?;
            self.next += 1;
        }
        flare::runtime::synchronize(dev)?;
        Ok(t0.elapsed().as_secs_f64() * 1e6 / n as f64)
    }
}

fn make_call(imp: Impl, pass: Pass, sets: Rc<Vec<Set>>) -> Call {
    let n = sets.len();
    Box::new(move |i| {
        let y = forward(imp, &sets[i % n])?;
        if pass == Pass::FwdBwd {
            let _grads = y.backward()?;
        }
        Ok(())
    })
}

/// Loads the PyTorch rows of `shape`/`dtype` from `--torch-json`, if given.
fn load_torch(path: Option<&Path>, shape: &str, dtype: &str) -> Result<Vec<TableRow>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let v: serde_json::Value = serde_json::from_slice(
        &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let rows = torch_rows(&v, shape, dtype);
    if rows.is_empty() {
        eprintln!(
            "note: {} has no rows of shape {shape} {dtype}",
            path.display()
        );
    }
    Ok(rows)
}

/// Prints the notes, the targets and then the table.
fn report(rows: &[LoraRow], torch: Vec<TableRow>, cuda: bool, title: &str) {
    let mut table: Vec<TableRow> = rows.iter().map(TableRow::from).collect();
    table.extend(torch);
    println!("{title}");
    if let Some(r) = rows.first() {
        let dt = match r.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        };
        let w = Shape {
            tokens: r.tokens,
            inf: r.in_features,
            out: r.out_features,
            r: r.r,
        }
        .w_bytes(dt) as f64
            / (1u64 << 20) as f64;
        print!("{}", format_w_grad_note(&table, w));
    }
    print!("{}", format_targets(&table, cuda));
    println!();
    print!("{}", format_table(&table));
}

/// Runs `flare bench lora`.
pub fn run_lora(args: &LoraArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let cuda = matches!(spec, DeviceSpec::Cuda(_));
    if let Some(path) = &args.report {
        let rows: Vec<LoraRow> = serde_json::from_slice(
            &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        let Some(first) = rows.first() else {
            bail!("{}: no rows", path.display());
        };
        let torch = load_torch(args.torch_json.as_deref(), &first.shape, &first.dtype)?;
        let title = format!(
            "flare bench lora (from {}): {}, {} {}, s = {}",
            path.display(),
            first.device_name,
            first.shape,
            first.dtype,
            first.scale
        );
        report(&rows, torch, first.device.starts_with("cuda"), &title);
        return Ok(());
    }
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
    let (def, def_dt) = default_shape(cuda, args.quick);
    let shape = Shape {
        tokens: args.tokens.unwrap_or(def.tokens),
        inf: args.in_features.unwrap_or(def.inf),
        out: args.out_features.unwrap_or(def.out),
        r: args.r.unwrap_or(def.r),
    };
    let dt = args.dtype.as_deref().map_or(Ok(def_dt), parse_dtype)?;
    let dtl = dtype_label(dt);
    let torch = load_torch(args.torch_json.as_deref(), &shape.label(), dtl)?;

    let dev = spec.open()?;
    // flare's runtime first, as a program does at start-up (on CUDA: event tracking off, the
    // pool kept), so every case runs on equal terms.
    let probe = Tensor::randn(0f32, 1f32, (2, 8), &dev)?;
    flare::ops::softmax_last_dim(&probe).context("initialising flare on the device")?;
    flare::runtime::synchronize(&dev)?;
    let _ = dev.set_seed(0x5EED);
    let hw = hardware_name(&dev);
    let cfg = Config::new(cuda, args.quick, args.repeats, LORA_RUN_BUDGET);
    let nsets = input_sets(shape.footprint(dt), cfg.cache_bytes, cfg.max_sets);
    eprintln!(
        "flare bench lora: {} ({hw}), {} {dtl}, s = {SCALE}, {nsets} input set(s), {} repeats{}",
        spec.name(),
        shape.label(),
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
    let sets: Rc<Vec<Set>> = Rc::new(
        (0..nsets)
            .map(|_| make_set(&dev, shape, dt))
            .collect::<Result<_>>()
            .context("creating the inputs")?,
    );
    let reference_set = upcast(&sets[0])?;
    let meter = Meter::new(&dev)?;
    let mut failed = Vec::new();

    // Check, warm up and size the burst of every case; a failing case is reported and dropped.
    let mut runners = Vec::new();
    for (imp, pass) in cases() {
        let mut r = Runner {
            imp,
            pass,
            call: make_call(imp, pass, sets.clone()),
            next: 0,
            burst: 1,
            region_s: 0.0,
            samples: Vec::new(),
            peak_mib: None,
            check: None,
        };
        let label = r.label();
        let mut prep = || -> Result<()> {
            r.check = Some(check(imp, pass, &sets[0], &reference_set, &dev)?);
            r.time(&dev, nsets)?;
            let single = r.time(&dev, 1)?.min(r.time(&dev, 1)?);
            r.burst =
                ((cfg.target_region_us / single.max(1e-3)).ceil() as usize).clamp(1, cfg.max_burst);
            for _ in 0..cfg.warmup_bursts {
                r.region_s = r.time(&dev, r.burst)? * r.burst as f64 * 1e-6;
            }
            Ok(())
        };
        match prep() {
            Ok(()) => runners.push(r),
            Err(e) => {
                eprintln!("  {label:<36} FAILED: {e:#}");
                failed.push(label);
            }
        }
    }
    // Peak memory of one isolated call per case, after the warm-up (GEMM plans, workspaces).
    for r in &mut runners {
        let call = &mut r.call;
        r.peak_mib = meter.peak_mib(&dev, &mut || call(0))?;
    }
    // Timed repeats: every case once per repeat, the first case rotating.
    let per_repeat_s: f64 = runners.iter().map(|r| r.region_s).sum();
    let repeats = if per_repeat_s * cfg.repeats as f64 > cfg.budget_s {
        ((cfg.budget_s / per_repeat_s) as usize).clamp(3, cfg.repeats)
    } else {
        cfg.repeats
    };
    let n = runners.len();
    let mut dead = vec![false; n];
    for rep in 0..repeats {
        for j in 0..n {
            let k = (rep + j) % n;
            if dead[k] {
                continue;
            }
            let r = &mut runners[k];
            let burst = r.burst;
            match r.time(&dev, burst) {
                Ok(us) => r.samples.push(us),
                Err(e) => {
                    eprintln!("  {:<36} FAILED: {e:#}", r.label());
                    failed.push(r.label());
                    dead[k] = true;
                }
            }
        }
    }

    let tol = tolerance(dt);
    let rows: Vec<LoraRow> = runners
        .iter()
        .zip(&dead)
        .filter(|(r, d)| !**d && !r.samples.is_empty())
        .map(|(r, _)| LoraRow {
            case: r.imp.name().into(),
            pass: r.pass.label().into(),
            shape: shape.label(),
            dtype: dtl.into(),
            us: median(&r.samples),
            peak_mib: r.peak_mib,
            device: spec.name(),
            device_name: hw.clone(),
            min_us: r.samples.iter().copied().fold(f64::INFINITY, f64::min),
            repeats: r.samples.len(),
            burst: r.burst,
            input_sets: nsets,
            check_rel_diff: r.check,
            check_ok: r.check.map(|d| d <= tol),
            tokens: shape.tokens,
            in_features: shape.inf,
            out_features: shape.out,
            r: shape.r,
            scale: SCALE,
            implementation: r.imp.description().into(),
        })
        .collect();
    for row in &rows {
        eprintln!(
            "  {:<36} {:>10} us  peak {:>8} MiB{}",
            format!("{} {}", row.case, row.pass),
            fmt_num(row.us),
            row.peak_mib
                .map_or_else(|| "-".into(), |m| format!("{m:.1}")),
            match row.check_ok {
                Some(false) => format!(
                    "  WARNING: differs from the f32 reference by {:.2e} (relative)",
                    row.check_rel_diff.unwrap_or(f64::NAN)
                ),
                _ => String::new(),
            }
        );
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        write_json(path, &rows)?;
        eprintln!("wrote {}", path.display());
    }
    let title = format!(
        "flare bench lora: {} ({hw}), {} {dtl}, s = {SCALE}",
        spec.name(),
        shape.label()
    );
    report(&rows, torch, cuda, &title);
    if !failed.is_empty() {
        bail!("{} case(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trow(case: &str, pass: &str, us: f64, peak: Option<f64>) -> TableRow {
        TableRow {
            case: case.into(),
            pass: pass.into(),
            us,
            peak_mib: peak,
            check: Some((1e-4, true)),
        }
    }

    fn lrow(case: &str, pass: &str, us: f64) -> LoraRow {
        LoraRow {
            case: case.into(),
            pass: pass.into(),
            shape: "4096x4096x4096 r16".into(),
            dtype: "bf16".into(),
            us,
            peak_mib: Some(32.5),
            device: "cuda:0".into(),
            device_name: "test".into(),
            min_us: us,
            repeats: 5,
            burst: 10,
            input_sets: 1,
            check_rel_diff: Some(1e-3),
            check_ok: Some(true),
            tokens: 4096,
            in_features: 4096,
            out_features: 4096,
            r: 16,
            scale: SCALE,
            implementation: "x".into(),
        }
    }

    #[test]
    fn defaults_and_labels() {
        let (s, dt) = default_shape(true, false);
        assert_eq!(s.label(), "4096x4096x4096 r16");
        assert_eq!(dt, DType::BF16);
        assert_eq!(s.w_bytes(dt), 32 << 20);
        let (c, cdt) = default_shape(false, false);
        assert_eq!(c.label(), "256x512x512 r16");
        assert_eq!(cdt, DType::F32);
        assert!(default_shape(false, true).0.tokens < c.tokens);
        // The GPU default is larger than L2: no rotation; the CPU one rotates.
        assert_eq!(input_sets(s.footprint(dt), 50_000_000, 16), 1);
        assert!(input_sets(c.footprint(cdt), 32 << 20, 8) > 1);
        let labels: Vec<String> = cases()
            .iter()
            .map(|(i, p)| format!("{} {}", i.name(), p.label()))
            .collect();
        let mut d = labels.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), labels.len());
        assert!(labels.contains(&"composite lora (W Var) fwd+bwd".to_string()));
        assert!(positive("0").is_err() && positive("x").is_err());
        assert_eq!(positive("16"), Ok(16));
    }

    #[test]
    fn table_ratios_and_torch_rows() {
        let v: serde_json::Value = serde_json::json!([
            {"case": "torch base linear", "pass": "fwd", "shape": "4096x4096x4096 r16",
             "dtype": "bf16", "us": 184.0, "peak_mib": 32.0},
            {"case": "torch lora", "pass": "fwd+bwd", "shape": "4096x4096x4096 r16",
             "dtype": "bf16", "us": 938.0, "peak_mib": 100.0},
            {"case": "torch lora", "pass": "fwd+bwd", "shape": "1x1x1 r1",
             "dtype": "bf16", "us": 1.0, "peak_mib": 1.0},
            {"case": "broken"}
        ]);
        let torch = torch_rows(&v, "4096x4096x4096 r16", "bf16");
        assert_eq!(torch.len(), 2);
        let mut rows = vec![
            trow(BASE, "fwd", 200.0, Some(32.0)),
            trow(FLARE, "fwd", 210.0, Some(32.1)),
            trow(BASE, "fwd+bwd", 400.0, Some(96.0)),
            trow(FLARE, "fwd+bwd", 420.0, Some(96.5)),
        ];
        rows.extend(torch);
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + rows.len());
        for h in [
            "case", "pass", "us", "vs base", "vs flare", "peak MiB", "check",
        ] {
            assert!(lines[0].contains(h), "header lacks {h}");
        }
        assert!(lines[3].contains("1.05x"), "{}", lines[3]); // flare fwd vs base
        assert!(lines[5].contains("1.05x") && lines[5].contains("96.5"));
        // torch lora fwd+bwd: no torch base fwd+bwd row, 938 / 420 vs flare.
        assert!(lines[7].contains("2.23x"), "{}", lines[7]);
        let tg = format_targets(&rows, true);
        assert!(tg.contains("1.050x  PASS"), "{tg}");
        assert!(tg.contains("0.448x") && tg.lines().nth(1).unwrap().ends_with("PASS"));
        let slow = vec![
            trow(BASE, "fwd", 100.0, None),
            trow(FLARE, "fwd", 120.0, None),
        ];
        let tg = format_targets(&slow, true);
        assert!(tg.contains("1.200x  FAIL"), "{tg}");
        assert!(tg.contains("fwd+bwd: -"));
        assert!(!format_targets(&slow, false).contains("FAIL"));
    }

    #[test]
    fn w_grad_note() {
        let ok = vec![
            trow(BASE, "fwd+bwd", 1.0, Some(96.0)),
            trow(FLARE, "fwd+bwd", 1.0, Some(96.6)),
            trow(Impl::Composite.name(), "fwd+bwd", 1.0, Some(97.0)),
            trow(Impl::CompositeWVar.name(), "fwd+bwd", 1.0, Some(161.0)),
        ];
        let n = format_w_grad_note(&ok, 32.0);
        assert!(n.contains(": none"), "{n}");
        assert!(
            n.contains("(W Var) fwd+bwd peaks 161.0 MiB = base linear +65.0 MiB"),
            "{n}"
        );
        let bad = vec![
            trow(BASE, "fwd+bwd", 1.0, Some(96.0)),
            trow(FLARE, "fwd+bwd", 1.0, Some(130.0)),
        ];
        assert!(format_w_grad_note(&bad, 32.0).contains("APPEARED"));
        let cpu = vec![trow(BASE, "fwd+bwd", 1.0, None)];
        assert!(format_w_grad_note(&cpu, 32.0).contains("CUDA only"));
    }

    #[test]
    fn json_round_trip() {
        let dir = std::env::temp_dir().join(format!("flare-bench-lora-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lora.json");
        let rows = vec![lrow(BASE, "fwd", 184.0), lrow(FLARE, "fwd+bwd", 400.0)];
        write_json(&path, &rows).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let o = v[0].as_object().unwrap();
        for k in [
            "case", "pass", "shape", "dtype", "us", "peak_mib", "device", "impl",
        ] {
            assert!(o.contains_key(k), "missing {k}");
        }
        let back: Vec<LoraRow> = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, rows);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_and_calls_run_on_cpu() -> Result<()> {
        let dev = Device::Cpu;
        let s = Shape {
            tokens: 6,
            inf: 16,
            out: 12,
            r: 2,
        };
        let sets = Rc::new(vec![make_set(&dev, s, DType::F32)?]);
        let r = upcast(&sets[0])?;
        for (imp, pass) in cases() {
            let d = check(imp, pass, &sets[0], &r, &dev)?;
            assert!(d <= 1e-4, "{} {}: {d}", imp.name(), pass.label());
            make_call(imp, pass, sets.clone())(0)?;
        }
        Ok(())
    }
}
