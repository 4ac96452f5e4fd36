//! Every GPU kernel run on the host emulator (the same `.cu` sources, compiled by g++) against the CPU
//! backend, through the launch code shared with the CUDA device. The same checks run on a real GPU when one
//! is present (`gpu_*` tests), and otherwise say that they skipped it.
//!
//! bf16 tolerance, FlashAttention's criterion: the kernel's max error against the f32 reference is at most
//! twice the error of the bf16-rounded f32 reference.

use half::bf16;
use isoformer_engine::gpu::cuda::CudaDevice;
use isoformer_engine::gpu::emulator::EmuDevice;
use isoformer_engine::gpu::{ops, Arg, DeviceBuffer, KernelDevice, KernelDeviceExt, LaunchConfig};
use isoformer_engine::ops::norm::{layernorm, layernorm_backward};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_bf16(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(lo..hi)))
        .collect()
}

fn widen(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// FlashAttention's bf16 criterion against the f32 reference `want`.
fn assert_bf16_close(what: &str, got: &[bf16], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g.to_f32() - w).abs()));
    let ref_err = want.iter().fold(0.0f32, |m, w| {
        m.max((bf16::from_f32(*w).to_f32() - w).abs())
    });
    assert!(
        err <= 2.0 * ref_err + 1e-6 * scale,
        "{what}: error {err:.3e} > 2 × bf16 reference error {ref_err:.3e}"
    );
}

fn assert_f32_close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        err <= rtol * scale,
        "{what}: error {err:.3e} (relative {:.3e} > {rtol:.1e})",
        err / scale
    );
}

fn check_layernorm<D: KernelDevice>(dev: &D) {
    let mut rng = StdRng::seed_from_u64(7);
    for (rows, dim) in [(1, 1), (7, 33), (13, 768), (5, 1000)] {
        let x = random_bf16(&mut rng, rows * dim, -2.0, 3.0);
        let g = random_bf16(&mut rng, dim, 0.5, 1.5);
        let b = random_bf16(&mut rng, dim, -0.5, 0.5);
        let (xf, gf, bf) = (widen(&x), widen(&g), widen(&b));
        let (mut want, mut wm, mut wr) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        layernorm(&mut want, &mut wm, &mut wr, &xf, &gf, &bf, dim, 1e-5).unwrap();

        let (dx_, dg_, db_) = (
            dev.upload_bf16(&x).unwrap(),
            dev.upload_bf16(&g).unwrap(),
            dev.upload_bf16(&b).unwrap(),
        );
        let out = dev.alloc_zeroed(rows * dim * 2).unwrap();
        let (mean, rstd) = (
            dev.alloc_zeroed(rows * 4).unwrap(),
            dev.alloc_zeroed(rows * 4).unwrap(),
        );
        ops::layernorm_forward(dev, &out, &mean, &rstd, &dx_, &dg_, &db_, rows, dim, 1e-5).unwrap();
        let what = format!("{} layernorm forward {rows}x{dim}", dev.name());
        assert_bf16_close(&what, &dev.download_bf16(&out).unwrap(), &want);
        assert_f32_close(
            &format!("{what} mean"),
            &dev.download_f32(&mean).unwrap(),
            &wm,
            1e-5,
        );
        assert_f32_close(
            &format!("{what} rstd"),
            &dev.download_f32(&rstd).unwrap(),
            &wr,
            1e-5,
        );

        let dout = random_bf16(&mut rng, rows * dim, -1.0, 1.0);
        let (mut wdx, mut wdg, mut wdb) = (vec![0.0; rows * dim], vec![0.0; dim], vec![0.0; dim]);
        layernorm_backward(
            &mut wdx,
            &mut wdg,
            &mut wdb,
            &widen(&dout),
            &xf,
            &gf,
            &wm,
            &wr,
            dim,
        )
        .unwrap();
        let ddout = dev.upload_bf16(&dout).unwrap();
        let dx = dev.alloc_zeroed(rows * dim * 2).unwrap();
        let dgb = dev.alloc_zeroed(2 * dim * 4).unwrap();
        let scratch = dev
            .alloc_zeroed(ops::layernorm_backward_scratch_bytes(rows, dim))
            .unwrap();
        ops::layernorm_backward(
            dev, &dx, &dgb, &scratch, &ddout, &dx_, &dg_, &mean, &rstd, rows, dim,
        )
        .unwrap();
        let what = format!("{} layernorm backward {rows}x{dim}", dev.name());
        assert_bf16_close(
            &format!("{what} dx"),
            &dev.download_bf16(&dx).unwrap(),
            &wdx,
        );
        let dgb = dev.download_f32(&dgb).unwrap();
        assert_f32_close(&format!("{what} dgamma"), &dgb[..dim], &wdg, 1e-4);
        assert_f32_close(&format!("{what} dbeta"), &dgb[dim..], &wdb, 1e-4);
    }
    // A wrong size is an error before any launch.
    let small = dev.alloc_zeroed(8).unwrap();
    assert!(ops::layernorm_forward(
        dev, &small, &small, &small, &small, &small, &small, 3, 5, 1e-5
    )
    .is_err());
}

fn check_execution_model<D: KernelDevice>(dev: &D) {
    for (n, threads) in [(100usize, 64u32), (1000, 256), (31, 32), (70, 96)] {
        let out = dev.alloc_zeroed(2 * n * 4).unwrap();
        let count = dev.alloc_zeroed(4).unwrap();
        let blocks = n.div_ceil(threads as usize) as u32;
        dev.launch(
            "selftest_reduce_f32",
            LaunchConfig::linear(blocks, threads, 0),
            &[
                Arg::Ptr(out.ptr()),
                Arg::Ptr(count.ptr()),
                Arg::I32(n as i32),
            ],
        )
        .unwrap();
        let got = dev.download_f32(&out).unwrap();
        for t in 0..n {
            let block_lo = t / threads as usize * threads as usize;
            let warp_lo = block_lo + (t - block_lo) / 32 * 32;
            let warp_hi = (warp_lo + 32).min(n).min(block_lo + threads as usize);
            let block_hi = (block_lo + threads as usize).min(n);
            let sum = |a: usize, b: usize| ((a + 1)..=b).map(|v| v as f32).sum::<f32>();
            assert_eq!(
                got[2 * t],
                sum(warp_lo, warp_hi),
                "warp sum of thread {t} (block {threads})"
            );
            assert_eq!(
                got[2 * t + 1],
                sum(block_lo, block_hi),
                "block sum of thread {t}"
            );
        }
        let c = dev.download(&count).unwrap();
        assert_eq!(
            i32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
            n as i32,
            "atomic count"
        );
    }
}

#[test]
fn emu_layernorm_forward_and_backward() {
    check_layernorm(&EmuDevice::default());
}

#[test]
fn emu_execution_model_shuffles_shared_memory_atomics() {
    check_execution_model(&EmuDevice::default());
}

#[test]
fn emu_reports_divergent_barriers_and_unknown_kernels() {
    let dev = EmuDevice::default();
    let flag = dev.alloc_zeroed(4).unwrap();
    let err = dev
        .launch(
            "selftest_divergent_barrier",
            LaunchConfig::linear(1, 4, 0),
            &[Arg::Ptr(flag.ptr())],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("divergent __syncthreads"), "{err}");
    let err = dev
        .launch("no_such_kernel", LaunchConfig::linear(1, 32, 0), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not registered"), "{err}");
    let kernels = EmuDevice::kernels();
    for k in [
        "layernorm_forward_bf16",
        "layernorm_backward_bf16",
        "reduce_columns_f32",
        "selftest_reduce_f32",
    ] {
        assert!(
            kernels.iter().any(|n| n == k),
            "{k} missing from the emulator registry: {kernels:?}"
        );
    }
}

/// The same checks on a real GPU, when this machine has one.
#[test]
fn gpu_kernels_when_a_gpu_is_present() {
    match CudaDevice::new(0) {
        Ok(dev) => {
            check_execution_model(&dev);
            check_layernorm(&dev);
        }
        Err(e) => println!("skipped: no GPU run ({e})"),
    }
}
