//! Device selection for every subcommand: the `--device` argument ([`DeviceSpec`]: `auto`,
//! `cpu`, `cuda`, `cuda:N`), opening it with a clear error when this build has no CUDA, and the
//! hardware's name for reports ([`hardware_name`]).

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// A parsed `--device` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::auto()),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| {
                    anyhow::anyhow!("invalid CUDA ordinal in device '{s}': expected cuda:N")
                }),
                None => bail!("unknown device '{s}': expected auto, cpu, cuda or cuda:N"),
            },
        }
    }
}

impl DeviceSpec {
    /// `auto`: CUDA device 0 when this build has CUDA and a GPU is there, else the CPU.
    pub fn auto() -> Self {
        if cfg!(feature = "cuda")
            && candle_core::utils::cuda_is_available()
            && Device::new_cuda(0).is_ok()
        {
            DeviceSpec::Cuda(0)
        } else {
            DeviceSpec::Cpu
        }
    }

    /// Opens the device, with a clear error when this build has no CUDA.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!("flare was built without CUDA; rebuild with --features cuda");
                }
                Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}"))
            }
        }
    }

    /// The name rows carry in their `device` field: `cpu` or `cuda:N`.
    pub fn name(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// A human-readable description of the hardware behind `dev` (the GPU's name on CUDA).
pub(crate) fn hardware_name(dev: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        let name = c
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "CUDA device".into());
        // Whether attention runs on cuDNN (flare opens it at run time, when asked to).
        if !flare::runtime::settings().attention_cudnn {
            return name;
        }
        return match flare::runtime::cudnn_version() {
            Ok(v) => format!("{name}, cuDNN {}.{}.{}", v / 10_000, v / 100 % 100, v % 100),
            Err(_) => format!("{name}, no cuDNN"),
        };
    }
    let _ = dev;
    format!("CPU ({} threads)", candle_core::utils::get_num_threads())
}

/// Fixes Candle's CPU thread count for the whole process: `main` calls it first, while the
/// process has one thread.
///
/// Candle's CPU matmul asks [`candle_core::utils::get_num_threads`] on every call, and without
/// `RAYON_NUM_THREADS` that re-reads `/proc/cpuinfo` (the physical-core count) each time: on
/// a 2-core machine about a quarter of `flare demo`'s time (BENCHMARKS.md, "CPU"). Setting the
/// variable to the count Candle computes keeps Candle's choice and makes every later call an
/// environment lookup. A valid value the user set is left as it is.
pub fn pin_cpu_threads() {
    let current = std::env::var("RAYON_NUM_THREADS").ok();
    if let Some(n) = thread_count_to_pin(current.as_deref(), candle_core::utils::get_num_threads) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The `RAYON_NUM_THREADS` to set given its current value: none when it already names a
/// positive count (which Candle and rayon read), else Candle's own count.
fn thread_count_to_pin(current: Option<&str>, candle: impl FnOnce() -> usize) -> Option<usize> {
    match current.and_then(|v| v.parse::<usize>().ok()) {
        Some(n) if n > 0 => None,
        _ => Some(candle().max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_thread_count_is_pinned_unless_the_user_set_one() {
        assert_eq!(thread_count_to_pin(None, || 6), Some(6));
        assert_eq!(thread_count_to_pin(Some("3"), || 6), None);
        // Values Candle ignores (it parses the variable as it is) are replaced by its count.
        assert_eq!(thread_count_to_pin(Some(" 3 "), || 6), Some(6));
        assert_eq!(thread_count_to_pin(Some("0"), || 6), Some(6));
        assert_eq!(thread_count_to_pin(Some("many"), || 6), Some(6));
        assert_eq!(thread_count_to_pin(None, || 0), Some(1));
    }

    #[test]
    fn device_specs() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("metal".parse::<DeviceSpec>().is_err());
        #[cfg(not(feature = "cuda"))]
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::Cuda(2).name(), "cuda:2");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert_eq!(
            e,
            "flare was built without CUDA; rebuild with --features cuda"
        );
    }
}
