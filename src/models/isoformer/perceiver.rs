//! The Perceiver Resampler aggregator (the paper's Table 4 ablation, after Flamingo): `n` learned latents
//! of width `D` read every modality by cross-attention, then pass an FFN, `depth` times, and the head
//! averages the final, layer-normed latents:
//!
//! ```text
//! z = latents (per sample)
//! per layer:  per modality m:  z += gate_m ∘ W_o·Attn(W_q·LN(z), W_k·h_m, W_v·h_m)     (the shared block)
//!             z += W₂·GELU(W₁·LN(z) + b₁) + b₂            (W₁: D → 4D)
//! out = LN(z)  →  mean over the latents  →  head
//! ```
//!
//! The attention masks each modality's padding, and `gate_m` zeroes a missing modality (no protein), as in
//! the cross-attention aggregator.

use super::aggregate::lin;
use super::cross::{CrossActs, CrossScratch, CrossShape};
use super::{CrossAttnParams, EncoderOutput, Isoformer, Modality};
use crate::backend::{Act, Backend, Role, Tensor, View, ViewMut};
use crate::Result;

const LN_EPS: f32 = 1e-5;

/// Positions of the resampler's parameters in the aggregator section.
#[derive(Clone, Debug)]
pub(super) struct PerceiverParams {
    pub latents: usize,
    pub n: usize,
    pub width: usize,
    pub layers: Vec<PerceiverLayer>,
    pub norm: (usize, usize),
}

/// A LayerNorm (scale, shift) and the cross-attention that reads its output.
pub(super) type NormedCross = ((usize, usize), CrossAttnParams);

#[derive(Clone, Debug)]
pub(super) struct PerceiverLayer {
    /// Per modality: the pre-attention LayerNorm of the latents and the cross-attention.
    pub cross: Vec<NormedCross>,
    pub ffn_norm: (usize, usize),
    pub ffn_in: (usize, usize),
    pub ffn_out: (usize, usize),
}

/// A LayerNorm's output and statistics.
struct Normed<B: Backend> {
    out: Tensor<B>,
    mean: Tensor<B>,
    rstd: Tensor<B>,
}

impl<B: Backend> Normed<B> {
    fn new(b: &B, rows: usize, d: usize) -> Result<Self> {
        Ok(Normed {
            out: Tensor::new(b, Role::Activation, rows * d)?,
            mean: Tensor::new(b, Role::Exact, rows)?,
            rstd: Tensor::new(b, Role::Exact, rows)?,
        })
    }

    /// Sizes the buffers for `rows` rows of width `d`, growing only.
    fn fit(&mut self, b: &B, rows: usize, d: usize) -> Result<()> {
        self.out.ensure(b, Role::Activation, rows * d)?;
        self.mean.ensure(b, Role::Exact, rows)?;
        self.rstd.ensure(b, Role::Exact, rows)
    }

    fn run(
        &mut self,
        b: &B,
        x: View<'_, B>,
        p: &[View<'_, B>],
        (w, bias): (usize, usize),
    ) -> Result<()> {
        b.layernorm(
            self.out.view_mut(),
            self.mean.view_mut(),
            self.rstd.view_mut(),
            x,
            p[w],
            p[bias],
            LN_EPS,
        )
    }

    /// `dx += LNᵀ(dout)`, with the scale's and shift's gradients.
    fn backward(
        &self,
        b: &B,
        dx: ViewMut<'_, B>,
        dout: View<'_, B>,
        x: View<'_, B>,
        p: &[View<'_, B>],
        g: &mut [ViewMut<'_, B>],
        (w, bias): (usize, usize),
    ) -> Result<()> {
        let [gw, gb] = g.get_disjoint_mut([w, bias]).expect("distinct entries");
        b.layernorm_backward(
            dx,
            gw.rb(),
            gb.rb(),
            dout,
            x,
            p[w],
            self.mean.view(),
            self.rstd.view(),
        )
    }
}

enum Stage<B: Backend> {
    Cross {
        ln: Normed<B>,
        block: CrossActs<B>,
    },
    Ffn {
        ln: Normed<B>,
        pre: Tensor<B>,
        act: Tensor<B>,
        /// `W₂·GELU(…) + b₂`, read once right after (kept to reuse its memory).
        y: Tensor<B>,
        out: Tensor<B>,
    },
}

impl<B: Backend> Stage<B> {
    fn out(&self) -> View<'_, B> {
        match self {
            Stage::Cross { block, .. } => block.out(),
            Stage::Ffn { out, .. } => out.view(),
        }
    }
}

/// What the resampler keeps from a forward, and its backward scratch.
pub struct PerceiverActivations<B: Backend> {
    z0: Option<Tensor<B>>,
    stages: Vec<Stage<B>>,
    norm: Option<Normed<B>>,
    scratch: Vec<Tensor<B>>,
    cross_scratch: Option<CrossScratch<B>>,
}

impl<B: Backend> Default for PerceiverActivations<B> {
    fn default() -> Self {
        PerceiverActivations {
            z0: None,
            stages: Vec::new(),
            norm: None,
            scratch: Vec::new(),
            cross_scratch: None,
        }
    }
}

impl<B: Backend> PerceiverActivations<B> {
    /// The final latents `[batch, n, D]`.
    pub fn output(&self) -> Option<View<'_, B>> {
        self.norm.as_ref().map(|t| t.out.view())
    }
}

impl Isoformer {
    /// The resampler's forward; its output is `a.output()`.
    pub(super) fn perceiver_forward<B: Backend>(
        &self,
        b: &B,
        pp: &PerceiverParams,
        p: &[View<'_, B>],
        outputs: &[EncoderOutput<'_, B>],
        kv_lens: &[Tensor<B>],
        presence: &dyn Fn(Modality) -> Vec<f32>,
        a: &mut PerceiverActivations<B>,
        batch: usize,
    ) -> Result<()> {
        let (n, d) = (pp.n, pp.width);
        let rows = batch * n;
        // Every buffer is made on the first call and only grown after it (no allocation in a warm step).
        if a.stages.is_empty() {
            for layer in &pp.layers {
                for _ in &layer.cross {
                    a.stages.push(Stage::Cross {
                        ln: Normed::new(b, 0, 0)?,
                        block: CrossActs::new(b)?,
                    });
                }
                a.stages.push(Stage::Ffn {
                    ln: Normed::new(b, 0, 0)?,
                    pre: Tensor::new(b, Role::Activation, 0)?,
                    act: Tensor::new(b, Role::Activation, 0)?,
                    y: Tensor::new(b, Role::Activation, 0)?,
                    out: Tensor::new(b, Role::Activation, 0)?,
                });
            }
        }
        if a.z0.is_none() {
            a.z0 = Some(Tensor::new(b, Role::Activation, 0)?);
        }
        let z0 = a.z0.as_mut().expect("set above");
        z0.ensure(b, Role::Activation, rows * d)?;
        for bi in 0..batch {
            b.copy(z0.view_mut().slice_mut(bi * n * d, n * d)?, p[pp.latents])?;
        }
        let z0 = a.z0.as_ref().expect("set above");
        let mut i = 0;
        for layer in &pp.layers {
            for (norm, c) in &layer.cross {
                let e = self.encoder_index(c.context);
                let co = &outputs[e];
                let shape = CrossShape {
                    batch,
                    lq: n,
                    lk: co.len,
                    context_width: self.cfg.width(c.context),
                };
                let (before, rest) = a.stages.split_at_mut(i);
                let z = before.last().map_or_else(|| z0.view(), |s| s.out());
                let Stage::Cross { ln, block } = &mut rest[0] else {
                    unreachable!("stages follow the layers")
                };
                ln.fit(b, rows, d)?;
                ln.run(b, z, p, *norm)?;
                c.forward(
                    b,
                    p,
                    shape,
                    ln.out.view(),
                    z,
                    co.hidden,
                    kv_lens[e].view(),
                    &presence(c.context),
                    block,
                )?;
                i += 1;
            }
            let (before, rest) = a.stages.split_at_mut(i);
            let z = before.last().map_or_else(|| z0.view(), |s| s.out());
            let Stage::Ffn {
                ln,
                pre,
                act,
                y,
                out,
            } = &mut rest[0]
            else {
                unreachable!("stages follow the layers")
            };
            ln.fit(b, rows, d)?;
            for (t, size) in [
                (&mut *pre, 4 * d),
                (&mut *act, 4 * d),
                (&mut *y, d),
                (&mut *out, d),
            ] {
                t.ensure(b, Role::Activation, rows * size)?;
            }
            ln.run(b, z, p, layer.ffn_norm)?;
            let ((w1, b1), (w2, b2)) = (layer.ffn_in, layer.ffn_out);
            b.linear_act(
                pre.view_mut(),
                act.view_mut(),
                ln.out.view(),
                p[w1],
                p[b1],
                Act::GeluErf,
                lin(rows, d, 4 * d),
                true,
            )?;
            b.linear(
                y.view_mut(),
                act.view(),
                p[w2],
                Some(p[b2]),
                lin(rows, 4 * d, d),
            )?;
            b.add(out.view_mut(), z, y.view())?;
            i += 1;
        }
        if a.norm.is_none() {
            a.norm = Some(Normed::new(b, 0, 0)?);
        }
        let norm = a.norm.as_mut().expect("set above");
        norm.fit(b, rows, d)?;
        norm.run(
            b,
            a.stages.last().expect("at least one layer").out(),
            p,
            pp.norm,
        )?;
        Ok(())
    }

    /// The resampler's backward from `d_out` (`[batch, n, D]`, the pooled head's gradient): adds into the
    /// aggregator gradients `g` and into `d_ctx[e]` for each encoder whose gradient is asked for.
    pub(super) fn perceiver_backward<B: Backend>(
        &self,
        b: &B,
        pp: &PerceiverParams,
        p: &[View<'_, B>],
        outputs: &[EncoderOutput<'_, B>],
        kv_lens: &[Tensor<B>],
        a: &mut PerceiverActivations<B>,
        batch: usize,
        d_out: View<'_, B>,
        g: &mut [ViewMut<'_, B>],
        d_ctx: &mut [Option<Tensor<B>>],
    ) -> Result<()> {
        let (n, d) = (pp.n, pp.width);
        let rows = batch * n;
        // Scratch: d_z (the stream's gradient), d_ln, d_act, d_pre.
        let sizes = [rows * d, rows * d, rows * 4 * d, rows * 4 * d];
        while a.scratch.len() < sizes.len() {
            a.scratch.push(Tensor::new(b, Role::Activation, 0)?);
        }
        for (s, &size) in a.scratch.iter_mut().zip(&sizes) {
            s.ensure(b, Role::Activation, size)?;
        }
        if a.cross_scratch.is_none() {
            a.cross_scratch = Some(CrossScratch::new(b)?);
        }
        let sc = a.cross_scratch.as_mut().expect("made above");
        let [d_z, d_ln, d_act, d_pre] = a.scratch.get_disjoint_mut([0, 1, 2, 3]).expect("distinct");
        let norm = a.norm.as_ref().expect("a forward ran");
        b.zero(d_z.view_mut())?;
        norm.backward(
            b,
            d_z.view_mut(),
            d_out,
            a.stages.last().expect("a forward ran").out(),
            p,
            g,
            pp.norm,
        )?;
        // The stages' parameters in forward order, walked backwards.
        let mut plan: Vec<(Option<&NormedCross>, &PerceiverLayer)> = Vec::new();
        for layer in &pp.layers {
            plan.extend(layer.cross.iter().map(|c| (Some(c), layer)));
            plan.push((None, layer));
        }
        let blocks: Vec<(CrossShape, usize)> = plan
            .iter()
            .filter_map(|(c, _)| c.map(|(_, c)| c))
            .map(|c| {
                let shape = CrossShape {
                    batch,
                    lq: n,
                    lk: outputs[self.encoder_index(c.context)].len,
                    context_width: self.cfg.width(c.context),
                };
                (shape, c.width)
            })
            .collect();
        sc.reserve(b, blocks)?;
        let z0 = a.z0.as_ref().expect("a forward ran");
        for (i, stage) in a.stages.iter().enumerate().rev() {
            let z = if i == 0 {
                z0.view()
            } else {
                a.stages[i - 1].out()
            };
            match (stage, plan[i]) {
                (Stage::Ffn { ln, pre, act, .. }, (None, layer)) => {
                    // out = z + FFN(LN(z)): d_z passes through and the FFN path adds into it.
                    let ((w1, b1), (w2, b2)) = (layer.ffn_in, layer.ffn_out);
                    b.zero(d_act.view_mut())?;
                    {
                        let [gw, gb] = g.get_disjoint_mut([w2, b2]).expect("distinct");
                        b.linear_backward(
                            Some(d_act.view_mut()),
                            Some(gw.rb()),
                            Some(gb.rb()),
                            d_z.view(),
                            act.view(),
                            p[w2],
                            lin(rows, 4 * d, d),
                        )?;
                    }
                    b.zero(d_pre.view_mut())?;
                    b.activation_backward(
                        d_pre.view_mut(),
                        d_act.view(),
                        pre.view(),
                        Act::GeluErf,
                    )?;
                    b.zero(d_ln.view_mut())?;
                    {
                        let [gw, gb] = g.get_disjoint_mut([w1, b1]).expect("distinct");
                        b.linear_backward(
                            Some(d_ln.view_mut()),
                            Some(gw.rb()),
                            Some(gb.rb()),
                            d_pre.view(),
                            ln.out.view(),
                            p[w1],
                            lin(rows, d, 4 * d),
                        )?;
                    }
                    ln.backward(b, d_z.view_mut(), d_ln.view(), z, p, g, layer.ffn_norm)?;
                }
                (Stage::Cross { ln, block }, (Some((norm, c)), _)) => {
                    let e = self.encoder_index(c.context);
                    let co = &outputs[e];
                    let shape = CrossShape {
                        batch,
                        lq: n,
                        lk: co.len,
                        context_width: self.cfg.width(c.context),
                    };
                    // The query input is LN(z): its gradient goes to d_ln, then through the LayerNorm.
                    b.zero(d_ln.view_mut())?;
                    let d_context = d_ctx[e].as_mut().map(|t| t.view_mut());
                    c.backward(
                        b,
                        p,
                        shape,
                        ln.out.view(),
                        co.hidden,
                        kv_lens[e].view(),
                        block,
                        d_z.view_mut(),
                        Some(d_ln.view_mut()),
                        true,
                        d_context,
                        g,
                        sc,
                    )?;
                    ln.backward(b, d_z.view_mut(), d_ln.view(), z, p, g, *norm)?;
                }
                _ => unreachable!("stages follow the plan"),
            }
        }
        // Every sample's latents are the same parameter: sum over the batch.
        b.sum_rows(g[pp.latents].rb(), d_z.view())
    }
}
