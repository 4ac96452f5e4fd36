//! The one dispatch point: an enum of the backends this build can run, used by the CLI and the library.
//! Everything below it is generic over [`super::Backend`]; matching on this enum is where the concrete type
//! is picked.

use super::cpu::CpuBackend;
use super::kernel::KernelBackend;
use crate::gpu::cuda::CudaDevice;
use crate::gpu::emulator::EmuDevice;
use crate::{DType, Device, Error, Result};

pub enum AnyBackend {
    Cpu(Box<CpuBackend>),
    Emu(Box<KernelBackend<EmuDevice>>),
    Cuda(Box<KernelBackend<CudaDevice>>),
}

impl AnyBackend {
    /// Opens the backend of `device` (a GPU that is missing is an error that says so), computing in its
    /// default dtype: f32 on the CPU, bf16 on kernel devices.
    pub fn open(device: Device) -> Result<Self> {
        Self::open_as(device, None)
    }

    /// Opens the backend of `device` computing in `dtype` (`None`: the device's default). The CPU computes
    /// in f32 or bf16; kernel devices compute in bf16 only.
    pub fn open_as(device: Device, dtype: Option<DType>) -> Result<Self> {
        if device != Device::Cpu && dtype.is_some_and(|d| d != DType::BF16) {
            return Err(Error::invalid(
                "--dtype",
                format!(
                    "{device} computes in bf16 (with f32 statistics and master weights); {} is only for the CPU",
                    dtype.unwrap_or(DType::F32)
                ),
            ));
        }
        Ok(match device {
            Device::Cpu => AnyBackend::Cpu(Box::new(CpuBackend::with_dtype(
                dtype.unwrap_or(DType::F32),
            )?)),
            Device::Emulator => AnyBackend::Emu(Box::new(KernelBackend::new(EmuDevice::default()))),
            Device::Cuda(i) => AnyBackend::Cuda(Box::new(KernelBackend::new(CudaDevice::new(i)?))),
        })
    }

    /// The dtype activations are computed in.
    pub fn compute_dtype(&self) -> DType {
        use super::Backend;
        match self {
            AnyBackend::Cpu(b) => b.compute_dtype(),
            AnyBackend::Emu(b) => b.compute_dtype(),
            AnyBackend::Cuda(b) => b.compute_dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            AnyBackend::Cpu(_) => Device::Cpu,
            AnyBackend::Emu(_) => Device::Emulator,
            AnyBackend::Cuda(_) => Device::Cuda(0),
        }
    }
}
