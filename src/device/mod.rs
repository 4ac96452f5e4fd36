//! Where computation runs. The CPU backend is the reference and the default; the CUDA device and the host
//! emulator that runs the same `.cu` kernels on the CPU plug in here.

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The host emulator running the CUDA kernels on the CPU.
    Emulator,
    /// A GPU, by ordinal.
    Cuda(usize),
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

    /// Resolves the request to a device this machine can run, or says why it cannot: `cuda` checks the
    /// kernels, the driver and a GPU (without panicking); `auto` takes the GPU when there is one, else the CPU.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Emulator => Ok(Device::Emulator),
            DeviceRequest::Cuda => crate::gpu::cuda::CudaDevice::new(0).map(|_| Device::Cuda(0)).map_err(|e| {
                let msg = match e {
                    Error::Device(m) => m,
                    other => other.to_string(),
                };
                Error::Device(format!("{msg}; use --device cpu (or emu to run the CUDA kernels on the host emulator)"))
            }),
            DeviceRequest::Auto => Ok(if crate::gpu::cuda::CudaDevice::new(0).is_ok() { Device::Cuda(0) } else { Device::Cpu }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Emulator => f.write_str("emu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
