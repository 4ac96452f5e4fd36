//! Normalisation: layernorm over the last dimension, and batchnorm over the rows of channels-last data
//! (`[rows, channels]`, rows = batch × length), in training mode (batch statistics, running-stat update) and
//! eval mode (running statistics).

use rayon::prelude::*;

use super::output::OutElem;
use super::rows_per_task;
use super::simd::{self, dispatch};
use crate::error::check_len;
use crate::ops::matmul::require_positive;
use crate::Result;

/// Row chunks of the gamma/beta gradient reductions: enough to keep every core busy, few enough that the
/// per-chunk partial sums stay small.
const REDUCE_CHUNKS: usize = 32;

/// `out = (x − mean) · rstd · gamma + beta` per row of `dim` elements, written as f32 or rounded once to
/// bf16 ([`OutElem`]); saves `mean` and `rstd` per row.
pub fn layernorm<O: OutElem>(
    out: &mut [O],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dim: usize,
    eps: f32,
) -> Result<()> {
    require_positive("layernorm", "dim", dim)?;
    let rows = x.len() / dim;
    check_len("layernorm", "x", x.len(), rows * dim)?;
    check_len("layernorm", "out", out.len(), x.len())?;
    check_len("layernorm", "mean", mean.len(), rows)?;
    check_len("layernorm", "rstd", rstd.len(), rows)?;
    check_len("layernorm", "gamma", gamma.len(), dim)?;
    check_len("layernorm", "beta", beta.len(), dim)?;
    let step = rows_per_task(dim);
    out.par_chunks_mut(step * dim)
        .zip(x.par_chunks(step * dim))
        .zip(mean.par_chunks_mut(step).zip(rstd.par_chunks_mut(step)))
        .for_each(|((o, x), (mean, rstd))| {
            dispatch(
                #[inline(always)]
                || {
                    for (((o, x), m), rs) in o
                        .chunks_mut(dim)
                        .zip(x.chunks(dim))
                        .zip(mean.iter_mut())
                        .zip(rstd.iter_mut())
                    {
                        let mu = simd::sum(x) / dim as f32;
                        let var = simd::sum_sq_dev(x, mu) / dim as f32;
                        let r = 1.0 / (var + eps).sqrt();
                        O::normalize_row(o, x, (mu, r), gamma, beta);
                        *m = mu;
                        *rs = r;
                    }
                },
            )
        });
    Ok(())
}

/// Gradients of [`layernorm`], added into `dx`, `dgamma` and `dbeta`.
pub fn layernorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dout: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
) -> Result<()> {
    require_positive("layernorm_backward", "dim", dim)?;
    let rows = x.len() / dim;
    check_len("layernorm_backward", "x", x.len(), rows * dim)?;
    check_len("layernorm_backward", "dx", dx.len(), x.len())?;
    check_len("layernorm_backward", "dout", dout.len(), x.len())?;
    check_len("layernorm_backward", "mean", mean.len(), rows)?;
    check_len("layernorm_backward", "rstd", rstd.len(), rows)?;
    check_len("layernorm_backward", "gamma", gamma.len(), dim)?;
    check_len("layernorm_backward", "dgamma", dgamma.len(), dim)?;
    check_len("layernorm_backward", "dbeta", dbeta.len(), dim)?;
    let step = rows_per_task(dim);
    dx.par_chunks_mut(step * dim)
        .zip(dout.par_chunks(step * dim))
        .zip(x.par_chunks(step * dim))
        .zip(mean.par_chunks(step).zip(rstd.par_chunks(step)))
        .for_each(|(((dx, dout), x), (mean, rstd))| {
            dispatch(
                #[inline(always)]
                || {
                    for ((((dx, dout), x), &mu), &r) in dx
                        .chunks_mut(dim)
                        .zip(dout.chunks(dim))
                        .zip(x.chunks(dim))
                        .zip(mean)
                        .zip(rstd)
                    {
                        // Σ dn and Σ dn·x̂ with dn = dout·γ: Σ dn·x̂ = r·(Σ dn·x − μ·Σ dn).
                        let (mut sum_dn, mut sum_dn_x) = ([0.0f32; 16], [0.0f32; 16]);
                        let split = dim - dim % 16;
                        for ((d, v), g) in dout[..split]
                            .chunks_exact(16)
                            .zip(x[..split].chunks_exact(16))
                            .zip(gamma[..split].chunks_exact(16))
                        {
                            for l in 0..16 {
                                let dn = d[l] * g[l];
                                sum_dn[l] += dn;
                                sum_dn_x[l] = dn.mul_add(v[l] - mu, sum_dn_x[l]);
                            }
                        }
                        let (mut sdn, mut sdnx) = (simd::sum(&sum_dn), simd::sum(&sum_dn_x));
                        for ((d, v), g) in
                            dout[split..].iter().zip(&x[split..]).zip(&gamma[split..])
                        {
                            sdn += d * g;
                            sdnx += d * g * (v - mu);
                        }
                        let (mean_dn, mean_dn_xhat) = (sdn / dim as f32, sdnx * r / dim as f32);
                        for (((dx, &d), &v), g) in dx.iter_mut().zip(dout).zip(x).zip(gamma) {
                            let xhat = (v - mu) * r;
                            *dx += r * (d * g - mean_dn - xhat * mean_dn_xhat);
                        }
                    }
                },
            )
        });
    column_reduce(dgamma, dbeta, dout, x, mean, rstd, dim, StatsPer::Row);
    Ok(())
}

/// Whether normalisation statistics are per row (layernorm) or per column (batchnorm).
#[derive(Clone, Copy, PartialEq, Eq)]
enum StatsPer {
    Row,
    Column,
}

/// Column sums over `rows` rows: `add_row(r, acc)` adds row `r`'s terms into `width` accumulators. The rows
/// are split into a fixed number of chunks whatever the thread count, so the sums are the same on any
/// machine; each chunk walks its rows in order into its own partial sums (contiguous, vectorised, in L1),
/// and the partials are added in chunk order.
fn chunked_column_sums<T>(
    rows: usize,
    width: usize,
    add_row: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T>
where
    T: Copy + Default + Send + std::ops::AddAssign,
{
    let chunk_rows = rows.div_ceil(REDUCE_CHUNKS).max(1);
    let partials: Vec<Vec<T>> = (0..rows.div_ceil(chunk_rows))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![T::default(); width];
            for r in chunk * chunk_rows..((chunk + 1) * chunk_rows).min(rows) {
                add_row(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![T::default(); width];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(t, p)| *t += p);
    }
    total
}

/// `dgamma[c] += Σ_r dout·xhat`, `dbeta[c] += Σ_r dout`, where `xhat = (x − mean) · rstd` with the
/// statistics of the row or of the column.
fn column_reduce(
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    cols: usize,
    per: StatsPer,
) {
    let rows = dout.len() / cols;
    // One accumulator row: the dgamma terms, then the dbeta terms.
    let sums = chunked_column_sums(rows, 2 * cols, |row, acc: &mut [f32]| {
        let (dg, db) = acc.split_at_mut(cols);
        let (d, v) = (&dout[row * cols..][..cols], &x[row * cols..][..cols]);
        match per {
            StatsPer::Row => {
                let (m, s) = (mean[row], rstd[row]);
                for ((g, b), (d, v)) in dg.iter_mut().zip(db.iter_mut()).zip(d.iter().zip(v)) {
                    *g += d * ((v - m) * s);
                    *b += d;
                }
            }
            StatsPer::Column => {
                let terms = d.iter().zip(v).zip(mean.iter().zip(rstd));
                for ((g, b), ((d, v), (m, s))) in dg.iter_mut().zip(db.iter_mut()).zip(terms) {
                    *g += d * ((v - m) * s);
                    *b += d;
                }
            }
        }
    });
    let (sum_dg, sum_db) = sums.split_at(cols);
    dgamma.iter_mut().zip(sum_dg).for_each(|(g, p)| *g += p);
    dbeta.iter_mut().zip(sum_db).for_each(|(b, p)| *b += p);
}

/// Running statistics that training-mode batchnorm updates, PyTorch style:
/// `running = (1 − momentum)·running + momentum·batch`, with the unbiased batch variance.
pub struct RunningStats<'a> {
    pub mean: &'a mut [f32],
    pub var: &'a mut [f32],
    pub momentum: f32,
}

/// Training-mode batchnorm on `x [rows, channels]`: normalises with the batch mean and biased variance,
/// saves `mean` and `rstd` per channel, and updates `running` if given.
pub fn batchnorm_train(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    channels: usize,
    eps: f32,
    running: Option<RunningStats<'_>>,
) -> Result<()> {
    check_batchnorm(
        "batchnorm_train",
        x.len(),
        out.len(),
        mean.len(),
        rstd.len(),
        gamma.len(),
        beta.len(),
        channels,
    )?;
    let rows = x.len() / channels;
    require_positive("batchnorm_train", "rows", rows)?;
    // Two passes in f64: the mean, then the squared deviations from it.
    let row_of = |r: usize| &x[r * channels..][..channels];
    let mu: Vec<f64> = chunked_column_sums(rows, channels, |r, acc: &mut [f64]| {
        acc.iter_mut()
            .zip(row_of(r))
            .for_each(|(a, v)| *a += *v as f64)
    })
    .into_iter()
    .map(|s| s / rows as f64)
    .collect();
    let sq = chunked_column_sums(rows, channels, |r, acc: &mut [f64]| {
        for ((a, v), m) in acc.iter_mut().zip(row_of(r)).zip(&mu) {
            let d = *v as f64 - m;
            *a += d * d;
        }
    });
    for c in 0..channels {
        mean[c] = mu[c] as f32;
        // Stored as the biased variance until the running update below reads it.
        rstd[c] = (sq[c] / rows as f64) as f32;
    }
    if let Some(run) = running {
        check_len("batchnorm_train", "running mean", run.mean.len(), channels)?;
        check_len("batchnorm_train", "running var", run.var.len(), channels)?;
        let unbias = if rows > 1 {
            rows as f32 / (rows - 1) as f32
        } else {
            1.0
        };
        for c in 0..channels {
            run.mean[c] = (1.0 - run.momentum) * run.mean[c] + run.momentum * mean[c];
            run.var[c] = (1.0 - run.momentum) * run.var[c] + run.momentum * rstd[c] * unbias;
        }
    }
    rstd.iter_mut().for_each(|v| *v = 1.0 / (*v + eps).sqrt());
    normalize_channels(out, x, mean, rstd, gamma, beta, channels);
    Ok(())
}

/// Eval-mode batchnorm: normalises with the running statistics. Writes the `mean` and `rstd` it used, so
/// [`batchnorm_backward`] handles both modes.
pub fn batchnorm_eval(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    channels: usize,
    eps: f32,
) -> Result<()> {
    check_batchnorm(
        "batchnorm_eval",
        x.len(),
        out.len(),
        mean.len(),
        rstd.len(),
        gamma.len(),
        beta.len(),
        channels,
    )?;
    check_len(
        "batchnorm_eval",
        "running mean",
        running_mean.len(),
        channels,
    )?;
    check_len("batchnorm_eval", "running var", running_var.len(), channels)?;
    mean.copy_from_slice(running_mean);
    for (r, v) in rstd.iter_mut().zip(running_var) {
        *r = 1.0 / (v + eps).sqrt();
    }
    normalize_channels(out, x, mean, rstd, gamma, beta, channels);
    Ok(())
}

fn check_batchnorm(
    op: &'static str,
    x: usize,
    out: usize,
    mean: usize,
    rstd: usize,
    g: usize,
    b: usize,
    channels: usize,
) -> Result<()> {
    require_positive(op, "channels", channels)?;
    check_len(op, "x (whole rows)", x % channels, 0)?;
    check_len(op, "out", out, x)?;
    check_len(op, "mean", mean, channels)?;
    check_len(op, "rstd", rstd, channels)?;
    check_len(op, "gamma", g, channels)?;
    check_len(op, "beta", b, channels)
}

fn normalize_channels(
    out: &mut [f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    channels: usize,
) {
    let step = rows_per_task(channels);
    out.par_chunks_mut(step * channels)
        .zip(x.par_chunks(step * channels))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(channels).zip(x.chunks(channels)) {
                let per_channel = mean.iter().zip(rstd).zip(gamma.iter().zip(beta));
                for ((o, x), ((m, r), (g, b))) in o.iter_mut().zip(x).zip(per_channel) {
                    *o = (x - m) * r * g + b;
                }
            }
        });
}

/// Gradients of batchnorm. With `train`, the batch statistics depend on `x` and that path is included;
/// otherwise (eval) they are constants.
pub fn batchnorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dout: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    channels: usize,
    train: bool,
) -> Result<()> {
    check_batchnorm(
        "batchnorm_backward",
        x.len(),
        dx.len(),
        mean.len(),
        rstd.len(),
        gamma.len(),
        dgamma.len(),
        channels,
    )?;
    check_len("batchnorm_backward", "dbeta", dbeta.len(), channels)?;
    check_len("batchnorm_backward", "dout", dout.len(), x.len())?;
    let rows = x.len() / channels;
    // Per-channel Σ dout and Σ dout·xhat are what dgamma/dbeta accumulate, and what the train path needs.
    let (mut sum_d, mut sum_dxhat) = (vec![0.0f32; channels], vec![0.0f32; channels]);
    column_reduce(
        &mut sum_dxhat,
        &mut sum_d,
        dout,
        x,
        mean,
        rstd,
        channels,
        StatsPer::Column,
    );
    // Per channel: dx += g·(dout − mean(dout) − (x − mean)·rstd·mean(dout·xhat)) in training mode (batch
    // statistics depend on every row), dx += g·dout in eval mode; g = gamma·rstd. The per-channel factors
    // are computed once, so the row loop is a vectorised multiply-add.
    let g: Vec<f32> = gamma.iter().zip(rstd).map(|(g, r)| g * r).collect();
    let (shift, slope): (Vec<f32>, Vec<f32>) = if train {
        let n = rows as f32;
        sum_d
            .iter()
            .zip(&sum_dxhat)
            .zip(rstd)
            .map(|((sd, sx), r)| (sd / n, r * (sx / n)))
            .unzip()
    } else {
        (vec![0.0; channels], vec![0.0; channels])
    };
    let step = rows_per_task(channels);
    dx.par_chunks_mut(step * channels)
        .zip(dout.par_chunks(step * channels))
        .zip(x.par_chunks(step * channels))
        .for_each(|((dx, d), x)| {
            for ((dx, d), x) in dx
                .chunks_mut(channels)
                .zip(d.chunks(channels))
                .zip(x.chunks(channels))
            {
                let per_channel = g.iter().zip(&shift).zip(slope.iter().zip(mean));
                for ((dx, (d, x)), ((g, shift), (slope, mean))) in
                    dx.iter_mut().zip(d.iter().zip(x)).zip(per_channel)
                {
                    *dx += g * (d - shift - (x - mean) * slope);
                }
            }
        });
    for c in 0..channels {
        dgamma[c] += sum_dxhat[c];
        dbeta[c] += sum_d[c];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn naive_layernorm(x: &[f64], g: &[f64], b: &[f64], dim: usize, eps: f64) -> Vec<f64> {
        let mut out = Vec::new();
        for row in x.chunks(dim) {
            let mu = row.iter().sum::<f64>() / dim as f64;
            let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / dim as f64;
            for j in 0..dim {
                out.push((row[j] - mu) / (var + eps).sqrt() * g[j] + b[j]);
            }
        }
        out
    }

    #[test]
    fn layernorm_forward_and_backward() {
        let mut r = rng(11);
        for (rows, dim) in [(7, 13), (3, 1), (40, 70), (103, 9)] {
            let x = uniform(&mut r, rows * dim, -2.0, 3.0);
            let g = uniform(&mut r, dim, 0.5, 1.5);
            let b = uniform(&mut r, dim, -0.5, 0.5);
            let (mut out, mut mean, mut rstd) =
                (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
            layernorm(&mut out, &mut mean, &mut rstd, &x, &g, &b, dim, 1e-5).unwrap();
            let naive = |v: &[Vec<f64>]| naive_layernorm(&v[0], &v[1], &v[2], dim, 1e-5);
            assert_close(
                "layernorm",
                &out,
                &naive(&[to_f64(&x), to_f64(&g), to_f64(&b)]),
                1e-5,
            );
            let dout = uniform(&mut r, x.len(), -1.0, 1.0);
            let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
            layernorm_backward(&mut dx, &mut dg, &mut db, &dout, &x, &g, &mean, &rstd, dim)
                .unwrap();
            if dim > 1 {
                check_gradients(
                    "layernorm",
                    &[&x, &g, &b],
                    &[Some(&dx), Some(&dg), Some(&db)],
                    &dout,
                    naive,
                    2e-4,
                );
            }
        }
    }

    fn naive_batchnorm(
        x: &[f64],
        g: &[f64],
        b: &[f64],
        c: usize,
        eps: f64,
        stats: Option<(&[f64], &[f64])>,
    ) -> Vec<f64> {
        let rows = x.len() / c;
        let mut out = vec![0.0; x.len()];
        for ch in 0..c {
            let col: Vec<f64> = (0..rows).map(|r| x[r * c + ch]).collect();
            let (mu, var) = match stats {
                Some((m, v)) => (m[ch], v[ch]),
                None => {
                    let mu = col.iter().sum::<f64>() / rows as f64;
                    (
                        mu,
                        col.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / rows as f64,
                    )
                }
            };
            for r in 0..rows {
                out[r * c + ch] = (col[r] - mu) / (var + eps).sqrt() * g[ch] + b[ch];
            }
        }
        out
    }

    #[test]
    fn batchnorm_train_forward_backward_and_running_stats() {
        let mut r = rng(12);
        // Fewer rows than reduction chunks, and more, with a short last chunk.
        for (rows, c) in [(11, 70), (103, 3)] {
            let x = uniform(&mut r, rows * c, -2.0, 3.0);
            let g = uniform(&mut r, c, 0.5, 1.5);
            let b = uniform(&mut r, c, -0.5, 0.5);
            let (mut rm, mut rv) = (vec![0.5f32; c], vec![2.0f32; c]);
            let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
            let running = RunningStats {
                mean: &mut rm,
                var: &mut rv,
                momentum: 0.1,
            };
            batchnorm_train(
                &mut out,
                &mut mean,
                &mut rstd,
                &x,
                &g,
                &b,
                c,
                1e-5,
                Some(running),
            )
            .unwrap();
            let naive = |v: &[Vec<f64>]| naive_batchnorm(&v[0], &v[1], &v[2], c, 1e-5, None);
            assert_close(
                "batchnorm train",
                &out,
                &naive(&[to_f64(&x), to_f64(&g), to_f64(&b)]),
                1e-5,
            );
            for ch in 0..c {
                let col: Vec<f64> = (0..rows).map(|i| x[i * c + ch] as f64).collect();
                let mu = col.iter().sum::<f64>() / rows as f64;
                let unbiased =
                    col.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (rows - 1) as f64;
                assert!((rm[ch] as f64 - (0.9 * 0.5 + 0.1 * mu)).abs() < 1e-6);
                assert!((rv[ch] as f64 - (0.9 * 2.0 + 0.1 * unbiased)).abs() < 1e-5);
            }
            let dout = uniform(&mut r, x.len(), -1.0, 1.0);
            let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
            batchnorm_backward(
                &mut dx, &mut dg, &mut db, &dout, &x, &g, &mean, &rstd, c, true,
            )
            .unwrap();
            check_gradients(
                "batchnorm train",
                &[&x, &g, &b],
                &[Some(&dx), Some(&dg), Some(&db)],
                &dout,
                naive,
                2e-4,
            );
        }
    }

    #[test]
    fn batchnorm_eval_forward_and_backward() {
        let mut r = rng(13);
        let (rows, c) = (9, 5);
        let x = uniform(&mut r, rows * c, -2.0, 3.0);
        let g = uniform(&mut r, c, 0.5, 1.5);
        let b = uniform(&mut r, c, -0.5, 0.5);
        let rm = uniform(&mut r, c, -0.5, 0.5);
        let rv = uniform(&mut r, c, 0.5, 2.0);
        let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        batchnorm_eval(
            &mut out, &mut mean, &mut rstd, &x, &g, &b, &rm, &rv, c, 1e-5,
        )
        .unwrap();
        let (rm64, rv64) = (to_f64(&rm), to_f64(&rv));
        let naive =
            |v: &[Vec<f64>]| naive_batchnorm(&v[0], &v[1], &v[2], c, 1e-5, Some((&rm64, &rv64)));
        assert_close(
            "batchnorm eval",
            &out,
            &naive(&[to_f64(&x), to_f64(&g), to_f64(&b)]),
            1e-5,
        );
        let dout = uniform(&mut r, x.len(), -1.0, 1.0);
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        batchnorm_backward(
            &mut dx, &mut dg, &mut db, &dout, &x, &g, &mean, &rstd, c, false,
        )
        .unwrap();
        check_gradients(
            "batchnorm eval",
            &[&x, &g, &b],
            &[Some(&dx), Some(&dg), Some(&db)],
            &dout,
            naive,
            2e-4,
        );
    }
}
