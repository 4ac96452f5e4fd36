//! GEMM throughput: `C[m,n] = A[m,k]·B[k,n]` in f32 or bf16 (bf16 storage, f32 accumulation).

use half::bf16;

use super::{time_runs, Timing};
use crate::ops::matmul::{matmul, matmul_bf16, MatmulDims};
use crate::{DType, Device, Error, Result};

#[derive(Clone, Debug)]
pub struct GemmBench {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub threads: usize,
    pub dtype: DType,
    pub device: Device,
    pub warmup: usize,
    pub repeats: usize,
}

/// bf16 GEMM through a kernel device (cuBLAS on a GPU, the CPU GEMM with its semantics on the emulator),
/// synchronised around every run.
fn device_gemm<D: crate::gpu::KernelDevice>(
    dev: &D,
    b: &GemmBench,
    dims: MatmulDims,
) -> Result<Timing> {
    use crate::gpu::KernelDeviceExt;
    let fill = |n: usize, salt: usize| -> Vec<bf16> {
        (0..n)
            .map(|i| bf16::from_f32(((i * 7 + salt) % 13) as f32 / 13.0 - 0.5))
            .collect()
    };
    let (a_buf, b_buf) = (
        dev.upload_bf16(&fill(b.m * b.k, 1))?,
        dev.upload_bf16(&fill(b.k * b.n, 2))?,
    );
    let c = dev.alloc_zeroed(b.m * b.n * 2)?;
    let mut err = None;
    let t = time_runs(b.warmup, b.repeats, || {
        if let Err(e) = dev
            .gemm(&c, false, &a_buf, &b_buf, dims, false)
            .and_then(|_| dev.synchronize())
        {
            err = Some(e);
        }
    });
    err.map_or(Ok(t), Err)
}

/// bf16 values on 64-byte cache lines. The CPU bench's operands start on cache lines as the engine's own
/// tensors do (its host memory is 64-byte aligned, and so is PyTorch's), so the GEMM meets them as it does
/// inside a model: a bf16 left operand of whole tiles is then read in place rather than packed.
struct Lines {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line([u16; 32]);

impl Lines {
    fn zeroed(len: usize) -> Self {
        Lines {
            lines: vec![Line([0; 32]); len.div_ceil(32)],
            len,
        }
    }

    fn of(values: &[f32]) -> Self {
        let mut lines = Self::zeroed(values.len());
        lines
            .values_mut()
            .iter_mut()
            .zip(values)
            .for_each(|(o, v)| *o = bf16::from_f32(*v));
        lines
    }

    fn values(&self) -> &[bf16] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    fn values_mut(&mut self) -> &mut [bf16] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

/// Operand memory `bench gemm` accepts (A, B and C together, as f32).
pub const MAX_BENCH_BYTES: usize = 16 << 30;
/// Worker threads a benchmark may ask for: far above any machine's cores, far below what stalls the
/// system creating them.
pub const MAX_BENCH_THREADS: usize = 1024;

#[derive(Clone, Debug)]
pub struct GemmResult {
    pub timing: Timing,
    pub gflops: f64,
}

impl GemmBench {
    pub fn run(&self) -> Result<GemmResult> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Err(Error::invalid("gemm size", "m, n and k must be positive"));
        }
        if self.threads == 0 || self.threads > MAX_BENCH_THREADS {
            return Err(Error::invalid(
                "threads",
                format!("{} is outside 1..={MAX_BENCH_THREADS}", self.threads),
            ));
        }
        if self.repeats == 0 {
            return Err(Error::invalid("repeats", "at least one timed run"));
        }
        // Sizes are checked before anything is allocated: a product that overflows, or operands beyond the
        // limit, are errors rather than an abort in the allocator.
        let dims = MatmulDims::new(self.m, self.n, self.k);
        let (sa, sb, sc) = dims.checked_sizes("bench gemm")?;
        let bytes = [sa, sb, sc]
            .iter()
            .try_fold(0usize, |acc, &n| acc.checked_add(n.checked_mul(4)?))
            .unwrap_or(usize::MAX);
        if bytes > MAX_BENCH_BYTES {
            return Err(Error::invalid(
                "gemm size",
                format!(
                    "m={} n={} k={} needs {:.1} GiB of operands; the limit is {} GiB",
                    self.m,
                    self.n,
                    self.k,
                    bytes as f64 / (1u64 << 30) as f64,
                    MAX_BENCH_BYTES >> 30
                ),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads.max(1))
            .build()
            .map_err(|e| Error::invalid("threads", e.to_string()))?;
        // Deterministic, non-trivial inputs (constant inputs can flatter some kernels).
        let fill = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + salt) % 13) as f32 / 13.0 - 0.5)
                .collect()
        };
        let timing = pool.install(|| -> Result<Timing> {
            match (self.device, self.dtype) {
                (Device::Cpu, DType::F32) => {
                    let (a, b) = (fill(self.m * self.k, 1), fill(self.k * self.n, 2));
                    let mut c = vec![0.0f32; self.m * self.n];
                    let mut err = None;
                    let t = time_runs(self.warmup, self.repeats, || {
                        if let Err(e) = matmul(&mut c, &a, &b, dims, false) {
                            err = Some(e);
                        }
                    });
                    err.map_or(Ok(t), Err)
                }
                (Device::Cpu, DType::BF16) => {
                    let (a, b) = (
                        Lines::of(&fill(self.m * self.k, 1)),
                        Lines::of(&fill(self.k * self.n, 2)),
                    );
                    let mut c = Lines::zeroed(self.m * self.n);
                    let mut err = None;
                    let t = time_runs(self.warmup, self.repeats, || {
                        if let Err(e) = matmul_bf16(c.values_mut(), a.values(), b.values(), dims) {
                            err = Some(e);
                        }
                    });
                    err.map_or(Ok(t), Err)
                }
                (Device::Emulator, DType::BF16) => device_gemm(&crate::gpu::emulator::EmuDevice::default(), self, dims),
                (Device::Cuda(i), DType::BF16) => device_gemm(&crate::gpu::cuda::CudaDevice::new(i)?, self, dims),
                (device, dtype) => Err(Error::invalid(
                    "gemm benchmark",
                    format!("{dtype} on {device} is not supported (the GPU path multiplies bf16 with f32 accumulation: use --dtype bf16)"),
                )),
            }
        })?;
        let gflops = dims.flops() / timing.median.as_secs_f64() / 1e9;
        Ok(GemmResult { timing, gflops })
    }
}
