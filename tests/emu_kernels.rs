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
use isoformer_engine::ops::attention::{
    attention, attention_backward, AttentionBias, AttentionDims, AttentionInputs,
};
use isoformer_engine::ops::elementwise::{
    activation, activation_backward, swiglu, swiglu_backward, Activation, GeluErf, GeluSigmoid,
    Relu, Softplus,
};
use isoformer_engine::ops::norm::{layernorm, layernorm_backward};
use isoformer_engine::runtime::{Layout, TensorSpec, TrainState};
use isoformer_engine::training::{global_norm, AdamW};
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

fn check_activation<D: KernelDevice, A: Activation>(dev: &D, act: ops::Act, lo: f32, hi: f32) {
    let mut rng = StdRng::seed_from_u64(11);
    for n in [1usize, 1000, 70_001] {
        let x = random_bf16(&mut rng, n, lo, hi);
        let dout = random_bf16(&mut rng, n, -1.0, 1.0);
        let mut want = vec![0.0; n];
        activation::<A>(&mut want, &widen(&x)).unwrap();
        let (bx, bout) = (
            dev.upload_bf16(&x).unwrap(),
            dev.alloc_zeroed(n * 2).unwrap(),
        );
        ops::act_forward(dev, &bout, &bx, n, act).unwrap();
        assert_bf16_close(
            &format!("{} {act:?} forward n={n}", dev.name()),
            &dev.download_bf16(&bout).unwrap(),
            &want,
        );
        let mut wdx = vec![0.0; n];
        activation_backward::<A>(&mut wdx, &widen(&dout), &widen(&x)).unwrap();
        let (bd, bdx) = (
            dev.upload_bf16(&dout).unwrap(),
            dev.alloc_zeroed(n * 2).unwrap(),
        );
        ops::act_backward(dev, &bdx, &bd, &bx, n, act).unwrap();
        assert_bf16_close(
            &format!("{} {act:?} backward n={n}", dev.name()),
            &dev.download_bf16(&bdx).unwrap(),
            &wdx,
        );
    }
}

fn check_elementwise<D: KernelDevice>(dev: &D) {
    check_activation::<D, GeluErf>(dev, ops::Act::GeluErf, -5.0, 5.0);
    check_activation::<D, GeluSigmoid>(dev, ops::Act::GeluSigmoid, -6.0, 6.0);
    check_activation::<D, Relu>(dev, ops::Act::Relu, -2.0, 2.0);
    check_activation::<D, Softplus>(dev, ops::Act::Softplus, -25.0, 25.0);
    let mut rng = StdRng::seed_from_u64(12);
    let (rows, cols) = (37, 45);
    // bias + GELU: pre is the bf16 sum, out the activation of that bf16 value.
    let x = random_bf16(&mut rng, rows * cols, -3.0, 3.0);
    let bias = random_bf16(&mut rng, cols, -1.0, 1.0);
    let pre_want: Vec<f32> = (0..rows * cols)
        .map(|i| x[i].to_f32() + bias[i % cols].to_f32())
        .collect();
    let (bx, bb) = (
        dev.upload_bf16(&x).unwrap(),
        dev.upload_bf16(&bias).unwrap(),
    );
    let (bpre, bout) = (
        dev.alloc_zeroed(rows * cols * 2).unwrap(),
        dev.alloc_zeroed(rows * cols * 2).unwrap(),
    );
    ops::bias_act_forward(dev, &bpre, &bout, &bx, &bb, rows, cols, ops::Act::GeluErf).unwrap();
    let pre = dev.download_bf16(&bpre).unwrap();
    assert_bf16_close("bias+gelu pre-activation", &pre, &pre_want);
    let mut out_want = vec![0.0; rows * cols];
    activation::<GeluErf>(&mut out_want, &widen(&pre)).unwrap();
    assert_bf16_close(
        "bias+gelu output",
        &dev.download_bf16(&bout).unwrap(),
        &out_want,
    );
    // SwiGLU
    let width = 45;
    let u = random_bf16(&mut rng, rows * 2 * width, -3.0, 3.0);
    let dout = random_bf16(&mut rng, rows * width, -1.0, 1.0);
    let mut want = vec![0.0; rows * width];
    swiglu(&mut want, &widen(&u), width).unwrap();
    let (bu, bo) = (
        dev.upload_bf16(&u).unwrap(),
        dev.alloc_zeroed(rows * width * 2).unwrap(),
    );
    ops::swiglu_forward(dev, &bo, &bu, rows, width).unwrap();
    assert_bf16_close("swiglu forward", &dev.download_bf16(&bo).unwrap(), &want);
    let mut wdu = vec![0.0; rows * 2 * width];
    swiglu_backward(&mut wdu, &widen(&dout), &widen(&u), width).unwrap();
    let (bd, bdu) = (
        dev.upload_bf16(&dout).unwrap(),
        dev.alloc_zeroed(rows * 2 * width * 2).unwrap(),
    );
    ops::swiglu_backward(dev, &bdu, &bd, &bu, rows, width).unwrap();
    assert_bf16_close("swiglu backward", &dev.download_bf16(&bdu).unwrap(), &wdu);
    // Residual add and casts.
    let (a, b) = (
        random_bf16(&mut rng, 1001, -4.0, 4.0),
        random_bf16(&mut rng, 1001, -4.0, 4.0),
    );
    let want: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.to_f32() + y.to_f32())
        .collect();
    let (ba, bbb, bo) = (
        dev.upload_bf16(&a).unwrap(),
        dev.upload_bf16(&b).unwrap(),
        dev.alloc_zeroed(1001 * 2).unwrap(),
    );
    ops::add(dev, &bo, &ba, &bbb, 1001).unwrap();
    assert_bf16_close("add", &dev.download_bf16(&bo).unwrap(), &want);
    let f: Vec<f32> = (0..1001).map(|_| rng.random_range(-100.0..100.0)).collect();
    let (bf, bo) = (
        dev.upload_f32(&f).unwrap(),
        dev.alloc_zeroed(1001 * 2).unwrap(),
    );
    ops::cast_to_bf16(dev, &bo, &bf, 1001).unwrap();
    let got = dev.download_bf16(&bo).unwrap();
    assert!(
        got.iter().zip(&f).all(|(g, x)| *g == bf16::from_f32(*x)),
        "cast rounds to nearest even, bit for bit"
    );
}

fn check_optimizer<D: KernelDevice>(dev: &D) {
    let mut rng = StdRng::seed_from_u64(13);
    let n = 10_007;
    let layout = std::sync::Arc::new(Layout::sequential(vec![TensorSpec::f32("w", [n])]).unwrap());
    let mut st = TrainState::new(layout);
    let p0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    st.params.f32_mut("w").unwrap().copy_from_slice(&p0);
    let opt = AdamW::single_group(&st, 1e-2, 0.1).unwrap();
    let (bp, bpb) = (
        dev.upload_f32(&p0).unwrap(),
        dev.alloc_zeroed(n * 2).unwrap(),
    );
    let (bm, bv) = (
        dev.alloc_zeroed(n * 4).unwrap(),
        dev.alloc_zeroed(n * 4).unwrap(),
    );
    let (norm_out, scratch) = (
        dev.alloc_zeroed(4).unwrap(),
        dev.alloc_zeroed(ops::NORM_BLOCKS * 4).unwrap(),
    );
    for step in 1..=3u64 {
        let g: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        // Global norm, and clipping to 10 as the CPU does it.
        let bg = dev.upload_f32(&g).unwrap();
        ops::global_norm_squared(dev, &norm_out, &scratch, &bg, n).unwrap();
        let norm = dev.download_f32(&norm_out).unwrap()[0].sqrt();
        let want_norm = global_norm(&g);
        assert_f32_close("global norm", &[norm], &[want_norm], 1e-5);
        let scale = (10.0 / (want_norm + 1e-6)).min(1.0);
        let clipped: Vec<f32> = g.iter().map(|x| x * scale).collect();
        st.grads.f32_mut("w").unwrap().copy_from_slice(&clipped);
        opt.step(&mut st, 1.0).unwrap();
        let s = ops::AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
            grad_scale: scale,
        };
        ops::adamw(dev, &bp, &bpb, &bm, &bv, &bg, n, s).unwrap();
        let got = dev.download_f32(&bp).unwrap();
        assert_f32_close(
            &format!("{} adamw step {step}", dev.name()),
            &got,
            st.params.f32("w").unwrap(),
            1e-5,
        );
        let copy = dev.download_bf16(&bpb).unwrap();
        assert!(
            copy.iter().zip(&got).all(|(c, p)| *c == bf16::from_f32(*p)),
            "bf16 copy of the updated weights"
        );
    }
}

/// One attention case: CPU f32 reference on the bf16-rounded inputs against the kernel.
fn flash_case<D: KernelDevice>(
    dev: &D,
    d: AttentionDims,
    lens: &[usize],
    bias_mode: Option<bool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let q = random_bf16(
        &mut rng,
        d.batch * d.q_len * d.heads * d.head_dim,
        -1.0,
        1.0,
    );
    let k = random_bf16(
        &mut rng,
        d.batch * d.kv_len * d.heads * d.head_dim,
        -1.0,
        1.0,
    );
    let v = random_bf16(
        &mut rng,
        d.batch * d.kv_len * d.heads * d.v_head_dim,
        -1.0,
        1.0,
    );
    let bias_len = bias_mode.map_or(
        0,
        |pb| if pb { d.batch } else { 1 } * d.heads * d.q_len * d.kv_len,
    );
    let bias: Vec<f32> = (0..bias_len).map(|_| rng.random_range(-2.0..2.0)).collect();
    let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));
    let inputs = AttentionInputs {
        q: &qf,
        k: &kf,
        v: &vf,
        kv_lens: Some(lens),
        bias: bias_mode.map(|per_batch| AttentionBias {
            data: &bias,
            per_batch,
        }),
    };
    let (mut want, mut want_lse) = (
        vec![0.0; d.batch * d.q_len * d.heads * d.v_head_dim],
        vec![0.0; d.batch * d.heads * d.q_len],
    );
    let mut ws = vec![0.0; d.workspace_len(2)];
    attention(&mut want, &mut want_lse, inputs, &d, &mut ws).unwrap();

    let (bq, bk, bv) = (
        dev.upload_bf16(&q).unwrap(),
        dev.upload_bf16(&k).unwrap(),
        dev.upload_bf16(&v).unwrap(),
    );
    let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let blens = dev.upload(bytemuck::cast_slice(&lens_i32)).unwrap();
    let bbias = dev.upload_f32(&bias).unwrap();
    let out = dev.alloc_zeroed(want.len() * 2).unwrap();
    let lse = dev.alloc_zeroed(want_lse.len() * 4).unwrap();
    let bias_arg = bias_mode.map(|pb| (&bbias, pb));
    ops::flash_attention_forward(dev, &out, &lse, &bq, &bk, &bv, Some(&blens), bias_arg, &d)
        .unwrap();
    let what = format!(
        "{} flash forward {d:?} lens {lens:?} bias {bias_mode:?}",
        dev.name()
    );
    assert_bf16_close(&what, &dev.download_bf16(&out).unwrap(), &want);
    let got_lse = dev.download_f32(&lse).unwrap();
    for (g, w) in got_lse.iter().zip(&want_lse) {
        assert!(
            g == w || (g - w).abs() <= 1e-3 * w.abs().max(1.0),
            "{what}: lse {g} vs {w}"
        );
    }

    // Backward from the kernel's own output and LSE; the CPU reference uses its f32 ones.
    let dout = random_bf16(&mut rng, want.len(), -1.0, 1.0);
    let (mut wdq, mut wdk, mut wdv) = (
        vec![0.0; qf.len()],
        vec![0.0; kf.len()],
        vec![0.0; vf.len()],
    );
    let mut wdbias = vec![0.0; bias_len];
    let dbias_arg = bias_mode.map(|_| &mut wdbias[..]);
    attention_backward(
        &mut wdq,
        &mut wdk,
        &mut wdv,
        dbias_arg,
        &widen(&dout),
        &want,
        &want_lse,
        inputs,
        &d,
        &mut ws,
    )
    .unwrap();
    let (bdq, bdk, bdv) = (
        dev.alloc_zeroed(qf.len() * 2).unwrap(),
        dev.alloc_zeroed(kf.len() * 2).unwrap(),
        dev.alloc_zeroed(vf.len() * 2).unwrap(),
    );
    let scratch = dev
        .alloc_zeroed(ops::flash_backward_scratch_bytes(
            &d,
            bias_mode == Some(false),
        ))
        .unwrap();
    let bdout = dev.upload_bf16(&dout).unwrap();
    let bdbias_check = dev.alloc_zeroed(bias_len * 4).unwrap();
    let dbias_buf = bias_mode.map(|_| &bdbias_check);
    ops::flash_attention_backward(
        dev,
        &bdq,
        &bdk,
        &bdv,
        dbias_buf,
        &scratch,
        &bdout,
        &out,
        &lse,
        &bq,
        &bk,
        &bv,
        Some(&blens),
        bias_arg,
        &d,
    )
    .unwrap();
    let what = format!(
        "{} flash backward {d:?} lens {lens:?} bias {bias_mode:?}",
        dev.name()
    );
    assert_bf16_close(
        &format!("{what} dq"),
        &dev.download_bf16(&bdq).unwrap(),
        &wdq,
    );
    assert_bf16_close(
        &format!("{what} dk"),
        &dev.download_bf16(&bdk).unwrap(),
        &wdk,
    );
    assert_bf16_close(
        &format!("{what} dv"),
        &dev.download_bf16(&bdv).unwrap(),
        &wdv,
    );
    if bias_mode.is_some() {
        // dbias is f32, but computed from bf16 O (in D = rowsum(dO∘O)): one bf16 unit (2⁻⁸) of its scale.
        assert_f32_close(
            &format!("{what} dbias"),
            &dev.download_f32(&bdbias_check).unwrap(),
            &wdbias,
            1.0 / 256.0,
        );
    }
}

fn check_flash_attention<D: KernelDevice>(dev: &D) {
    // Odd lengths (not multiples of the 64-row and 32-key tiles), padding and a fully masked batch entry.
    flash_case(
        dev,
        AttentionDims::new(3, 2, 37, 37, 32),
        &[37, 20, 0],
        None,
        1,
    );
    // Cross-attention with NT-v2's head dim 48, keys past one tile.
    flash_case(
        dev,
        AttentionDims::new(2, 2, 29, 70, 48),
        &[70, 33],
        None,
        2,
    );
    // Enformer: keys 64, values 192, relative-position bias per batch and broadcast.
    let enformer = AttentionDims {
        v_head_dim: 192,
        ..AttentionDims::new(2, 2, 67, 67, 64)
    };
    flash_case(dev, enformer, &[67, 67], Some(true), 3);
    flash_case(dev, enformer, &[67, 50], Some(false), 4);
    // IsoFormer's cross-attention: head dim 384, DNA queries against padded RNA keys.
    flash_case(dev, AttentionDims::new(1, 1, 20, 45, 384), &[41], None, 5);
}

#[test]
fn emu_flash_attention_forward_and_backward() {
    check_flash_attention(&EmuDevice::default());
}

#[test]
fn emu_elementwise_activations_swiglu_add_cast() {
    check_elementwise(&EmuDevice::default());
}

#[test]
fn emu_adamw_global_norm_and_clipping() {
    check_optimizer(&EmuDevice::default());
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
            check_elementwise(&dev);
            check_optimizer(&dev);
            check_flash_attention(&dev);
        }
        Err(e) => println!("skipped: no GPU run ({e})"),
    }
}
