//! Tests of the host emulator itself, apart from any op: the CUDA execution model (barriers, warp
//! shuffles, shared memory, atomics), ballots and fp16 rounding, and the errors it reports (divergent
//! barriers, unknown kernels). The ops are checked by `tests/backend_ops.rs`. The same execution-model checks
//! run on a GPU when one is present.

use isoformer_engine::gpu::cuda::CudaDevice;
use isoformer_engine::gpu::emulator::EmuDevice;
use isoformer_engine::gpu::{Arg, DeviceBuffer, KernelDevice, KernelDeviceExt, LaunchConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn check_execution_model<D: KernelDevice>(dev: &D) {
    for (n, threads) in [(100usize, 64u32), (1000, 256), (31, 32), (70, 96)] {
        let out = dev.alloc_zeroed(2 * n * 4).unwrap();
        let count = dev.alloc_zeroed(4).unwrap();
        let blocks = n.div_ceil(threads as usize) as u32;
        // SAFETY: `out` holds 2·n f32 and `count` one i32, as the self-test kernel writes.
        unsafe {
            dev.launch(
                "selftest_reduce_f32",
                LaunchConfig::linear(blocks, threads, 0),
                &[
                    Arg::Ptr(out.ptr()),
                    Arg::Ptr(count.ptr()),
                    Arg::I32(n as i32),
                ],
            )
        }
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

fn check_ballot_and_half<D: KernelDevice>(dev: &D) {
    let n = 50usize;
    let mut values: Vec<f32> = vec![
        1.0,
        -2.5,
        65504.0,
        65520.0,
        1e-7,
        5.96e-8,
        2.98e-8,
        3.0e-5,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        f32::INFINITY,
        -0.0,
    ];
    let mut rng = StdRng::seed_from_u64(99);
    while values.len() < n {
        values.push(rng.random_range(-70000.0f32..70000.0) * 10f32.powi(rng.random_range(-9..0)));
    }
    let (ballot, flags, bits) = (
        dev.alloc_zeroed(2 * 4).unwrap(),
        dev.alloc_zeroed(4 * 4).unwrap(),
        dev.alloc_zeroed(n * 2).unwrap(),
    );
    let bv = dev.upload_f32(&values).unwrap();
    // SAFETY: the buffers have the sizes the self-test kernel reads and writes for `n` values.
    unsafe {
        dev.launch(
            "selftest_ballot_half",
            LaunchConfig::linear(1, 64, 0),
            &[
                Arg::Ptr(ballot.ptr()),
                Arg::Ptr(flags.ptr()),
                Arg::Ptr(bits.ptr()),
                Arg::Ptr(bv.ptr()),
                Arg::I32(n as i32),
            ],
        )
    }
    .unwrap();
    let b: Vec<u32> = dev
        .download(&ballot)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(b, vec![0xaaaa_aaaa, 0xaaaa_aaaa], "ballot of odd lanes");
    let f: Vec<i32> = dev
        .download(&flags)
        .unwrap()
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(
        f,
        vec![11001, 1 + 32, 11000, 32],
        "any/all/popc and reduce add/max per warp"
    );
    let got: Vec<u16> = dev
        .download(&bits)
        .unwrap()
        .chunks_exact(2)
        .map(|c| u16::from_ne_bytes([c[0], c[1]]))
        .collect();
    for (v, g) in values.iter().zip(&got) {
        assert_eq!(
            *g,
            half::f16::from_f32(*v).to_bits(),
            "fp16 conversion of {v} (round to nearest even)"
        );
    }
}

#[test]
fn emu_ballot_any_all_and_fp16_rounding() {
    check_ballot_and_half(&EmuDevice::default());
}

#[test]
fn emu_execution_model_shuffles_shared_memory_atomics() {
    check_execution_model(&EmuDevice::default());
}

#[test]
fn emu_reports_divergent_barriers_and_unknown_kernels() {
    let dev = EmuDevice::default();
    let flag = dev.alloc_zeroed(4).unwrap();
    // SAFETY: `flag` is the one i32 the kernel writes.
    let err = unsafe {
        dev.launch(
            "selftest_divergent_barrier",
            LaunchConfig::linear(1, 4, 0),
            &[Arg::Ptr(flag.ptr())],
        )
    }
    .unwrap_err()
    .to_string();
    assert!(err.contains("divergent __syncthreads"), "{err}");
    // SAFETY: no such kernel exists, so nothing runs.
    let err = unsafe { dev.launch("no_such_kernel", LaunchConfig::linear(1, 32, 0), &[]) }
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

/// A kernel that reads shared memory another thread writes, with no barrier between, reads what it expects
/// in the emulator's ascending thread order and not in the descending one: the reversed order exposes the
/// races that one fixed order hides (`tests/backend_ops.rs` runs every op in both orders).
#[test]
fn emu_thread_orders_disagree_on_a_race() {
    let run = |dev: EmuDevice| {
        // A new thread: the emulator keeps `__shared__` arrays per OS thread, and the launching thread
        // runs the first block.
        std::thread::spawn(move || {
            let out = dev.alloc_zeroed(64 * 4).unwrap();
            // SAFETY: one block of 64 threads writes the 64 i32 of `out`.
            unsafe {
                dev.launch(
                    "selftest_unsynchronised_read",
                    LaunchConfig::linear(1, 64, 0),
                    &[Arg::Ptr(out.ptr())],
                )
            }
            .unwrap();
            let bytes = dev.read(&out).unwrap();
            bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<i32>>()
        })
        .join()
        .unwrap()
    };
    let in_order: Vec<i32> = (0..64).collect();
    assert_eq!(run(EmuDevice::default()), in_order, "ascending order");
    let reversed = run(EmuDevice::reversed());
    assert_eq!(reversed[0], 0);
    assert!(
        reversed[1..]
            .iter()
            .zip(&in_order[1..])
            .all(|(r, t)| r != t),
        "descending order must read no neighbour's write: {reversed:?}"
    );
}

#[test]
fn gpu_execution_model_when_a_gpu_is_present() {
    match CudaDevice::new(0) {
        Ok(dev) => {
            check_execution_model(&dev);
            check_ballot_and_half(&dev);
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no GPU run ({e})");
        }
    }
}
