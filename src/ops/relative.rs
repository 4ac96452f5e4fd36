//! Enformer's relative-position attention logits (Transformer-XL style, as enformer-pytorch computes them
//! with its `relative_shift`): for queries i and keys j of a length-n sequence,
//! `bias[b, h, i, j] = q_pos[b, i, h]·R[(n − 1) + j − i, h]`, with `q_pos [B, n, H, dk]` and
//! `R [2n − 1, H, dk]` (the projected positional features). The backward adds into both inputs.

use super::matmul::{gemm_views, View};
use crate::error::{check_len, checked_product};
use crate::Result;

/// `bias[b, h, i, j] = (q_pos[b, i, h]·R[(n−1) + j − i, h])` for every query i and key j.
pub fn relative_logits(
    bias: &mut [f32],
    q_pos: &[f32],
    rel_k: &[f32],
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    use rayon::prelude::*;
    check_shapes(
        "relative_logits",
        bias.len(),
        q_pos.len(),
        rel_k.len(),
        batch,
        heads,
        n,
        dk,
    )?;
    let hk = heads * dk;
    bias.par_chunks_mut(n * n)
        .enumerate()
        .for_each(|(bh, out)| {
            let (b, h) = (bh / heads, bh % heads);
            // Query rows i0..i1 read positions n − i1 ..= 2n − 2 − i0 of R only (n + rows − 1 of them): a
            // band of the full n × (2n − 1) product, in an L2-sized buffer. The full product was twice the
            // multiply-adds and a fresh 19 MB buffer per head at Enformer's n = 1,536.
            let mut band = vec![0.0f32; QUERY_BLOCK.min(n) * (n + QUERY_BLOCK.min(n) - 1)];
            for i0 in (0..n).step_by(QUERY_BLOCK) {
                let i1 = (i0 + QUERY_BLOCK).min(n);
                let (rows, cols) = (i1 - i0, n + i1 - i0 - 1);
                let q = View {
                    rows,
                    cols: dk,
                    rs: hk as isize,
                    cs: 1,
                };
                let r = View {
                    rows: cols,
                    cols: dk,
                    rs: hk as isize,
                    cs: 1,
                };
                gemm_views(
                    &mut band[..rows * cols],
                    View::strided(rows, cols, cols),
                    false,
                    &q_pos[(b * n + i0) * hk + h * dk..],
                    q,
                    &rel_k[(n - i1) * hk + h * dk..],
                    r.t(),
                    Some(gemm::Parallelism::None),
                );
                // Query i0 + ii against key j reads band column j + (rows − 1 − ii).
                for ii in 0..rows {
                    let start = ii * cols + rows - 1 - ii;
                    out[(i0 + ii) * n..][..n].copy_from_slice(&band[start..start + n]);
                }
            }
        });
    Ok(())
}

/// Query rows per band of [`relative_logits`].
const QUERY_BLOCK: usize = 64;

/// Gradients of [`relative_logits`]: `dq_pos += dFull·R`, `d_rel_k += dFullᵀ·q_pos` (summed over the batch in
/// order, so the result is deterministic).
pub fn relative_logits_backward(
    dq_pos: &mut [f32],
    d_rel_k: &mut [f32],
    dbias: &[f32],
    q_pos: &[f32],
    rel_k: &[f32],
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    check_shapes(
        "relative_logits_backward",
        dbias.len(),
        q_pos.len(),
        rel_k.len(),
        batch,
        heads,
        n,
        dk,
    )?;
    check_len(
        "relative_logits_backward",
        "dq_pos",
        dq_pos.len(),
        q_pos.len(),
    )?;
    check_len(
        "relative_logits_backward",
        "d_rel_k",
        d_rel_k.len(),
        rel_k.len(),
    )?;
    let hk = heads * dk;
    let mut full = vec![0.0f32; n * (2 * n - 1)];
    let q = View {
        rows: n,
        cols: dk,
        rs: hk as isize,
        cs: 1,
    };
    let r = View {
        rows: 2 * n - 1,
        cols: dk,
        rs: hk as isize,
        cs: 1,
    };
    for h in 0..heads {
        for b in 0..batch {
            full.iter_mut().for_each(|v| *v = 0.0);
            let src = &dbias[(b * heads + h) * n * n..(b * heads + h + 1) * n * n];
            for i in 0..n {
                full[i * (2 * n - 1) + (n - 1 - i)..i * (2 * n - 1) + (n - 1 - i) + n]
                    .copy_from_slice(&src[i * n..(i + 1) * n]);
            }
            let fv = View::strided(n, 2 * n - 1, 2 * n - 1);
            gemm_views(
                &mut dq_pos[b * n * hk + h * dk..],
                q,
                true,
                &full,
                fv,
                &rel_k[h * dk..],
                r,
                None,
            );
            gemm_views(
                &mut d_rel_k[h * dk..],
                r,
                true,
                &full,
                fv.t(),
                &q_pos[b * n * hk + h * dk..],
                q,
                None,
            );
        }
    }
    Ok(())
}

fn check_shapes(
    op: &'static str,
    bias: usize,
    q_pos: usize,
    rel_k: usize,
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    if n == 0 || heads == 0 || dk == 0 {
        return Err(crate::Error::invalid(
            op,
            "empty sequence, heads or head dim",
        ));
    }
    let two_n = n
        .checked_mul(2)
        .ok_or_else(|| crate::Error::invalid(op, "sequence length overflows"))?;
    check_len(
        op,
        "bias",
        bias,
        checked_product(op, &[batch, heads, n, n])?,
    )?;
    check_len(
        op,
        "q_pos",
        q_pos,
        checked_product(op, &[batch, n, heads, dk])?,
    )?;
    check_len(
        op,
        "rel_k",
        rel_k,
        checked_product(op, &[two_n - 1, heads, dk])?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    /// Against the definition in f64, for lengths of one band, of a band and a ragged one, and of one.
    #[test]
    fn relative_logits_match_f64() {
        let mut r = rng(73);
        for (batch, heads, n, dk) in [(2, 3, 11, 8), (1, 2, 130, 16), (1, 1, 1, 4)] {
            let q = uniform(&mut r, batch * n * heads * dk, -1.0, 1.0);
            let rel = uniform(&mut r, (2 * n - 1) * heads * dk, -1.0, 1.0);
            let mut got = vec![f32::NAN; batch * heads * n * n];
            relative_logits(&mut got, &q, &rel, batch, heads, n, dk).unwrap();
            let mut want = vec![0.0f64; got.len()];
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..n {
                        for j in 0..n {
                            let p = n - 1 + j - i;
                            want[((b * heads + h) * n + i) * n + j] = (0..dk)
                                .map(|c| {
                                    q[((b * n + i) * heads + h) * dk + c] as f64
                                        * rel[(p * heads + h) * dk + c] as f64
                                })
                                .sum();
                        }
                    }
                }
            }
            assert_close(&format!("relative logits n={n}"), &got, &want, 1e-5);
        }
    }
}
