//! CPU GEMM, f32 and bf16 (bf16 storage, f32 accumulation: AMX `tdpbf16ps` tiles where the CPU has
//! them, else `vdpbf16ps` on AVX512-BF16), at 1024³ and 2048³ on 1 and 2 threads. Criterion measures; afterwards the same
//! measurement the `bench gemm` command makes prints GFLOP/s for each case, and the bf16 rate as a
//! multiple of the f32 rate.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use isoformer_engine::bench::gemm::GemmBench;
use isoformer_engine::ops::matmul::{matmul, matmul_bf16, MatmulDims};
use isoformer_engine::{DType, Device};

const SIZES: [usize; 2] = [1024, 2048];
const THREADS: [usize; 2] = [1, 2];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn gemm(c: &mut Criterion) {
    for dtype in [DType::F32, DType::BF16] {
        let mut group = c.benchmark_group(format!("gemm_{dtype}"));
        group.sample_size(10);
        for &n in &SIZES {
            let dims = MatmulDims::new(n, n, n);
            let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
            let b: Vec<f32> = (0..n * n).map(|i| (i % 11) as f32 / 11.0 - 0.5).collect();
            let (a16, b16): (Vec<bf16>, Vec<bf16>) = (
                a.iter().map(|v| bf16::from_f32(*v)).collect(),
                b.iter().map(|v| bf16::from_f32(*v)).collect(),
            );
            let (mut out, mut out16) = (vec![0.0f32; n * n], vec![bf16::ZERO; n * n]);
            // One criterion "element" is one floating-point operation, so elem/s reads as FLOP/s.
            group.throughput(Throughput::Elements(dims.flops() as u64));
            for &t in &THREADS {
                let pool = pool(t);
                group.bench_function(format!("{n}x{n}x{n}/threads={t}"), |bench| {
                    bench.iter(|| {
                        pool.install(|| match dtype {
                            DType::BF16 => matmul_bf16(&mut out16, &a16, &b16, dims),
                            _ => matmul(&mut out, &a, &b, dims, false),
                        })
                        .expect("matmul")
                    })
                });
            }
        }
        group.finish();
    }
    for &n in &SIZES {
        for &t in &THREADS {
            let rate = |dtype| {
                GemmBench {
                    m: n,
                    n,
                    k: n,
                    threads: t,
                    dtype,
                    device: Device::Cpu,
                    warmup: 2,
                    repeats: 10,
                }
                .run()
                .expect("gemm bench")
                .gflops
            };
            let (f32_rate, bf16_rate) = (rate(DType::F32), rate(DType::BF16));
            println!(
                "gemm {n}x{n}x{n} threads={t}: f32 {f32_rate:.1} GFLOP/s, bf16 {bf16_rate:.1} GFLOP/s ({:.2}× f32)",
                bf16_rate / f32_rate
            );
        }
    }
}

criterion_group!(benches, gemm);
criterion_main!(benches);
