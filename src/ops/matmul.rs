//! Matrix products through the `gemm` crate: batched matmul with either operand transposed, linear layers,
//! and a bf16 variant (bf16 storage, f32 accumulation, as cuBLAS computes it on the GPU).

use half::bf16;
use rayon::prelude::*;

use crate::error::check_len;
use crate::{Error, Result};

/// `c[b] = op(a[b]) · op(b[b])` for `b < batch`, with `op(a)` of shape `m × k` and `op(b)` of shape `k × n`.
/// `trans_a` means `a` is stored `k × m`; `trans_b` means `b` is stored `n × k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulDims {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        MatmulDims {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
        }
    }

    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Elements of `a`, `b` and `c` for these dims, or an error when a product overflows (a huge size
    /// must not wrap around and pass a bounds check before unsafe code).
    pub fn checked_sizes(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        let prod = |what: &str, dims: [usize; 3]| {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    Error::invalid(
                        op,
                        format!(
                            "{what} of {} × {} × {} elements overflows",
                            dims[0], dims[1], dims[2]
                        ),
                    )
                })
        };
        // Each matrix on its own too: with batch 0 the batched products are 0 whatever m, n, k are.
        prod("a", [1, self.m, self.k])?;
        prod("b", [1, self.k, self.n])?;
        prod("c", [1, self.m, self.n])?;
        Ok((
            prod("a", [self.batch, self.m, self.k])?,
            prod("b", [self.batch, self.k, self.n])?,
            prod("c", [self.batch, self.m, self.n])?,
        ))
    }

    fn check(&self, op: &'static str, a: usize, b: usize, c: usize) -> Result<()> {
        let (sa, sb, sc) = self.checked_sizes(op)?;
        check_len(op, "a", a, sa)?;
        check_len(op, "b", b, sb)?;
        check_len(op, "c", c, sc)
    }

    fn a_view(&self) -> View {
        View::row_major(self.m, self.k, self.trans_a)
    }

    fn b_view(&self) -> View {
        View::row_major(self.k, self.n, self.trans_b)
    }
}

/// A strided matrix inside a buffer: element (i, j) lives at `i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View {
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl View {
    /// The logical `rows × cols` matrix of a contiguous buffer, stored transposed when `transposed`.
    pub fn row_major(rows: usize, cols: usize, transposed: bool) -> Self {
        if transposed {
            View {
                rows,
                cols,
                rs: 1,
                cs: rows as isize,
            }
        } else {
            View {
                rows,
                cols,
                rs: cols as isize,
                cs: 1,
            }
        }
    }

    /// A `rows × cols` block with row stride `ld` (columns contiguous).
    pub fn strided(rows: usize, cols: usize, ld: usize) -> Self {
        View {
            rows,
            cols,
            rs: ld as isize,
            cs: 1,
        }
    }

    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the largest element index the view touches (`None` when it does not fit the address
    /// space, or a stride is negative).
    pub(crate) fn extent(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(0);
        }
        let (rs, cs) = (
            usize::try_from(self.rs).ok()?,
            usize::try_from(self.cs).ok()?,
        );
        (self.rows - 1)
            .checked_mul(rs)?
            .checked_add((self.cols - 1).checked_mul(cs)?)?
            .checked_add(1)
    }
}

/// Threads to give one GEMM: all of the current pool when the product is big enough to share.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= 48 * 48 * 48 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst (+)= scale · lhs · rhs` on strided views of slices, bounds-checked.
pub(crate) fn gemm_views(
    dst: &mut [f32],
    dv: View,
    accumulate: bool,
    lhs: &[f32],
    lv: View,
    rhs: &[f32],
    rv: View,
    par: Option<gemm::Parallelism>,
) {
    let fits = |v: View, len: usize| v.extent().is_some_and(|e| e <= len);
    assert!(
        fits(dv, dst.len()) && fits(lv, lhs.len()) && fits(rv, rhs.len()),
        "gemm view out of bounds"
    );
    // SAFETY: the views stay inside their buffers (checked above); `dst` is borrowed mutably, so it cannot
    // alias `lhs` or `rhs`.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            dv,
            accumulate,
            lhs.as_ptr(),
            lv,
            rhs.as_ptr(),
            rv,
            1.0,
            par,
        )
    }
}

/// `dst (+)= scale · lhs · rhs` on raw strided views. The single place where the crate calls into `gemm`.
///
/// # Safety
/// Every element the three views describe must be valid for the pointer it is read or written through, and
/// no other thread may touch the elements of `dst`'s view during the call.
pub(crate) unsafe fn gemm_raw(
    dst: *mut f32,
    dv: View,
    accumulate: bool,
    lhs: *const f32,
    lv: View,
    rhs: *const f32,
    rv: View,
    scale: f32,
    par: Option<gemm::Parallelism>,
) {
    assert!(
        dv.rows == lv.rows && dv.cols == rv.cols && lv.cols == rv.rows,
        "gemm view dims disagree"
    );
    let (m, n, k) = (dv.rows, dv.cols, lv.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.offset(i as isize * dv.rs + j as isize * dv.cs) = 0.0;
                }
            }
        }
        return;
    }
    let par = par.unwrap_or_else(|| parallelism(m, n, k));
    // A linear layer's product of few rows reads its weight in place (see `few_rows`).
    if super::few_rows::suits(m, n, k) && lv.cs == 1 && rv.rs == 1 && scale == 1.0 {
        let parallel = matches!(par, gemm::Parallelism::Rayon(_));
        let operands = super::few_rows::Operands {
            dst,
            dst_strides: (dv.rs, dv.cs),
            accumulate,
            a: lhs,
            a_rs: lv.rs,
            b: rhs,
            b_cs: rv.cs,
            mnk: (m, n, k),
        };
        // SAFETY: (caller) the views' elements are valid and dst's are this call's alone.
        return unsafe { super::few_rows::product(operands, parallel) };
    }
    // gemm computes dst = alpha·dst + beta·lhs·rhs (alpha ignored when read_dst is false).
    gemm::gemm(
        m, n, k, dst, dv.cs, dv.rs, accumulate, lhs, lv.cs, lv.rs, rhs, rv.cs, rv.rs, 1.0, scale,
        false, false, false, par,
    )
}

/// Runs `f(batch_index, c_chunk)` for each batch entry: in parallel over the batch when each product is small,
/// one after another (each using all threads) when it is large.
fn for_each_batch(
    c: &mut [f32],
    d: &MatmulDims,
    chunk: usize,
    f: impl Fn(usize, &mut [f32], Option<gemm::Parallelism>) + Sync,
) {
    if chunk == 0 {
        return;
    }
    let small = d.m.saturating_mul(d.n).saturating_mul(d.k) < 128 * 128 * 128;
    if d.batch > 1 && small {
        c.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, ci)| f(i, ci, Some(gemm::Parallelism::None)));
    } else {
        c.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, ci)| f(i, ci, None));
    }
}

/// `c = op(a) · op(b)`, or `c += …` when `accumulate`.
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], d: MatmulDims, accumulate: bool) -> Result<()> {
    d.check("matmul", a.len(), b.len(), c.len())?;
    let (sa, sb, sc) = (d.m * d.k, d.k * d.n, d.m * d.n);
    for_each_batch(c, &d, sc, |i, ci, par| {
        gemm_views(
            ci,
            View::row_major(d.m, d.n, false),
            accumulate,
            &a[i * sa..(i + 1) * sa],
            d.a_view(),
            &b[i * sb..(i + 1) * sb],
            d.b_view(),
            par,
        )
    });
    Ok(())
}

/// Gradients of [`matmul`]: `da += dc · op(b)ᵀ` and `db += op(a)ᵀ · dc`, laid out like `a` and `b`.
pub fn matmul_backward(
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dc: &[f32],
    a: &[f32],
    b: &[f32],
    d: MatmulDims,
) -> Result<()> {
    d.check("matmul_backward", a.len(), b.len(), dc.len())?;
    let (sa, sb, sc) = (d.m * d.k, d.k * d.n, d.m * d.n);
    let dc_view = View::row_major(d.m, d.n, false);
    if let Some(da) = da {
        check_len("matmul_backward", "da", da.len(), a.len())?;
        let dims = MatmulDims {
            m: d.m,
            n: d.k,
            k: d.n,
            ..d
        };
        for_each_batch(da, &dims, sa, |i, dai, par| {
            gemm_views(
                dai,
                d.a_view(),
                true,
                &dc[i * sc..(i + 1) * sc],
                dc_view,
                &b[i * sb..(i + 1) * sb],
                d.b_view().t(),
                par,
            )
        });
    }
    if let Some(db) = db {
        check_len("matmul_backward", "db", db.len(), b.len())?;
        let dims = MatmulDims {
            m: d.k,
            n: d.n,
            k: d.m,
            ..d
        };
        for_each_batch(db, &dims, sb, |i, dbi, par| {
            gemm_views(
                dbi,
                d.b_view(),
                true,
                &a[i * sa..(i + 1) * sa],
                d.a_view().t(),
                &dc[i * sc..(i + 1) * sc],
                dc_view,
                par,
            )
        });
    }
    Ok(())
}

/// bf16 matmul with f32 accumulation: the products are accumulated in f32 (on AMX or `vdpbf16ps` where the CPU
/// has them, see [`super::gemm_bf16`]) and the result is rounded to bf16 once (round to nearest even), as cuBLAS's
/// bf16 GEMM with f32 compute does on the GPU.
pub fn matmul_bf16(c: &mut [bf16], a: &[bf16], b: &[bf16], d: MatmulDims) -> Result<()> {
    d.check("matmul_bf16", a.len(), b.len(), c.len())?;
    let (sa, sb, sc) = (d.m * d.k, d.k * d.n, d.m * d.n);
    if sc == 0 {
        return Ok(());
    }
    for (i, ci) in c.chunks_mut(sc).enumerate() {
        super::gemm_bf16::gemm_bf16(
            super::gemm_bf16::GemmOut::Bf16 { c: ci, bias: None },
            super::gemm_bf16::Lhs::Bf16(&a[i * sa..(i + 1) * sa]),
            d.a_view(),
            &b[i * sb..(i + 1) * sb],
            d.b_view(),
            None,
        )?;
    }
    Ok(())
}

/// A linear layer on bf16 weights, with f32 accumulation and an f32 bias:
/// - `x` bf16 and `y` bf16: `y = bf16(x·Wᵀ + bias)`;
/// - `x` f32 and `y` f32: `y = bf16(x)·Wᵀ + bias`, the activations rounded to bf16 as they are packed;
/// - `y` SwiGLU ([`super::gemm_bf16::GemmOut::SwiGlu`], `d_out` even, no bias): `y = swiglu(x·Wᵀ)`,
///   `[rows, d_out/2]` in bf16, with the product kept out of memory;
/// - `y` activated ([`super::gemm_bf16::GemmOut::Activated`]): `y = bf16(act(x·Wᵀ + bias))`, likewise.
pub fn linear_bf16_weights(
    y: super::gemm_bf16::GemmOut<'_>,
    x: super::gemm_bf16::Lhs<'_>,
    w: &[bf16],
    d: LinearDims,
) -> Result<()> {
    let md = d.as_matmul();
    d.check_bias("linear", y.bias().map(<[f32]>::len))?;
    let y_len = y.product_len();
    let (sx, sw, sy) = md.checked_sizes("linear")?;
    check_len("linear", "x", x.len(), sx)?;
    check_len("linear", "w", w.len(), sw)?;
    check_len("linear", "y", y_len, sy)?;
    super::gemm_bf16::gemm_bf16(y, x, md.a_view(), w, md.b_view(), None)
}

/// Dimensions of a linear layer `y[rows, out] = x[rows, in] · Wᵀ + bias`, `W` stored `[out, in]` (PyTorch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
}

impl LinearDims {
    fn as_matmul(&self) -> MatmulDims {
        MatmulDims {
            batch: 1,
            m: self.rows,
            n: self.d_out,
            k: self.d_in,
            trans_a: false,
            trans_b: true,
        }
    }

    fn check_bias(&self, op: &'static str, bias: Option<usize>) -> Result<()> {
        match bias {
            Some(n) => check_len(op, "bias", n, self.d_out),
            None => Ok(()),
        }
    }
}

pub fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    d: LinearDims,
) -> Result<()> {
    d.check_bias("linear", bias.map(<[f32]>::len))?;
    check_len("linear", "y", y.len(), d.rows * d.d_out)?;
    if let Some(bias) = bias {
        y.par_chunks_mut(d.d_out.max(1))
            .for_each(|row| row.copy_from_slice(bias));
    }
    matmul(y, x, w, d.as_matmul(), bias.is_some())
}

/// Gradients of [`linear`]: `dx += dy·W`, `dw += dyᵀ·x`, `dbias += Σ_rows dy`.
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    d: LinearDims,
) -> Result<()> {
    d.check_bias("linear_backward", dbias.as_deref().map(<[f32]>::len))?;
    matmul_backward(dx, dw, dy, x, w, d.as_matmul())?;
    if let Some(dbias) = dbias {
        sum_rows_into(dbias, dy, d.d_out);
    }
    Ok(())
}

/// `acc[j] += Σ_i m[i, j]` for a row-major `m` with `cols` columns; parallel over column blocks, so the
/// summation order (hence the result) does not depend on the thread count.
pub fn sum_rows_into(acc: &mut [f32], m: &[f32], cols: usize) {
    const BLOCK: usize = 64;
    acc.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(blk, out)| {
            let (j0, width) = (blk * BLOCK, out.len());
            for row in m.chunks_exact(cols) {
                for (o, v) in out.iter_mut().zip(&row[j0..j0 + width]) {
                    *o += v;
                }
            }
        });
}

/// Rejects a zero dimension where the op needs a positive one.
pub(crate) fn require_positive(op: &'static str, what: &str, v: usize) -> Result<()> {
    if v == 0 {
        Err(Error::shape(op, format!("{what} must be positive")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn naive_matmul(a: &[f64], b: &[f64], d: MatmulDims) -> Vec<f64> {
        let mut c = vec![0.0; d.batch * d.m * d.n];
        for bt in 0..d.batch {
            for i in 0..d.m {
                for j in 0..d.n {
                    let mut s = 0.0;
                    for p in 0..d.k {
                        let av = if d.trans_a {
                            a[bt * d.m * d.k + p * d.m + i]
                        } else {
                            a[bt * d.m * d.k + i * d.k + p]
                        };
                        let bv = if d.trans_b {
                            b[bt * d.k * d.n + j * d.k + p]
                        } else {
                            b[bt * d.k * d.n + p * d.n + j]
                        };
                        s += av * bv;
                    }
                    c[bt * d.m * d.n + i * d.n + j] = s;
                }
            }
        }
        c
    }

    #[test]
    fn matmul_forward_and_backward_all_transposes() {
        let mut r = rng(1);
        for (batch, m, n, k) in [(1, 7, 5, 3), (3, 13, 9, 11), (2, 1, 17, 6), (4, 70, 65, 66)] {
            for trans_a in [false, true] {
                for trans_b in [false, true] {
                    let d = MatmulDims {
                        batch,
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                    };
                    let a = uniform(&mut r, batch * m * k, -1.0, 1.0);
                    let b = uniform(&mut r, batch * k * n, -1.0, 1.0);
                    let mut c = vec![0.0; batch * m * n];
                    matmul(&mut c, &a, &b, d, false).unwrap();
                    assert_close(
                        &format!("matmul {d:?}"),
                        &c,
                        &naive_matmul(&to_f64(&a), &to_f64(&b), d),
                        1e-5,
                    );
                    if m * n * k > 10_000 {
                        continue; // finite differences on the small shapes only
                    }
                    let dc = uniform(&mut r, c.len(), -1.0, 1.0);
                    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
                    matmul_backward(Some(&mut da), Some(&mut db), &dc, &a, &b, d).unwrap();
                    check_gradients(
                        "matmul",
                        &[&a, &b],
                        &[Some(&da), Some(&db)],
                        &dc,
                        |x| naive_matmul(&x[0], &x[1], d),
                        1e-4,
                    );
                }
            }
        }
    }

    /// Linear layers of few rows on weights large enough for `few_rows` (which reads the weight in place)
    /// and, at the same sizes, on either side of its row and weight limits: against f64, with a bias.
    #[test]
    fn linear_layers_of_few_rows_match_f64() {
        let mut r = rng(3);
        for (rows, d_in, d_out) in [
            (1, 640, 640),
            (22, 480, 1920),
            (256, 256, 512),
            (257, 256, 512),
            (300, 512, 256),
            (512, 256, 256),
            (513, 256, 256),
            (22, 200, 300),
            (5, 650, 120),
        ] {
            let d = LinearDims { rows, d_in, d_out };
            let x = uniform(&mut r, rows * d_in, -1.0, 1.0);
            let w = uniform(&mut r, d_out * d_in, -1.0, 1.0);
            let bias = uniform(&mut r, d_out, -1.0, 1.0);
            let mut y = vec![f32::NAN; rows * d_out];
            linear(&mut y, &x, &w, Some(&bias), d).unwrap();
            let mut want = naive_matmul(&to_f64(&x), &to_f64(&w), d.as_matmul());
            for row in want.chunks_mut(d_out) {
                row.iter_mut().zip(&bias).for_each(|(v, b)| *v += *b as f64);
            }
            assert_close(&format!("linear {d:?}"), &y, &want, 1e-5);
        }
    }

    #[test]
    fn matmul_accumulates_and_checks_sizes() {
        let d = MatmulDims::new(2, 2, 2);
        let mut c = vec![1.0; 4];
        matmul(
            &mut c,
            &[1.0, 0.0, 0.0, 1.0],
            &[1.0, 2.0, 3.0, 4.0],
            d,
            true,
        )
        .unwrap();
        assert_eq!(c, vec![2.0, 3.0, 4.0, 5.0]);
        assert!(matmul(&mut c, &[1.0; 3], &[1.0; 4], d, false).is_err());
    }

    #[test]
    fn bf16_matmul_matches_widened_f32_product() {
        let mut r = rng(2);
        let d = MatmulDims {
            batch: 2,
            m: 33,
            n: 17,
            k: 45,
            trans_a: false,
            trans_b: true,
        };
        let a: Vec<bf16> = uniform(&mut r, 2 * 33 * 45, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let b: Vec<bf16> = uniform(&mut r, 2 * 17 * 45, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut c = vec![bf16::ZERO; 2 * 33 * 17];
        matmul_bf16(&mut c, &a, &b, d).unwrap();
        let want = naive_matmul(
            &a.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
            &b.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
            d,
        );
        for (got, w) in c.iter().zip(&want) {
            // one bf16 rounding of an (almost exact) f32 accumulation: within half an ulp plus f32 noise
            assert!(
                (got.to_f64() - w).abs() <= w.abs() * 2f64.powi(-8) + 1e-5,
                "{got} vs {w}"
            );
        }
    }

    #[test]
    fn linear_forward_and_backward() {
        let mut r = rng(3);
        let d = LinearDims {
            rows: 9,
            d_in: 7,
            d_out: 5,
        };
        let x = uniform(&mut r, 63, -1.0, 1.0);
        let w = uniform(&mut r, 35, -1.0, 1.0);
        let b = uniform(&mut r, 5, -1.0, 1.0);
        let naive = |x: &[Vec<f64>]| {
            let mut y = vec![0.0; 45];
            for i in 0..9 {
                for o in 0..5 {
                    y[i * 5 + o] = x[2][o]
                        + (0..7)
                            .map(|p| x[0][i * 7 + p] * x[1][o * 7 + p])
                            .sum::<f64>();
                }
            }
            y
        };
        let mut y = vec![0.0; 45];
        linear(&mut y, &x, &w, Some(&b), d).unwrap();
        assert_close(
            "linear",
            &y,
            &naive(&[to_f64(&x), to_f64(&w), to_f64(&b)]),
            1e-6,
        );
        let dy = uniform(&mut r, 45, -1.0, 1.0);
        let (mut dx, mut dw, mut db) = (vec![0.0; 63], vec![0.0; 35], vec![0.0; 5]);
        linear_backward(Some(&mut dx), Some(&mut dw), Some(&mut db), &dy, &x, &w, d).unwrap();
        check_gradients(
            "linear",
            &[&x, &w, &b],
            &[Some(&dx), Some(&dw), Some(&db)],
            &dy,
            naive,
            1e-4,
        );
    }
}
