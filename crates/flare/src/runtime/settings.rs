//! [`Settings`]: every `FLARE_*` environment switch that selects a code path, read once into one
//! typed struct.
//!
//! The environment is read the first time [`settings`] is called (normally by the first op
//! that consults a switch) and never again: set the variables before the process starts its
//! work. Every switch is parsed the same way: the value is trimmed, then `0`, `false` or `off`
//! (any case) turn it off and `1`, `true` or `on` turn it on; an empty or unset variable leaves
//! the default; anything else is ignored with a warning on stderr that names the variable, its
//! value and the default kept.
//!
//! | variable | default | what it does | when to use it |
//! | --- | --- | --- | --- |
//! | `FLARE_SMALL_GEMM` | on | small matmuls (<= 2^21 multiply-adds, k <= 512) run on flare's `gemm_small` kernel instead of cuBLASLt | `0` to measure cuBLASLt alone (`bench/gpu_run.sh` does) |
//! | `FLARE_GEMV` | on | skinny products `x @ W.T` (<= 8 rows: decode-time linear layers) run on flare's `gemv_*` kernel | `0` to compare with cuBLASLt / `gemm_small` (`bench/gpu_run.sh` runs the decode tests and bench with it) |
//! | `FLARE_ATTENTION_DECODE` | on | decode attention runs on the flash-decoding `attention_split_*` / `attention_combine_*` kernels | `0` for GEMM + softmax + GEMM, to compare (`bench/gpu_run.sh`) |
//! | `FLARE_ATTENTION_CUDNN` | on | training and prefill attention runs on cuDNN's fused flash attention (cuDNN 9, opened at run time; the engine PyTorch's SDPA runs on Hopper) where it applies: bf16 / f16, head dim 64 / 128, equal-length sequences of a multiple of 128 tokens, no window; flare's own kernel otherwise, or when cuDNN is not found (`flare bench` prints the cuDNN version, or `no cuDNN`, beside the GPU's name) | `0` for flare's kernel everywhere, to compare (`bench/gpu_run.sh` stage `attn` tests and times both against SDPA; on an H100, cuDNN's forward + backward is 1.5x to 2.4x faster than the kernel, BENCHMARKS.md 2026-12-07) |
//! | `FLARE_ARGMAX_SPLIT` | on | the device argmax of <= 64 rows of >= 4096 columns runs in two stages (many blocks per row, then a merge) | `0` for the one-block-per-row kernel, to compare (per-op batch-1 decode 1.7% faster with the split, BENCHMARKS.md 2026-12-06) |
//! | `FLARE_DECODE_ENGINE` | on | generation runs plain batch-1 greedy decoding on the decode engine ([`crate::generate::DecodeGraph`]) where it applies | `0` for the per-op path, to compare or to debug |
//! | `FLARE_GEMM_AUTOTUNE` | on | large cuBLASLt GEMM plans time the heuristic's top 8 algorithms once and keep the fastest | `0` to take the heuristic's first choice |
//! | `FLARE_GEMM_DEBUG` | off | each autotune prints its candidates, times and winner to stderr | `1` to see why a GEMM got its algorithm |
//! | `FLARE_LAUNCH_PARAM_CACHE` | on | [`super::cache_launch_params`] turns on Candle's cache of strided launches' shape and stride parameters (the trainer holds it around each pass) | `0` to measure without it (`flare bench train`) |
//! | `FLARE_CUDA_EVENT_TRACKING` | off | cudarc's per-allocation event tracking stays on (flare turns it off: it issues all work on Candle's one stream per device) | `1` when the same buffers are also used from streams of your own |
//! | `FLARE_CUDA_KEEP_POOL` | on | the device memory pool keeps freed memory instead of returning it at every synchronisation ([`super::empty_cache`] trims on demand) | `0` to return memory at every sync (slow for large tensors) |
//! | `FLARE_STEP_GRAPH` | on | the trainer's forward and backward of a padded batch are captured as one CUDA graph the second time a batch shape is seen, and replayed for that shape from then on (one GPU, no LoRA dropout, no checkpoint offload: [`crate::train::StepGraphs`]); the values are those of the op-by-op pass | `0` for op-by-op launches, to compare (`flare bench train` prints `graph` on the rows that ran one) or to debug |
//!
//! Tests and benchmarks that compare two paths in one process do not touch the environment:
//! [`Settings::apply`] overrides the settings on the current thread while its guard lives.
//!
//! ```
//! use flare::runtime::{settings, Settings};
//! let off = Settings { decode_engine: false, ..settings() };
//! {
//!     let _guard = off.apply();
//!     assert!(!settings().decode_engine);
//! }
//! assert_eq!(settings().decode_engine, Settings::from_lookup(|k| std::env::var(k).ok()).0.decode_engine);
//! ```

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;

/// The code-path switches, one field per `FLARE_*` variable (see the [module docs](self) for
/// the table). [`Default`] gives the defaults with no variable set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `FLARE_SMALL_GEMM`: small matmuls on `gemm_small` rather than cuBLASLt.
    pub small_gemm: bool,
    /// `FLARE_GEMV`: skinny products on `gemv_*`.
    pub gemv: bool,
    /// `FLARE_ATTENTION_DECODE`: the flash-decoding attention kernels.
    pub attention_decode: bool,
    /// `FLARE_ATTENTION_CUDNN`: training / prefill attention on cuDNN where it applies.
    pub attention_cudnn: bool,
    /// `FLARE_ARGMAX_SPLIT`: the two-stage argmax for few long rows.
    pub argmax_split: bool,
    /// `FLARE_DECODE_ENGINE`: generation may use the batch-1 decode engine.
    pub decode_engine: bool,
    /// `FLARE_GEMM_AUTOTUNE`: large GEMM plans are autotuned.
    pub gemm_autotune: bool,
    /// `FLARE_GEMM_DEBUG`: autotunes are printed to stderr.
    pub gemm_debug: bool,
    /// `FLARE_LAUNCH_PARAM_CACHE`: [`super::cache_launch_params`] is active.
    pub launch_param_cache: bool,
    /// `FLARE_CUDA_EVENT_TRACKING`: cudarc's per-allocation event tracking is kept.
    pub cuda_event_tracking: bool,
    /// `FLARE_CUDA_KEEP_POOL`: the device pool keeps freed memory.
    pub cuda_keep_pool: bool,
    /// `FLARE_STEP_GRAPH`: the trainer replays a captured CUDA graph of each padded batch
    /// shape's forward and backward.
    pub step_graph: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            small_gemm: true,
            gemv: true,
            attention_decode: true,
            attention_cudnn: true,
            argmax_split: true,
            decode_engine: true,
            gemm_autotune: true,
            gemm_debug: false,
            launch_param_cache: true,
            cuda_event_tracking: false,
            cuda_keep_pool: true,
            step_graph: true,
        }
    }
}

/// One switch: its variable and its field.
struct Switch {
    var: &'static str,
    field: fn(&mut Settings) -> &mut bool,
}

/// Every switch, in the order of the module docs' table.
const SWITCHES: [Switch; 12] = [
    Switch {
        var: "FLARE_SMALL_GEMM",
        field: |s| &mut s.small_gemm,
    },
    Switch {
        var: "FLARE_GEMV",
        field: |s| &mut s.gemv,
    },
    Switch {
        var: "FLARE_ATTENTION_DECODE",
        field: |s| &mut s.attention_decode,
    },
    Switch {
        var: "FLARE_ATTENTION_CUDNN",
        field: |s| &mut s.attention_cudnn,
    },
    Switch {
        var: "FLARE_ARGMAX_SPLIT",
        field: |s| &mut s.argmax_split,
    },
    Switch {
        var: "FLARE_DECODE_ENGINE",
        field: |s| &mut s.decode_engine,
    },
    Switch {
        var: "FLARE_GEMM_AUTOTUNE",
        field: |s| &mut s.gemm_autotune,
    },
    Switch {
        var: "FLARE_GEMM_DEBUG",
        field: |s| &mut s.gemm_debug,
    },
    Switch {
        var: "FLARE_LAUNCH_PARAM_CACHE",
        field: |s| &mut s.launch_param_cache,
    },
    Switch {
        var: "FLARE_CUDA_EVENT_TRACKING",
        field: |s| &mut s.cuda_event_tracking,
    },
    Switch {
        var: "FLARE_CUDA_KEEP_POOL",
        field: |s| &mut s.cuda_keep_pool,
    },
    Switch {
        var: "FLARE_STEP_GRAPH",
        field: |s| &mut s.step_graph,
    },
];

/// A switch's value: `Some(on)`, `None` for empty, `Err` for anything unrecognised.
fn parse(value: &str) -> Result<Option<bool>, ()> {
    let v = value.trim().to_ascii_lowercase();
    match v.as_str() {
        "" => Ok(None),
        "0" | "false" | "off" => Ok(Some(false)),
        "1" | "true" | "on" => Ok(Some(true)),
        _ => Err(()),
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl Settings {
    /// The names of every `FLARE_*` variable read, in the order of the module docs' table.
    pub fn variables() -> impl Iterator<Item = &'static str> {
        SWITCHES.iter().map(|s| s.var)
    }

    /// The settings that `lookup` (a variable's value, `None` when unset) gives, and a warning
    /// for each variable whose value is not recognised (that switch keeps its default).
    /// [`settings`] calls it once with the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> (Settings, Vec<String>) {
        let mut s = Settings::default();
        let mut warnings = Vec::new();
        for sw in &SWITCHES {
            let Some(raw) = lookup(sw.var) else { continue };
            let field = (sw.field)(&mut s);
            match parse(&raw) {
                Ok(Some(on)) => *field = on,
                Ok(None) => {}
                Err(()) => warnings.push(format!(
                    "ignoring {}={raw:?}: expected 0, false or off, or 1, true or on; \
                     keeping the default ({})",
                    sw.var,
                    on_off(*field)
                )),
            }
        }
        (s, warnings)
    }

    /// Makes these the settings of the current thread until the returned guard is dropped
    /// (then the previous ones come back): for tests and benchmarks that compare two paths in
    /// one process. Other threads keep theirs.
    pub fn apply(self) -> SettingsGuard {
        let previous = OVERRIDE.with(|o| o.replace(Some(self)));
        SettingsGuard {
            previous,
            _not_send: PhantomData,
        }
    }
}

thread_local! {
    /// The settings [`Settings::apply`] put on this thread, if any.
    static OVERRIDE: Cell<Option<Settings>> = const { Cell::new(None) };
}

/// The settings of the environment, read and validated once per process.
fn from_env() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let (s, warnings) = Settings::from_lookup(|var| std::env::var(var).ok());
        for w in warnings {
            eprintln!("flare: {w}");
        }
        s
    })
}

/// The settings in force on this thread: those of a live [`Settings::apply`] guard, else the
/// environment's (read once per process; see the [module docs](self)).
pub fn settings() -> Settings {
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| *from_env())
}

/// Restores the thread's previous settings when dropped; see [`Settings::apply`]. Not `Send`:
/// it must be dropped on the thread that made it.
#[must_use = "the settings apply only while the guard lives"]
#[derive(Debug)]
pub struct SettingsGuard {
    previous: Option<Settings>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for SettingsGuard {
    fn drop(&mut self) {
        OVERRIDE.with(|o| o.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_when_unset() {
        let (s, w) = Settings::from_lookup(|_| None);
        assert_eq!(s, Settings::default());
        assert!(w.is_empty());
        assert!(s.gemv && s.attention_decode && s.small_gemm && s.decode_engine);
        assert!(s.argmax_split && !s.gemm_debug && !s.cuda_event_tracking);
    }

    #[test]
    fn every_switch_parses_the_same_way() {
        for var in Settings::variables() {
            for (value, on) in [
                ("0", false),
                (" off ", false),
                ("FALSE", false),
                ("1", true),
                ("on\n", true),
                ("True", true),
            ] {
                let (s, w) = Settings::from_lookup(lookup(&[(var, value)]));
                assert!(w.is_empty(), "{var}={value:?}: {w:?}");
                let (mut want, _) = Settings::from_lookup(|_| None);
                let sw = SWITCHES.iter().find(|s| s.var == var).unwrap();
                *(sw.field)(&mut want) = on;
                assert_eq!(s, want, "{var}={value:?}");
            }
        }
    }

    #[test]
    fn empty_keeps_the_default_and_garbage_warns() {
        let (s, w) = Settings::from_lookup(lookup(&[("FLARE_GEMV", "  ")]));
        assert_eq!(s, Settings::default());
        assert!(w.is_empty());
        let (s, w) = Settings::from_lookup(lookup(&[
            ("FLARE_GEMV", "maybe"),
            ("FLARE_GEMM_DEBUG", "2"),
        ]));
        assert_eq!(s, Settings::default());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("FLARE_GEMV=\"maybe\"") && w[0].contains("default (on)"),
            "{}",
            w[0]
        );
        assert!(
            w[1].contains("FLARE_GEMM_DEBUG=\"2\"") && w[1].contains("default (off)"),
            "{}",
            w[1]
        );
    }

    #[test]
    fn apply_overrides_this_thread_only_and_nests() {
        let base = settings();
        let a = Settings {
            gemv: !base.gemv,
            ..base
        };
        {
            let _g = a.apply();
            assert_eq!(settings(), a);
            let b = Settings {
                decode_engine: !base.decode_engine,
                ..a
            };
            {
                let _g2 = b.apply();
                assert_eq!(settings(), b);
                let other = std::thread::spawn(settings).join().unwrap();
                assert_eq!(
                    other, base,
                    "another thread sees the environment's settings"
                );
            }
            assert_eq!(settings(), a);
        }
        assert_eq!(settings(), base);
    }
}
