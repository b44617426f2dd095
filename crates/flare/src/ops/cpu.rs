//! CPU helpers shared by the ops: accumulation types per dtype, dispatch over Candle's
//! `CpuStorage` variants, and the loss ops' target reading.

use candle_core::{CpuStorage, Layout};
use half::{bf16, f16};

use super::contiguous_range;

/// An element type with the type its reductions accumulate in: f32 for f32 and the half types,
/// f64 for f64.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The accumulation type.
    type A: num_traits::Float + Send + Sync + std::iter::Sum + std::ops::AddAssign + 'static;
    /// Widens to the accumulation type.
    fn up(self) -> Self::A;
    /// Narrows from the accumulation type (round to nearest).
    fn down(a: Self::A) -> Self;
    /// Converts an f64 constant (an epsilon) to the accumulation type.
    fn acc(c: f64) -> Self::A;
    /// `exp` in the accumulation type: [`exp_f32`] for f32 accumulation, `f64::exp` for f64.
    fn exp(a: Self::A) -> Self::A;
}

macro_rules! elem {
    ($t:ty, $a:ty, $up:expr, $down:expr, $exp:expr) => {
        impl Elem for $t {
            type A = $a;
            #[inline(always)]
            fn up(self) -> $a {
                $up(self)
            }
            #[inline(always)]
            fn down(a: $a) -> Self {
                $down(a)
            }
            #[inline(always)]
            fn acc(c: f64) -> $a {
                c as $a
            }
            #[inline(always)]
            fn exp(a: $a) -> $a {
                $exp(a)
            }
        }
    };
}

elem!(f32, f32, |x| x, |a| a, exp_f32);
elem!(f64, f64, |x| x, |a| a, f64::exp);
elem!(f16, f32, f16::to_f32, f16::from_f32, exp_f32);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32, exp_f32);

/// `exp(x)` for f32 without a libm call, so that loops over rows vectorise (libm's `expf` is a
/// scalar call per element and dominates a CPU softmax).
///
/// Range reduction `x = n·ln2 + r`, |r| <= ln2/2, with `n` rounded by the 1.5·2²³ trick (no
/// `round` call, plain SSE2, and `n`'s integer value read from the sum's mantissa bits), a degree-6 Taylor polynomial for `exp(r)` (truncation error
/// below 1.3e-7 relative) and `2ⁿ` built from the exponent bits. Below -87.3 the result is 0
/// (as `exp` underflows there; this also maps -inf to 0), above 88.7 it is +inf, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's mantissa bits: integer ops vectorise, a float-to-int
    // conversion (saturating in Rust) does not.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Maximum of a row in the accumulation type, with 8 independent lanes so it vectorises.
#[inline]
pub(crate) fn row_max<T: Elem>(x: &[T]) -> T::A {
    use num_traits::Float;
    let mut m = [T::A::neg_infinity(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            let v = c[i].up();
            m[i] = if v > m[i] { v } else { m[i] };
        }
    }
    let mut best = T::A::neg_infinity();
    for v in m.into_iter().chain(rest.iter().map(|v| v.up())) {
        best = if v > best { v } else { best };
    }
    best
}

/// Sum of a slice of the accumulation type, with 8 independent lanes so it vectorises.
#[inline]
pub(crate) fn lane_sum<A: num_traits::Float + std::ops::AddAssign>(x: &[A]) -> A {
    let mut s = [A::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            s[i] += c[i];
        }
    }
    let mut total = A::zero();
    for v in s.into_iter().chain(rest.iter().copied()) {
        total += v;
    }
    total
}

/// Applies a generic body to the typed slice inside a `CpuStorage`, for the dtypes flare's ops
/// support; other dtypes produce an error naming the op.
macro_rules! dispatch_float {
    ($op:expr, $storage:expr, |$v:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage as S;
        match $storage {
            S::F32($v) => Ok(S::F32($body)),
            S::F64($v) => Ok(S::F64($body)),
            S::F16($v) => Ok(S::F16($body)),
            S::BF16($v) => Ok(S::BF16($body)),
            other => Err(candle_core::Error::Msg(format!(
                "{}: unsupported dtype {:?} on cpu",
                $op,
                other.dtype()
            ))),
        }
    }};
}
pub(crate) use dispatch_float;

/// Like [`dispatch_float`] for two storages that must share a dtype.
macro_rules! dispatch_float2 {
    ($op:expr, $s1:expr, $s2:expr, |$a:ident, $b:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage as S;
        match ($s1, $s2) {
            (S::F32($a), S::F32($b)) => Ok(S::F32($body)),
            (S::F64($a), S::F64($b)) => Ok(S::F64($body)),
            (S::F16($a), S::F16($b)) => Ok(S::F16($body)),
            (S::BF16($a), S::BF16($b)) => Ok(S::BF16($body)),
            (x, y) => Err(candle_core::Error::Msg(format!(
                "{}: unsupported or mismatched dtypes {:?} and {:?} on cpu",
                $op,
                x.dtype(),
                y.dtype()
            ))),
        }
    }};
}
pub(crate) use dispatch_float2;

/// Like [`dispatch_float`] for three storages that must share a dtype.
macro_rules! dispatch_float3 {
    ($op:expr, $s1:expr, $s2:expr, $s3:expr, |$a:ident, $b:ident, $c:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage as S;
        match ($s1, $s2, $s3) {
            (S::F32($a), S::F32($b), S::F32($c)) => Ok(S::F32($body)),
            (S::F64($a), S::F64($b), S::F64($c)) => Ok(S::F64($body)),
            (S::F16($a), S::F16($b), S::F16($c)) => Ok(S::F16($body)),
            (S::BF16($a), S::BF16($b), S::BF16($c)) => Ok(S::BF16($body)),
            (x, y, z) => Err(candle_core::Error::Msg(format!(
                "{}: unsupported or mismatched dtypes {:?}, {:?} and {:?} on cpu",
                $op,
                x.dtype(),
                y.dtype(),
                z.dtype()
            ))),
        }
    }};
}
pub(crate) use dispatch_float3;

/// The targets of the loss op `op` (cross-entropy, linear cross-entropy) as a slice: u32 and
/// contiguous (the public functions check the dtype and make them contiguous first).
pub(crate) fn targets_of<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [u32]> {
    let (a, b) = contiguous_range(op, l)?;
    match s {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: targets must be u32"
        ))),
    }
}

/// The error message of the loss op `op` for target `t` of row `i` outside the vocabulary
/// `0..vocab` that is not the ignore index.
pub(crate) fn bad_target(op: &'static str, i: usize, t: u32, vocab: usize) -> String {
    format!(
        "{op}: target {t} of row {i} is outside the vocabulary (0..{vocab}) and is not the \
         ignore index"
    )
}

/// Rows per rayon task: enough elements per task that scheduling costs stay small.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_f64_exp() {
        // A dense sweep over the range where exp is finite and normal, plus the edges.
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_7;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn lane_reductions_match_sequential() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let seq: f32 = v.iter().sum();
        assert!((lane_sum(&v) - seq).abs() < 1e-5);
        let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(row_max(&v), m);
    }
}
