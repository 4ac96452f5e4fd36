//! Embedding lookup, and its backward: a scatter-add of the output gradient into the table rows.

use rayon::prelude::*;

use crate::error::check_len;
use crate::{Error, Result};

fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        Some((i, id)) => Err(Error::invalid(
            "token id",
            format!("{id} at position {i} is outside the vocabulary of {vocab}"),
        )),
        None => Ok(()),
    }
}

/// `out[t, :] = table[ids[t], :]` for a table `[vocab, dim]`.
pub fn embedding(out: &mut [f32], ids: &[u32], table: &[f32], dim: usize) -> Result<()> {
    crate::ops::matmul::require_positive("embedding", "dim", dim)?;
    check_len("embedding", "table (whole rows)", table.len() % dim, 0)?;
    check_len("embedding", "out", out.len(), ids.len() * dim)?;
    check_ids(ids, table.len() / dim)?;
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            o.copy_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]);
        });
    Ok(())
}

/// `dtable[ids[t], :] += dout[t, :]`. Parallel over column blocks with tokens in order, so repeated ids
/// sum deterministically.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) -> Result<()> {
    crate::ops::matmul::require_positive("embedding_backward", "dim", dim)?;
    check_len(
        "embedding_backward",
        "dtable (whole rows)",
        dtable.len() % dim,
        0,
    )?;
    check_len("embedding_backward", "dout", dout.len(), ids.len() * dim)?;
    let vocab = dtable.len() / dim;
    check_ids(ids, vocab)?;
    const COLS: usize = 64;
    let blocks = dim.div_ceil(COLS);
    // Each task owns columns [c0, c1) of every row: disjoint writes without atomics.
    let ptr = dtable.as_mut_ptr() as usize;
    (0..blocks).into_par_iter().for_each(|blk| {
        let (c0, c1) = (blk * COLS, ((blk + 1) * COLS).min(dim));
        for (t, &id) in ids.iter().enumerate() {
            let src = &dout[t * dim + c0..t * dim + c1];
            // SAFETY: row `id` is inside the table (checked), and columns c0..c1 belong to this task alone.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    (ptr as *mut f32).add(id as usize * dim + c0),
                    c1 - c0,
                )
            };
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn embedding_forward_and_backward_with_repeated_ids() {
        let mut r = rng(51);
        let (vocab, dim) = (11, 70);
        let table = uniform(&mut r, vocab * dim, -1.0, 1.0);
        let ids = [3u32, 0, 10, 3, 3, 7];
        let naive = |x: &[Vec<f64>]| {
            ids.iter()
                .flat_map(|&i| x[0][i as usize * dim..(i as usize + 1) * dim].to_vec())
                .collect::<Vec<_>>()
        };
        let mut out = vec![0.0; ids.len() * dim];
        embedding(&mut out, &ids, &table, dim).unwrap();
        assert_close("embedding", &out, &naive(&[to_f64(&table)]), 0.0);
        let dout = uniform(&mut r, out.len(), -1.0, 1.0);
        let mut dtable = vec![0.0; table.len()];
        embedding_backward(&mut dtable, &dout, &ids, dim).unwrap();
        check_gradients("embedding", &[&table], &[Some(&dtable)], &dout, naive, 1e-5);
    }

    #[test]
    fn out_of_vocabulary_id_is_an_error() {
        let mut out = vec![0.0; 4];
        let err = embedding(&mut out, &[0, 5], &[0.0; 10], 2).unwrap_err();
        assert!(err.to_string().contains("5 at position 1"), "{err}");
        assert!(embedding_backward(&mut [0.0; 10], &[0.0; 4], &[0, 5], 2).is_err());
    }
}
