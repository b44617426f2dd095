//! `flare bench`: the benchmarks, one file each (`ops`, `lora`, `decode`, `train`, `floors`;
//! `presets` holds the model shapes and the FLOP count `train` shares with its anchor),
//! and the timing harness that `bench ops` and `bench lora` share: the [`Pass`] a row times,
//! the timing [`Config`] per device, input-set rotation ([`input_sets`]) and `--filter`
//! ([`matches_filter`]). `pool` reads the CUDA memory pool's counters for the peak-memory
//! columns of `bench lora` and `bench train`. Device selection and reporting live beside the
//! other subcommands' ([`crate::device`], [`crate::report`]).

use anyhow::Result;

pub mod decode;
pub mod floors;
pub mod lora;
pub mod ops;
#[cfg(feature = "cuda")]
pub(crate) mod pool;
pub mod presets;
pub mod train;

/// Which pass a row times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The forward only.
    Fwd,
    /// Forward then `.backward()` from the output.
    FwdBwd,
}

impl Pass {
    /// The label in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::FwdBwd => "fwd+bwd",
        }
    }
}

/// How many input sets to rotate through so that the sets together exceed the cache twice
/// over, capped at `max_sets`; one when a single set is already larger than the cache.
pub fn input_sets(footprint: usize, cache_bytes: usize, max_sets: usize) -> usize {
    if footprint == 0 || footprint >= cache_bytes {
        1
    } else {
        (2 * cache_bytes)
            .div_ceil(footprint)
            .clamp(1, max_sets.max(1))
    }
}

/// Whether `label` matches `--filter` (case-insensitive substring; commas separate
/// alternatives).
pub fn matches_filter(label: &str, filter: Option<&str>) -> bool {
    let Some(f) = filter else { return true };
    let label = label.to_ascii_lowercase();
    f.split(',')
        .map(|p| p.trim().to_ascii_lowercase())
        .filter(|p| !p.is_empty())
        .any(|p| label.contains(&p))
}

/// Timing parameters that depend on the device and `--quick`; shared by `bench ops` and
/// `bench lora`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) repeats: usize,
    pub(crate) warmup_bursts: usize,
    /// Target length of one timed region, in microseconds.
    pub(crate) target_region_us: f64,
    pub(crate) max_burst: usize,
    /// Rough cap on the timed seconds that the caller's `budget` covers (one case for
    /// `bench ops`, the whole run for `bench lora`); repeats are cut (to no fewer than 3) above
    /// it.
    pub(crate) budget_s: f64,
    pub(crate) cache_bytes: usize,
    pub(crate) max_sets: usize,
}

/// Seconds of timed work allowed, by (cuda, quick): `[quick, cuda, cpu]`.
pub(crate) type Budget = [f64; 3];
impl Config {
    pub(crate) fn new(cuda: bool, quick: bool, repeats: Option<u32>, budget: Budget) -> Config {
        let default_repeats = match (cuda, quick) {
            (_, true) => 5,
            (true, false) => 25,
            (false, false) => 10,
        };
        Config {
            repeats: repeats.map_or(default_repeats, |r| r as usize),
            warmup_bursts: if quick { 1 } else { 2 },
            target_region_us: if cuda { 2_000.0 } else { 5_000.0 },
            max_burst: if cuda { 2_000 } else { 1_000 },
            budget_s: match (cuda, quick) {
                (_, true) => budget[0],
                (true, false) => budget[1],
                (false, false) => budget[2],
            },
            // H100's L2 is 50 MB; on the CPU, a generous last-level cache.
            cache_bytes: if cuda { 50_000_000 } else { 32 << 20 },
            max_sets: if cuda { 16 } else { 8 },
        }
    }
}

/// A timed call: runs the op on input set `i` and drops the result.
pub(crate) type Call = Box<dyn FnMut(usize) -> Result<()>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation() {
        assert_eq!(input_sets(100 << 20, 50_000_000, 16), 1);
        assert_eq!(input_sets(6 << 20, 50_000_000, 16), 16);
        assert_eq!(input_sets(40_000_000, 50_000_000, 16), 3);
        assert_eq!(input_sets(16 << 10, 50_000_000, 16), 16);
    }

    #[test]
    fn filters() {
        assert!(matches_filter("softmax 64x64 f32 fwd", None));
        assert!(matches_filter("softmax 64x64 f32 fwd", Some("SOFTMAX")));
        assert!(matches_filter(
            "rms_norm 64x64 f32 fwd",
            Some("softmax, rms")
        ));
        assert!(!matches_filter(
            "matmul 64x64x64 f32 fwd",
            Some("softmax,rms")
        ));
        assert!(matches_filter("softmax 64x64 f32 fwd+bwd", Some("fwd+bwd")));
    }
}
