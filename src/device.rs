//! Device selection: `cpu` (default) or `cuda[:N]`, parsed once and checked early.
//!
//! CUDA is a cargo feature so the default build needs no toolkit; whether a device can
//! run here is the runtime's to say (`runtime::select`): asking for CUDA in a build
//! without the feature is a clear error rather than a silent fallback to the CPU.

use crate::{Error, Result};

/// Where a command computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host CPU (all commands).
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    ///
    /// # Errors
    /// [`Error::Config`] for any other text (whether the device exists is checked later,
    /// by the runtime).
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(Error::Config(format!(
                    "unknown device `{other}`; use `cpu`, `cuda` or `cuda:N`"
                ))),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:2").unwrap(), Device::Cuda(2));
        assert!(Device::parse("tpu").is_err());
    }
}
