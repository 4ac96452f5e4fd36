//! The host emulator device: kernels compiled from the same `.cu` sources by g++ (see `build.rs` and
//! `kernels/emu/`), launched by name on CPU worker threads; device memory is host memory.

use std::ffi::{c_char, c_void, CString};

use super::{check_gemm, check_linear, Arg, DeviceBuffer, KernelDevice, LaunchConfig, MatmulDims};
use crate::{Error, Result};

extern "C" {
    fn emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
        workers: u32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn emu_kernel_count() -> usize;
    fn emu_kernel_name(i: usize) -> *const c_char;
}

/// Host memory standing in for device memory (256-byte aligned, like cudaMalloc's). Kernels write it
/// through its address, so it is held as a raw allocation, never behind a Rust reference.
pub struct EmuBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    len: usize,
}

impl EmuBuffer {
    fn zeroed(len: usize) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 256)
            .map_err(|e| Error::invalid("allocation", e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| {
            Error::Device(format!("emulator: out of memory allocating {len} bytes"))
        })?;
        Ok(EmuBuffer { ptr, layout, len })
    }

    /// The bytes, copied out.
    fn read(&self) -> Vec<u8> {
        // SAFETY: `len` bytes were allocated; no kernel runs concurrently with a host read (launches block).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }.to_vec()
    }

    fn write(&self, bytes: &[u8]) {
        assert!(bytes.len() <= self.len);
        // SAFETY: as above; the region is within the allocation.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr(), bytes.len()) }
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl DeviceBuffer for EmuBuffer {
    fn ptr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
}

#[derive(Clone, Debug)]
pub struct EmuDevice {
    /// Worker threads running blocks.
    pub workers: u32,
}

impl Default for EmuDevice {
    fn default() -> Self {
        EmuDevice {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        }
    }
}

impl EmuDevice {
    /// Names of the kernels compiled into the emulator.
    pub fn kernels() -> Vec<String> {
        // SAFETY: the registry is filled by static initialisers before main and never changes after.
        unsafe {
            (0..emu_kernel_count())
                .map(|i| {
                    std::ffi::CStr::from_ptr(emu_kernel_name(i))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        }
    }
}

impl KernelDevice for EmuDevice {
    type Buffer = EmuBuffer;

    fn name(&self) -> String {
        format!("emu ({} workers)", self.workers)
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<EmuBuffer> {
        EmuBuffer::zeroed(bytes)
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuffer> {
        let b = EmuBuffer::zeroed(bytes.len())?;
        b.write(bytes);
        Ok(b)
    }

    fn download(&self, buf: &EmuBuffer) -> Result<Vec<u8>> {
        Ok(buf.read())
    }

    fn gemm(
        &self,
        c: &EmuBuffer,
        c_f32: bool,
        a: &EmuBuffer,
        b: &EmuBuffer,
        dims: MatmulDims,
        accumulate: bool,
    ) -> Result<()> {
        check_gemm(c, c_f32, a, b, &dims)?;
        let widen = |bytes: Vec<u8>| -> Vec<f32> {
            bytes
                .chunks_exact(2)
                .map(|x| half::bf16::from_ne_bytes([x[0], x[1]]).to_f32())
                .collect()
        };
        let (af, bf) = (widen(a.read()), widen(b.read()));
        let mut cf: Vec<f32> = if c_f32 {
            c.read()
                .chunks_exact(4)
                .map(|x| f32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
                .collect()
        } else {
            widen(c.read())
        };
        crate::ops::matmul::matmul(&mut cf, &af, &bf, dims, accumulate)?;
        if c_f32 {
            c.write(bytemuck::cast_slice(&cf));
        } else {
            let out: Vec<half::bf16> = cf.iter().map(|&v| half::bf16::from_f32(v)).collect();
            c.write(bytemuck::cast_slice(&out));
        }
        Ok(())
    }

    fn linear_bias(
        &self,
        y: &EmuBuffer,
        x: &EmuBuffer,
        w: &EmuBuffer,
        bias: &EmuBuffer,
        rows: usize,
        d_in: usize,
        d_out: usize,
        relu: bool,
    ) -> Result<()> {
        check_linear(y, x, w, bias, rows, d_in, d_out)?;
        let n = rows * d_out;
        // Bias first, the GEMM accumulating onto it (one rounding), then ReLU from a separate buffer.
        let pre = if relu {
            self.alloc_zeroed(n * 2)?
        } else {
            EmuBuffer::zeroed(0)?
        };
        let target = if relu { &pre } else { y };
        super::ops::fill_rows(self, target, bias, rows, d_out)?;
        self.gemm(
            target,
            false,
            x,
            w,
            MatmulDims {
                batch: 1,
                m: rows,
                n: d_out,
                k: d_in,
                trans_a: false,
                trans_b: true,
            },
            true,
        )?;
        if relu {
            super::ops::act_forward(self, y, &pre, n, super::ops::Act::Relu)?;
        }
        Ok(())
    }

    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let name = CString::new(kernel).map_err(|_| Error::invalid("kernel name", kernel))?;
        let mut storage: Vec<[u8; 8]> = args.iter().map(Arg::bytes).collect();
        let mut ptrs: Vec<*mut c_void> = storage
            .iter_mut()
            .map(|b| b.as_mut_ptr() as *mut c_void)
            .collect();
        let mut err = vec![0 as c_char; 512];
        // SAFETY: the argument array matches the kernel's parameters (the launch code in `ops` builds both
        // from one place), pointers address live buffers, and `err` is large enough for the message.
        let rc = unsafe {
            emu_launch(
                name.as_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.shared_bytes,
                ptrs.as_mut_ptr(),
                self.workers,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: emu_launch writes a NUL-terminated message.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(Error::Device(format!("emulator: {msg}")));
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
