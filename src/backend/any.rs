//! The one dispatch point: an enum of the backends this build can run, used by the CLI and the library.
//! Everything below it is generic over [`super::Backend`]; matching on this enum is where the concrete type
//! is picked.

use super::cpu::CpuBackend;
use super::kernel::KernelBackend;
use crate::gpu::cuda::CudaDevice;
use crate::gpu::emulator::EmuDevice;
use crate::{Device, Result};

pub enum AnyBackend {
    Cpu(Box<CpuBackend>),
    Emu(Box<KernelBackend<EmuDevice>>),
    Cuda(Box<KernelBackend<CudaDevice>>),
}

impl AnyBackend {
    /// Opens the backend of `device` (a GPU that is missing is an error that says so).
    pub fn open(device: Device) -> Result<Self> {
        Ok(match device {
            Device::Cpu => AnyBackend::Cpu(Box::new(CpuBackend::new())),
            Device::Emulator => AnyBackend::Emu(Box::new(KernelBackend::new(EmuDevice::default()))),
            Device::Cuda(i) => AnyBackend::Cuda(Box::new(KernelBackend::new(CudaDevice::new(i)?))),
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
