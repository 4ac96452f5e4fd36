//! The main ops on every CPU backend, through the backend trait: attention forward and backward (ESM-2 35M
//! shapes), layernorm and conv1d (an Enformer conv-tower layer). Criterion measures; afterwards a summary
//! prints each op's rate (GFLOP/s for compute-bound ops, GB/s for layernorm) and its fraction of this
//! machine's measured peak: the f32 GEMM rate at 2048³ for compute (the bf16 GEMM rate for the bf16
//! backend), a copy with the same working set for bandwidth. The emulator gets a smoke run of each op at tiny sizes only.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use isoformer_engine::backend::cpu::CpuBackend;
use isoformer_engine::backend::kernel::KernelBackend;
use isoformer_engine::backend::{AttentionDims, Backend, Conv1dDims, Role, Tensor};
use isoformer_engine::bench::gemm::GemmBench;
use isoformer_engine::gpu::emulator::EmuDevice;
use isoformer_engine::{DType, Device};

/// Shapes of one run.
#[derive(Clone, Copy)]
struct Shapes {
    attention: (usize, usize, usize, usize),
    layernorm: (usize, usize),
    conv: Conv1dDims,
}

const FULL: Shapes = Shapes {
    // ESM-2 35M: 8 × 512 tokens, 20 heads of 24.
    attention: (8, 20, 512, 24),
    layernorm: (4096, 480),
    // An Enformer conv-tower layer at 196,608 bp / 32.
    conv: Conv1dDims {
        batch: 1,
        len: 6144,
        c_in: 768,
        c_out: 768,
        width: 5,
    },
};

const TINY: Shapes = Shapes {
    attention: (1, 2, 16, 24),
    layernorm: (8, 32),
    conv: Conv1dDims {
        batch: 1,
        len: 16,
        c_in: 8,
        c_out: 8,
        width: 5,
    },
};

/// One op, ready to run: `run()` executes it once (synchronised); `work` is its FLOPs or bytes.
struct Case<'a> {
    name: &'static str,
    work: f64,
    bytes: bool,
    run: Box<dyn FnMut() + 'a>,
}

fn filled<B: Backend>(b: &B, role: Role, n: usize, salt: usize) -> Tensor<B> {
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + salt) % 13) as f32 / 13.0 - 0.5)
        .collect();
    Tensor::from_f32(b, role, &v).expect("upload")
}

fn cases<'a, B: Backend>(b: &'a B, s: Shapes) -> Vec<Case<'a>> {
    let (batch, heads, len, hd) = s.attention;
    let dims = AttentionDims::new(batch, heads, len, len, hd);
    let n = batch * heads * len * hd;
    let (q, k, v, dout) = (
        filled(b, Role::Activation, n, 1),
        filled(b, Role::Activation, n, 2),
        filled(b, Role::Activation, n, 3),
        filled(b, Role::Activation, n, 4),
    );
    let mut out = Tensor::new(b, Role::Activation, n).expect("alloc");
    let mut lse = Tensor::new(b, Role::Exact, batch * heads * len).expect("alloc");
    let mut grads: Vec<Tensor<B>> = (0..3)
        .map(|_| Tensor::new(b, Role::Activation, n).expect("alloc"))
        .collect();
    let attention_flops = 4.0 * (batch * heads) as f64 * (len * len * hd) as f64;
    b.attention(
        out.view_mut(),
        lse.view_mut(),
        q.view(),
        k.view(),
        v.view(),
        None,
        None,
        &dims,
    )
    .expect("attention");
    let fwd_out = Tensor::from_f32(b, Role::Activation, &b.read_f32(out.view()).unwrap()).unwrap();
    let fwd_lse = Tensor::from_f32(b, Role::Exact, &b.read_f32(lse.view()).unwrap()).unwrap();

    let (rows, dim) = s.layernorm;
    let x = filled(b, Role::Activation, rows * dim, 5);
    let (gamma, beta) = (
        filled(b, Role::Weight, dim, 6),
        filled(b, Role::Weight, dim, 7),
    );
    let mut ln_out = Tensor::new(b, Role::Activation, rows * dim).expect("alloc");
    let (mut mean, mut rstd) = (
        Tensor::new(b, Role::Exact, rows).expect("alloc"),
        Tensor::new(b, Role::Exact, rows).expect("alloc"),
    );
    let act_bytes = b.dtype_of(Role::Activation).size_in_bytes() as f64;

    let c = s.conv;
    let cx = filled(b, Role::Activation, c.batch * c.len * c.c_in, 8);
    let cw = filled(b, Role::Weight, c.c_out * c.c_in * c.width, 9);
    let mut cout = Tensor::new(b, Role::Activation, c.batch * c.len * c.c_out).expect("alloc");

    vec![
        Case {
            name: "attention forward",
            work: attention_flops,
            bytes: false,
            run: Box::new(move || {
                b.attention(
                    out.view_mut(),
                    lse.view_mut(),
                    q.view(),
                    k.view(),
                    v.view(),
                    None,
                    None,
                    &dims,
                )
                .expect("attention");
                b.synchronize().expect("sync");
            }),
        },
        Case {
            name: "attention backward",
            work: 2.5 * attention_flops,
            bytes: false,
            run: Box::new({
                let (q, k, v, dout) = (
                    filled(b, Role::Activation, n, 1),
                    filled(b, Role::Activation, n, 2),
                    filled(b, Role::Activation, n, 3),
                    dout,
                );
                move || {
                    let [dq, dk, dv] = &mut grads[..] else {
                        unreachable!()
                    };
                    b.attention_backward(
                        dq.view_mut(),
                        dk.view_mut(),
                        dv.view_mut(),
                        None,
                        dout.view(),
                        fwd_out.view(),
                        fwd_lse.view(),
                        q.view(),
                        k.view(),
                        v.view(),
                        None,
                        None,
                        &dims,
                    )
                    .expect("attention backward");
                    b.synchronize().expect("sync");
                }
            }),
        },
        Case {
            name: "layernorm",
            // Reads x, writes out (the statistics are small).
            work: 2.0 * (rows * dim) as f64 * act_bytes,
            bytes: true,
            run: Box::new(move || {
                b.layernorm(
                    ln_out.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    x.view(),
                    gamma.view(),
                    beta.view(),
                    1e-5,
                )
                .expect("layernorm");
                b.synchronize().expect("sync");
            }),
        },
        Case {
            name: "conv1d",
            work: 2.0 * (c.batch * c.len * c.c_in * c.c_out * c.width) as f64,
            bytes: false,
            run: Box::new(move || {
                b.conv1d(cout.view_mut(), cx.view(), cw.view(), None, &c)
                    .expect("conv1d");
                b.synchronize().expect("sync");
            }),
        },
    ]
}

/// Median seconds of `repeats` runs after one warm-up.
fn median_secs(run: &mut dyn FnMut(), repeats: usize) -> f64 {
    run();
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let t0 = Instant::now();
            run();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Copy bandwidth (bytes read + written per second) with the working set of `bytes` (read + written), so
/// a cache-resident op is held to the cache's bandwidth and a large one to memory's.
/// The copy runs on every rayon thread, as the ops do, and its result is kept (`black_box`): a copy nobody
/// reads is removed by the optimiser.
fn copy_bandwidth(bytes: f64) -> f64 {
    use rayon::prelude::*;
    use std::hint::black_box;
    let src = vec![1.0f32; ((bytes / 8.0) as usize).max(1024)];
    let mut dst = vec![0.0f32; src.len()];
    let per_task = src.len().div_ceil(rayon::current_num_threads());
    let secs = median_secs(
        &mut || {
            dst.par_chunks_mut(per_task)
                .zip(black_box(&src).par_chunks(per_task))
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&mut dst);
        },
        5,
    );
    2.0 * (src.len() * 4) as f64 / secs
}

fn gemm_peak(dtype: DType) -> f64 {
    GemmBench {
        m: 2048,
        n: 2048,
        k: 2048,
        threads: rayon::current_num_threads(),
        dtype,
        device: Device::Cpu,
        warmup: 2,
        repeats: 10,
    }
    .run()
    .expect("gemm")
    .gflops
        * 1e9
}

fn ops(c: &mut Criterion) {
    let backends: [(&str, CpuBackend, DType); 2] = [
        ("cpu_f32", CpuBackend::new(), DType::F32),
        ("cpu_bf16", CpuBackend::bf16(), DType::BF16),
    ];
    let mut summary = Vec::new();
    for (label, b, gemm_dtype) in &backends {
        let peak = gemm_peak(*gemm_dtype);
        let mut group = c.benchmark_group(*label);
        group.sample_size(10);
        for mut case in cases(b, FULL) {
            group.bench_function(case.name, |bench| bench.iter(&mut case.run));
            let secs = median_secs(&mut case.run, 5);
            let rate = case.work / secs;
            // Only byte counts size a copy (a FLOP count is no working set).
            let bandwidth = if case.bytes {
                copy_bandwidth(case.work)
            } else {
                0.0
            };
            let (unit, scale, of) = if case.bytes {
                ("GB/s", 1e9, bandwidth)
            } else {
                ("GFLOP/s", 1e9, peak)
            };
            summary.push(format!(
                "{label:>9} {:<20} {:>8.1} {unit:<7} {:>5.1}% of the measured {}",
                case.name,
                rate / scale,
                100.0 * rate / of,
                if case.bytes {
                    format!("copy bandwidth at this size ({:.1} GB/s)", bandwidth / 1e9)
                } else {
                    format!("{gemm_dtype} GEMM rate ({:.0} GFLOP/s)", peak / 1e9)
                }
            ));
        }
        group.finish();
    }
    // The emulator: each op once at tiny sizes (it interprets the CUDA kernels; its speed means nothing).
    let emu = KernelBackend::new(EmuDevice::default());
    for mut case in cases(&emu, TINY) {
        (case.run)();
        summary.push(format!("      emu {:<20} smoke run ok", case.name));
    }
    for line in summary {
        println!("{line}");
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
