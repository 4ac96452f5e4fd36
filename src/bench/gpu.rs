//! `bench gpu`: the figures a GPU is judged by, from the binary alone (random inputs and weights, nothing
//! to download): bf16 GEMM at several sizes, flash attention forward and backward at head dims 64, 128 and
//! 384 (IsoFormer's cross-attention), and a training step of a full-size encoder (ESM-2 150M shape). Each
//! figure is shown next to the GPU's dense bf16 peak where the GPU is known.
//!
//! Everything runs through the backend trait, so the same code runs on the emulator (at small sizes, for the
//! tests) and on CUDA.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::{AttentionDims, Backend, LinearDims, Role, Tensor};
use crate::models::transformer::{FeedForward, TransformerConfig, TransformerEncoder};
use crate::training::bench_encoder::time_encoder_steps;
use crate::Result;

/// Sizes of one run: full (`bench gpu`) or quick (tests, the emulator).
#[derive(Clone, Debug)]
pub struct GpuBenchSizes {
    pub gemm: Vec<usize>,
    /// (batch, heads, length) per head dim.
    pub attention: Vec<(usize, usize, usize, usize)>,
    pub encoder: TransformerConfig,
    /// (batch, tokens per sequence) of the training step.
    pub encoder_batch: (usize, usize),
    pub repeats: usize,
}

impl GpuBenchSizes {
    /// FlashAttention-2's benchmark shapes (16k tokens per batch, model width 2048), the cross-attention's
    /// 384-wide heads, and ESM-2 150M at 4 × 1,024 tokens.
    pub fn full() -> Self {
        GpuBenchSizes {
            gemm: vec![2048, 4096, 8192],
            attention: vec![(4, 32, 4096, 64), (4, 16, 4096, 128), (4, 8, 4096, 384)],
            encoder: esm2_150m(),
            encoder_batch: (4, 1024),
            repeats: 10,
        }
    }

    /// Tiny shapes that exercise every path in seconds on the emulator.
    pub fn quick() -> Self {
        GpuBenchSizes {
            gemm: vec![64],
            attention: vec![(1, 2, 32, 64), (1, 1, 32, 128), (1, 1, 16, 384)],
            encoder: TransformerConfig {
                vocab: 33,
                hidden: 32,
                layers: 2,
                heads: 4,
                ffn_dim: 64,
                ffn: FeedForward::Gelu,
                ln_eps: 1e-5,
                token_dropout: false,
                mask_token: 32,
            },
            encoder_batch: (2, 16),
            repeats: 2,
        }
    }
}

fn esm2_150m() -> TransformerConfig {
    TransformerConfig {
        vocab: 33,
        hidden: 640,
        layers: 30,
        heads: 20,
        ffn_dim: 2560,
        ffn: FeedForward::Gelu,
        ln_eps: 1e-5,
        token_dropout: false,
        mask_token: 32,
    }
}

/// One measured figure.
#[derive(Clone, Debug)]
pub struct GpuFigure {
    pub name: String,
    pub seconds: f64,
    pub tflops: f64,
}

/// Dense bf16 tensor-core peak (TFLOP/s, f32 accumulation) of GPUs known by name.
pub fn bf16_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    [
        ("H200", 989.0),
        ("H100 PCIE", 756.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("RTX 4090", 165.0),
        ("L4", 121.0),
    ]
    .iter()
    .find(|(k, _)| n.contains(k))
    .map(|&(_, p)| p)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f` (synchronised) `repeats` times after one warm-up; the median in seconds.
fn timed<B: Backend>(b: &B, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    b.synchronize()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        f()?;
        b.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Runs every figure on `b`.
pub fn run_gpu_bench<B: Backend>(b: &B, sizes: &GpuBenchSizes) -> Result<Vec<GpuFigure>> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut figures = Vec::new();
    let mut push = |name: String, seconds: f64, flops: f64| {
        figures.push(GpuFigure {
            name,
            seconds,
            tflops: flops / seconds / 1e12,
        })
    };
    for &n in &sizes.gemm {
        let x = Tensor::from_f32(b, Role::Activation, &random(&mut rng, n * n, 1.0))?;
        let w = Tensor::from_f32(b, Role::Weight, &random(&mut rng, n * n, 1.0))?;
        let mut y = Tensor::new(b, Role::Activation, n * n)?;
        let dims = LinearDims {
            rows: n,
            d_in: n,
            d_out: n,
        };
        let secs = timed(b, sizes.repeats, || {
            b.linear(y.view_mut(), x.view(), w.view(), None, dims)
        })?;
        push(
            format!("gemm bf16 {n}×{n}×{n}"),
            secs,
            2.0 * (n as f64).powi(3),
        );
    }
    for &(batch, heads, len, hd) in &sizes.attention {
        let dims = AttentionDims::new(batch, heads, len, len, hd);
        let n = batch * len * heads * hd;
        let q = Tensor::from_f32(b, Role::Activation, &random(&mut rng, n, 1.0))?;
        let k = Tensor::from_f32(b, Role::Activation, &random(&mut rng, n, 1.0))?;
        let v = Tensor::from_f32(b, Role::Activation, &random(&mut rng, n, 1.0))?;
        let dout = Tensor::from_f32(b, Role::Activation, &random(&mut rng, n, 1.0))?;
        let mut out = Tensor::new(b, Role::Activation, n)?;
        let mut lse = Tensor::new(b, Role::Exact, batch * heads * len)?;
        let (mut dq, mut dk, mut dv) = (
            Tensor::new(b, Role::Activation, n)?,
            Tensor::new(b, Role::Activation, n)?,
            Tensor::new(b, Role::Activation, n)?,
        );
        // FlashAttention's count: QKᵀ and PV, 4·b·h·L²·d forward; the backward does 2.5× that.
        let fwd_flops = 4.0 * (batch * heads) as f64 * (len as f64).powi(2) * hd as f64;
        let secs = timed(b, sizes.repeats, || {
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
        })?;
        let shape = format!("b={batch} h={heads} L={len} d={hd}");
        push(format!("flash attention fwd {shape}"), secs, fwd_flops);
        let secs = timed(b, sizes.repeats, || {
            b.attention_backward(
                dq.view_mut(),
                dk.view_mut(),
                dv.view_mut(),
                None,
                dout.view(),
                out.view(),
                lse.view(),
                q.view(),
                k.view(),
                v.view(),
                None,
                None,
                &dims,
            )
        })?;
        push(
            format!("flash attention bwd {shape}"),
            secs,
            2.5 * fwd_flops,
        );
    }
    let encoder = TransformerEncoder::new(sizes.encoder.clone())?;
    let host: Vec<Vec<f32>> = encoder
        .layout()
        .entries()
        .iter()
        .map(|e| random(&mut rng, e.numel(), 0.02))
        .collect();
    let (batch, len) = sizes.encoder_batch;
    let steps = time_encoder_steps(
        b,
        &encoder,
        |i| &host[i],
        batch,
        len,
        1 + sizes.repeats.min(3),
    )?;
    let secs = median(steps[1..].iter().map(|s| s.seconds).collect());
    let c = &encoder.cfg;
    let tokens = (batch * len) as f64;
    // Matrix products of one token per layer: QKV and output projections, the FFN, and attention's QKᵀ
    // and PV over the sequence; the backward does twice the forward.
    let per_layer = 2.0 * (4 * c.hidden * c.hidden + 2 * c.hidden * c.ffn_dim) as f64
        + 4.0 * len as f64 * c.hidden as f64;
    let flops = 3.0 * tokens * c.layers as f64 * per_layer;
    push(
        format!(
            "training step, encoder {} layers × {} wide, {batch} × {len} tokens",
            c.layers, c.hidden
        ),
        secs,
        flops,
    );
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_are_looked_up_by_name() {
        assert_eq!(bf16_peak_tflops("cuda (NVIDIA H200)"), Some(989.0));
        assert_eq!(bf16_peak_tflops("cuda (NVIDIA H100 PCIe)"), Some(756.0));
        assert_eq!(
            bf16_peak_tflops("cuda (NVIDIA A100-SXM4-80GB)"),
            Some(312.0)
        );
        assert_eq!(bf16_peak_tflops("emu (2 workers)"), None);
    }
}
