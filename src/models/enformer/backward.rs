//! The Enformer trunk's backward over the backend trait: from `∂loss/∂embeddings` through the final
//! block, the transformer, the tower and the stem, adding every parameter's gradient (running statistics
//! get none). Three gradient buffers carry the stream gradients (a module's input and output gradients,
//! and one residual copy), sized by the largest; the module internals have their own.

use super::forward::{ensure, EnformerActivations};
use super::{crop_range, AttnLayer, BatchNormMode, ConvBlock, EnformerTrunk, BN_EPS};
use crate::backend::{Act, Backend, LinearDims, PoolDims, Role, Tensor, View, ViewMut};
use crate::{Error, Result};

/// Gradient buffers of one backward, planned on the first call of a shape.
pub(crate) struct Grads<B: Backend> {
    ring: [Option<Tensor<B>>; 3],
    d_gelu: Option<Tensor<B>>,
    d_normed: Option<Tensor<B>>,
    d_act: Option<Tensor<B>>,
    d_pre: Option<Tensor<B>>,
    d_ln: Option<Tensor<B>>,
    d_attn: Option<Tensor<B>>,
    dqc: Option<Tensor<B>>,
    dqp: Option<Tensor<B>>,
    dq: Option<Tensor<B>>,
    dk: Option<Tensor<B>>,
    dv: Option<Tensor<B>>,
    dbias: Option<Tensor<B>>,
    drel: Option<Tensor<B>>,
}

impl<B: Backend> Default for Grads<B> {
    fn default() -> Self {
        Grads {
            ring: [None, None, None],
            d_gelu: None,
            d_normed: None,
            d_act: None,
            d_pre: None,
            d_ln: None,
            d_attn: None,
            dqc: None,
            dqp: None,
            dq: None,
            dk: None,
            dv: None,
            dbias: None,
            drel: None,
        }
    }
}

/// A zeroed activation-gradient buffer of `numel` elements.
fn zeroed<'t, B: Backend>(
    b: &B,
    slot: &'t mut Option<Tensor<B>>,
    numel: usize,
) -> Result<&'t mut Tensor<B>> {
    ensure(b, slot, Role::Activation, numel)?;
    let t = slot.as_mut().expect("ensured");
    b.zero(t.view_mut())?;
    Ok(t)
}

fn ring3<B: Backend>(ring: &mut [Option<Tensor<B>>; 3]) -> [&mut Tensor<B>; 3] {
    let [a, b, c] = ring;
    [
        a.as_mut().expect("ensured"),
        b.as_mut().expect("ensured"),
        c.as_mut().expect("ensured"),
    ]
}

impl EnformerTrunk {
    /// Adds the gradients of a loss with `d_emb = ∂loss/∂embeddings` (`[B, T, 2·dim]`) into `grads` (one
    /// f32 view per layout entry). Needs a forward run with `keep`.
    pub fn backward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        d_emb: View<'_, B>,
        grads: &mut [ViewMut<'_, B>],
    ) -> Result<()> {
        let entries = self.layout.entries().len();
        if p.len() != entries || grads.len() != entries {
            return Err(Error::shape(
                "enformer backward",
                "one parameter and one gradient view per layout entry",
            ));
        }
        if !acts.keep || acts.out_len == 0 || acts.trace.layers.len() != self.layers.len() {
            return Err(Error::invalid(
                "backward",
                "the forward was run without keeping activations",
            ));
        }
        let (batch, dim, half) = (acts.batch, self.cfg.dim, self.cfg.dim / 2);
        let (n, out_len, seq_len) = (acts.transformer_len, acts.out_len, acts.seq_len);
        if d_emb.numel() != batch * out_len * 2 * dim {
            return Err(Error::shape(
                "enformer backward",
                format!(
                    "d_emb has {} values, the embeddings {}",
                    d_emb.numel(),
                    batch * out_len * 2 * dim
                ),
            ));
        }
        let (train, mode) = (acts.mode == BatchNormMode::Train, acts.mode);
        let tr = acts.trace.clone();
        let mut g = acts.backward.take().unwrap_or_default();
        let max_numel = batch * seq_len * half;
        for slot in g.ring.iter_mut() {
            ensure(b, slot, Role::Activation, max_numel)?;
        }
        // The ConvBlock scratch at its widest (blocks run from the narrowest up): made once per step.
        let widest = self.conv_block_extent(n, seq_len).0.saturating_mul(batch);
        ensure(b, &mut g.d_gelu, Role::Activation, widest)?;
        ensure(b, &mut g.d_normed, Role::Activation, widest)?;
        let result = (|| -> Result<()> {
            let last = tr.blocks.last().copied().ok_or_else(|| {
                Error::invalid("enformer backward", "the forward kept no ConvBlock")
            })?;
            // Final GELU and pointwise block: d_pre (B), d_cropped (C).
            {
                let [_, gb, gc] = ring3(&mut g.ring);
                gb.ensure(b, Role::Activation, batch * out_len * 2 * dim)?;
                b.zero(gb.view_mut())?;
                b.activation_backward(
                    gb.view_mut(),
                    d_emb,
                    acts.streams[tr.pre].view(),
                    Act::GeluSigmoid,
                )?;
                gc.ensure(b, Role::Activation, batch * out_len * dim)?;
                b.zero(gc.view_mut())?;
            }
            self.block_backward(
                b,
                p,
                grads,
                &mut g,
                acts,
                &self.final_block,
                last,
                tr.cropped,
                1,
                2,
                batch,
                out_len,
                train,
            )?;
            // Un-crop into d_trunk (A).
            {
                let [ga, _, gc] = ring3(&mut g.ring);
                ga.ensure(b, Role::Activation, batch * n * dim)?;
                b.zero(ga.view_mut())?;
                let (start, _) = crop_range(n, self.cfg.target_length);
                let (src, mut dst) = (gc.view(), ga.view_mut());
                for bb in 0..batch {
                    b.copy(
                        dst.rb().slice_mut((bb * n + start) * dim, out_len * dim)?,
                        src.slice(bb * out_len * dim, out_len * dim)?,
                    )?;
                }
            }
            // Transformer, last layer first: the gradient stays in A.
            for (l, layer) in self.layers.iter().enumerate().rev() {
                let (x, mid, out, slot) = tr.layers[l];
                if acts.checkpoints {
                    self.attention_layer(b, p, acts, layer, slot, x, mid, out, batch, n)?;
                } else {
                    self.relative_bias(b, acts, slot, batch, n)?;
                }
                self.layer_backward(b, p, grads, &mut g, acts, layer, slot, x, mid, batch, n)?;
            }
            // Tower, last level first: ∂pooled in A → ∂x in A.
            let mut len = n;
            for (t, tb) in self.tower.iter().enumerate().rev() {
                if acts.checkpoints {
                    self.tower_forward(b, p, acts, t, batch, mode)?;
                }
                let lv = tr.tower[t];
                let pre_len = len * 2;
                let c = tb.channels;
                {
                    let [ga, gb, _] = ring3(&mut g.ring);
                    gb.ensure(b, Role::Activation, batch * pre_len * c)?;
                    b.zero(gb.view_mut())?;
                    b.attention_pool_backward(
                        gb.view_mut(),
                        grads[tb.pool].rb(),
                        ga.view(),
                        acts.streams[lv.z].view(),
                        p[tb.pool],
                        acts.pool_logits[lv.pool].view(),
                        &PoolDims {
                            batch,
                            len: pre_len,
                            channels: c,
                        },
                    )?;
                }
                // z = y + CB₁(y): ∂y = ∂z + CB₁ᵀ(∂z), in C.
                self.copy_ring(b, &mut g, 1, 2, batch * pre_len * c)?;
                self.block_backward(
                    b,
                    p,
                    grads,
                    &mut g,
                    acts,
                    &tb.residual,
                    lv.residual_block,
                    lv.y,
                    1,
                    2,
                    batch,
                    pre_len,
                    train,
                )?;
                // y = CB₅(x): ∂x in A.
                {
                    let [ga, _, _] = ring3(&mut g.ring);
                    ga.ensure(b, Role::Activation, batch * pre_len * tb.conv.c_in)?;
                    b.zero(ga.view_mut())?;
                }
                self.block_backward(
                    b,
                    p,
                    grads,
                    &mut g,
                    acts,
                    &tb.conv,
                    lv.first_block,
                    lv.x_in,
                    2,
                    0,
                    batch,
                    pre_len,
                    train,
                )?;
                len = pre_len;
            }
            // Stem: pooled = Pool(r), r = x0 + CB₁(x0), x0 = conv15(one-hot).
            let stem_len = len * 2;
            debug_assert_eq!(stem_len, seq_len);
            if acts.checkpoints {
                self.stem_forward(b, p, acts, batch, mode)?;
            }
            {
                let [ga, gb, _] = ring3(&mut g.ring);
                gb.ensure(b, Role::Activation, batch * stem_len * half)?;
                b.zero(gb.view_mut())?;
                b.attention_pool_backward(
                    gb.view_mut(),
                    grads[self.stem_pool].rb(),
                    ga.view(),
                    acts.streams[tr.stem.z].view(),
                    p[self.stem_pool],
                    acts.pool_logits[tr.stem.pool].view(),
                    &PoolDims {
                        batch,
                        len: stem_len,
                        channels: half,
                    },
                )?;
            }
            self.copy_ring(b, &mut g, 1, 2, batch * stem_len * half)?;
            self.block_backward(
                b,
                p,
                grads,
                &mut g,
                acts,
                &self.stem_residual,
                tr.stem.residual_block,
                tr.stem.y,
                1,
                2,
                batch,
                stem_len,
                train,
            )?;
            let [_, _, gc] = ring3(&mut g.ring);
            let [gw, gb] = grads
                .get_disjoint_mut([self.stem_conv.0, self.stem_conv.1])
                .map_err(|_| Error::invalid("enformer backward", "stem parameters overlap"))?;
            b.conv1d_backward(
                None,
                gw.rb(),
                Some(gb.rb()),
                gc.view(),
                acts.input.as_ref().expect("kept").view(),
                p[self.stem_conv.0],
                &crate::backend::Conv1dDims {
                    batch,
                    len: stem_len,
                    c_in: 4,
                    c_out: half,
                    width: 15,
                },
            )
        })();
        acts.backward = Some(g);
        result
    }

    /// `ring[to] = ring[from]` over `numel` elements.
    fn copy_ring<B: Backend>(
        &self,
        b: &B,
        g: &mut Grads<B>,
        from: usize,
        to: usize,
        numel: usize,
    ) -> Result<()> {
        let [a, bb, c] = ring3(&mut g.ring);
        let (src, dst): (&Tensor<B>, &mut Tensor<B>) = match (from, to) {
            (0, 1) => (a, bb),
            (0, 2) => (a, c),
            (1, 0) => (bb, a),
            (1, 2) => (bb, c),
            (2, 0) => (c, a),
            (2, 1) => (c, bb),
            _ => {
                return Err(Error::invalid(
                    "enformer backward",
                    "copy within one gradient buffer",
                ))
            }
        };
        dst.ensure(b, Role::Activation, numel)?;
        b.copy(dst.view_mut(), src.view().slice(0, numel)?)
    }

    /// Backward of a ConvBlock with input stream `x`, output gradient `ring[dout]`, adding the input
    /// gradient into `ring[dx]` (which the caller sized and initialised).
    fn block_backward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        grads: &mut [ViewMut<'_, B>],
        g: &mut Grads<B>,
        acts: &EnformerActivations<B>,
        cb: &ConvBlock,
        block: usize,
        x: usize,
        dout: usize,
        dx: usize,
        batch: usize,
        len: usize,
        train: bool,
    ) -> Result<()> {
        let blk = acts.blocks.get(block).ok_or_else(|| {
            Error::invalid("enformer backward", "the forward kept no such ConvBlock")
        })?;
        let rows = batch * len;
        let d_gelu = zeroed(b, &mut g.d_gelu, rows * cb.c_in)?;
        {
            let [gw, gbias] = grads
                .get_disjoint_mut([cb.conv_w, cb.conv_b])
                .map_err(|_| Error::invalid("enformer backward", "conv parameters overlap"))?;
            let ring = ring3(&mut g.ring);
            b.conv1d_backward(
                Some(d_gelu.view_mut()),
                gw.rb(),
                Some(gbias.rb()),
                ring[dout].view().slice(0, rows * cb.c_out)?,
                blk.gelu.view(),
                p[cb.conv_w],
                &cb.dims(batch, len),
            )?;
        }
        let d_gelu = g.d_gelu.as_ref().expect("ensured").view();
        let d_normed = zeroed(b, &mut g.d_normed, rows * cb.c_in)?;
        b.activation_backward(
            d_normed.view_mut(),
            d_gelu,
            blk.normed.view(),
            Act::GeluSigmoid,
        )?;
        let [gw, gbias] = grads
            .get_disjoint_mut([cb.bn[0], cb.bn[1]])
            .map_err(|_| Error::invalid("enformer backward", "batchnorm parameters overlap"))?;
        let ring = ring3(&mut g.ring);
        b.batchnorm_backward(
            ring[dx].view_mut().slice_mut(0, rows * cb.c_in)?,
            gw.rb(),
            gbias.rb(),
            g.d_normed.as_ref().expect("ensured").view(),
            acts.streams[x].view(),
            p[cb.bn[0]],
            blk.mean.view(),
            blk.var.view(),
            BN_EPS,
            train,
        )?;
        Ok(())
    }

    /// Backward of transformer layer `l` (input stream `x`, middle stream `mid`): the output gradient in
    /// `ring[0]` is replaced by the input gradient; `ring[1]` is scratch.
    fn layer_backward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        grads: &mut [ViewMut<'_, B>],
        g: &mut Grads<B>,
        acts: &EnformerActivations<B>,
        l: &AttnLayer,
        li: usize,
        x: usize,
        mid: usize,
        batch: usize,
        n: usize,
    ) -> Result<()> {
        let (dim, heads, dk) = (self.cfg.dim, self.cfg.heads, self.cfg.attn_dim_key);
        let (rows, hk, rel) = (batch * n, heads * dk, dim / heads);
        let lin = |d_in: usize, d_out: usize| LinearDims { rows, d_in, d_out };
        let a = &acts.layers[li];
        let numel = rows * dim;
        // out = mid + FFN(LN₂(mid)): ∂mid (B) = ∂out + LN₂ᵀ(FFNᵀ(∂out)).
        self.copy_ring(b, g, 0, 1, numel)?;
        let d_act = zeroed(b, &mut g.d_act, rows * 2 * dim)?;
        {
            let [gw, gbias] = grads
                .get_disjoint_mut([l.ff2.0, l.ff2.1])
                .map_err(overlap)?;
            let ring = ring3(&mut g.ring);
            b.linear_backward(
                Some(d_act.view_mut()),
                Some(gw.rb()),
                Some(gbias.rb()),
                ring[0].view().slice(0, numel)?,
                a.ff_act.view(),
                p[l.ff2.0],
                lin(2 * dim, dim),
            )?;
        }
        let d_pre = zeroed(b, &mut g.d_pre, rows * 2 * dim)?;
        b.activation_backward(
            d_pre.view_mut(),
            g.d_act.as_ref().expect("ensured").view(),
            a.ff_pre.view(),
            Act::Relu,
        )?;
        let d_ln = zeroed(b, &mut g.d_ln, numel)?;
        {
            let [gw, gbias] = grads
                .get_disjoint_mut([l.ff1.0, l.ff1.1])
                .map_err(overlap)?;
            b.linear_backward(
                Some(d_ln.view_mut()),
                Some(gw.rb()),
                Some(gbias.rb()),
                g.d_pre.as_ref().expect("ensured").view(),
                a.ln2.view(),
                p[l.ff1.0],
                lin(dim, 2 * dim),
            )?;
        }
        {
            let [gw, gbias] = grads
                .get_disjoint_mut([l.ln2.0, l.ln2.1])
                .map_err(overlap)?;
            let ring = ring3(&mut g.ring);
            let [_, rb, _] = ring;
            b.layernorm_backward(
                rb.view_mut().slice_mut(0, numel)?,
                gw.rb(),
                gbias.rb(),
                g.d_ln.as_ref().expect("ensured").view(),
                acts.streams[mid].view(),
                p[l.ln2.0],
                a.mean2.view(),
                a.rstd2.view(),
            )?;
        }
        // mid = x + Attn(LN₁(x)): ∂x (A) = ∂mid + LN₁ᵀ(…).
        self.copy_ring(b, g, 1, 0, numel)?;
        let d_attn = zeroed(b, &mut g.d_attn, numel)?;
        {
            let [gw, gbias] = grads
                .get_disjoint_mut([l.out.0, l.out.1])
                .map_err(overlap)?;
            let ring = ring3(&mut g.ring);
            b.linear_backward(
                Some(d_attn.view_mut()),
                Some(gw.rb()),
                Some(gbias.rb()),
                ring[1].view().slice(0, numel)?,
                a.attn.view(),
                p[l.out.0],
                lin(dim, dim),
            )?;
        }
        zeroed(b, &mut g.dqc, rows * hk)?;
        zeroed(b, &mut g.dk, rows * hk)?;
        zeroed(b, &mut g.dv, numel)?;
        ensure(b, &mut g.dbias, Role::Exact, batch * heads * n * n)?;
        b.zero(g.dbias.as_mut().expect("ensured").view_mut())?;
        b.attention_backward(
            g.dqc.as_mut().expect("ensured").view_mut(),
            g.dk.as_mut().expect("ensured").view_mut(),
            g.dv.as_mut().expect("ensured").view_mut(),
            Some(g.dbias.as_mut().expect("ensured").view_mut()),
            g.d_attn.as_ref().expect("ensured").view(),
            a.attn.view(),
            a.lse.view(),
            a.q_content.view(),
            a.k.view(),
            a.v.view(),
            None,
            Some((acts.rel_bias.as_ref().expect("recomputed").view(), true)),
            &self.attention_dims(batch, n),
        )?;
        // Relative logits: bias = shift(q_pos·Rᵀ), R = P·W_rᵀ.
        zeroed(b, &mut g.dqp, rows * hk)?;
        zeroed(b, &mut g.drel, (2 * n - 1) * hk)?;
        b.relative_logits_backward(
            g.dqp.as_mut().expect("ensured").view_mut(),
            g.drel.as_mut().expect("ensured").view_mut(),
            g.dbias.as_ref().expect("ensured").view(),
            a.q_pos.view(),
            a.rel_k.view(),
            batch,
            heads,
            n,
        )?;
        b.linear_backward(
            None,
            Some(grads[l.rel_k].rb()),
            None,
            g.drel.as_ref().expect("ensured").view(),
            acts.positions.as_ref().expect("kept").view(),
            p[l.rel_k],
            LinearDims {
                rows: 2 * n - 1,
                d_in: rel,
                d_out: hk,
            },
        )?;
        b.sum_rows(
            grads[l.content_bias].rb(),
            g.dqc.as_ref().expect("ensured").view(),
        )?;
        b.sum_rows(
            grads[l.pos_bias].rb(),
            g.dqp.as_ref().expect("ensured").view(),
        )?;
        // q_content and q_pos both come from q = dk^−½·(LN₁(x)·W_qᵀ).
        ensure(b, &mut g.dq, Role::Activation, rows * hk)?;
        b.add(
            g.dq.as_mut().expect("ensured").view_mut(),
            g.dqc.as_ref().expect("ensured").view(),
            g.dqp.as_ref().expect("ensured").view(),
        )?;
        b.scale_rows(
            g.dq.as_mut().expect("ensured").view_mut(),
            acts.q_scale.as_ref().expect("kept").view(),
        )?;
        let d_ln = zeroed(b, &mut g.d_ln, numel)?;
        let mut d_ln = d_ln.view_mut();
        for (grad, w, width) in [(&g.dq, l.q, hk), (&g.dk, l.k, hk), (&g.dv, l.v, dim)] {
            b.linear_backward(
                Some(d_ln.rb()),
                Some(grads[w].rb()),
                None,
                grad.as_ref().expect("ensured").view(),
                a.ln1.view(),
                p[w],
                lin(dim, width),
            )?;
        }
        let [gw, gbias] = grads
            .get_disjoint_mut([l.ln1.0, l.ln1.1])
            .map_err(overlap)?;
        let [ra, _, _] = ring3(&mut g.ring);
        b.layernorm_backward(
            ra.view_mut().slice_mut(0, numel)?,
            gw.rb(),
            gbias.rb(),
            g.d_ln.as_ref().expect("ensured").view(),
            acts.streams[x].view(),
            p[l.ln1.0],
            a.mean1.view(),
            a.rstd1.view(),
        )
    }
}

fn overlap(_: std::slice::GetDisjointMutError) -> Error {
    Error::invalid("enformer backward", "parameter entries overlap")
}
