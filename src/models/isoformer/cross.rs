//! One cross-attention block, forward and backward, shared by every aggregator that attends (the released
//! DNA-centred one, the modality-centred form and the Perceiver Resampler). It is the released
//! `MultiHeadAttention` with a gated residual:
//!
//! `out = residual + gate ∘ (W_o·Attn(W_q·x + b_q, W_k·c + b_k, W_v·c + b_v) + b_o)`
//!
//! where `x` is the query input (the stream itself, or its LayerNorm in the resampler), `c` the context
//! modality (narrower or wider than `x`), keys past each sample's length masked, and `gate` 1 or 0 per sample
//! (a missing modality). The attention is the backend's flash attention (log-sum-exp saved, scale d^-½).

use super::aggregate::lin;
use super::CrossAttnParams;
use crate::backend::{AttentionDims, Backend, Role, Tensor, View, ViewMut};
use crate::Result;

/// Sizes of one call: batch, query and context lengths (padded), context width.
#[derive(Clone, Copy, Debug)]
pub(super) struct CrossShape {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub context_width: usize,
}

/// What a block keeps for its backward.
pub(super) struct CrossActs<B: Backend> {
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    attn: Tensor<B>,
    lse: Tensor<B>,
    o: Tensor<B>,
    gate: Tensor<B>,
    out: Tensor<B>,
}

/// Backward scratch, grown to the largest block and reused.
pub(super) struct CrossScratch<B: Backend> {
    d_o: Tensor<B>,
    d_attn: Tensor<B>,
    dq: Tensor<B>,
    dk: Tensor<B>,
    dv: Tensor<B>,
}

impl<B: Backend> CrossActs<B> {
    pub fn new(b: &B) -> Result<Self> {
        let act = || Tensor::new(b, Role::Activation, 0);
        Ok(CrossActs {
            q: act()?,
            k: act()?,
            v: act()?,
            attn: act()?,
            lse: Tensor::new(b, Role::Exact, 0)?,
            o: act()?,
            gate: Tensor::new(b, Role::Exact, 0)?,
            out: act()?,
        })
    }

    /// The block's output `[batch, lq, width]`.
    pub fn out(&self) -> View<'_, B> {
        self.out.view()
    }
}

impl<B: Backend> CrossScratch<B> {
    pub fn new(b: &B) -> Result<Self> {
        let act = || Tensor::new(b, Role::Activation, 0);
        Ok(CrossScratch {
            d_o: act()?,
            d_attn: act()?,
            dq: act()?,
            dk: act()?,
            dv: act()?,
        })
    }

    /// Grows the scratch, before a backward, to the largest of the blocks given as (shape, width): each
    /// buffer is then made once per run, whatever order the blocks' sizes come in (a planned arena
    /// relies on the same allocations at every shape).
    pub fn reserve(
        &mut self,
        b: &B,
        blocks: impl IntoIterator<Item = (CrossShape, usize)>,
    ) -> Result<()> {
        let (mut nq, mut nk) = (0usize, 0usize);
        let overflow = || crate::Error::shape("cross-attention", "scratch size overflows");
        for (s, width) in blocks {
            let rows = |l: usize| s.batch.checked_mul(l)?.checked_mul(width);
            nq = nq.max(rows(s.lq).ok_or_else(overflow)?);
            nk = nk.max(rows(s.lk).ok_or_else(overflow)?);
        }
        for (t, n) in [
            (&mut self.d_o, nq),
            (&mut self.d_attn, nq),
            (&mut self.dq, nq),
            (&mut self.dk, nk),
            (&mut self.dv, nk),
        ] {
            if t.numel() < n {
                t.ensure(b, Role::Activation, n)?;
            }
        }
        Ok(())
    }
}

/// Grows `t` to at least `n` elements and returns a view of exactly `n`.
fn first<'a, B: Backend>(b: &B, t: &'a mut Tensor<B>, n: usize) -> Result<ViewMut<'a, B>> {
    if t.numel() < n {
        t.ensure(b, Role::Activation, n)?;
    }
    t.view_mut().slice_mut(0, n)
}

impl CrossAttnParams {
    fn dims(&self, s: CrossShape) -> AttentionDims {
        AttentionDims::new(s.batch, self.heads, s.lq, s.lk, self.width / self.heads)
    }

    /// `a.out = residual + gate ∘ (dense(attention(query(x), key(c), value(c))))`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        s: CrossShape,
        x: View<'_, B>,
        residual: View<'_, B>,
        context: View<'_, B>,
        kv_lens: View<'_, B>,
        gate: &[f32],
        a: &mut CrossActs<B>,
    ) -> Result<()> {
        let w = self.width;
        let (nq, nk) = (s.batch * s.lq, s.batch * s.lk);
        for (t, role, n) in [
            (&mut a.q, Role::Activation, nq * w),
            (&mut a.k, Role::Activation, nk * w),
            (&mut a.v, Role::Activation, nk * w),
            (&mut a.attn, Role::Activation, nq * w),
            (&mut a.lse, Role::Exact, s.batch * self.heads * s.lq),
            (&mut a.o, Role::Activation, nq * w),
            (&mut a.gate, Role::Exact, nq),
            (&mut a.out, Role::Activation, nq * w),
        ] {
            t.ensure(b, role, n)?;
        }
        let rows: Vec<f32> = (0..s.batch)
            .flat_map(|i| std::iter::repeat_n(gate.get(i).copied().unwrap_or(1.0), s.lq))
            .collect();
        b.write_f32(a.gate.view_mut(), &rows)?;
        let cw = s.context_width;
        b.linear(
            a.q.view_mut(),
            x,
            p[self.q.0],
            Some(p[self.q.1]),
            lin(nq, w, w),
        )?;
        b.linear(
            a.k.view_mut(),
            context,
            p[self.k.0],
            Some(p[self.k.1]),
            lin(nk, cw, w),
        )?;
        b.linear(
            a.v.view_mut(),
            context,
            p[self.v.0],
            Some(p[self.v.1]),
            lin(nk, cw, w),
        )?;
        b.attention(
            a.attn.view_mut(),
            a.lse.view_mut(),
            a.q.view(),
            a.k.view(),
            a.v.view(),
            Some(kv_lens),
            None,
            &self.dims(s),
        )?;
        b.linear(
            a.o.view_mut(),
            a.attn.view(),
            p[self.o.0],
            Some(p[self.o.1]),
            lin(nq, w, w),
        )?;
        b.scale_rows(a.o.view_mut(), a.gate.view())?;
        b.add(a.out.view_mut(), residual, a.o.view())
    }

    /// The backward of [`Self::forward`] given `d_out` (the gradient of `out`, which is also the residual's).
    /// The query input's gradient is added into `d_query`, or into `d_out` itself when `d_query` is `None`
    /// and the query input is the residual stream (`query_grad`); the context's into `d_context` when given.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        s: CrossShape,
        x: View<'_, B>,
        context: View<'_, B>,
        kv_lens: View<'_, B>,
        a: &CrossActs<B>,
        mut d_out: ViewMut<'_, B>,
        d_query: Option<ViewMut<'_, B>>,
        query_grad: bool,
        d_context: Option<ViewMut<'_, B>>,
        g: &mut [ViewMut<'_, B>],
        sc: &mut CrossScratch<B>,
    ) -> Result<()> {
        let w = self.width;
        let (nq, nk) = (s.batch * s.lq, s.batch * s.lk);
        let mut d_o = first(b, &mut sc.d_o, nq * w)?;
        b.copy(d_o.rb(), d_out.view())?;
        b.scale_rows(d_o.rb(), a.gate.view())?;
        let mut d_attn = first(b, &mut sc.d_attn, nq * w)?;
        b.zero(d_attn.rb())?;
        {
            let [gw, gb] = g
                .get_disjoint_mut([self.o.0, self.o.1])
                .expect("distinct entries");
            b.linear_backward(
                Some(d_attn.rb()),
                Some(gw.rb()),
                Some(gb.rb()),
                d_o.view(),
                a.attn.view(),
                p[self.o.0],
                lin(nq, w, w),
            )?;
        }
        let mut dq = first(b, &mut sc.dq, nq * w)?;
        let mut dk = first(b, &mut sc.dk, nk * w)?;
        let mut dv = first(b, &mut sc.dv, nk * w)?;
        for t in [&mut dq, &mut dk, &mut dv] {
            b.zero(t.rb())?;
        }
        b.attention_backward(
            dq.rb(),
            dk.rb(),
            dv.rb(),
            None,
            d_attn.view(),
            a.attn.view(),
            a.lse.view(),
            a.q.view(),
            a.k.view(),
            a.v.view(),
            Some(kv_lens),
            None,
            &self.dims(s),
        )?;
        {
            let [gw, gb] = g
                .get_disjoint_mut([self.q.0, self.q.1])
                .expect("distinct entries");
            let dx = match d_query {
                Some(d) => Some(d),
                None => query_grad.then(|| d_out.rb()),
            };
            b.linear_backward(
                dx,
                Some(gw.rb()),
                Some(gb.rb()),
                dq.view(),
                x,
                p[self.q.0],
                lin(nq, w, w),
            )?;
        }
        // The key bias adds q·b_k to every score of a row, which the softmax cancels: its gradient is exactly
        // zero, so it is not computed (it would be a sum of rounding noise).
        let mut d_context = d_context;
        let cw = s.context_width;
        for (proj, dy, bias_grad) in [(self.k, dk.view(), false), (self.v, dv.view(), true)] {
            let [gw, gb] = g
                .get_disjoint_mut([proj.0, proj.1])
                .expect("distinct entries");
            b.linear_backward(
                d_context.as_mut().map(|d| d.rb()),
                Some(gw.rb()),
                bias_grad.then(|| gb.rb()),
                dy,
                context,
                p[proj.0],
                lin(nk, cw, w),
            )?;
        }
        Ok(())
    }
}
