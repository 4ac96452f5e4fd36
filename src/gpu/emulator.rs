//! The host emulator device: kernels compiled from the same `.cu` sources by g++ (see `build.rs` and
//! `kernels/emu/`), launched by name on CPU worker threads; device memory is host memory.

use std::ffi::{c_char, c_void, CString};

use super::{Arg, DeviceBuffer, KernelDevice, LaunchConfig};
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

/// Host memory standing in for device memory (16-byte aligned, as cudaMalloc's is at least).
pub struct EmuBuffer {
    words: Vec<u128>,
    len: usize,
}

impl DeviceBuffer for EmuBuffer {
    fn ptr(&self) -> u64 {
        self.words.as_ptr() as u64
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
        Ok(EmuBuffer {
            words: vec![0u128; bytes.div_ceil(16)],
            len: bytes,
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuffer> {
        let mut b = self.alloc_zeroed(bytes.len())?;
        bytemuck::cast_slice_mut::<u128, u8>(&mut b.words)[..bytes.len()].copy_from_slice(bytes);
        Ok(b)
    }

    fn download(&self, buf: &EmuBuffer) -> Result<Vec<u8>> {
        Ok(bytemuck::cast_slice::<u128, u8>(&buf.words)[..buf.len].to_vec())
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
