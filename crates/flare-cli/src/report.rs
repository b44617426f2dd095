//! Reporting helpers shared by the subcommands: the [`median`] of timing samples, numbers
//! formatted for tables ([`fmt_num`]), and result rows written as JSON with flare's one atomic
//! writer ([`write_json`], through [`flare::io::write_atomic`]).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// The median of `xs` (mean of the middle two for an even count); NaN for an empty slice.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Formats a number with about four significant digits and no exponent.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Writes `rows` as a pretty JSON list (and a final newline) to `path` atomically, with
/// [`flare::io::write_atomic`]: a crash leaves the old file or the new one, never a mix.
pub fn write_json<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(rows).context("serialising the results")?;
    bytes.push(b'\n');
    flare::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// The directory a `--json` path lands in (`.` for a bare file name).
pub fn json_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_unsorted() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
        // An outlier does not move the median.
        assert_eq!(median(&[1.0, 1.0, 1000.0]), 1.0);
    }

    #[test]
    fn number_format() {
        assert_eq!(fmt_num(1234.56), "1235");
        assert_eq!(fmt_num(123.456), "123.5");
        assert_eq!(fmt_num(12.3456), "12.35");
        assert_eq!(fmt_num(1.23456), "1.235");
        assert_eq!(fmt_num(f64::NAN), "-");
    }

    #[test]
    fn json_dirs() {
        assert_eq!(json_dir(Path::new("out.json")), Path::new("."));
        assert_eq!(json_dir(Path::new("a/b/out.json")), Path::new("a/b"));
    }
}
