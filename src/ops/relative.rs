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
            gemm_views(
                &mut full,
                View::strided(n, 2 * n - 1, 2 * n - 1),
                false,
                &q_pos[b * n * hk + h * dk..],
                q,
                &rel_k[h * dk..],
                r.t(),
                Some(gemm::Parallelism::None),
            );
            for i in 0..n {
                out[i * n..(i + 1) * n].copy_from_slice(
                    &full[i * (2 * n - 1) + (n - 1 - i)..i * (2 * n - 1) + (n - 1 - i) + n],
                );
            }
        });
    Ok(())
}

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
