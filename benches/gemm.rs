//! CPU f32 GEMM at 1024³ and 2048³ on 1 and 2 threads. Criterion measures; afterwards the same
//! measurement the `bench gemm` command makes prints GFLOP/s for each case.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use isoformer_engine::bench::gemm::GemmBench;
use isoformer_engine::ops::matmul::{matmul, MatmulDims};
use isoformer_engine::{DType, Device};

const SIZES: [usize; 2] = [1024, 2048];
const THREADS: [usize; 2] = [1, 2];

fn gemm_f32(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm_f32");
    group.sample_size(10);
    for &n in &SIZES {
        let dims = MatmulDims::new(n, n, n);
        let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let b: Vec<f32> = (0..n * n).map(|i| (i % 11) as f32 / 11.0 - 0.5).collect();
        let mut out = vec![0.0f32; n * n];
        // One criterion "element" is one floating-point operation, so elem/s reads as FLOP/s.
        group.throughput(Throughput::Elements(dims.flops() as u64));
        for &t in &THREADS {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("thread pool");
            group.bench_function(format!("{n}x{n}x{n}/threads={t}"), |bench| {
                bench.iter(|| {
                    pool.install(|| matmul(&mut out, &a, &b, dims, false).expect("matmul"))
                })
            });
        }
    }
    group.finish();
    for &n in &SIZES {
        for &t in &THREADS {
            let r = GemmBench {
                m: n,
                n,
                k: n,
                threads: t,
                dtype: DType::F32,
                device: Device::Cpu,
                warmup: 2,
                repeats: 10,
            }
            .run()
            .expect("gemm bench");
            println!("gemm f32 {n}x{n}x{n} threads={t}: {:.1} GFLOP/s", r.gflops);
        }
    }
}

criterion_group!(benches, gemm_f32);
criterion_main!(benches);
