//! bf16 GEMM with f32 accumulation on the CPU: `C = A·B` with bf16 `A [m, k]` and `B [k, n]` (any strides),
//! written as f32 (overwritten or accumulated) or rounded once to bf16, either with an optional f32 bias
//! added as the sums are written, or passed through SwiGLU ([`GemmOut::SwiGlu`]) or an activation
//! ([`GemmOut::Activated`]) on its way out.
//!
//! Three kernels; each product runs on the fastest this CPU has ([`Bf16Kernel::best`]):
//! - **AMX** (`amx`, Sapphire Rapids and later, where Linux grants the tile state): `tdpbf16ps` on
//!   16×16 f32 tiles, 16 times the work of an AVX-512 instruction;
//! - **AVX512-BF16** (`avx512`): `vdpbf16ps`, which multiplies two adjacent bf16 pairs per 32-bit lane
//!   and adds both products into an f32 lane, twice the multiply-adds of an f32 FMA, on a 12×32 register
//!   tile;
//! - **portable**: everywhere else (AVX-512F alone, AVX2, other CPUs) the operands are widened to f32
//!   exactly and the f32 GEMM runs, with the same epilogue.
//!
//! Both native kernels pack B once per call in 32-column strips of k pairs (`(b[2p][j], b[2p+1][j])` side
//! by side, the layout both instructions read), or per task where the product has one block of rows, and
//! A in strips of rows, into cache-line-aligned buffers (`shared`); odd `k` and ragged edges are padded
//! with zeros. Work is split over blocks of C (narrower where a product of few rows would leave threads
//! idle); partial
//! sums across k-blocks live in an f32 scratch block per task, so a bf16 output is rounded exactly once,
//! except that an f32 output's whole blocks are written in place where one k-block covers k. Each
//! element's summation order is fixed, so results do not depend on the thread count.

use half::bf16;
use rayon::prelude::*;

use super::matmul::{gemm_views, View};
use crate::{Error, Result};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod shared;

/// Where the product goes: a row-major `m × n` buffer.
pub enum GemmOut<'a> {
    /// f32, `c = A·B + bias`, or `c += A·B + bias` when `accumulate`, with `bias [n]`: the bias is added
    /// as the sums are written, so a linear layer needs no pass that fills its output with the bias first.
    F32 {
        c: &'a mut [f32],
        accumulate: bool,
        bias: Option<&'a [f32]>,
    },
    /// f32, `c = residual + (A·B + bias)` with `residual [m, n]` and `bias [n]`: the bits of
    /// [`GemmOut::F32`] (not accumulating) followed by adding the residual, in one write of `c` (a
    /// transformer layer's output projection and its residual connection: the product is not stored and
    /// read back, and the sum is not a pass of its own).
    Residual {
        c: &'a mut [f32],
        residual: &'a [f32],
        bias: Option<&'a [f32]>,
    },
    /// bf16, `c = round(A·B + bias)` with `bias [n]`.
    Bf16 {
        c: &'a mut [bf16],
        bias: Option<&'a [f32]>,
    },
    /// bf16 SwiGLU of a product whose `n` columns are a gate half and a value half: `c` is `m × n/2`,
    /// `c[i, j] = round(swiglu(g, v))` with `g = (A·B)[i, j]` and `v = (A·B)[i, n/2 + j]`
    /// (computed by `ops::simd::swiglu_16` and rounded as the elementwise op rounds, so the same
    /// bits as [`crate::ops::elementwise::swiglu`] of the f32 product). The product itself is never
    /// stored: each task's block of it stays in the task's scratch, which saves a SwiGLU feed-forward's
    /// widest activation (NT-v2: `[rows, 6,144]` f32) a write and a read.
    SwiGlu { c: &'a mut [bf16] },
    /// bf16, `c = round(act(A·B + bias))`, with `act` an activation's vector body (`out[i] = f(x[i])`
    /// over f32 values: [`crate::ops::elementwise::Activation::f_chunk`]), so the bits are those of the f32
    /// product with its bias, then the activation, then the rounding. As for SwiGLU, the product stays in
    /// each task's scratch: an inference GELU feed-forward (ESM-2: `[rows, 4·hidden]` f32) skips writing
    /// its pre-activation and reading it back.
    Activated {
        c: &'a mut [bf16],
        bias: Option<&'a [f32]>,
        act: ActChunk,
    },
    /// f32, `A·B + bias` as [`GemmOut::F32`] computes it (the same bits), written head-major: the `m` rows
    /// are `m / rows.len` sequences of `rows.len` tokens, the `n` columns `rows.heads` heads of
    /// `n / rows.heads` values, and row `b·len + l`, column `h·hd + i` goes to `c[((b·heads + h)·len +
    /// l)·hd + i]`. A projection to attention heads written this way lets the attention read each head's
    /// rows contiguously ([`crate::ops::attention::AttentionInputs::head_major`]).
    F32Heads {
        c: &'a mut [f32],
        bias: Option<&'a [f32]>,
        rows: HeadRows,
    },
}

/// The head-major layout of [`GemmOut::F32Heads`]: tokens per sequence and heads per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadRows {
    pub len: usize,
    pub heads: usize,
}

pub use super::elementwise::ActChunk;

impl GemmOut<'_> {
    /// The values of the product `A·B` this output takes (twice its own for [`GemmOut::SwiGlu`]).
    pub(crate) fn product_len(&self) -> usize {
        match self {
            GemmOut::F32 { c, .. } | GemmOut::Residual { c, .. } | GemmOut::F32Heads { c, .. } => {
                c.len()
            }
            GemmOut::Bf16 { c, .. } | GemmOut::Activated { c, .. } => c.len(),
            GemmOut::SwiGlu { c } => 2 * c.len(),
        }
    }

    /// The bias added as the sums are written (none for SwiGLU).
    pub(crate) fn bias(&self) -> Option<&[f32]> {
        match self {
            GemmOut::F32 { bias, .. }
            | GemmOut::Residual { bias, .. }
            | GemmOut::Bf16 { bias, .. }
            | GemmOut::Activated { bias, .. }
            | GemmOut::F32Heads { bias, .. } => *bias,
            GemmOut::SwiGlu { .. } => None,
        }
    }
}

/// The left operand: bf16, or f32 rounded to bf16 (nearest even) as it is packed, so f32 activations
/// multiply bf16 weights without a separate conversion pass.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Bf16(&'a [bf16]),
    F32(&'a [f32]),
}

impl Lhs<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Lhs::Bf16(a) => a.len(),
            Lhs::F32(a) => a.len(),
        }
    }

    /// Element `idx` as bf16 bits.
    #[inline(always)]
    fn bits(&self, idx: usize) -> u16 {
        match self {
            Lhs::Bf16(a) => a[idx].to_bits(),
            Lhs::F32(a) => super::simd::bf16_bits(a[idx]),
        }
    }
}

/// A bf16 GEMM kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// Widened to f32, the f32 GEMM.
    Portable,
}

impl Bf16Kernel {
    /// Every kernel this CPU can run, fastest first (detected once; no allocation per GEMM call).
    pub fn available() -> &'static [Bf16Kernel] {
        static AVAILABLE: std::sync::OnceLock<Vec<Bf16Kernel>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            let mut kernels = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if has_native_bf16() && crate::ops::amx::available() {
                    kernels.push(Bf16Kernel::Amx);
                }
                if has_native_bf16() {
                    kernels.push(Bf16Kernel::Avx512Bf16);
                }
            }
            kernels.push(Bf16Kernel::Portable);
            kernels
        })
    }

    /// The fastest kernel this CPU runs, for products of any shape: AMX, else AVX512-BF16, else portable.
    /// AMX also for fewer than 32 rows, though most of each row tile is then padding: the products of so
    /// few rows are bound by streaming the weights, not by the tiles. On the Xeon model 167, 2 threads
    /// (`bench gemm --dtype bf16`), AMX against AVX512-BF16: 22 × 640 × 640 497 against 173 GFLOP/s,
    /// 22 × 640 × 2,560 456 against 80, 31 × 640 × 640 679 against 176, 5 × 640 × 640 113 against 68, one
    /// row 22 against 13; ESM-2 150M bf16 over 32 peptides of 20 residues one at a time, 1.75–1.80 → 0.77–0.80 s.
    pub fn best() -> Bf16Kernel {
        Self::available()[0]
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "AMX tdpbf16ps",
            Bf16Kernel::Avx512Bf16 => "AVX512-BF16 vdpbf16ps",
            Bf16Kernel::Portable => "portable (widened to f32)",
        }
    }
}

/// Whether this CPU runs a native bf16 kernel: AVX512-BF16 with the AVX-512 subsets the packing and
/// epilogue loops are compiled for (every CPU with AVX512-BF16 has them); AMX needs it too.
pub fn has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn fits(v: View, len: usize) -> bool {
    v.extent().is_some_and(|e| e <= len)
}

/// `out = A·B` (see [`GemmOut`]) for bf16 `a` and `b` read through the strided views `av [m, k]` and
/// `bv [k, n]`, on `kernel` (None: [`Bf16Kernel::best`]). A kernel this CPU lacks is an error.
pub(crate) fn gemm_bf16(
    out: GemmOut<'_>,
    a: Lhs<'_>,
    av: View,
    b: &[bf16],
    bv: View,
    kernel: Option<Bf16Kernel>,
) -> Result<()> {
    const OP: &str = "gemm_bf16";
    let (m, n, k) = (av.rows, bv.cols, av.cols);
    if bv.rows != k {
        return Err(Error::shape(
            OP,
            format!("a is {m}×{k} but b is {}×{n}", bv.rows),
        ));
    }
    if !fits(av, a.len()) || !fits(bv, b.len()) {
        return Err(Error::shape(OP, "an operand view reaches past its buffer"));
    }
    let mn = m
        .checked_mul(n)
        .ok_or_else(|| Error::invalid(OP, format!("{m} × {n} outputs overflow")))?;
    if out.product_len() != mn {
        return Err(Error::shape(
            OP,
            format!(
                "output takes {} product values, expected {mn}",
                out.product_len()
            ),
        ));
    }
    if let GemmOut::SwiGlu { .. } = out {
        // The value half is read from column n/2 on: whole halves, and strides that step forwards.
        if n % 2 != 0 || bv.rs < 0 || bv.cs < 0 {
            return Err(Error::shape(
                OP,
                format!(
                    "SwiGLU needs an even number of columns and non-negative strides, b is {k}×{n} \
                     (strides {}, {})",
                    bv.rs, bv.cs
                ),
            ));
        }
    }
    if let GemmOut::Residual { c, residual, .. } = &out {
        if residual.len() != c.len() {
            return Err(Error::shape(
                OP,
                format!(
                    "residual has {} values, expected {}",
                    residual.len(),
                    c.len()
                ),
            ));
        }
    }
    if let GemmOut::F32Heads { rows, .. } = &out {
        if rows.len == 0 || rows.heads == 0 || m % rows.len != 0 || n % rows.heads != 0 {
            return Err(Error::shape(
                OP,
                format!(
                    "a head-major output needs whole sequences and heads: {m} rows of {} tokens, {n} \
                     columns of {} heads",
                    rows.len, rows.heads
                ),
            ));
        }
    }
    if let Some(bias) = out.bias() {
        if bias.len() != n {
            return Err(Error::shape(
                OP,
                format!("bias has {} values, expected {n}", bias.len()),
            ));
        }
    }
    if mn == 0 {
        return Ok(());
    }
    let kernel = kernel.unwrap_or_else(Bf16Kernel::best);
    if !Bf16Kernel::available().contains(&kernel) {
        return Err(Error::invalid(
            OP,
            format!("the {} kernel does not run on this CPU", kernel.name()),
        ));
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX is available (checked just above).
        Bf16Kernel::Amx => unsafe { amx::gemm(out, a, av, b, bv) },
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 => avx512::gemm(out, a, av, b, bv),
        _ => portable_gemm(out, a, av, b, bv)?,
    }
    Ok(())
}

/// Widens both operands to f32 (exactly) and runs the f32 GEMM.
fn portable_gemm(out: GemmOut<'_>, a: Lhs<'_>, av: View, b: &[bf16], bv: View) -> Result<()> {
    let widen = |x: &[bf16]| -> Vec<f32> { x.par_iter().map(|v| v.to_f32()).collect() };
    let a32 = match a {
        Lhs::Bf16(a) => widen(a),
        Lhs::F32(a) => a.par_iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
    };
    let b32 = widen(b);
    let cv = View::row_major(av.rows, bv.cols, false);
    match out {
        GemmOut::F32 {
            c,
            accumulate,
            bias,
        } => {
            gemm_views(c, cv, accumulate, &a32, av, &b32, bv, None);
            if let Some(bias) = bias {
                c.par_chunks_mut(bv.cols).for_each(|row| {
                    row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                });
            }
        }
        GemmOut::Residual { c, residual, bias } => {
            gemm_views(c, cv, false, &a32, av, &b32, bv, None);
            c.par_chunks_mut(bv.cols)
                .zip(residual.par_chunks(bv.cols))
                .for_each(|(row, res)| match bias {
                    Some(bias) => row
                        .iter_mut()
                        .zip(bias.iter().zip(res))
                        .for_each(|(o, (b, r))| *o = (*o + b) + r),
                    None => row.iter_mut().zip(res).for_each(|(o, r)| *o += r),
                });
        }
        GemmOut::Bf16 { c, bias } => {
            let mut c32 = vec![0.0f32; c.len()];
            gemm_views(&mut c32, cv, false, &a32, av, &b32, bv, None);
            round_rows(c, &c32, bv.cols, bias);
        }
        GemmOut::SwiGlu { c } => {
            let mut c32 = vec![0.0f32; 2 * c.len()];
            gemm_views(&mut c32, cv, false, &a32, av, &b32, bv, None);
            super::elementwise::swiglu(c, &c32, bv.cols / 2)?;
        }
        GemmOut::F32Heads { c, bias, rows } => {
            let mut c32 = vec![0.0f32; c.len()];
            gemm_views(&mut c32, cv, false, &a32, av, &b32, bv, None);
            let (n, hd) = (bv.cols, bv.cols / rows.heads);
            for (r, row) in c32.chunks(n).enumerate() {
                let (seq, l) = (r / rows.len, r % rows.len);
                for (h, values) in row.chunks(hd).enumerate() {
                    let at = ((seq * rows.heads + h) * rows.len + l) * hd;
                    for (i, (o, v)) in c[at..at + hd].iter_mut().zip(values).enumerate() {
                        *o = bias.map_or(*v, |bias| v + bias[h * hd + i]);
                    }
                }
            }
        }
        GemmOut::Activated { c, bias, act } => {
            let mut c32 = vec![0.0f32; c.len()];
            gemm_views(&mut c32, cv, false, &a32, av, &b32, bv, None);
            if let Some(bias) = bias {
                c32.par_chunks_mut(bv.cols).for_each(|row| {
                    row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                });
            }
            let mut activated = vec![0.0f32; c.len()];
            activated
                .par_chunks_mut(bv.cols)
                .zip(c32.par_chunks(bv.cols))
                .for_each(|(o, x)| act(o, x));
            round_rows(c, &activated, bv.cols, None);
        }
    }
    Ok(())
}

/// `c[r, j] = bf16(src[r, j] + bias[j])` for rows of `cols` values.
fn round_rows(c: &mut [bf16], src: &[f32], cols: usize, bias: Option<&[f32]>) {
    c.par_chunks_mut(cols)
        .zip(src.par_chunks(cols))
        .for_each(|(o, s)| match bias {
            Some(bias) => o
                .iter_mut()
                .zip(s.iter().zip(bias))
                .for_each(|(o, (v, b))| *o = bf16::from_f32(v + b)),
            None => o
                .iter_mut()
                .zip(s)
                .for_each(|(o, v)| *o = bf16::from_f32(*v)),
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rng, uniform};
    use rand::rngs::StdRng;

    /// Naive f64 product of the bf16 values.
    fn reference(a: &[bf16], av: View, b: &[bf16], bv: View) -> (Vec<f64>, Vec<f64>) {
        let (m, n, k) = (av.rows, bv.cols, av.cols);
        let (mut c, mut mag) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = a[i * av.rs as usize + p * av.cs as usize].to_f32() as f64;
                    let y = b[p * bv.rs as usize + j * bv.cs as usize].to_f32() as f64;
                    c[i * n + j] += x * y;
                    mag[i * n + j] += (x * y).abs();
                }
            }
        }
        (c, mag)
    }

    fn random_bf16(rng: &mut StdRng, n: usize) -> Vec<bf16> {
        uniform(rng, n, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// `len` zeros starting on a cache line, inside `storage` (replaced here), as the engine's tensors
    /// start: whole tiles of such a left operand are read in place by the AMX kernel.
    fn on_cache_line(storage: &mut Vec<bf16>, len: usize) -> &mut [bf16] {
        *storage = vec![bf16::ZERO; len + 32];
        let start = storage.as_ptr().align_offset(64);
        &mut storage[start..start + len]
    }

    /// B's layouts (`[k, n]`, b holding `(k + 1)·n` values): rows, columns, and columns padded to stride
    /// k + 1 (a slice of a wider weight; an even stride takes the packer's word-transpose path, odd k
    /// included).
    fn b_layouts(k: usize, n: usize) -> [View; 3] {
        [
            View::row_major(k, n, false),
            View::row_major(k, n, true),
            View {
                rows: k,
                cols: n,
                rs: 1,
                cs: (k + 1) as isize,
            },
        ]
    }

    /// Every edge case of the packing (ragged m and n, odd k, k across several blocks, transposed
    /// operands, B columns at a padded stride, bf16 and f32 left operands, A read in place) and of the
    /// output (through the scratch, or in place from zero, its own values or the bias), on every kernel
    /// this CPU runs.
    #[test]
    fn bf16_gemm_matches_f64_on_ragged_and_transposed_shapes() {
        let mut rng = rng(7);
        let shapes = [
            (1, 1, 1),
            (13, 33, 7),
            (25, 64, 385),
            (250, 45, 800),
            (12, 530, 33),
            (64, 45, 96),
            // Past one k-block (1,024 on both kernels): partial sums carried across blocks.
            (40, 70, 1090),
            // Whole register blocks and k within one k-block, where an f32 output is written in
            // place, with whole and ragged tasks side by side (the AVX-512 kernel's tasks are 48 × 512).
            (96, 64, 1000),
            (300, 288, 64),
            (100, 1100, 130),
        ];
        for &(m, n, k) in &shapes {
            for (ta, bv) in [false, true]
                .into_iter()
                .flat_map(|ta| b_layouts(k, n).map(|bv| (ta, bv)))
            {
                let tb = bv.rs == 1;
                // f32 values that bf16 cannot hold: packed as `Lhs::F32` they are rounded, so both
                // operand kinds must give the product of the rounded values.
                let a32 = uniform(&mut rng, m * k, -1.0, 1.0);
                // A starts on a cache line, so that shapes of whole tiles (m and k multiples of 32,
                // row-major) take the AMX kernel's in-place path.
                let mut a_storage = Vec::new();
                let a = on_cache_line(&mut a_storage, m * k);
                a.iter_mut()
                    .zip(&a32)
                    .for_each(|(o, v)| *o = bf16::from_f32(*v));
                let a = &*a;
                let b = random_bf16(&mut rng, (k + 1) * n);
                let bias = uniform(&mut rng, n, -1.0, 1.0);
                let av = View::row_major(m, k, ta);
                let (want, mag) = reference(a, av, &b, bv);
                for &kernel in Bf16Kernel::available() {
                    let run = |out: GemmOut<'_>, lhs: Lhs<'_>| {
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap()
                    };
                    let mut c32 = vec![0.5f32; m * n];
                    let out = GemmOut::F32 {
                        c: &mut c32,
                        accumulate: true,
                        bias: None,
                    };
                    run(out, Lhs::Bf16(a));
                    // Overwritten (the NaN must not survive), with and without the bias added as it
                    // is written.
                    let overwritten = |bias: Option<&[f32]>| {
                        let mut c = vec![f32::NAN; m * n];
                        let out = GemmOut::F32 {
                            c: &mut c,
                            accumulate: false,
                            bias,
                        };
                        run(out, Lhs::Bf16(a));
                        c
                    };
                    let (c32_bias, c32_plain) = (overwritten(Some(&bias)), overwritten(None));
                    let mut c16 = vec![bf16::ZERO; m * n];
                    let out = GemmOut::Bf16 {
                        c: &mut c16,
                        bias: Some(&bias),
                    };
                    run(out, Lhs::F32(&a32));
                    for i in 0..m * n {
                        // f32 accumulation: error grows with k and the magnitude of the terms.
                        let tol = 4.0 * k as f64 * f32::EPSILON as f64 * mag[i] + 1e-6;
                        let got = c32[i] as f64 - 0.5;
                        assert!(
                            (got - want[i]).abs() <= tol,
                            "{m}×{n}×{k} ta={ta} tb={tb} cs={} {kernel:?} [{i}]: {got} vs {}",
                            bv.cs,
                            want[i]
                        );
                        let got_plain = c32_plain[i] as f64;
                        assert!(
                            (got_plain - want[i]).abs() <= tol,
                            "f32 out {m}×{n}×{k} {kernel:?} [{i}]: {got_plain} vs {}",
                            want[i]
                        );
                        let with_bias = want[i] + bias[i % n] as f64;
                        let got_bias = c32_bias[i] as f64;
                        assert!(
                            (got_bias - with_bias).abs() <= tol + 1e-6,
                            "f32 out with bias {m}×{n}×{k} {kernel:?} [{i}]: {got_bias} vs {with_bias}"
                        );
                        let got16 = c16[i].to_f32() as f64;
                        // one bf16 rounding: half an ulp of 2⁻⁸ relative, plus the f32 error
                        let tol16 = with_bias.abs() * 2f64.powi(-8) + tol + 1e-30;
                        assert!(
                            (got16 - with_bias).abs() <= tol16,
                            "bf16 out {m}×{n}×{k} {kernel:?} [{i}]: {got16} vs {with_bias}"
                        );
                    }
                }
            }
        }
    }

    /// A fused epilogue against its two-step form: for each `(m, n, k)`, random operands with B in every
    /// layout ([`b_layouts`]), bf16 and f32 left operands, on every kernel this CPU runs, the f32 product
    /// (with `bias`, `[n]` values drawn for the shape, where asked) goes through `two_step` into `want`,
    /// and the fused output `fused(c, bias)` must match it bit for bit (`width(n)` outputs a row).
    fn fused_matches_two_step(
        seed: u64,
        shapes: &[(usize, usize, usize)],
        (width, with_bias): (fn(usize) -> usize, bool),
        fused: impl for<'a> Fn(&'a mut [bf16], Option<&'a [f32]>) -> GemmOut<'a>,
        two_step: impl Fn(&mut [bf16], &[f32], usize),
    ) {
        let mut rng = rng(seed);
        for &(m, n, k) in shapes {
            for bv in b_layouts(k, n) {
                let a32 = uniform(&mut rng, m * k, -1.0, 1.0);
                let a: Vec<bf16> = a32.iter().map(|&v| bf16::from_f32(v)).collect();
                let b = random_bf16(&mut rng, (k + 1) * n);
                let bias = with_bias.then(|| uniform(&mut rng, n, -1.0, 1.0));
                let av = View::row_major(m, k, false);
                for &kernel in Bf16Kernel::available() {
                    for lhs in [Lhs::Bf16(&a), Lhs::F32(&a32)] {
                        let mut product = vec![f32::NAN; m * n];
                        let out = GemmOut::F32 {
                            c: &mut product,
                            accumulate: false,
                            bias: bias.as_deref(),
                        };
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap();
                        let mut want = vec![bf16::ZERO; m * width(n)];
                        two_step(&mut want, &product, n);
                        let mut got = vec![bf16::NAN; m * width(n)];
                        let out = fused(&mut got, bias.as_deref());
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap();
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{m}×{n}×{k} cs={} {kernel:?} [{i}]: {g} vs {w}",
                                bv.cs
                            );
                        }
                    }
                }
            }
        }
    }

    /// The head-major output holds the f32 output's bits, each row's heads moved to their places: heads
    /// that straddle a task's columns (48 wide), k past one k-block, blocks the f32 output writes in place
    /// (k = 64, whole blocks), ragged blocks, k = 0, with and without a bias, bf16 and f32 left operands,
    /// on every kernel this CPU runs; and sizes that are not whole sequences or heads are refused.
    #[test]
    fn head_major_output_is_the_f32_output_moved() {
        let mut rng = rng(29);
        // (m, n, k, tokens per sequence, heads)
        let shapes = [
            (96, 768, 768, 48, 16),
            (64, 96, 1090, 32, 2),
            (256, 512, 64, 128, 8),
            (40, 60, 7, 20, 5),
            (8, 12, 0, 4, 3),
        ];
        for (m, n, k, len, heads) in shapes {
            let a32 = uniform(&mut rng, m * k, -1.0, 1.0);
            let a: Vec<bf16> = a32.iter().map(|&v| bf16::from_f32(v)).collect();
            let b = random_bf16(&mut rng, k * n);
            let (av, bv) = (View::row_major(m, k, false), View::row_major(k, n, false));
            let hd = n / heads;
            for bias in [None, Some(uniform(&mut rng, n, -1.0, 1.0))] {
                for &kernel in Bf16Kernel::available() {
                    for lhs in [Lhs::Bf16(&a), Lhs::F32(&a32)] {
                        let mut plain = vec![f32::NAN; m * n];
                        let out = GemmOut::F32 {
                            c: &mut plain,
                            accumulate: false,
                            bias: bias.as_deref(),
                        };
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap();
                        let mut moved = vec![f32::NAN; m * n];
                        let out = GemmOut::F32Heads {
                            c: &mut moved,
                            bias: bias.as_deref(),
                            rows: HeadRows { len, heads },
                        };
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap();
                        for r in 0..m {
                            for c in 0..n {
                                let (seq, l, h, i) = (r / len, r % len, c / hd, c % hd);
                                let got = moved[((seq * heads + h) * len + l) * hd + i];
                                let want = plain[r * n + c];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{m}×{n}×{k} {kernel:?} bias {} [{r}, {c}]: {got} vs {want}",
                                    bias.is_some()
                                );
                            }
                        }
                    }
                }
            }
        }
        let (a, b) = (vec![bf16::ONE; 12], vec![bf16::ONE; 8]);
        for rows in [HeadRows { len: 4, heads: 2 }, HeadRows { len: 3, heads: 3 }] {
            let mut c = vec![0.0f32; 24];
            let out = GemmOut::F32Heads {
                c: &mut c,
                bias: None,
                rows,
            };
            let (av, bv) = (View::row_major(6, 2, false), View::row_major(2, 4, false));
            let err = gemm_bf16(out, Lhs::Bf16(&a), av, &b, bv, None).unwrap_err();
            assert!(err.to_string().contains("head-major"), "{err}");
        }
    }

    /// The SwiGLU output is bit for bit SwiGLU of the f32 product (which the test above checks against
    /// f64): ragged halves (a last strip of each half only partly used), odd k, k past one k-block,
    /// products wider than one task, B in rows, in columns and in columns at a padded stride, bf16 and f32
    /// left operands, on every kernel this CPU runs.
    #[test]
    fn swiglu_output_is_swiglu_of_the_f32_product() {
        let shapes = [
            (1, 1, 1),
            (13, 33, 7),
            (50, 45, 385),
            (40, 70, 1090),
            (100, 600, 130),
            (96, 256, 64),
        ]
        .map(|(m, width, k)| (m, 2 * width, k));
        fused_matches_two_step(
            11,
            &shapes,
            (|n| n / 2, false),
            |c, _| GemmOut::SwiGlu { c },
            |want, product, n| crate::ops::elementwise::swiglu(want, product, n / 2).unwrap(),
        );
        // An odd number of product columns has no halves.
        let (a, b) = (vec![bf16::ONE; 4], vec![bf16::ONE; 6]);
        let mut c = vec![bf16::ZERO; 3];
        let err = gemm_bf16(
            GemmOut::SwiGlu { c: &mut c },
            Lhs::Bf16(&a),
            View::row_major(2, 2, false),
            &b,
            View::row_major(2, 3, false),
            None,
        );
        assert!(err.is_err());
    }

    /// The fused activation gives the bits of the two-step form: the f32 product with its bias, then the
    /// activation op writing bf16 (as `linear_act` runs when it keeps the pre-activation). Ragged tiles,
    /// several tasks (and the epilogue's runs of 256 columns), several k-blocks, and k = 0.
    #[test]
    fn activated_output_is_the_activation_of_the_f32_product() {
        use crate::ops::elementwise::{activation, Activation, GeluErf, GeluSigmoid, Relu};
        type TwoStep = fn(&mut [bf16], &[f32]) -> Result<()>;
        let acts: [(ActChunk, TwoStep); 3] = [
            (GeluErf::f_chunk, activation::<GeluErf, bf16>),
            (GeluSigmoid::f_chunk, activation::<GeluSigmoid, bf16>),
            (Relu::f_chunk, activation::<Relu, bf16>),
        ];
        let shapes = [
            (1, 1, 1),
            (13, 33, 7),
            (100, 600, 130),
            (40, 70, 1090),
            (3, 5, 0),
        ];
        for (seed, (act, two_step)) in acts.into_iter().enumerate() {
            fused_matches_two_step(
                12 + seed as u64,
                &shapes,
                (|n| n, true),
                |c, bias| GemmOut::Activated { c, bias, act },
                |want, product, _| two_step(want, product).unwrap(),
            );
        }
    }

    /// The residual output gives the bits of the two steps: the f32 product with its bias (as written in
    /// place where whole blocks allow it, or through the scratch), then the residual added. Whole tiles in
    /// one k-block (the in-place start from the bias), ragged tiles, several k-blocks and k = 0, with and
    /// without a bias, bf16 and f32 left operands, on every kernel this CPU runs; a residual of another
    /// size is an error.
    #[test]
    fn residual_output_is_the_product_then_the_residual() {
        let mut rng = rng(21);
        let shapes = [
            (64, 64, 64),
            (96, 256, 96),
            (13, 33, 7),
            (40, 70, 1090),
            (64, 96, 2080),
            (3, 5, 0),
        ];
        for (m, n, k) in shapes {
            let a32 = uniform(&mut rng, m * k, -1.0, 1.0);
            let mut a_storage = Vec::new();
            let a = on_cache_line(&mut a_storage, m * k);
            a.iter_mut()
                .zip(&a32)
                .for_each(|(o, v)| *o = bf16::from_f32(*v));
            let a = &*a;
            let b = random_bf16(&mut rng, k * n);
            let (av, bv) = (View::row_major(m, k, false), View::row_major(k, n, false));
            let residual = uniform(&mut rng, m * n, -4.0, 4.0);
            for bias in [None, Some(uniform(&mut rng, n, -1.0, 1.0))] {
                for &kernel in Bf16Kernel::available() {
                    for lhs in [Lhs::Bf16(a), Lhs::F32(&a32)] {
                        let bias = bias.as_deref();
                        let mut product = vec![f32::NAN; m * n];
                        let out = GemmOut::F32 {
                            c: &mut product,
                            accumulate: false,
                            bias,
                        };
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap();
                        let mut got = vec![f32::NAN; m * n];
                        let out = GemmOut::Residual {
                            c: &mut got,
                            residual: &residual,
                            bias,
                        };
                        gemm_bf16(out, lhs, av, &b, bv, Some(kernel)).unwrap();
                        for (i, ((g, p), r)) in got.iter().zip(&product).zip(&residual).enumerate()
                        {
                            let want = r + p;
                            assert_eq!(
                                g.to_bits(),
                                want.to_bits(),
                                "{m}×{n}×{k} {kernel:?} bias {} [{i}]: {g} vs {want}",
                                bias.is_some()
                            );
                        }
                    }
                }
            }
            let mut c = vec![0.0; m * n];
            let out = GemmOut::Residual {
                c: &mut c,
                residual: &residual[1..],
                bias: None,
            };
            let err = gemm_bf16(out, Lhs::Bf16(a), av, &b, bv, None).unwrap_err();
            assert!(err.to_string().contains("residual"), "{err}");
        }
    }

    /// The bits of `A·B` (`a` `[m, k]` row-major, B `[k, n]` columns of a weight) written as output kind
    /// `kind` (0: f32 with a bias, 1: the residual output, 2: bf16 with a bias, 3: SwiGLU), each value's
    /// bits widened to u32, on `kernel`.
    #[allow(clippy::too_many_arguments)]
    fn output_bits(
        kernel: Bf16Kernel,
        a: &[bf16],
        (m, n, k): (usize, usize, usize),
        b: &[bf16],
        bias: &[f32],
        residual: &[f32],
        kind: usize,
    ) -> Vec<u32> {
        let (av, bv) = (View::row_major(m, k, false), View::row_major(k, n, true));
        let gemm =
            |out: GemmOut<'_>| gemm_bf16(out, Lhs::Bf16(a), av, b, bv, Some(kernel)).unwrap();
        let (mut f, mut h) = (vec![f32::NAN; m * n], vec![bf16::NAN; m * n]);
        match kind {
            0 => gemm(GemmOut::F32 {
                c: &mut f,
                accumulate: false,
                bias: Some(bias),
            }),
            1 => gemm(GemmOut::Residual {
                c: &mut f,
                residual: &residual[..m * n],
                bias: None,
            }),
            2 => gemm(GemmOut::Bf16 {
                c: &mut h,
                bias: Some(bias),
            }),
            _ => gemm(GemmOut::SwiGlu {
                c: &mut h[..m * n / 2],
            }),
        }
        match kind {
            0 | 1 => f.iter().map(|v| v.to_bits()).collect(),
            2 => h.iter().map(|v| v.to_bits() as u32).collect(),
            _ => h[..m * n / 2].iter().map(|v| v.to_bits() as u32).collect(),
        }
    }

    /// Products of few rows: their tasks pack their own strips of B where the product has one block of
    /// rows (`shared::pack_b_in_tasks`), and they are split into more tasks by columns the more threads
    /// there are (`shared::task_columns`). Neither changes a bit: each shape runs on pools of one thread
    /// (three or four tasks of 256 columns) and of eight (strips of 64), and with all of B packed first;
    /// for every output kind (the SwiGLU one pairing gate and value strips inside each task; f32 in place
    /// where one k-block covers k, through the scratch past it, from the bias where its blocks are whole)
    /// on every native kernel this CPU runs. 900 columns keep their last block of 132 columns whole (its
    /// first 128 would start from the bias as a block of their own, the rest from zero).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn products_of_few_rows_have_the_same_bits_however_b_is_packed_and_split() {
        let mut rng = rng(35);
        let pool = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
        };
        let (one, eight) = (pool(1), pool(8));
        assert_eq!(one.install(|| shared::task_columns(1, 768, 256, 32)), 128);
        assert_eq!(eight.install(|| shared::task_columns(1, 768, 256, 32)), 64);
        assert_eq!(
            eight.install(|| shared::task_columns(32, 768, 256, 32)),
            256
        );
        assert_eq!(eight.install(|| shared::task_columns(1, 900, 256, 32)), 256);
        assert_eq!(eight.install(|| shared::task_columns(1, 830, 256, 32)), 64);
        // (m, n, k): NT-v2's one short sequence; k past a k-block; whole blocks from the bias, one ragged;
        // a ragged tail of rows and columns (one block of rows for the AVX-512 kernel too).
        let shapes = [
            (201, 768, 768),
            (64, 1024, 1090),
            (64, 900, 768),
            (45, 830, 64),
        ];
        for (m, n, k) in shapes {
            let a: Vec<bf16> = uniform(&mut rng, m * k, -1.0, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let b = random_bf16(&mut rng, k * n);
            let bias = uniform(&mut rng, n, -1.0, 1.0);
            let residual = uniform(&mut rng, m * n, -2.0, 2.0);
            let kernels = Bf16Kernel::available()
                .iter()
                .filter(|&&kernel| kernel != Bf16Kernel::Portable);
            for &kernel in kernels {
                for kind in 0..4 {
                    let bits = || output_bits(kernel, &a, (m, n, k), &b, &bias, &residual, kind);
                    let (few, many) = (one.install(bits), eight.install(bits));
                    let packed_first = eight.install(|| {
                        shared::PACK_B_FIRST.with(|first| first.set(true));
                        let bits = bits();
                        shared::PACK_B_FIRST.with(|first| first.set(false));
                        bits
                    });
                    let what = format!("{m}×{n}×{k} {kernel:?} output kind {kind}");
                    assert!(few == many, "{what}: bits differ between splits");
                    assert!(
                        many == packed_first,
                        "{what}: bits differ from the product with B packed first"
                    );
                }
            }
        }
    }

    /// The same product from A at two row strides gives the same bits: at k = 768, rows 1,536 bytes apart
    /// spread over the L1 sets and the AMX kernel runs three short k-blocks through its scratch, while rows
    /// 4,096 bytes apart crowd them and one long k-block writes the output in place, or, for a wide
    /// product, they are packed and take the short k-blocks too (the AVX-512 kernel reads the first in
    /// place and packs the second). The scratch must start from the bias as the
    /// in-place output does: f32 with and without a bias, and the residual output, on the native kernels
    /// this CPU runs.
    #[test]
    fn product_bits_do_not_depend_on_the_k_block_or_the_row_stride() {
        let mut rng = rng(33);
        // 2,080 columns: the AMX kernel packs the crowded rows rather than reading them in place.
        for n in [320, 2080] {
            product_bits_match_at_two_row_strides(&mut rng, n);
        }
    }

    fn product_bits_match_at_two_row_strides(rng: &mut StdRng, n: usize) {
        let (m, k, wide) = (96, 768, 2048);
        let mut storage = Vec::new();
        let wide_a = on_cache_line(&mut storage, m * wide);
        let values = random_bf16(rng, m * k);
        for (row, src) in wide_a.chunks_mut(wide).zip(values.chunks(k)) {
            row[..k].copy_from_slice(src);
        }
        let wide_a = &*wide_a;
        let mut dense_storage = Vec::new();
        let dense_a = on_cache_line(&mut dense_storage, m * k);
        dense_a.copy_from_slice(&values);
        let dense_a = &*dense_a;
        let b = random_bf16(rng, k * n);
        let bv = View::row_major(k, n, false);
        let (dense_v, wide_v) = (
            View::row_major(m, k, false),
            View {
                rows: m,
                cols: k,
                rs: wide as isize,
                cs: 1,
            },
        );
        let residual = uniform(rng, m * n, -4.0, 4.0);
        let bias = uniform(rng, n, -1.0, 1.0);
        let natives = Bf16Kernel::available()
            .iter()
            .filter(|k| **k != Bf16Kernel::Portable);
        for &kernel in natives {
            for bias in [None, Some(&bias[..])] {
                for with_residual in [false, true] {
                    let run = |a: &[bf16], av: View| {
                        let mut c = vec![f32::NAN; m * n];
                        let out = if with_residual {
                            GemmOut::Residual {
                                c: &mut c,
                                residual: &residual,
                                bias,
                            }
                        } else {
                            GemmOut::F32 {
                                c: &mut c,
                                accumulate: false,
                                bias,
                            }
                        };
                        gemm_bf16(out, Lhs::Bf16(a), av, &b, bv, Some(kernel)).unwrap();
                        c
                    };
                    let (dense, wide) = (run(dense_a, dense_v), run(wide_a, wide_v));
                    for (i, (d, w)) in dense.iter().zip(&wide).enumerate() {
                        assert_eq!(
                            d.to_bits(),
                            w.to_bits(),
                            "{kernel:?} n {n} bias {} residual {with_residual} [{i}]: {d} vs {w}",
                            bias.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_gemm_rejects_bad_sizes() {
        let a = vec![bf16::ONE; 6];
        let b = vec![bf16::ONE; 6];
        let mut c = vec![0.0f32; 4];
        let err = gemm_bf16(
            GemmOut::F32 {
                c: &mut c,
                accumulate: false,
                bias: None,
            },
            Lhs::Bf16(&a),
            View::row_major(2, 3, false),
            &b,
            View::row_major(3, 3, false),
            None,
        );
        assert!(err.is_err(), "b view past its buffer");
        let mut c = vec![0.0f32; 5];
        let err = gemm_bf16(
            GemmOut::F32 {
                c: &mut c,
                accumulate: false,
                bias: None,
            },
            Lhs::Bf16(&a),
            View::row_major(2, 3, false),
            &b,
            View::row_major(3, 2, false),
            None,
        );
        assert!(err.is_err(), "output of the wrong size");
    }
}
