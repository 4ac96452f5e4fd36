//! The Perceiver Resampler aggregator (the paper's Table 4 ablation, after Flamingo): `n` learned latents
//! of width `D` read every modality by cross-attention, then pass an FFN, `depth` times, and the head
//! averages the final, layer-normed latents:
//!
//! ```text
//! z = latents (per sample)
//! per layer:  per modality m:  z += gate_m ∘ W_o·Attn(W_q·LN(z), W_k·h_m, W_v·h_m)
//!             z += W₂·GELU(W₁·LN(z) + b₁) + b₂            (W₁: D → 4D)
//! out = LN(z)  →  mean over the latents  →  head
//! ```
//!
//! The attention masks each modality's padding, and `gate_m` zeroes a missing modality (no protein), as in
//! the cross-attention aggregator.

use super::aggregate::lin;
use super::{CrossAttnParams, EncoderOutput, Isoformer, Modality};
use crate::backend::{Act, AttentionDims, Backend, Role, Tensor, View, ViewMut};
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

#[derive(Clone, Debug)]
pub(super) struct PerceiverLayer {
    /// Per modality: the pre-attention LayerNorm of the latents and the cross-attention.
    pub cross: Vec<((usize, usize), CrossAttnParams)>,
    pub ffn_norm: (usize, usize),
    pub ffn_in: (usize, usize),
    pub ffn_out: (usize, usize),
}

enum Stage<B: Backend> {
    Cross {
        ln: Tensor<B>,
        mean: Tensor<B>,
        rstd: Tensor<B>,
        q: Tensor<B>,
        k: Tensor<B>,
        v: Tensor<B>,
        attn: Tensor<B>,
        lse: Tensor<B>,
        o: Tensor<B>,
        gate: Tensor<B>,
        out: Tensor<B>,
    },
    Ffn {
        ln: Tensor<B>,
        mean: Tensor<B>,
        rstd: Tensor<B>,
        pre: Tensor<B>,
        act: Tensor<B>,
        y: Tensor<B>,
        out: Tensor<B>,
    },
}

impl<B: Backend> Stage<B> {
    fn out(&self) -> &Tensor<B> {
        match self {
            Stage::Cross { out, .. } | Stage::Ffn { out, .. } => out,
        }
    }
}

/// What the resampler keeps from a forward.
pub struct PerceiverActivations<B: Backend> {
    z0: Option<Tensor<B>>,
    stages: Vec<Stage<B>>,
    norm_out: Option<Tensor<B>>,
    norm_mean: Option<Tensor<B>>,
    norm_rstd: Option<Tensor<B>>,
    /// Backward scratch.
    scratch: Vec<Tensor<B>>,
}

impl<B: Backend> Default for PerceiverActivations<B> {
    fn default() -> Self {
        PerceiverActivations {
            z0: None,
            stages: Vec::new(),
            norm_out: None,
            norm_mean: None,
            norm_rstd: None,
            scratch: Vec::new(),
        }
    }
}

impl<B: Backend> PerceiverActivations<B> {
    /// The final latents `[batch, n, D]`.
    pub fn output(&self) -> Option<View<'_, B>> {
        self.norm_out.as_ref().map(|t| t.view())
    }
}

fn t<B: Backend>(b: &B, role: Role, n: usize) -> Result<Tensor<B>> {
    Tensor::new(b, role, n)
}

fn fit<B: Backend>(b: &B, slot: &mut Option<Tensor<B>>, role: Role, n: usize) -> Result<()> {
    match slot {
        Some(x) => x.ensure(b, role, n),
        None => {
            *slot = Some(Tensor::new(b, role, n)?);
            Ok(())
        }
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
        fit(b, &mut a.z0, Role::Activation, rows * d)?;
        {
            let z0 = a.z0.as_mut().expect("fitted");
            for bi in 0..batch {
                b.copy(z0.view_mut().slice_mut(bi * n * d, n * d)?, p[pp.latents])?;
            }
        }
        // Stages in order: the cross-attentions of a layer, then its FFN.
        a.stages.clear();
        for layer in &pp.layers {
            for ((lnw, lnb), c) in &layer.cross {
                let e = self.encoder_index(c.context);
                let co = &outputs[e];
                let nk = batch * co.len;
                let cw = self.cfg.width(c.context);
                let here = presence(c.context);
                let gate: Vec<f32> = (0..batch)
                    .flat_map(|bi| std::iter::repeat_n(here.get(bi).copied().unwrap_or(1.0), n))
                    .collect();
                let mut st = Stage::Cross {
                    ln: t(b, Role::Activation, rows * d)?,
                    mean: t(b, Role::Exact, rows)?,
                    rstd: t(b, Role::Exact, rows)?,
                    q: t(b, Role::Activation, rows * d)?,
                    k: t(b, Role::Activation, nk * d)?,
                    v: t(b, Role::Activation, nk * d)?,
                    attn: t(b, Role::Activation, rows * d)?,
                    lse: t(b, Role::Exact, batch * c.heads * n)?,
                    o: t(b, Role::Activation, rows * d)?,
                    gate: Tensor::from_f32(b, Role::Exact, &gate)?,
                    out: t(b, Role::Activation, rows * d)?,
                };
                let z = match a.stages.last() {
                    Some(s) => s.out().view(),
                    None => a.z0.as_ref().expect("fitted").view(),
                };
                if let Stage::Cross {
                    ln,
                    mean,
                    rstd,
                    q,
                    k,
                    v,
                    attn,
                    lse,
                    o,
                    gate,
                    out,
                } = &mut st
                {
                    b.layernorm(
                        ln.view_mut(),
                        mean.view_mut(),
                        rstd.view_mut(),
                        z,
                        p[*lnw],
                        p[*lnb],
                        LN_EPS,
                    )?;
                    b.linear(
                        q.view_mut(),
                        ln.view(),
                        p[c.q.0],
                        Some(p[c.q.1]),
                        lin(rows, d, d),
                    )?;
                    b.linear(
                        k.view_mut(),
                        co.hidden,
                        p[c.k.0],
                        Some(p[c.k.1]),
                        lin(nk, cw, d),
                    )?;
                    b.linear(
                        v.view_mut(),
                        co.hidden,
                        p[c.v.0],
                        Some(p[c.v.1]),
                        lin(nk, cw, d),
                    )?;
                    let dims = AttentionDims::new(batch, c.heads, n, co.len, d / c.heads);
                    b.attention(
                        attn.view_mut(),
                        lse.view_mut(),
                        q.view(),
                        k.view(),
                        v.view(),
                        Some(kv_lens[e].view()),
                        None,
                        &dims,
                    )?;
                    b.linear(
                        o.view_mut(),
                        attn.view(),
                        p[c.o.0],
                        Some(p[c.o.1]),
                        lin(rows, d, d),
                    )?;
                    b.scale_rows(o.view_mut(), gate.view())?;
                    b.add(out.view_mut(), z, o.view())?;
                }
                a.stages.push(st);
            }
            let mut st = Stage::Ffn {
                ln: t(b, Role::Activation, rows * d)?,
                mean: t(b, Role::Exact, rows)?,
                rstd: t(b, Role::Exact, rows)?,
                pre: t(b, Role::Activation, rows * 4 * d)?,
                act: t(b, Role::Activation, rows * 4 * d)?,
                y: t(b, Role::Activation, rows * d)?,
                out: t(b, Role::Activation, rows * d)?,
            };
            let z = match a.stages.last() {
                Some(s) => s.out().view(),
                None => a.z0.as_ref().expect("fitted").view(),
            };
            if let Stage::Ffn {
                ln,
                mean,
                rstd,
                pre,
                act,
                y,
                out,
            } = &mut st
            {
                let (nw, nb) = layer.ffn_norm;
                b.layernorm(
                    ln.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    z,
                    p[nw],
                    p[nb],
                    LN_EPS,
                )?;
                let (w1, b1) = layer.ffn_in;
                b.linear_act(
                    pre.view_mut(),
                    act.view_mut(),
                    ln.view(),
                    p[w1],
                    p[b1],
                    Act::GeluErf,
                    lin(rows, d, 4 * d),
                )?;
                let (w2, b2) = layer.ffn_out;
                b.linear(
                    y.view_mut(),
                    act.view(),
                    p[w2],
                    Some(p[b2]),
                    lin(rows, 4 * d, d),
                )?;
                b.add(out.view_mut(), z, y.view())?;
            }
            a.stages.push(st);
        }
        fit(b, &mut a.norm_out, Role::Activation, rows * d)?;
        fit(b, &mut a.norm_mean, Role::Exact, rows)?;
        fit(b, &mut a.norm_rstd, Role::Exact, rows)?;
        let last = a.stages.last().expect("at least one layer").out().view();
        b.layernorm(
            a.norm_out.as_mut().expect("fitted").view_mut(),
            a.norm_mean.as_mut().expect("fitted").view_mut(),
            a.norm_rstd.as_mut().expect("fitted").view_mut(),
            last,
            p[pp.norm.0],
            p[pp.norm.1],
            LN_EPS,
        )
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
        let max_kv = outputs.iter().map(|o| batch * o.len).max().unwrap_or(0);
        // Scratch: d_z, copy, d_ln, d_attn, dq, dk, dv, d_act, d_pre.
        let sizes = [
            rows * d,
            rows * d,
            rows * d,
            rows * d,
            rows * d,
            max_kv * d,
            max_kv * d,
            rows * 4 * d,
            rows * 4 * d,
        ];
        while a.scratch.len() < sizes.len() {
            a.scratch.push(Tensor::new(b, Role::Activation, 0)?);
        }
        for (s, &size) in a.scratch.iter_mut().zip(&sizes) {
            s.ensure(b, Role::Activation, size)?;
        }
        let [d_z, d_copy, d_ln, d_attn, dq, dk, dv, d_act, d_pre] = a
            .scratch
            .get_disjoint_mut([0, 1, 2, 3, 4, 5, 6, 7, 8])
            .expect("distinct");
        let last = a.stages.last().expect("a forward ran").out().view();
        b.zero(d_z.view_mut())?;
        {
            let [gw, gb] = g
                .get_disjoint_mut([pp.norm.0, pp.norm.1])
                .expect("distinct");
            b.layernorm_backward(
                d_z.view_mut(),
                gw.rb(),
                gb.rb(),
                d_out,
                last,
                p[pp.norm.0],
                a.norm_mean.as_ref().expect("a forward ran").view(),
                a.norm_rstd.as_ref().expect("a forward ran").view(),
            )?;
        }
        // The stage parameters in forward order, to walk backwards.
        let mut plan: Vec<Option<&((usize, usize), CrossAttnParams)>> = Vec::new();
        let mut ffns = Vec::new();
        for layer in &pp.layers {
            for c in &layer.cross {
                plan.push(Some(c));
            }
            plan.push(None);
            ffns.push(layer);
        }
        let mut ffn_index = ffns.len();
        for (i, stage) in a.stages.iter().enumerate().rev() {
            let z = if i == 0 {
                a.z0.as_ref().expect("a forward ran").view()
            } else {
                a.stages[i - 1].out().view()
            };
            match (stage, plan[i]) {
                (
                    Stage::Ffn {
                        ln,
                        mean,
                        rstd,
                        pre,
                        act,
                        ..
                    },
                    None,
                ) => {
                    ffn_index -= 1;
                    let layer = ffns[ffn_index];
                    b.copy(d_copy.view_mut(), d_z.view())?;
                    b.zero(d_act.view_mut())?;
                    let (w2, b2) = layer.ffn_out;
                    {
                        let [gw, gb] = g.get_disjoint_mut([w2, b2]).expect("distinct");
                        b.linear_backward(
                            Some(d_act.view_mut()),
                            Some(gw.rb()),
                            Some(gb.rb()),
                            d_copy.view(),
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
                    let (w1, b1) = layer.ffn_in;
                    {
                        let [gw, gb] = g.get_disjoint_mut([w1, b1]).expect("distinct");
                        b.linear_backward(
                            Some(d_ln.view_mut()),
                            Some(gw.rb()),
                            Some(gb.rb()),
                            d_pre.view(),
                            ln.view(),
                            p[w1],
                            lin(rows, d, 4 * d),
                        )?;
                    }
                    let (nw, nb) = layer.ffn_norm;
                    let [gw, gb] = g.get_disjoint_mut([nw, nb]).expect("distinct");
                    b.layernorm_backward(
                        d_z.view_mut(),
                        gw.rb(),
                        gb.rb(),
                        d_ln.view(),
                        z,
                        p[nw],
                        mean.view(),
                        rstd.view(),
                    )?;
                }
                (
                    Stage::Cross {
                        ln,
                        mean,
                        rstd,
                        q,
                        k,
                        v,
                        attn,
                        lse,
                        gate,
                        ..
                    },
                    Some(((lnw, lnb), c)),
                ) => {
                    let e = self.encoder_index(c.context);
                    let co = &outputs[e];
                    let nk = batch * co.len;
                    let cw = self.cfg.width(c.context);
                    b.copy(d_copy.view_mut(), d_z.view())?;
                    b.scale_rows(d_copy.view_mut(), gate.view())?;
                    b.zero(d_attn.view_mut())?;
                    {
                        let [gw, gb] = g.get_disjoint_mut([c.o.0, c.o.1]).expect("distinct");
                        b.linear_backward(
                            Some(d_attn.view_mut()),
                            Some(gw.rb()),
                            Some(gb.rb()),
                            d_copy.view(),
                            attn.view(),
                            p[c.o.0],
                            lin(rows, d, d),
                        )?;
                    }
                    let mut dk_v = dk.view_mut().slice_mut(0, nk * d)?;
                    let mut dv_v = dv.view_mut().slice_mut(0, nk * d)?;
                    b.zero(dq.view_mut())?;
                    b.zero(dk_v.rb())?;
                    b.zero(dv_v.rb())?;
                    let dims = AttentionDims::new(batch, c.heads, n, co.len, d / c.heads);
                    b.attention_backward(
                        dq.view_mut(),
                        dk_v.rb(),
                        dv_v.rb(),
                        None,
                        d_attn.view(),
                        attn.view(),
                        lse.view(),
                        q.view(),
                        k.view(),
                        v.view(),
                        Some(kv_lens[e].view()),
                        None,
                        &dims,
                    )?;
                    b.zero(d_ln.view_mut())?;
                    {
                        let [gw, gb] = g.get_disjoint_mut([c.q.0, c.q.1]).expect("distinct");
                        b.linear_backward(
                            Some(d_ln.view_mut()),
                            Some(gw.rb()),
                            Some(gb.rb()),
                            dq.view(),
                            ln.view(),
                            p[c.q.0],
                            lin(rows, d, d),
                        )?;
                    }
                    // The key bias's gradient is exactly zero (see the cross-attention aggregator).
                    for (proj, dy, bias_grad) in
                        [(c.k, dk_v.view(), false), (c.v, dv_v.view(), true)]
                    {
                        let [gw, gb] = g.get_disjoint_mut([proj.0, proj.1]).expect("distinct");
                        let dx = d_ctx[e].as_mut().map(|t| t.view_mut());
                        b.linear_backward(
                            dx,
                            Some(gw.rb()),
                            bias_grad.then(|| gb.rb()),
                            dy,
                            co.hidden,
                            p[proj.0],
                            lin(nk, cw, d),
                        )?;
                    }
                    let [gw, gb] = g.get_disjoint_mut([*lnw, *lnb]).expect("distinct");
                    b.layernorm_backward(
                        d_z.view_mut(),
                        gw.rb(),
                        gb.rb(),
                        d_ln.view(),
                        z,
                        p[*lnw],
                        mean.view(),
                        rstd.view(),
                    )?;
                }
                _ => unreachable!("stages follow the plan"),
            }
        }
        // Every sample's latents are the same parameter: sum over the batch.
        b.sum_rows(g[pp.latents].rb(), d_z.view())
    }
}
