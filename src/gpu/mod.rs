//! The GPU path: kernels from `kernels/*.cu`, run on a real GPU ([`cuda::CudaDevice`]) or on the host
//! emulator ([`emulator::EmuDevice`]), which executes the very same sources on the CPU.
//!
//! Both devices implement [`KernelDevice`]: memory, copies, and launching a kernel by name with an argument
//! array, as `cuLaunchKernel` does. The launch code in `ops` (grid sizes, arguments, checks) is written once
//! against that trait.

pub mod cuda;
pub mod emulator;
pub(crate) mod ops;

use crate::Result;

/// Embedded kernels: `(file stem, fatbin, source)`; fatbins are empty when built without nvcc.
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// A launch argument, passed by value as the kernel's parameter (device pointers are addresses).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U32(u32),
    F32(f32),
}

impl Arg {
    /// Raw bytes of the argument, as the kernel's parameter reads them.
    fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        match *self {
            Arg::Ptr(p) => b.copy_from_slice(&p.to_ne_bytes()),
            Arg::I32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            Arg::I64(v) => b.copy_from_slice(&v.to_ne_bytes()),
            Arg::U32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            Arg::F32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
        }
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchConfig {
    pub fn linear(blocks: u32, threads: u32, shared_bytes: u32) -> Self {
        LaunchConfig {
            grid: [blocks.max(1), 1, 1],
            block: [threads, 1, 1],
            shared_bytes,
        }
    }
}

/// Device memory: an allocation that kernels address by `ptr()`.
pub trait DeviceBuffer {
    fn ptr(&self) -> u64;
    fn len_bytes(&self) -> usize;
}

/// What the launch code needs from a device.
pub trait KernelDevice {
    type Buffer: DeviceBuffer;
    fn name(&self) -> String;
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buffer>;
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buffer>;
    /// The bytes of `src` (a whole buffer or a view into one), copied to the host.
    fn read(&self, src: &dyn DeviceBuffer) -> Result<Vec<u8>>;
    /// Sets every byte of `dst` to zero.
    fn zero(&self, dst: &dyn DeviceBuffer) -> Result<()>;
    /// Copies host `bytes` into the start of `dst` (a whole buffer or a view into one).
    fn write(&self, dst: &dyn DeviceBuffer, bytes: &[u8]) -> Result<()>;
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<u8>> {
        self.read(buf)
    }
    /// Launches `kernel` with `args` as its parameters.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters, and every pointer must address live memory of
    /// this device large enough for what the kernel reads and writes with those arguments. The launchers
    /// in `ops` check this; nothing else should call it.
    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
    /// A linear layer's forward with a fused epilogue: `y[rows, out] = x[rows, in]·Wᵀ + bias` (ReLU after it
    /// with `relu`), bf16 in and out, f32 accumulation, one rounding. cuBLASLt's bias (or ReLU + bias)
    /// epilogue on the GPU; bias-then-GEMM-then-kernel on the emulator. (GELU is not fused here: cuBLASLt's
    /// GELU epilogue is the tanh approximation, while ESM-2 needs erf GELU and Enformer the sigmoid form.)
    #[allow(clippy::too_many_arguments)]
    fn linear_bias(
        &self,
        y: &dyn DeviceBuffer,
        x: &dyn DeviceBuffer,
        w: &dyn DeviceBuffer,
        bias: &dyn DeviceBuffer,
        rows: usize,
        d_in: usize,
        d_out: usize,
        relu: bool,
    ) -> Result<()>;
    /// `C[b] = op(A[b])·op(B[b])`, or `C[b] += …` with `accumulate`, row-major with the meaning of
    /// [`crate::ops::matmul::matmul`]: bf16 A and B, C in bf16 or f32, f32 accumulation (cuBLAS on the GPU;
    /// the CPU GEMM with the same semantics on the emulator).
    fn gemm(
        &self,
        c: &dyn DeviceBuffer,
        c_f32: bool,
        a: &dyn DeviceBuffer,
        b: &dyn DeviceBuffer,
        dims: MatmulDims,
        accumulate: bool,
    ) -> Result<()>;
}

pub use crate::ops::matmul::MatmulDims;

/// Checks the byte sizes of a fused linear's operands (shared by both devices).
pub(crate) fn check_linear<B: DeviceBuffer + ?Sized>(
    y: &B,
    x: &B,
    w: &B,
    bias: &B,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    use crate::error::check_len;
    check_len("linear (bytes)", "y", y.len_bytes(), rows * d_out * 2)?;
    check_len("linear (bytes)", "x", x.len_bytes(), rows * d_in * 2)?;
    check_len("linear (bytes)", "weight", w.len_bytes(), d_out * d_in * 2)?;
    check_len("linear (bytes)", "bias", bias.len_bytes(), d_out * 2)
}

/// Checks the byte sizes of a GEMM's operands (shared by both devices).
pub(crate) fn check_gemm<B: DeviceBuffer + ?Sized>(
    c: &B,
    c_f32: bool,
    a: &B,
    b: &B,
    d: &MatmulDims,
) -> Result<()> {
    use crate::error::check_len;
    let (sa, sb, sc) = d.checked_sizes("gemm")?;
    let bytes = |n: usize, size: usize| {
        n.checked_mul(size)
            .ok_or_else(|| crate::Error::invalid("gemm", "operand size overflows"))
    };
    check_len("gemm (bytes)", "a", a.len_bytes(), bytes(sa, 2)?)?;
    check_len("gemm (bytes)", "b", b.len_bytes(), bytes(sb, 2)?)?;
    check_len(
        "gemm (bytes)",
        "c",
        c.len_bytes(),
        bytes(sc, if c_f32 { 4 } else { 2 })?,
    )
}

/// Typed helpers over [`KernelDevice`] for f32 and bf16 data.
pub trait KernelDeviceExt: KernelDevice {
    fn upload_f32(&self, v: &[f32]) -> Result<Self::Buffer> {
        self.upload(bytemuck::cast_slice(v))
    }
    fn upload_bf16(&self, v: &[half::bf16]) -> Result<Self::Buffer> {
        self.upload(bytemuck::cast_slice(v))
    }
    fn download_f32(&self, b: &Self::Buffer) -> Result<Vec<f32>> {
        Ok(self
            .download(b)?
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn download_bf16(&self, b: &Self::Buffer) -> Result<Vec<half::bf16>> {
        Ok(self
            .download(b)?
            .chunks_exact(2)
            .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]))
            .collect())
    }
}

impl<D: KernelDevice + ?Sized> KernelDeviceExt for D {}
