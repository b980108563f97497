//! Where forward passes run, parsed in one place: [`DeviceSpec`] is `cpu`, `cuda` (every
//! visible GPU) or `cuda:N`, for the `--device` flags and the search file's `[evaluator] device`.
//!
//! ```
//! use evomerge::device::DeviceSpec;
//! let spec: DeviceSpec = "cuda:1".parse()?;
//! assert_eq!(spec, DeviceSpec::Cuda(Some(1)));
//! assert_eq!(spec.to_string(), "cuda:1");
//! assert_eq!(DeviceSpec::default(), DeviceSpec::Cpu);
//! # Ok::<(), evomerge::Error>(())
//! ```
//!
//! GPUs need a build with the `cuda` cargo feature (`cargo build --release --features cuda`, with
//! the CUDA toolkit installed); in a build without it, opening a `cuda` spec is an error that
//! says so (parsing it is not, so a search file written for a GPU machine still loads).
//!
//! # Several GPUs
//!
//! `cuda` means every visible GPU (counted by opening ordinals 0, 1, … until one fails; choose
//! them with `CUDA_VISIBLE_DEVICES`). A search evaluates `slots` candidates at once on a rayon
//! pool of `slots` threads; the evaluation on pool thread `i` runs on GPU [`slot_device`]`(i, n)`
//! = `i mod n`, so slots spread evenly over the GPUs (with more GPUs than slots, the first
//! `slots` GPUs are used). Commands that score one candidate at a time (`eval`, `soup --greedy`,
//! `fisher`) use the first device of the spec.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// Most GPU ordinals probed for `cuda` (every visible GPU).
const MAX_GPUS: usize = 64;

/// A device to run forward passes on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The CPU (candle's CPU backend, threads from the rayon pool).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal, or (`None`) every visible GPU.
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// True for `cuda` and `cuda:N`.
    pub fn is_cuda(&self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// Open every device this spec names: `[Cpu]`, `[GPU N]`, or every visible GPU in ordinal
    /// order. Fails for `cuda` in a build without the `cuda` feature (the message says how to
    /// build one), when no GPU is visible, or when GPU `N` cannot be opened.
    pub fn open_all(&self) -> Result<Vec<Device>> {
        match self {
            DeviceSpec::Cpu => Ok(vec![Device::Cpu]),
            DeviceSpec::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::msg(format!(
                        "device `{self}`: this evomerge was built without CUDA support; \
                         rebuild it with `cargo build --release --features cuda` (needs the CUDA \
                         toolkit), or use `cpu`"
                    )));
                }
                match ordinal {
                    Some(n) => Device::new_cuda(*n).map(|d| vec![d]).map_err(|e| {
                        Error::msg(format!("device `{self}`: cannot open GPU {n}: {e}"))
                    }),
                    None => {
                        let mut devices = Vec::new();
                        for n in 0..MAX_GPUS {
                            match Device::new_cuda(n) {
                                Ok(d) => devices.push(d),
                                Err(e) if n == 0 => {
                                    return Err(Error::msg(format!(
                                        "device `cuda`: no GPU could be opened: {e}"
                                    )));
                                }
                                Err(_) => break,
                            }
                        }
                        Ok(devices)
                    }
                }
            }
        }
    }

    /// The first device of [`DeviceSpec::open_all`] (for commands that run one model at a time).
    pub fn open(&self) -> Result<Device> {
        let mut all = self.open_all()?;
        Ok(all.swap_remove(0))
    }
}

/// Which of `devices` devices evaluation slot `slot` runs on: `slot mod devices` (0 when there
/// are none), so `s` slots over `n` GPUs put `⌈s/n⌉` or `⌊s/n⌋` slots on each.
pub fn slot_device(slot: usize, devices: usize) -> usize {
    if devices == 0 { 0 } else { slot % devices }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// `cpu`, `cuda` or `cuda:N` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| DeviceSpec::Cuda(Some(n)))
                .ok_or_else(|| {
                    Error::msg(format!(
                        "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                    ))
                }),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(None)),
            ("cuda:0", DeviceSpec::Cuda(Some(0))),
            ("cuda:3", DeviceSpec::Cuda(Some(3))),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!(
            " CUDA:2 ".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Cuda(Some(2))
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "metal", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn slots_go_round_robin_over_the_gpus() {
        let map = |slots: usize, gpus: usize| -> Vec<usize> {
            (0..slots).map(|s| slot_device(s, gpus)).collect()
        };
        assert_eq!(map(4, 2), [0, 1, 0, 1]);
        assert_eq!(map(5, 2), [0, 1, 0, 1, 0]);
        assert_eq!(map(3, 4), [0, 1, 2]);
        assert_eq!(map(3, 1), [0, 0, 0]);
        assert_eq!(map(2, 0), [0, 0]);
    }

    #[test]
    fn cpu_opens_one_device() {
        let all = DeviceSpec::Cpu.open_all().unwrap();
        assert_eq!(all.len(), 1);
        assert!(all[0].is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        for spec in [DeviceSpec::Cuda(None), DeviceSpec::Cuda(Some(1))] {
            let e = spec.open_all().unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
            assert!(e.contains(&format!("`{spec}`")), "{e}");
        }
    }
}
