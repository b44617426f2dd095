//! CPU helpers shared by the ops: accumulation types per dtype and dispatch over Candle's
//! `CpuStorage` variants.

use half::{bf16, f16};

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
}

macro_rules! elem {
    ($t:ty, $a:ty, $up:expr, $down:expr) => {
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
        }
    };
}

elem!(f32, f32, |x| x, |a| a);
elem!(f64, f64, |x| x, |a| a);
elem!(f16, f32, f16::to_f32, f16::from_f32);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32);

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

/// Rows per rayon task: enough elements per task that scheduling costs stay small.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}
