//! The CUDA device, through cudarc with dynamic loading: nothing CUDA is needed to build, and a missing
//! driver or GPU is an error, never a panic (the driver library is probed before the first driver call).
//!
//! Modules are the fatbins embedded by `build.rs` (sm_80 and sm_90 SASS plus PTX), loaded once and their
//! functions cached; if the driver rejects a fatbin, the embedded `.cu` source is compiled with NVRTC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, PushKernelArg,
};

use super::embedded::{COMMON_HEADER, KERNEL_FILES};
use super::{check_gemm, check_linear, Arg, DeviceBuffer, KernelDevice, LaunchConfig, MatmulDims};
use crate::{Error, Result};

pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    ptr: u64,
}

impl DeviceBuffer for CudaBuffer {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len_bytes(&self) -> usize {
        self.slice.len()
    }
}

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: Mutex<Option<cudarc::cublas::CudaBlas>>,
    blas_lt: Mutex<Option<cudarc::cublaslt::CudaBlasLT>>,
}

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

impl CudaDevice {
    /// A second handle on the device memory of a buffer or view (for APIs that want a `CudaSlice`). It
    /// does not own the memory: the caller must `std::mem::forget` it.
    ///
    /// # Safety
    /// `b` must address live device memory of this context for as long as the handle is used.
    unsafe fn borrowed_slice(&self, b: &dyn DeviceBuffer) -> CudaSlice<u8> {
        self.stream.upgrade_device_ptr::<u8>(b.ptr(), b.len_bytes())
    }

    /// Whether this build has GPU kernels at all.
    pub fn built_with_kernels() -> bool {
        cfg!(cuda_kernels)
    }

    /// Opens GPU `ordinal`, or explains why there is none.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !Self::built_with_kernels() {
            return Err(Error::Device("built without CUDA kernels (nvcc was not found at build time; set NVCC or CUDA_HOME and rebuild)".into()));
        }
        // SAFETY: only checks whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device("the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into()));
        }
        let count = CudaContext::device_count().map_err(driver_err("counting GPUs"))?;
        if ordinal as i32 >= count {
            return Err(Error::Device(format!(
                "GPU {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating the CUDA context"))?;
        // SAFETY: we synchronise explicitly (one stream), so cudarc's per-buffer events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            blas_lt: Mutex::new(None),
        })
    }

    /// The GPU's memory in bytes.
    pub fn total_memory(&self) -> Result<usize> {
        self.ctx
            .total_mem()
            .map_err(driver_err("reading the GPU's memory size"))
    }

    fn module_of(&self, file: &str, fatbin: &[u8], source: &str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().expect("module cache");
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let loaded = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()));
        let module = match loaded {
            Ok(m) => m,
            Err(first) => {
                // NVRTC fallback: compile the embedded source for this GPU.
                let dir =
                    std::env::temp_dir().join(format!("isoformer-nvrtc-{}", std::process::id()));
                std::fs::create_dir_all(dir.join("emu")).map_err(|e| Error::io(&dir, e))?;
                std::fs::write(dir.join("common.cuh"), COMMON_HEADER)
                    .map_err(|e| Error::io(&dir, e))?;
                std::fs::write(dir.join("emu/emu.h"), "#pragma once\n#include <cuda_bf16.h>\n#define EMU_DYNAMIC_SHARED(type, name) extern __shared__ type name[]\n#define EMU_REGISTER(kernel)\n")
                    .map_err(|e| Error::io(&dir, e))?;
                let opts = cudarc::nvrtc::CompileOptions {
                    include_paths: vec![dir.display().to_string()],
                    ..Default::default()
                };
                let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
                    .map_err(|e| Error::Device(format!("loading {file}: the fatbin was rejected ({first:?}) and NVRTC failed: {e:?}")))?;
                self.ctx
                    .load_module(ptx)
                    .map_err(driver_err("loading NVRTC output"))?
            }
        };
        modules.insert(file.to_string(), module.clone());
        Ok(module)
    }

    fn function(&self, kernel: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("function cache").get(kernel) {
            return Ok(f.clone());
        }
        for (file, fatbin, source) in KERNEL_FILES {
            if source.contains(&format!("void {kernel}(")) {
                let module = self.module_of(file, fatbin, source)?;
                let f = module.load_function(kernel).map_err(driver_err(kernel))?;
                self.functions
                    .lock()
                    .expect("function cache")
                    .insert(kernel.to_string(), f.clone());
                return Ok(f);
            }
        }
        Err(Error::Device(format!(
            "no kernel named '{kernel}' in kernels/"
        )))
    }
}

impl KernelDevice for CudaDevice {
    type Buffer = CudaBuffer;

    fn name(&self) -> String {
        format!(
            "cuda ({})",
            self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
        )
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaBuffer> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(driver_err("cudaMalloc"))?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(CudaBuffer { slice, ptr })
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaBuffer> {
        let slice = self
            .stream
            .clone_htod(bytes)
            .map_err(driver_err("copy to the GPU"))?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(CudaBuffer { slice, ptr })
    }

    fn read(&self, src: &dyn DeviceBuffer) -> Result<Vec<u8>> {
        let mut out = vec![0u8; src.len_bytes()];
        // SAFETY: `src` addresses `len_bytes` bytes of live device memory on this context; the stream is
        // synchronised before `out` is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out, src.ptr(), self.stream.cu_stream())
        }
        .map_err(driver_err("copy from the GPU"))?;
        self.synchronize()?;
        Ok(out)
    }

    fn zero(&self, dst: &dyn DeviceBuffer) -> Result<()> {
        // SAFETY: the range is live device memory of this context.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                dst.ptr(),
                0,
                dst.len_bytes(),
                self.stream.cu_stream(),
            )
        }
        .map_err(driver_err("cuMemsetD8"))
    }

    fn write(&self, dst: &dyn DeviceBuffer, bytes: &[u8]) -> Result<()> {
        if bytes.len() > dst.len_bytes() {
            return Err(Error::shape(
                "copy to the GPU",
                format!("{} bytes into a buffer of {}", bytes.len(), dst.len_bytes()),
            ));
        }
        // SAFETY: the destination range is live device memory; the copy completes before `bytes` is released.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr(), bytes, self.stream.cu_stream())
        }
        .map_err(driver_err("copy to the GPU"))?;
        self.synchronize()
    }

    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.function(kernel)?;
        if cfg.shared_bytes > 48 * 1024 {
            f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, cfg.shared_bytes as i32)
                .map_err(driver_err("raising the shared-memory limit"))?;
        }
        let values: Vec<Arg> = args.to_vec();
        let mut b = self.stream.launch_builder(&f);
        for a in &values {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let lc = cudarc::driver::LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shared_bytes,
        };
        // SAFETY: the launch code in `ops` passes exactly the kernel's parameters, with pointers to live buffers.
        unsafe { b.launch(lc) }.map_err(driver_err(kernel))?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_err("synchronising"))
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
        use cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
        check_linear(y, x, w, bias, rows, d_in, d_out)?;
        let mut lt = self.blas_lt.lock().expect("cublasLt handle");
        if lt.is_none() {
            // SAFETY: only probes whether libcublasLt can be loaded.
            if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
                return Err(Error::Device(
                    "cuBLASLt (libcublasLt.so) was not found".into(),
                ));
            }
            *lt = Some(
                CudaBlasLT::new(self.stream.clone())
                    .map_err(|e| Error::Device(format!("cuBLASLt: {e:?}")))?,
            );
        }
        let lt = lt.as_ref().expect("created above");
        // Column-major view: yᵀ[out, rows] = W[out, in]·xᵀ; the bias runs along the output rows of that view.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: d_out as u64,
            n: rows as u64,
            k: d_in as u64,
            alpha: 1.0,
            lda: d_in as i64,
            ldb: d_in as i64,
            beta: 0.0,
            ldc: d_out as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the buffers are live device memory of this context, their sizes were checked, `y` is never
        // one of the inputs, and every borrowed handle is forgotten below, so nothing is freed twice.
        unsafe {
            let (w, x, bias, mut out) = (
                self.borrowed_slice(w),
                self.borrowed_slice(x),
                self.borrowed_slice(bias),
                self.borrowed_slice(y),
            );
            let result = (|| -> Result<()> {
                let wv = w
                    .transmute::<half::bf16>(d_out * d_in)
                    .ok_or_else(|| Error::Device("weight view".into()))?;
                let xv = x
                    .transmute::<half::bf16>(rows * d_in)
                    .ok_or_else(|| Error::Device("input view".into()))?;
                let bv = bias
                    .transmute::<half::bf16>(d_out)
                    .ok_or_else(|| Error::Device("bias view".into()))?;
                let mut yv = out
                    .transmute_mut::<half::bf16>(rows * d_out)
                    .ok_or_else(|| Error::Device("output view".into()))?;
                let act = relu.then_some(Activation::Relu);
                lt.matmul(cfg, &wv, &xv, &mut yv, Some(&bv), act.as_ref())
                    .map_err(|e| Error::Device(format!("cuBLASLt matmul: {e:?}")))
            })();
            std::mem::forget(w);
            std::mem::forget(x);
            std::mem::forget(bias);
            std::mem::forget(out);
            result?;
        }
        Ok(())
    }

    fn gemm(
        &self,
        c: &dyn DeviceBuffer,
        c_f32: bool,
        a: &dyn DeviceBuffer,
        b: &dyn DeviceBuffer,
        d: MatmulDims,
        accumulate: bool,
    ) -> Result<()> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
        };
        check_gemm(c, c_f32, a, b, &d)?;
        let mut blas = self.blas.lock().expect("cublas handle");
        if blas.is_none() {
            // SAFETY: only probes whether libcublas can be loaded.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(Error::Device("cuBLAS (libcublas.so) was not found".into()));
            }
            *blas = Some(
                cudarc::cublas::CudaBlas::new(self.stream.clone())
                    .map_err(|e| Error::Device(format!("cuBLAS: {e:?}")))?,
            );
        }
        let handle = *blas.as_ref().expect("created above").handle();
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS gets B first.
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (lda, ldb) = (
            if d.trans_b { d.k } else { d.n },
            if d.trans_a { d.m } else { d.k },
        );
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: sizes were checked; the pointers address live device buffers on this context.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                handle,
                op(d.trans_b),
                op(d.trans_a),
                d.n as i32,
                d.m as i32,
                d.k as i32,
                &alpha as *const f32 as *const _,
                b.ptr() as *const _,
                cudaDataType::CUDA_R_16BF,
                lda as i32,
                (d.k * d.n) as i64,
                a.ptr() as *const _,
                cudaDataType::CUDA_R_16BF,
                ldb as i32,
                (d.m * d.k) as i64,
                &beta as *const f32 as *const _,
                c.ptr() as *mut _,
                if c_f32 {
                    cudaDataType::CUDA_R_32F
                } else {
                    cudaDataType::CUDA_R_16BF
                },
                d.n as i32,
                (d.m * d.n) as i64,
                d.batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Device(format!("cuBLAS GEMM: {e:?}")))
    }
}
