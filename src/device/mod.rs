//! Where computation runs. The CPU backend is the reference and the default; the CUDA device and the host
//! emulator that runs the same `.cu` kernels on the CPU plug in here.

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
}

/// What a user may ask for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    Cuda,
    Emulator,
    /// CUDA when a usable GPU is present, the CPU otherwise.
    Auto,
}

impl DeviceRequest {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            "emu" | "emulator" => Ok(DeviceRequest::Emulator),
            "auto" => Ok(DeviceRequest::Auto),
            other => Err(Error::invalid(
                "device",
                format!("'{other}' (expected cpu, cuda, emu or auto)"),
            )),
        }
    }

    /// Resolves the request to a device this build can run, or says why it cannot.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceRequest::Cpu | DeviceRequest::Auto => Ok(Device::Cpu),
            DeviceRequest::Cuda => Err(Error::Device(
                "this build has no CUDA device yet (the CUDA path is not part of this version); use --device cpu"
                    .into(),
            )),
            DeviceRequest::Emulator => Err(Error::Device(
                "this build has no kernel emulator yet (the CUDA path is not part of this version); use --device cpu"
                    .into(),
            )),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}
