//! CPU GEMM, f32 and bf16 (bf16 storage, f32 accumulation: AMX `tdpbf16ps` tiles where the CPU has
//! them, else `vdpbf16ps` on AVX512-BF16), at 1024³ and 2048³ on 1 and 2 threads. Criterion measures; afterwards the same
//! measurement the `bench gemm` command makes prints GFLOP/s for each case, and the bf16 rate as a
//! multiple of the f32 rate.
//!
//! Then f32 linear layers of few rows (`x·Wᵀ` with a bias, the weight `[out, in]` read in place by
//! `ops::few_rows` up to 512 rows), the products of one sequence per forward: ESM-2 150M's 640 → 640 and
//! 640 → 2,560 at 22 rows (a peptide) and 202 (a 200-residue protein), on 2 threads, operands on cache
//! lines as the engine's tensors are.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use isoformer_engine::bench::gemm::GemmBench;
use isoformer_engine::ops::matmul::{linear, matmul, matmul_bf16, LinearDims, MatmulDims};
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

/// f32 values on 64-byte cache lines, as the engine's tensors start (the kernel's vector loads would
/// otherwise split across lines).
struct Lines(Vec<Line>, usize);

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

impl Lines {
    fn of(len: usize, f: impl Fn(usize) -> f32) -> Self {
        let mut lines = Lines(vec![Line([0.0; 16]); len.div_ceil(16)], len);
        lines
            .values_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = f(i));
        lines
    }

    fn values(&self) -> &[f32] {
        // SAFETY: a Line is 16 f32 values with no padding, and `len ≤ 16 · lines`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.1) }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.1) }
    }
}

fn linear_few_rows(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_f32_few_rows");
    group.sample_size(20);
    let pool = pool(2);
    for (rows, d_in, d_out) in [(22, 640, 640), (202, 640, 640), (202, 640, 2560)] {
        let d = LinearDims { rows, d_in, d_out };
        let x = Lines::of(rows * d_in, |i| (i % 13) as f32 / 13.0 - 0.5);
        let w = Lines::of(d_out * d_in, |i| (i % 11) as f32 / 11.0 - 0.5);
        let bias = Lines::of(d_out, |i| (i % 7) as f32 / 7.0);
        let mut y = Lines::of(rows * d_out, |_| 0.0);
        let flops = 2.0 * (rows * d_in * d_out) as f64;
        group.throughput(Throughput::Elements(flops as u64));
        let mut run = || {
            pool.install(|| {
                linear(
                    y.values_mut(),
                    x.values(),
                    w.values(),
                    Some(bias.values()),
                    d,
                )
            })
            .expect("linear")
        };
        group.bench_function(format!("{rows}x{d_in}->{d_out}/threads=2"), |bench| {
            bench.iter(&mut run)
        });
        // The same as a rate: the median of 30 calls after 3.
        (0..3).for_each(|_| run());
        let mut secs: Vec<f64> = (0..30)
            .map(|_| {
                let start = std::time::Instant::now();
                run();
                start.elapsed().as_secs_f64()
            })
            .collect();
        secs.sort_by(f64::total_cmp);
        println!(
            "linear {rows}x{d_in}->{d_out} threads=2: f32 {:.1} GFLOP/s",
            flops / secs[15] / 1e9
        );
    }
    group.finish();
}

criterion_group!(benches, gemm, linear_few_rows);
criterion_main!(benches);
