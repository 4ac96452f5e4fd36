//! The one dispatch point: an enum of the backends this build can run, used by the CLI and the library.
//! Everything below it is generic over [`super::Backend`]; [`with_backend!`](crate::with_backend) is the
//! single `match` that picks the concrete type.

use super::cpu::CpuBackend;
use super::kernel::KernelBackend;
use crate::gpu::cuda::CudaDevice;
use crate::gpu::emulator::EmuDevice;
use crate::{Device, Result};

pub enum AnyBackend {
    Cpu(CpuBackend),
    Emu(KernelBackend<EmuDevice>),
    Cuda(KernelBackend<CudaDevice>),
}

impl AnyBackend {
    /// Opens the backend of `device` (a GPU that is missing is an error that says so).
    pub fn open(device: Device) -> Result<Self> {
        Ok(match device {
            Device::Cpu => AnyBackend::Cpu(CpuBackend::new()),
            Device::Emulator => AnyBackend::Emu(KernelBackend::new(EmuDevice::default())),
            Device::Cuda(i) => AnyBackend::Cuda(KernelBackend::new(CudaDevice::new(i)?)),
        })
    }

    pub fn device(&self) -> Device {
        match self {
            AnyBackend::Cpu(_) => Device::Cpu,
            AnyBackend::Emu(_) => Device::Emulator,
            AnyBackend::Cuda(_) => Device::Cuda(0),
        }
    }
}

/// Runs `$body` with `$b` bound to the per-backend value inside `$value`, an [`AnyBackend`] or any enum
/// with the same three variants `Cpu`, `Emu`, `Cuda` over per-backend state: `with_backend!(AnyBackend,
/// any, b => b.name())`.
#[macro_export]
macro_rules! with_backend {
    ($enum:ident, $value:expr, $b:ident => $body:expr) => {
        match $value {
            $enum::Cpu($b) => $body,
            $enum::Emu($b) => $body,
            $enum::Cuda($b) => $body,
        }
    };
}
