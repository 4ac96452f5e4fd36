//! The aggregation module and the regression head, forward and backward, over the [`Backend`] trait.
//!
//! A cross-attention block (the released `MultiHeadAttention`): `q = W_q·x + b_q`, `k = W_k·c + b_k`,
//! `v = W_v·c + b_v` (the context `c` may be narrower than the query stream `x`), scaled dot-product
//! attention with the context's padding masked, then `x ← x + gate ∘ (W_o·a + b_o)`. The gate is 0 for a
//! sample that lacks the context modality (a non-coding transcript has no protein), so its term is zeroed.
//! No LayerNorm, no FFN, no dropout. The attention is the backend's flash attention (log-sum-exp saved).
//!
//! Pooling averages rows of each sample (the DNA stream over the configured bin window, the others over
//! their real tokens) through `sum_rows` into f32, so no new kernel is needed; its backward spreads the
//! gradient with `add_row_bias`.

use super::cross::{CrossActs, CrossScratch, CrossShape};
use super::perceiver::PerceiverActivations;
use super::EncoderOutput;
use super::{Aggregator, Isoformer, Modality};
use crate::backend::{Act, Backend, LinearDims, Role, Tensor, View, ViewMut};
use crate::{Error, Result};

/// A pooled part: f32 sums, the compute-dtype mean, and each sample's scale (`present / rows`).
struct PoolActs<B: Backend> {
    sum: Tensor<B>,
    mean: Tensor<B>,
    scale: Tensor<B>,
    ranges: Vec<(usize, usize)>,
}

/// Everything the aggregator and head keep from a forward, and their backward buffers.
pub struct AggregateActivations<B: Backend> {
    batch: usize,
    perceiver: PerceiverActivations<B>,
    cross_scratch: Option<CrossScratch<B>>,
    /// Per encoder: key lengths (i32).
    kv_lens: Vec<Tensor<B>>,
    blocks: Vec<CrossActs<B>>,
    /// Linear-mean projections per encoder.
    projected: Vec<Tensor<B>>,
    pools: Vec<PoolActs<B>>,
    /// Partial sums of the head's first layer (or of the linear-mean parts).
    part_out: Vec<Tensor<B>>,
    sums: Vec<Tensor<B>>,
    head_sums: Vec<Tensor<B>>,
    /// Head layers: pre-activations, and GELU outputs of all but the last.
    pre: Vec<Tensor<B>>,
    act: Vec<Tensor<B>>,
    // ---- backward ----
    d_stream: Vec<Tensor<B>>,
    d_ctx: Vec<Option<Tensor<B>>>,
    d_enc: Vec<Option<Tensor<B>>>,
    /// Which of d_stream / d_ctx / d_enc holds encoder e's gradient.
    enc_grad_src: Vec<GradSource>,
    d_tmp: Vec<Tensor<B>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum GradSource {
    None,
    Stream(usize),
    Context,
    Sum,
}

impl<B: Backend> Default for AggregateActivations<B> {
    fn default() -> Self {
        AggregateActivations {
            batch: 0,
            perceiver: PerceiverActivations::default(),
            cross_scratch: None,
            kv_lens: Vec::new(),
            blocks: Vec::new(),
            projected: Vec::new(),
            pools: Vec::new(),
            part_out: Vec::new(),
            sums: Vec::new(),
            head_sums: Vec::new(),
            pre: Vec::new(),
            act: Vec::new(),
            d_stream: Vec::new(),
            d_ctx: Vec::new(),
            d_enc: Vec::new(),
            enc_grad_src: Vec::new(),
            d_tmp: Vec::new(),
        }
    }
}

impl<B: Backend> AggregateActivations<B> {
    /// The predictions `[batch, tissues]` of the latest forward.
    pub fn predictions(&self) -> Result<View<'_, B>> {
        self.pre
            .last()
            .map(|t| t.view())
            .ok_or_else(|| Error::invalid("isoformer", "no forward has run"))
    }

    /// `∂loss/∂(output of encoder e)` after a backward that asked for it.
    pub fn encoder_grad(&self, e: usize) -> Result<View<'_, B>> {
        let missing =
            || Error::invalid("isoformer backward", format!("no gradient for encoder {e}"));
        match self
            .enc_grad_src
            .get(e)
            .copied()
            .unwrap_or(GradSource::None)
        {
            GradSource::None => Err(missing()),
            GradSource::Stream(q) => Ok(self.d_stream[q].view()),
            GradSource::Context => self.d_ctx[e].as_ref().map(|t| t.view()).ok_or_else(missing),
            GradSource::Sum => self.d_enc[e].as_ref().map(|t| t.view()).ok_or_else(missing),
        }
    }
}

/// Grows (never shrinks) a list of tensors to `n` entries of `numel` elements of `role`.
fn fit_list<B: Backend>(b: &B, list: &mut Vec<Tensor<B>>, sizes: &[(Role, usize)]) -> Result<()> {
    while list.len() < sizes.len() {
        list.push(Tensor::new(b, sizes[list.len()].0, 0)?);
    }
    list.truncate(sizes.len());
    for (t, &(role, n)) in list.iter_mut().zip(sizes) {
        t.ensure(b, role, n)?;
    }
    Ok(())
}

fn fit_one<B: Backend>(b: &B, slot: &mut Option<Tensor<B>>, role: Role, n: usize) -> Result<()> {
    match slot {
        Some(t) => t.ensure(b, role, n),
        None => {
            *slot = Some(Tensor::new(b, role, n)?);
            Ok(())
        }
    }
}

pub(super) fn lin(rows: usize, d_in: usize, d_out: usize) -> LinearDims {
    LinearDims { rows, d_in, d_out }
}

/// `mean[b] = scale[b] · Σ_{r ∈ ranges[b]} x[b, r, :]`.
fn pool_forward<B: Backend>(
    b: &B,
    pool: &mut PoolActs<B>,
    x: View<'_, B>,
    len: usize,
    width: usize,
) -> Result<()> {
    b.zero(pool.sum.view_mut())?;
    for (bi, &(s, e)) in pool.ranges.iter().enumerate() {
        if e > s {
            b.sum_rows(
                pool.sum.view_mut().slice_mut(bi * width, width)?,
                x.slice((bi * len + s) * width, (e - s) * width)?,
            )?;
        }
    }
    b.copy(pool.mean.view_mut(), pool.sum.view())?;
    b.scale_rows(pool.mean.view_mut(), pool.scale.view())
}

/// `dx[b, r, :] += scale[b] · dmean[b]` for `r` in the sample's range.
fn pool_backward<B: Backend>(
    b: &B,
    pool: &PoolActs<B>,
    mut dx: ViewMut<'_, B>,
    dmean: View<'_, B>,
    tmp: &mut Tensor<B>,
    len: usize,
    width: usize,
) -> Result<()> {
    let mut tmp = tmp.view_mut().slice_mut(0, dmean.numel())?;
    b.copy(tmp.rb(), dmean)?;
    b.scale_rows(tmp.rb(), pool.scale.view())?;
    for (bi, &(s, e)) in pool.ranges.iter().enumerate() {
        if e > s {
            b.add_row_bias(
                dx.rb().slice_mut((bi * len + s) * width, (e - s) * width)?,
                tmp.view().slice(bi * width, width)?,
            )?;
        }
    }
    Ok(())
}

impl Isoformer {
    pub(super) fn encoder_index(&self, m: Modality) -> usize {
        self.encoders
            .iter()
            .position(|e| e.modality == m)
            .expect("every configured modality has an encoder")
    }

    /// Block `i`'s sizes, its context encoder, and the block whose output is its query stream (`None`: the
    /// query modality's encoder output).
    fn cross_geometry<B>(
        &self,
        i: usize,
        outputs: &[EncoderOutput<'_, B>],
        batch: usize,
    ) -> (CrossShape, usize, Option<usize>) {
        let c = &self.top.cross[i];
        let ce = self.encoder_index(c.context);
        let shape = CrossShape {
            batch,
            lq: outputs[self.encoder_index(c.query)].len,
            lk: outputs[ce].len,
            context_width: self.cfg.width(c.context),
        };
        let prev = self.top.cross[..i]
            .iter()
            .rposition(|pc| pc.query == c.query);
        (shape, ce, prev)
    }

    /// Rows each sample of modality `m` is pooled over.
    fn pool_ranges(&self, m: Modality, out: &EncoderOutput<'_, impl Sized>) -> Vec<(usize, usize)> {
        out.lens
            .iter()
            .map(|&l| {
                if m == Modality::Dna {
                    let end = self.cfg.pool_window_end.min(l);
                    (self.cfg.pool_window_start.min(end), end)
                } else {
                    (0, l)
                }
            })
            .collect()
    }

    /// The parts the head's first layer reads: (modality, width) per pooled vector.
    fn head_parts(&self) -> Vec<(Modality, usize)> {
        let head_in = &self.top.head_in;
        head_in
            .iter()
            .map(|&(m, w)| {
                (
                    m,
                    self.sections.last().expect("top").layout.entries()[w]
                        .spec
                        .shape
                        .dims()[1],
                )
            })
            .collect()
    }

    #[allow(clippy::too_many_lines)]
    /// The aggregator and head on given encoder outputs (from the encoders, or from the embedding cache).
    pub fn aggregate_forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        outputs: &[EncoderOutput<'_, B>],
        present: &[(Modality, Vec<f32>)],
        a: &mut AggregateActivations<B>,
        batch: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        a.batch = batch;
        for (o, enc) in outputs.iter().zip(&self.encoders) {
            let w = cfg.width(enc.modality);
            if o.lens.len() != batch || o.hidden.numel() != batch * o.len * w {
                return Err(Error::shape(
                    "isoformer",
                    format!(
                        "{} output of {} values for {batch}×{}×{w}",
                        enc.modality.name(),
                        o.hidden.numel(),
                        o.len
                    ),
                ));
            }
        }
        // Key lengths per encoder.
        let kv_sizes: Vec<(Role, usize)> = outputs.iter().map(|_| (Role::Index, batch)).collect();
        fit_list(b, &mut a.kv_lens, &kv_sizes)?;
        for (t, o) in a.kv_lens.iter_mut().zip(outputs) {
            let lens: Vec<i32> = o.lens.iter().map(|&l| l as i32).collect();
            b.write_i32(t.view_mut(), &lens)?;
        }
        let presence = |m: Modality| -> &[f32] {
            present
                .iter()
                .find(|(pm, _)| *pm == m)
                .map(|(_, v)| v.as_slice())
                .unwrap_or(&[])
        };

        // Cross-attention blocks.
        while a.blocks.len() < self.top.cross.len() {
            a.blocks.push(CrossActs::new(b)?);
        }
        a.blocks.truncate(self.top.cross.len());
        for (i, c) in self.top.cross.iter().enumerate() {
            let (shape, ce, prev) = self.cross_geometry(i, outputs, batch);
            let co = &outputs[ce];
            let (before, rest) = a.blocks.split_at_mut(i);
            let x = match prev {
                Some(j) => before[j].out(),
                None => outputs[self.encoder_index(c.query)].hidden,
            };
            let kv = a.kv_lens[ce].view();
            c.forward(
                b,
                p,
                shape,
                x,
                x,
                co.hidden,
                kv,
                presence(c.context),
                &mut rest[0],
            )?;
        }

        if let Some(pp) = &self.top.perceiver {
            let presence_of = |m: Modality| presence(m).to_vec();
            self.perceiver_forward(
                b,
                pp,
                p,
                outputs,
                &a.kv_lens,
                &presence_of,
                &mut a.perceiver,
                batch,
            )?;
        }

        // The pooled parts the head reads.
        let parts = self.head_parts();
        let pooled_modalities: Vec<Modality> = match cfg.aggregator {
            Aggregator::LinearMean => cfg.modalities.clone(),
            _ => parts.iter().map(|p| p.0).collect(),
        };
        while a.pools.len() < pooled_modalities.len() {
            a.pools.push(PoolActs {
                sum: Tensor::new(b, Role::Exact, 0)?,
                mean: Tensor::new(b, Role::Activation, 0)?,
                scale: Tensor::new(b, Role::Exact, 0)?,
                ranges: Vec::new(),
            });
        }
        a.pools.truncate(pooled_modalities.len());
        if cfg.aggregator == Aggregator::LinearMean {
            let sizes: Vec<(Role, usize)> = self
                .top
                .project
                .iter()
                .map(|&(m, _, _)| {
                    let o = &outputs[self.encoder_index(m)];
                    (Role::Activation, batch * o.len * parts[0].1)
                })
                .collect();
            fit_list(b, &mut a.projected, &sizes)?;
        }
        for (k, &m) in pooled_modalities.iter().enumerate() {
            let e = self.encoder_index(m);
            let o = &outputs[e];
            // The resampler's latents: every one of them, for every sample.
            let latents = self.top.perceiver.as_ref().map(|pp| pp.n);
            let (ranges, len) = match latents {
                Some(n) => (vec![(0, n); batch], n),
                None => (self.pool_ranges(m, o), o.len),
            };
            let all_present = vec![1.0; batch];
            let here: &[f32] = if latents.is_some() {
                &all_present
            } else {
                presence(m)
            };
            let scale: Vec<f32> = ranges
                .iter()
                .enumerate()
                .map(|(bi, &(s, e))| {
                    let on = here.get(bi).copied().unwrap_or(1.0);
                    if e > s {
                        on / (e - s) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let width = if cfg.aggregator == Aggregator::LinearMean {
                parts[0].1
            } else {
                parts[k].1
            };
            let pool = &mut a.pools[k];
            pool.sum.ensure(b, Role::Exact, batch * width)?;
            pool.mean.ensure(b, Role::Activation, batch * width)?;
            pool.scale.ensure(b, Role::Exact, batch)?;
            b.write_f32(pool.scale.view_mut(), &scale)?;
            pool.ranges = ranges;
            // The stream to pool: the last block of this query, the projection, or the encoder output.
            let stream = if cfg.aggregator == Aggregator::LinearMean {
                let (_, pw, pb) = self.top.project[k];
                let cw = cfg.width(m);
                b.linear(
                    a.projected[k].view_mut(),
                    o.hidden,
                    p[pw],
                    Some(p[pb]),
                    lin(batch * o.len, cw, width),
                )?;
                a.projected[k].view()
            } else if latents.is_some() {
                a.perceiver.output().expect("the resampler ran")
            } else {
                match self.top.cross.iter().rposition(|c| c.query == m) {
                    Some(j) => a.blocks[j].out(),
                    None => o.hidden,
                }
            };
            pool_forward(b, &mut a.pools[k], stream, len, width)?;
        }
        if cfg.aggregator == Aggregator::LinearMean && a.pools.len() > 1 {
            // Sum the modalities' pooled vectors.
            let width = parts[0].1;
            let n = a.pools.len() - 1;
            fit_list(b, &mut a.sums, &vec![(Role::Activation, batch * width); n])?;
            for k in 0..n {
                let (done, todo) = a.sums.split_at_mut(k);
                let acc = if k == 0 {
                    a.pools[0].mean.view()
                } else {
                    done[k - 1].view()
                };
                b.add(todo[0].view_mut(), acc, a.pools[k + 1].mean.view())?;
            }
        }

        // The head.
        let layers = 1 + self.top.head_rest.len();
        let first_out = cfg.head_hidden.first().copied().unwrap_or(cfg.num_tissues);
        let mut pre_sizes = vec![(Role::Activation, batch * first_out)];
        pre_sizes.extend(
            self.top
                .head_rest
                .iter()
                .map(|r| (Role::Activation, batch * r.3)),
        );
        fit_list(b, &mut a.pre, &pre_sizes)?;
        fit_list(b, &mut a.act, &pre_sizes[..layers - 1])?;
        let head_inputs: Vec<View<'_, B>> = if cfg.aggregator == Aggregator::LinearMean {
            vec![if a.pools.len() > 1 {
                a.sums[a.pools.len() - 2].view()
            } else {
                a.pools[0].mean.view()
            }]
        } else {
            a.pools.iter().map(|p| p.mean.view()).collect()
        };
        let n_parts = head_inputs.len();
        if n_parts == 1 {
            b.linear(
                a.pre[0].view_mut(),
                head_inputs[0],
                p[self.top.head_in[0].1],
                Some(p[self.top.head_in_bias]),
                lin(batch, parts[0].1, first_out),
            )?;
        } else {
            fit_list(
                b,
                &mut a.part_out,
                &vec![(Role::Activation, batch * first_out); n_parts],
            )?;
            fit_list(
                b,
                &mut a.head_sums,
                &vec![(Role::Activation, batch * first_out); n_parts - 2],
            )?;
            for (k, x) in head_inputs.iter().enumerate() {
                let bias = (k == 0).then(|| p[self.top.head_in_bias]);
                b.linear(
                    a.part_out[k].view_mut(),
                    *x,
                    p[self.top.head_in[k].1],
                    bias,
                    lin(batch, parts[k].1, first_out),
                )?;
            }
            // pre0 = Σ_k part_out[k], through partial sums.
            for k in 1..n_parts {
                let (done, todo) = a.head_sums.split_at_mut(k - 1);
                let acc = if k == 1 {
                    a.part_out[0].view()
                } else {
                    done[k - 2].view()
                };
                let target = if k == n_parts - 1 {
                    a.pre[0].view_mut()
                } else {
                    todo[0].view_mut()
                };
                b.add(target, acc, a.part_out[k].view())?;
            }
        }
        for (l, &(w, bias, d_in, d_out)) in self.top.head_rest.iter().enumerate() {
            b.activation(a.act[l].view_mut(), a.pre[l].view(), Act::GeluErf)?;
            let (before, after) = a.pre.split_at_mut(l + 1);
            let _ = before;
            b.linear(
                after[0].view_mut(),
                a.act[l].view(),
                p[w],
                Some(p[bias]),
                lin(batch, d_in, d_out),
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_lines)]
    /// The backward of [`Self::aggregate_forward`]: gradients of the aggregator section, and of each encoder
    /// output where `want_encoder_grads` asks (read them with [`AggregateActivations::encoder_grad`]).
    pub fn aggregate_backward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        outputs: &[EncoderOutput<'_, B>],
        _present: &[(Modality, Vec<f32>)],
        a: &mut AggregateActivations<B>,
        batch: usize,
        dpred: View<'_, B>,
        g: &mut [ViewMut<'_, B>],
        want_encoder_grads: &[bool],
    ) -> Result<()> {
        let cfg = &self.cfg;
        if a.batch != batch || a.pre.is_empty() {
            return Err(Error::invalid("isoformer backward", "no matching forward"));
        }
        if dpred.numel() != batch * cfg.num_tissues {
            return Err(Error::shape(
                "isoformer backward",
                "dpred is not [batch, tissues]",
            ));
        }
        let n_enc = self.encoders.len();
        let parts = self.head_parts();
        let layers = 1 + self.top.head_rest.len();
        let first_out = cfg.head_hidden.first().copied().unwrap_or(cfg.num_tissues);

        // Head, last layer first. d_pre[l] lives in d_tmp[l] (the last is dpred itself).
        let mut sizes: Vec<(Role, usize)> = Vec::new();
        sizes.push((Role::Activation, batch * first_out));
        sizes.extend(
            self.top
                .head_rest
                .iter()
                .map(|r| (Role::Activation, batch * r.3)),
        );
        // d_pre per layer, d_act per hidden layer, and one pooled-width scratch per part.
        let mut scratch = sizes.clone();
        scratch.extend(sizes[..layers - 1].iter().copied());
        let pooled_width = if cfg.aggregator == Aggregator::LinearMean {
            parts[0].1
        } else {
            0
        };
        for &(_, w) in &parts {
            scratch.push((Role::Activation, batch * w));
        }
        scratch.push((
            Role::Activation,
            batch
                * parts
                    .iter()
                    .map(|p| p.1)
                    .max()
                    .unwrap_or(1)
                    .max(pooled_width),
        ));
        fit_list(b, &mut a.d_tmp, &scratch)?;
        let (d_pre, rest) = a.d_tmp.split_at_mut(layers);
        let (d_act, rest) = rest.split_at_mut(layers - 1);
        let (d_parts, rest) = rest.split_at_mut(parts.len());
        let pool_tmp = &mut rest[0];
        for l in (1..layers).rev() {
            let (w, bias, d_in, d_out) = self.top.head_rest[l - 1];
            let dy = if l == layers - 1 {
                dpred
            } else {
                d_pre[l].view()
            };
            b.zero(d_act[l - 1].view_mut())?;
            let [gw, gb] = g.get_disjoint_mut([w, bias]).expect("distinct entries");
            b.linear_backward(
                Some(d_act[l - 1].view_mut()),
                Some(gw.rb()),
                Some(gb.rb()),
                dy,
                a.act[l - 1].view(),
                p[w],
                lin(batch, d_in, d_out),
            )?;
            b.zero(d_pre[l - 1].view_mut())?;
            b.activation_backward(
                d_pre[l - 1].view_mut(),
                d_act[l - 1].view(),
                a.pre[l - 1].view(),
                Act::GeluErf,
            )?;
        }
        let d_pre0 = if layers == 1 { dpred } else { d_pre[0].view() };
        let head_inputs: Vec<View<'_, B>> = if cfg.aggregator == Aggregator::LinearMean {
            vec![if a.pools.len() > 1 {
                a.sums[a.pools.len() - 2].view()
            } else {
                a.pools[0].mean.view()
            }]
        } else {
            a.pools.iter().map(|p| p.mean.view()).collect()
        };
        for (k, x) in head_inputs.iter().enumerate() {
            b.zero(d_parts[k].view_mut())?;
            let wi = self.top.head_in[k].1;
            let (gw, gb) = if k == 0 {
                let [gw, gb] = g
                    .get_disjoint_mut([wi, self.top.head_in_bias])
                    .expect("distinct");
                (gw.rb(), Some(gb.rb()))
            } else {
                (g[wi].rb(), None)
            };
            b.linear_backward(
                Some(d_parts[k].view_mut()),
                Some(gw),
                gb,
                d_pre0,
                *x,
                p[wi],
                lin(batch, parts[k].1, first_out),
            )?;
        }

        // Gradient buffers per encoder output.
        let queries: Vec<Modality> = match cfg.aggregator {
            Aggregator::LinearMean | Aggregator::Perceiver => Vec::new(),
            _ => parts.iter().map(|p| p.0).collect(),
        };
        let stream_sizes: Vec<(Role, usize)> = queries
            .iter()
            .map(|&m| {
                let o = &outputs[self.encoder_index(m)];
                (Role::Activation, batch * o.len * cfg.width(m))
            })
            .collect();
        // Without query streams (linear-mean, the resampler) the branch below sizes d_stream itself;
        // fitting it here too would shrink and regrow it every step.
        if !queries.is_empty() {
            fit_list(b, &mut a.d_stream, &stream_sizes)?;
        }
        a.d_ctx.resize_with(n_enc, || None);
        a.d_enc.resize_with(n_enc, || None);
        a.enc_grad_src = vec![GradSource::None; n_enc];
        let is_context: Vec<bool> = (0..n_enc)
            .map(|e| {
                let m = self.encoders[e].modality;
                self.top.cross.iter().any(|c| c.context == m)
                    || matches!(
                        cfg.aggregator,
                        Aggregator::LinearMean | Aggregator::Perceiver
                    )
            })
            .collect();
        for e in 0..n_enc {
            if want_encoder_grads[e] && is_context[e] {
                let o = &outputs[e];
                fit_one(
                    b,
                    &mut a.d_ctx[e],
                    Role::Activation,
                    batch * o.len * cfg.width(self.encoders[e].modality),
                )?;
                b.zero(a.d_ctx[e].as_mut().expect("fitted").view_mut())?;
            }
        }

        // Pool backward into the streams (or the projections, or the resampler's latents).
        if let Some(pp) = &self.top.perceiver {
            fit_list(
                b,
                &mut a.d_stream,
                &[(Role::Activation, batch * pp.n * pp.width)],
            )?;
            b.zero(a.d_stream[0].view_mut())?;
            pool_backward(
                b,
                &a.pools[0],
                a.d_stream[0].view_mut(),
                d_parts[0].view(),
                pool_tmp,
                pp.n,
                pp.width,
            )?;
            let d_out = a.d_stream[0].view();
            self.perceiver_backward(
                b,
                pp,
                p,
                outputs,
                &a.kv_lens,
                &mut a.perceiver,
                batch,
                d_out,
                g,
                &mut a.d_ctx,
            )?;
        } else if cfg.aggregator == Aggregator::LinearMean {
            let width = parts[0].1;
            let proj_sizes: Vec<(Role, usize)> = self
                .top
                .project
                .iter()
                .map(|&(m, _, _)| {
                    (
                        Role::Activation,
                        batch * outputs[self.encoder_index(m)].len * width,
                    )
                })
                .collect();
            fit_list(b, &mut a.d_stream, &proj_sizes)?;
            for (k, &(m, pw, pb)) in self.top.project.iter().enumerate() {
                let e = self.encoder_index(m);
                let o = &outputs[e];
                b.zero(a.d_stream[k].view_mut())?;
                // The summed pooled vector's gradient reaches every modality's mean unchanged.
                pool_backward(
                    b,
                    &a.pools[k],
                    a.d_stream[k].view_mut(),
                    d_parts[0].view(),
                    pool_tmp,
                    o.len,
                    width,
                )?;
                let [gw, gb] = g.get_disjoint_mut([pw, pb]).expect("distinct");
                let dx = a.d_ctx[e].as_mut().map(|t| t.view_mut());
                b.linear_backward(
                    dx,
                    Some(gw.rb()),
                    Some(gb.rb()),
                    a.d_stream[k].view(),
                    o.hidden,
                    p[pw],
                    lin(batch * o.len, cfg.width(m), width),
                )?;
            }
        } else {
            for (k, &m) in queries.iter().enumerate() {
                let o = &outputs[self.encoder_index(m)];
                b.zero(a.d_stream[k].view_mut())?;
                pool_backward(
                    b,
                    &a.pools[k],
                    a.d_stream[k].view_mut(),
                    d_parts[k].view(),
                    pool_tmp,
                    o.len,
                    parts[k].1,
                )?;
            }
            if a.cross_scratch.is_none() {
                a.cross_scratch = Some(CrossScratch::new(b)?);
            }
            let blocks: Vec<(CrossShape, usize)> = (0..self.top.cross.len())
                .map(|i| {
                    (
                        self.cross_geometry(i, outputs, batch).0,
                        self.top.cross[i].width,
                    )
                })
                .collect();
            a.cross_scratch
                .as_mut()
                .expect("made above")
                .reserve(b, blocks)?;
            // Blocks in reverse order: each adds its query path into the stream's gradient, which the
            // residual passes through unchanged.
            for (i, c) in self.top.cross.iter().enumerate().rev() {
                let k = queries.iter().position(|&m| m == c.query).expect("a query");
                let (shape, ce, prev) = self.cross_geometry(i, outputs, batch);
                let co = &outputs[ce];
                let x: View<'_, B> = match prev {
                    Some(j) => a.blocks[j].out(),
                    None => outputs[self.encoder_index(c.query)].hidden,
                };
                let query_grad = prev.is_some() || want_encoder_grads[self.encoder_index(c.query)];
                c.backward(
                    b,
                    p,
                    shape,
                    x,
                    co.hidden,
                    a.kv_lens[ce].view(),
                    &a.blocks[i],
                    a.d_stream[k].view_mut(),
                    None,
                    query_grad,
                    a.d_ctx[ce].as_mut().map(|t| t.view_mut()),
                    g,
                    a.cross_scratch.as_mut().expect("made above"),
                )?;
            }
        }

        // Where each encoder's gradient ended up.
        for e in 0..n_enc {
            if !want_encoder_grads[e] {
                continue;
            }
            let m = self.encoders[e].modality;
            let stream = queries.iter().position(|&q| q == m);
            let ctx = a.d_ctx[e].is_some() && is_context[e];
            a.enc_grad_src[e] = match (stream, ctx) {
                (Some(k), false) => GradSource::Stream(k),
                (None, true) => GradSource::Context,
                (Some(k), true) => {
                    let n = a.d_stream[k].numel();
                    fit_one(b, &mut a.d_enc[e], Role::Activation, n)?;
                    let ctx_view = a.d_ctx[e].as_ref().expect("checked").view();
                    b.add(
                        a.d_enc[e].as_mut().expect("fitted").view_mut(),
                        a.d_stream[k].view(),
                        ctx_view,
                    )?;
                    GradSource::Sum
                }
                (None, false) => {
                    // An encoder the head never reads (not possible with a valid config).
                    return Err(Error::invalid(
                        "isoformer backward",
                        format!("encoder {e} feeds nothing"),
                    ));
                }
            };
        }
        Ok(())
    }
}
