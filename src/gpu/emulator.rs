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
        reverse_fibers: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn emu_kernel_count() -> usize;
    fn emu_kernel_name(i: usize) -> *const c_char;
}

/// Kernels launched in this process, for coverage checks.
static LAUNCHED: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

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

/// The host bytes behind an emulator buffer or a view into one.
fn host_bytes(b: &dyn DeviceBuffer) -> &[u8] {
    // SAFETY: emulator memory is host memory of `len_bytes` bytes at `ptr`, alive while `b` is borrowed;
    // launches block, so no kernel writes it meanwhile.
    unsafe { std::slice::from_raw_parts(b.ptr() as *const u8, b.len_bytes()) }
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
    /// Runs each block's threads in descending index order between barriers instead of ascending. A
    /// kernel that reads shared memory another thread writes without a `__syncthreads` between them
    /// gets the value it expects in one order at most, so checking every kernel in both orders finds
    /// such races, which one fixed order hides.
    pub reverse_fibers: bool,
}

impl Default for EmuDevice {
    fn default() -> Self {
        EmuDevice {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            reverse_fibers: false,
        }
    }
}

impl EmuDevice {
    /// The emulator running each block's threads in descending index order (see `reverse_fibers`).
    pub fn reversed() -> Self {
        EmuDevice {
            reverse_fibers: true,
            ..Self::default()
        }
    }

    /// Names of the kernels launched so far in this process (the op-coverage check of the tests reads it).
    pub fn launched_kernels() -> Vec<String> {
        LAUNCHED
            .lock()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

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
        let order = if self.reverse_fibers {
            ", threads in descending order"
        } else {
            ""
        };
        format!("emu ({} workers{order})", self.workers)
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<EmuBuffer> {
        EmuBuffer::zeroed(bytes)
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuffer> {
        let b = EmuBuffer::zeroed(bytes.len())?;
        b.write(bytes);
        Ok(b)
    }

    fn read(&self, src: &dyn DeviceBuffer) -> Result<Vec<u8>> {
        Ok(host_bytes(src).to_vec())
    }

    fn zero(&self, dst: &dyn DeviceBuffer) -> Result<()> {
        // SAFETY: emulator memory is host memory of `len_bytes` bytes at `ptr`; launches block.
        unsafe { std::ptr::write_bytes(dst.ptr() as *mut u8, 0, dst.len_bytes()) };
        Ok(())
    }

    fn write(&self, dst: &dyn DeviceBuffer, bytes: &[u8]) -> Result<()> {
        if bytes.len() > dst.len_bytes() {
            return Err(Error::shape(
                "emulator write",
                format!("{} bytes into a buffer of {}", bytes.len(), dst.len_bytes()),
            ));
        }
        // SAFETY: every emulator buffer (and view into one) is host memory of `len_bytes` bytes at `ptr`;
        // no kernel runs concurrently with a host copy (launches block).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.ptr() as *mut u8, bytes.len()) };
        Ok(())
    }

    fn gemm(
        &self,
        c: &dyn DeviceBuffer,
        c_f32: bool,
        a: &dyn DeviceBuffer,
        b: &dyn DeviceBuffer,
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
        let (af, bf) = (widen(self.read(a)?), widen(self.read(b)?));
        let mut cf: Vec<f32> = if c_f32 {
            self.read(c)?
                .chunks_exact(4)
                .map(|x| f32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
                .collect()
        } else {
            widen(self.read(c)?)
        };
        crate::ops::matmul::matmul(&mut cf, &af, &bf, dims, accumulate)?;
        if c_f32 {
            self.write(c, bytemuck::cast_slice(&cf))?;
        } else {
            let out: Vec<half::bf16> = cf.iter().map(|&v| half::bf16::from_f32(v)).collect();
            self.write(c, bytemuck::cast_slice(&out))?;
        }
        Ok(())
    }

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
    ) -> Result<()> {
        check_linear(y, x, w, bias, rows, d_in, d_out)?;
        let n = rows * d_out;
        // Bias first, the GEMM accumulating onto it (one rounding), then ReLU from a separate buffer.
        let pre = if relu {
            self.alloc_zeroed(n * 2)?
        } else {
            EmuBuffer::zeroed(0)?
        };
        let target: &dyn DeviceBuffer = if relu { &pre } else { y };
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

    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let name = CString::new(kernel).map_err(|_| Error::invalid("kernel name", kernel))?;
        if let Ok(mut set) = LAUNCHED.lock() {
            if !set.contains(kernel) {
                set.insert(kernel.to_string());
            }
        }
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
                self.reverse_fibers as i32,
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
