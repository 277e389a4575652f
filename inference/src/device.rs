//! Which processor runs the forward pass: the CPU, or an NVIDIA GPU through candle's CUDA
//! backend when the crate is built with the `cuda` feature.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{InferenceError, Result};

/// The device asked for in configuration (`auto`, `cpu`, `cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first CUDA GPU when this build has CUDA and one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA GPU with this ordinal; an error when there is none.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = InferenceError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    InferenceError::Device(format!(
                        "unknown device {other:?}: expected auto, cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

// As the text above, in configuration files and flags.
impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether this build can run models on CUDA GPUs (the `cuda` feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// Opens the device. `Auto` falls back to the CPU when this build has no CUDA or the
    /// driver reports no usable GPU; an explicit `cuda:N` fails instead, so a node configured
    /// for its GPU never silently serves from the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if !CUDA_BUILD => Ok(Device::Cpu),
            Self::Auto => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
            Self::Cuda(_) if !CUDA_BUILD => Err(InferenceError::Device(
                "this agent was built without CUDA (cargo feature `cuda`); use device cpu or auto"
                    .to_owned(),
            )),
            Self::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|error| {
                InferenceError::Device(format!("cannot open CUDA device {ordinal}: {error}"))
            }),
        }
    }
}

/// What a device is, for logs, `/v1/models` and the node's facts: `cpu`, or
/// `cuda:N (<GPU name>)`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let stream = cuda.cuda_stream();
            let context = stream.context();
            match context.name() {
                Ok(name) => format!("cuda:{} ({name})", context.ordinal()),
                Err(_) => format!("cuda:{}", context.ordinal()),
            }
        }
        other => format!("{:?}", other.location()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:1", DeviceChoice::Cuda(1)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice);
            assert_eq!(choice.to_string(), text);
        }
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        let error = "gpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(
            error.contains("expected auto, cpu, cuda or cuda:N"),
            "{error}"
        );
    }

    #[test]
    fn cpu_opens_everywhere_and_auto_without_cuda_is_the_cpu() {
        assert!(matches!(DeviceChoice::Cpu.open().unwrap(), Device::Cpu));
        assert_eq!(describe(&Device::Cpu), "cpu");
        if !CUDA_BUILD {
            assert!(matches!(DeviceChoice::Auto.open().unwrap(), Device::Cpu));
            let error = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
            assert!(error.contains("built without CUDA"), "{error}");
        }
    }
}
