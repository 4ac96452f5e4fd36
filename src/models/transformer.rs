//! The pre-LN transformer encoder shared by ESM-2 and Nucleotide Transformer v2 (one block, with options):
//!
//! ```text
//! x = E[ids] (ESM-2: token-dropout scaling), padded rows zeroed
//! per layer:  h = LN₁(x);  q,k,v = h·Wᵀ + b;  q,k = RoPE(q,k);  x += softmax(q·kᵀ/√d + mask)·v · W_oᵀ + b_o
//!             h = LN₂(x);  x += FFN(h)      FFN = GELU(h·W₁ᵀ+b₁)·W₂ᵀ+b₂ (ESM-2) | SwiGLU(h·W₁ᵀ)·W₂ᵀ (NT-v2)
//! out = LN_f(x)
//! ```
//!
//! Written once over the [`Backend`] trait: the same code runs on the CPU reference (f32), the emulator
//! and CUDA (bf16 activations). Parameter names are the HF names without the `esm.` prefix, spelled only
//! in [`TransformerEncoder::new`]. The forward keeps what the backward needs when asked to (training,
//! gradient tests); for inference one layer's buffers serve every layer.

use std::sync::Arc;

use super::config::EsmConfig;
use super::recompute::Recompute;
use crate::backend::{
    unfused, Act, AttentionDims, Backend, Epilogue, HeadRows, LinearDims, Role, Tensor, View,
    ViewMut,
};
use crate::ops::rotary::RotaryTable;
use crate::runtime::{Layout, TensorSpec};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForward {
    /// `GELU(h·W₁ᵀ + b₁)·W₂ᵀ + b₂`, exact erf GELU (ESM-2).
    Gelu,
    /// `(silu(u₁) ∘ u₂)·W₂ᵀ` with `[u₁ | u₂] = h·W₁ᵀ`, no biases (NT-v2).
    SwiGlu,
}

impl FeedForward {
    /// The op that computes the input projection's output.
    pub fn epilogue(self) -> Epilogue {
        match self {
            FeedForward::Gelu => Epilogue::Activation,
            FeedForward::SwiGlu => Epilogue::SwiGlu,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TransformerConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// FFN inner width F (SwiGLU's first projection has 2F outputs).
    pub ffn_dim: usize,
    pub ffn: FeedForward,
    pub ln_eps: f32,
    /// ESM-2's token dropout at inference: zero `<mask>` rows and scale by `0.88 / (1 − mask ratio)`.
    pub token_dropout: bool,
    pub mask_token: u32,
}

impl TransformerConfig {
    pub fn esm2(c: &EsmConfig) -> Self {
        Self::from_esm_config(c, FeedForward::Gelu)
    }

    pub fn nucleotide_transformer_v2(c: &EsmConfig) -> Self {
        Self::from_esm_config(c, FeedForward::SwiGlu)
    }

    fn from_esm_config(c: &EsmConfig, ffn: FeedForward) -> Self {
        TransformerConfig {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            ffn_dim: c.intermediate_size,
            ffn,
            ln_eps: c.layer_norm_eps as f32,
            token_dropout: c.token_dropout,
            mask_token: c.mask_token_id,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn ffn_in_width(&self) -> usize {
        match self.ffn {
            FeedForward::Gelu => self.ffn_dim,
            FeedForward::SwiGlu => 2 * self.ffn_dim,
        }
    }
}

/// Positions of each layer's parameters in the layout.
#[derive(Clone, Debug)]
struct LayerParams {
    ln1: (usize, usize),
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    o: (usize, usize),
    ln2: (usize, usize),
    ffn_in: (usize, Option<usize>),
    ffn_out: (usize, Option<usize>),
}

/// The encoder: configuration, parameter layout, and rotary tables.
#[derive(Clone, Debug)]
pub struct TransformerEncoder {
    pub cfg: TransformerConfig,
    layout: Arc<Layout>,
    embed: usize,
    layers: Vec<LayerParams>,
    final_ln: (usize, usize),
    /// What a training forward keeps ([`Recompute`]).
    recompute: Recompute,
}

/// What a forward keeps for the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Saving {
    /// Nothing: two residual streams and one layer's buffers serve every layer.
    Inference,
    /// Every layer's input and activations.
    All,
    /// Every layer's input; one layer's activations, recomputed layer by layer in the backward.
    Checkpoints,
}

/// One layer's saved activations (or, for inference, the buffers every layer reuses).
struct LayerActs<B: Backend> {
    ln1: Tensor<B>,
    mean1: Tensor<B>,
    rstd1: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    q_rot: Tensor<B>,
    k_rot: Tensor<B>,
    attn: Tensor<B>,
    lse: Tensor<B>,
    mid: Tensor<B>,
    ln2: Tensor<B>,
    mean2: Tensor<B>,
    rstd2: Tensor<B>,
    ffn_pre: Tensor<B>,
    ffn_act: Tensor<B>,
}

/// Buffers of the backward pass, shared by every layer.
struct BackwardBuffers<B: Backend> {
    /// Gradient of the residual stream (ping-pong: the layer's output and its input).
    d_out: Tensor<B>,
    d_in: Tensor<B>,
    d_act: Tensor<B>,
    d_pre: Tensor<B>,
    d_ln: Tensor<B>,
    d_attn: Tensor<B>,
    dq_rot: Tensor<B>,
    dk_rot: Tensor<B>,
    dv: Tensor<B>,
    dq: Tensor<B>,
    dk: Tensor<B>,
}

/// The planned activations of one batch shape: allocated on the first call of a shape, then reused, so a
/// forward plus backward of the same shape allocates nothing.
struct Planned<B: Backend> {
    batch: usize,
    len: usize,
    saving: Saving,
    ids: Tensor<B>,
    kv_lens: Tensor<B>,
    /// Per-row embedding scale (token dropout × padding mask), f32.
    row_scale: Tensor<B>,
    /// Residual stream: when training, the input of every layer and the final one (`layers + 1`);
    /// for inference two that alternate.
    xs: Vec<Tensor<B>>,
    /// Scratch for the attention projection and the FFN output (not read by the backward).
    proj: Tensor<B>,
    /// One set per layer with [`Saving::All`], else one set every layer reuses.
    layers: Vec<LayerActs<B>>,
    final_mean: Tensor<B>,
    final_rstd: Tensor<B>,
    hidden: Tensor<B>,
    backward: Option<BackwardBuffers<B>>,
    /// Host copies for the backward's checks.
    host_ids: Vec<u32>,
}

/// Activations of the latest forward, on backend `B`.
pub struct EncoderActivations<B: Backend> {
    planned: Option<Planned<B>>,
    /// Rotary tables `[max_len, head_dim/2]` (f32).
    cos: Option<Tensor<B>>,
    sin: Option<Tensor<B>>,
    rotary_len: usize,
    /// The longest input expected ([`EncoderActivations::reserve_len`]).
    reserved_len: usize,
}

impl<B: Backend> Default for EncoderActivations<B> {
    fn default() -> Self {
        EncoderActivations {
            planned: None,
            cos: None,
            sin: None,
            rotary_len: 0,
            reserved_len: 0,
        }
    }
}

impl<B: Backend> EncoderActivations<B> {
    /// Makes the position tables, when first made, long enough for inputs of `len` tokens, so a
    /// longer batch later does not replace them (a run's step buffers are then made once).
    pub fn reserve_len(&mut self, len: usize) {
        self.reserved_len = self.reserved_len.max(len);
    }

    /// The last hidden state `[batch, len, hidden]` of the latest forward.
    pub fn hidden(&self) -> Result<View<'_, B>> {
        self.planned
            .as_ref()
            .map(|p| p.hidden.view())
            .ok_or_else(|| Error::invalid("encoder", "no forward has run"))
    }
}

fn act<B: Backend>(b: &B, n: usize) -> Result<Tensor<B>> {
    Tensor::new(b, Role::Activation, n)
}

fn exact<B: Backend>(b: &B, n: usize) -> Result<Tensor<B>> {
    Tensor::new(b, Role::Exact, n)
}

impl<B: Backend> LayerActs<B> {
    fn new(
        b: &B,
        cfg: &TransformerConfig,
        batch: usize,
        len: usize,
        saving: Saving,
    ) -> Result<Self> {
        let mut la = LayerActs {
            ln1: act(b, 0)?,
            mean1: exact(b, 0)?,
            rstd1: exact(b, 0)?,
            q: act(b, 0)?,
            k: act(b, 0)?,
            v: act(b, 0)?,
            q_rot: act(b, 0)?,
            k_rot: act(b, 0)?,
            attn: act(b, 0)?,
            lse: exact(b, 0)?,
            mid: act(b, 0)?,
            ln2: act(b, 0)?,
            mean2: exact(b, 0)?,
            rstd2: exact(b, 0)?,
            ffn_pre: act(b, 0)?,
            ffn_act: act(b, 0)?,
        };
        la.fit(b, cfg, batch, len, saving)?;
        Ok(la)
    }

    /// Sizes every buffer for this shape, reallocating only those that must grow. An inference forward
    /// on a backend that keeps the feed-forward's product out of memory
    /// ([`Backend::linear_epilogue_skips_pre`]) gets no pre-activation buffer.
    fn fit(
        &mut self,
        b: &B,
        cfg: &TransformerConfig,
        batch: usize,
        len: usize,
        saving: Saving,
    ) -> Result<()> {
        let (n, h) = (batch * len, cfg.hidden);
        let skip_pre =
            saving == Saving::Inference && b.linear_epilogue_skips_pre(cfg.ffn.epilogue());
        let ffn_pre = if skip_pre { 0 } else { n * cfg.ffn_in_width() };
        // Nothing writes rotated copies of q and k where the attention reads head-major rows.
        let dims = AttentionDims::new(batch, cfg.heads, len, len, cfg.head_dim());
        let rotated = if saving == Saving::Inference && b.reads_heads_contiguously(&dims) {
            0
        } else {
            n * h
        };
        for (t, role, numel) in [
            (&mut self.ln1, Role::LinearInput, n * h),
            (&mut self.mean1, Role::Exact, n),
            (&mut self.rstd1, Role::Exact, n),
            (&mut self.q, Role::Activation, n * h),
            (&mut self.k, Role::Activation, n * h),
            (&mut self.v, Role::Activation, n * h),
            (&mut self.q_rot, Role::Activation, rotated),
            (&mut self.k_rot, Role::Activation, rotated),
            (&mut self.attn, Role::LinearInput, n * h),
            (&mut self.lse, Role::Exact, batch * cfg.heads * len),
            (&mut self.mid, Role::Activation, n * h),
            (&mut self.ln2, Role::LinearInput, n * h),
            (&mut self.mean2, Role::Exact, n),
            (&mut self.rstd2, Role::Exact, n),
            (&mut self.ffn_pre, Role::Activation, ffn_pre),
            (&mut self.ffn_act, Role::LinearInput, n * cfg.ffn_dim),
        ] {
            t.ensure(b, role, numel)?;
        }
        Ok(())
    }
}

impl<B: Backend> BackwardBuffers<B> {
    fn new(b: &B, cfg: &TransformerConfig, n: usize) -> Result<Self> {
        let mut bw = BackwardBuffers {
            d_out: act(b, 0)?,
            d_in: act(b, 0)?,
            d_act: act(b, 0)?,
            d_pre: act(b, 0)?,
            d_ln: act(b, 0)?,
            d_attn: act(b, 0)?,
            dq_rot: act(b, 0)?,
            dk_rot: act(b, 0)?,
            dv: act(b, 0)?,
            dq: act(b, 0)?,
            dk: act(b, 0)?,
        };
        bw.fit(b, cfg, n)?;
        Ok(bw)
    }

    fn fit(&mut self, b: &B, cfg: &TransformerConfig, n: usize) -> Result<()> {
        let h = cfg.hidden;
        for (t, numel) in [
            (&mut self.d_out, n * h),
            (&mut self.d_in, n * h),
            (&mut self.d_act, n * cfg.ffn_dim),
            (&mut self.d_pre, n * cfg.ffn_in_width()),
            (&mut self.d_ln, n * h),
            (&mut self.d_attn, n * h),
            (&mut self.dq_rot, n * h),
            (&mut self.dk_rot, n * h),
            (&mut self.dv, n * h),
            (&mut self.dq, n * h),
            (&mut self.dk, n * h),
        ] {
            t.ensure(b, Role::Activation, numel)?;
        }
        Ok(())
    }
}

impl<B: Backend> Planned<B> {
    /// Sizes every buffer for `batch × len`, reallocating only those that must grow: batches of
    /// decreasing length (as `embed` sorts them) reuse the first batch's memory.
    fn fit(&mut self, b: &B, cfg: &TransformerConfig, batch: usize, len: usize) -> Result<()> {
        let (n, h) = (batch * len, cfg.hidden);
        self.batch = batch;
        self.len = len;
        self.ids.ensure(b, Role::Index, n)?;
        self.kv_lens.ensure(b, Role::Index, batch)?;
        for (t, role, numel) in [
            (&mut self.row_scale, Role::Exact, n),
            (&mut self.proj, Role::Activation, n * h),
            (&mut self.final_mean, Role::Exact, n),
            (&mut self.final_rstd, Role::Exact, n),
            (&mut self.hidden, Role::Activation, n * h),
        ] {
            t.ensure(b, role, numel)?;
        }
        for x in self.xs.iter_mut() {
            x.ensure(b, Role::Activation, n * h)?;
        }
        for la in self.layers.iter_mut() {
            la.fit(b, cfg, batch, len, self.saving)?;
        }
        if let Some(bw) = self.backward.as_mut() {
            bw.fit(b, cfg, n)?;
        }
        Ok(())
    }
}

impl TransformerEncoder {
    pub fn new(cfg: TransformerConfig) -> Result<Self> {
        if cfg.heads == 0
            || !cfg.hidden.is_multiple_of(cfg.heads)
            || !cfg.head_dim().is_multiple_of(2)
        {
            return Err(Error::invalid(
                "transformer config",
                format!(
                    "hidden {} into {} heads of even width",
                    cfg.hidden, cfg.heads
                ),
            ));
        }
        let (h, f) = (cfg.hidden, cfg.ffn_dim);
        let mut specs = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| {
            specs.push(TensorSpec::f32(name, shape));
            specs.len() - 1
        };
        let embed = push(
            "embeddings.word_embeddings.weight".into(),
            vec![cfg.vocab, h],
        );
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let p = format!("encoder.layer.{l}.");
            let mut pair = |name: &str, w: Vec<usize>, bias: bool| {
                let wi = push(format!("{p}{name}.weight"), w.clone());
                let bi = if bias {
                    Some(push(format!("{p}{name}.bias"), vec![w[0]]))
                } else {
                    None
                };
                (wi, bi)
            };
            let lin = |x: (usize, Option<usize>)| (x.0, x.1.expect("biased"));
            let ln1 = lin(pair("attention.LayerNorm", vec![h], true));
            let q = lin(pair("attention.self.query", vec![h, h], true));
            let k = lin(pair("attention.self.key", vec![h, h], true));
            let v = lin(pair("attention.self.value", vec![h, h], true));
            let o = lin(pair("attention.output.dense", vec![h, h], true));
            let ln2 = lin(pair("LayerNorm", vec![h], true));
            let bias = cfg.ffn == FeedForward::Gelu;
            let ffn_in = pair("intermediate.dense", vec![cfg.ffn_in_width(), h], bias);
            let ffn_out = pair("output.dense", vec![h, f], bias);
            layers.push(LayerParams {
                ln1,
                q,
                k,
                v,
                o,
                ln2,
                ffn_in,
                ffn_out,
            });
        }
        let fw = push("encoder.emb_layer_norm_after.weight".into(), vec![h]);
        let fb = push("encoder.emb_layer_norm_after.bias".into(), vec![h]);
        Ok(TransformerEncoder {
            cfg,
            layout: Arc::new(Layout::sequential(specs)?),
            embed,
            layers,
            final_ln: (fw, fb),
            recompute: Recompute::None,
        })
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// What a training forward keeps from now on (the next forward plans its buffers for it).
    pub fn set_recompute(&mut self, policy: Recompute) {
        self.recompute = policy;
    }

    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// The factor each embedding row is multiplied by: ESM-2's token dropout (`<mask>` rows zeroed, the rest
    /// scaled by `0.88 / (1 − mask ratio)`) and the padding mask (padded rows zeroed).
    pub fn embedding_row_scales(&self, ids: &[u32], lens: &[usize], len: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len());
        for (b, &l) in lens.iter().enumerate() {
            let row = &ids[b * len..(b + 1) * len];
            let scale = if self.cfg.token_dropout {
                let masked = row[..l]
                    .iter()
                    .filter(|&&t| t == self.cfg.mask_token)
                    .count() as f32;
                (1.0 - 0.15 * 0.8) / (1.0 - masked / l as f32)
            } else {
                1.0
            };
            for (t, &id) in row.iter().enumerate() {
                let dropped = self.cfg.token_dropout && id == self.cfg.mask_token;
                out.push(if t < l && !dropped { scale } else { 0.0 });
            }
        }
        out
    }

    /// Plans (or reuses) the activations for this batch shape and writes the inputs.
    fn prepare<B: Backend>(
        &self,
        b: &B,
        acts: &mut EncoderActivations<B>,
        ids: &[u32],
        lens: &[usize],
        len: usize,
        saving: Saving,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let batch = lens.len();
        if batch == 0 || Some(ids.len()) != batch.checked_mul(len) {
            return Err(Error::shape(
                "encoder",
                format!("{} ids for {batch} sequences of {len}", ids.len()),
            ));
        }
        if let Some((i, l)) = lens.iter().enumerate().find(|(_, &l)| l > len || l == 0) {
            return Err(Error::invalid(
                "sequence length",
                format!("sequence {i} has length {l}, padded length {len}"),
            ));
        }
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= cfg.vocab)
        {
            return Err(Error::invalid(
                "token id",
                format!(
                    "{id} at position {i} is outside the vocabulary of {}",
                    cfg.vocab
                ),
            ));
        }
        if len > acts.rotary_len {
            let table =
                RotaryTable::new(len.max(64).max(acts.reserved_len), cfg.head_dim(), 10_000.0)?;
            acts.cos = Some(Tensor::from_f32(b, Role::Exact, table.cos())?);
            acts.sin = Some(Tensor::from_f32(b, Role::Exact, table.sin())?);
            acts.rotary_len = table.max_len();
        }
        let same_plan = acts.planned.as_ref().is_some_and(|p| p.saving == saving);
        if same_plan {
            let p = acts.planned.as_mut().expect("checked");
            p.fit(b, cfg, batch, len)?;
        } else {
            // Free the old plan's buffers before making the new one, so both never coexist.
            acts.planned = None;
            let (n, h) = (batch * len, cfg.hidden);
            let (streams, layer_sets) = match saving {
                Saving::Inference => (2, 1),
                Saving::All => (cfg.layers + 1, cfg.layers),
                Saving::Checkpoints => (cfg.layers + 1, 1),
            };
            acts.planned = Some(Planned {
                batch,
                len,
                saving,
                ids: Tensor::new(b, Role::Index, n)?,
                kv_lens: Tensor::new(b, Role::Index, batch)?,
                row_scale: exact(b, n)?,
                xs: (0..streams).map(|_| act(b, n * h)).collect::<Result<_>>()?,
                proj: act(b, n * h)?,
                layers: (0..layer_sets)
                    .map(|_| LayerActs::new(b, cfg, batch, len, saving))
                    .collect::<Result<_>>()?,
                final_mean: exact(b, n)?,
                final_rstd: exact(b, n)?,
                hidden: act(b, n * h)?,
                backward: None,
                host_ids: Vec::with_capacity(n),
            });
        }
        let p = acts.planned.as_mut().expect("planned above");
        let ids_i32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        b.write_i32(p.ids.view_mut(), &ids_i32)?;
        let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        b.write_i32(p.kv_lens.view_mut(), &lens_i32)?;
        b.write_f32(
            p.row_scale.view_mut(),
            &self.embedding_row_scales(ids, lens, len),
        )?;
        p.host_ids.clear();
        p.host_ids.extend_from_slice(ids);
        Ok(())
    }

    fn lin(&self, rows: usize, d_in: usize, d_out: usize) -> LinearDims {
        LinearDims { rows, d_in, d_out }
    }

    /// Forward for `ids [batch, len]` (right-padded, `lens` real tokens each) with parameters `p` (one view
    /// per layout entry). The last hidden state is in `acts.hidden()`. With `keep_all`, what
    /// [`Self::backward`] needs is kept, as the encoder's [`Recompute`] policy says.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        ids: &[u32],
        lens: &[usize],
        len: usize,
        acts: &mut EncoderActivations<B>,
        keep_all: bool,
    ) -> Result<()> {
        self.check_params(p)?;
        let saving = match (keep_all, self.recompute) {
            (false, _) => Saving::Inference,
            (true, Recompute::None) => Saving::All,
            (true, Recompute::Blocks) => Saving::Checkpoints,
        };
        self.prepare(b, acts, ids, lens, len, saving)?;
        let cfg = &self.cfg;
        let (cos, sin) = (
            acts.cos.as_ref().expect("prepared").view(),
            acts.sin.as_ref().expect("prepared").view(),
        );
        let pl = acts.planned.as_mut().expect("prepared");
        b.embedding(pl.xs[0].view_mut(), pl.ids.view(), p[self.embed])?;
        b.scale_rows(pl.xs[0].view_mut(), pl.row_scale.view())?;
        let rope = Rope { cos, sin };
        for (l, lp) in self.layers.iter().enumerate() {
            let (si, so) = match pl.saving {
                Saving::Inference => (l % 2, (l + 1) % 2),
                Saving::All | Saving::Checkpoints => (l, l + 1),
            };
            let li = if pl.saving == Saving::All { l } else { 0 };
            let [x_in, x_out] = pl.xs.get_disjoint_mut([si, so]).expect("distinct streams");
            self.layer_forward(
                b,
                p,
                lp,
                &mut pl.layers[li],
                &mut pl.proj,
                x_in.view(),
                Some(x_out.view_mut()),
                pl.kv_lens.view(),
                rope,
                (pl.batch, pl.len),
                pl.saving != Saving::Inference,
            )?;
        }
        let last = match pl.saving {
            Saving::Inference => cfg.layers % 2,
            Saving::All | Saving::Checkpoints => cfg.layers,
        };
        let (fw, fb) = self.final_ln;
        b.layernorm(
            pl.hidden.view_mut(),
            pl.final_mean.view_mut(),
            pl.final_rstd.view_mut(),
            pl.xs[last].view(),
            p[fw],
            p[fb],
            cfg.ln_eps,
        )
    }

    /// One layer: `mid = x_in + Attn(LN₁(x_in))·W_oᵀ + b_o`, then `x_out = mid + FFN(LN₂(mid))`, saving
    /// what the backward reads in `la` where `keep` (else a backend may skip what only the backward reads,
    /// such as the SwiGLU pre-activation). Without `x_out` (a recompute in the backward) it stops once every
    /// saved activation is written: the FFN's output projection and the residual add are not needed.
    fn layer_forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        lp: &LayerParams,
        la: &mut LayerActs<B>,
        proj: &mut Tensor<B>,
        x_in: View<'_, B>,
        x_out: Option<ViewMut<'_, B>>,
        kv_lens: View<'_, B>,
        rope: Rope<'_, B>,
        (batch, len): (usize, usize),
        keep: bool,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (n, h, hd) = (batch * len, cfg.hidden, cfg.head_dim());
        b.layernorm(
            la.ln1.view_mut(),
            la.mean1.view_mut(),
            la.rstd1.view_mut(),
            x_in,
            p[lp.ln1.0],
            p[lp.ln1.1],
            cfg.ln_eps,
        )?;
        let dims = AttentionDims::new(batch, cfg.heads, len, len, hd);
        // An inference forward on a backend whose attention reads each head's rows contiguously projects
        // q, k and v head-major (the backward reads them token-major: never when `keep`).
        let head_major = !keep && b.reads_heads_contiguously(&dims);
        for (out, (w, bias)) in [(&mut la.q, lp.q), (&mut la.k, lp.k), (&mut la.v, lp.v)] {
            let (y, x, w, bias, lin) = (
                out.view_mut(),
                la.ln1.view(),
                p[w],
                Some(p[bias]),
                self.lin(n, h, h),
            );
            if head_major {
                let heads = cfg.heads;
                b.linear_heads(y, x, w, bias, lin, HeadRows { len, heads })?;
            } else {
                b.linear(y, x, w, bias, lin)?;
            }
        }
        let (out, lse) = (la.attn.view_mut(), la.lse.view_mut());
        let rotated = (la.q_rot.view_mut(), la.k_rot.view_mut());
        let qkv = [la.q.view(), la.k.view(), la.v.view()];
        let tables = (rope.cos, rope.sin);
        if keep {
            // The backward reads the rotated rows: always the three ops, which write them.
            unfused::rotary_attention(b, out, lse, rotated, qkv, tables, Some(kv_lens), &dims)?;
        } else if head_major {
            let [q, k, v] = qkv;
            b.rotary_attention_heads(out, lse, q, k, v, tables, Some(kv_lens), &dims)?;
        } else {
            // Nothing reads the rotated rows after the attention: a backend may turn them as it reads them.
            let [q, k, v] = qkv;
            b.rotary_attention(out, lse, rotated, q, k, v, tables, Some(kv_lens), &dims)?;
        }
        // mid = x_in + attn·W_oᵀ + b_o, and LN₂(mid): the residual inside the product where the backend
        // adds it there (the same bits), else the residual add fused with the LayerNorm.
        let o_dims = self.lin(n, h, h);
        let (ln2_gamma, ln2_beta) = (p[lp.ln2.0], p[lp.ln2.1]);
        if b.fuses_linear_residual() {
            b.linear_residual(
                la.mid.view_mut(),
                la.attn.view(),
                p[lp.o.0],
                Some(p[lp.o.1]),
                x_in,
                proj.view_mut(),
                o_dims,
            )?;
            b.layernorm(
                la.ln2.view_mut(),
                la.mean2.view_mut(),
                la.rstd2.view_mut(),
                la.mid.view(),
                ln2_gamma,
                ln2_beta,
                cfg.ln_eps,
            )?;
        } else {
            b.linear(
                proj.view_mut(),
                la.attn.view(),
                p[lp.o.0],
                Some(p[lp.o.1]),
                o_dims,
            )?;
            b.residual_layernorm(
                la.mid.view_mut(),
                la.ln2.view_mut(),
                la.mean2.view_mut(),
                la.rstd2.view_mut(),
                x_in,
                proj.view(),
                ln2_gamma,
                ln2_beta,
                cfg.ln_eps,
            )?;
        }
        let ffn_in = self.lin(n, h, cfg.ffn_in_width());
        match cfg.ffn {
            FeedForward::Gelu => {
                let bias = lp
                    .ffn_in
                    .1
                    .ok_or_else(|| Error::invalid("encoder", "the GELU FFN has a bias"))?;
                b.linear_act(
                    la.ffn_pre.view_mut(),
                    la.ffn_act.view_mut(),
                    la.ln2.view(),
                    p[lp.ffn_in.0],
                    p[bias],
                    Act::GeluErf,
                    ffn_in,
                    keep,
                )?;
            }
            FeedForward::SwiGlu => {
                b.linear_swiglu(
                    la.ffn_pre.view_mut(),
                    la.ffn_act.view_mut(),
                    la.ln2.view(),
                    p[lp.ffn_in.0],
                    ffn_in,
                    keep,
                )?;
            }
        }
        let Some(x_out) = x_out else {
            return Ok(());
        };
        // x_out = mid + ffn_act·W_outᵀ + b_out, with `proj` the product's scratch where the backend needs it.
        b.linear_residual(
            x_out,
            la.ffn_act.view(),
            p[lp.ffn_out.0],
            lp.ffn_out.1.map(|i| p[i]),
            la.mid.view(),
            proj.view_mut(),
            self.lin(n, cfg.ffn_dim, h),
        )
    }

    fn check_params<V>(&self, p: &[V]) -> Result<()> {
        if p.len() != self.layout.entries().len() {
            return Err(Error::shape(
                "encoder",
                format!(
                    "{} parameter views for a layout of {}",
                    p.len(),
                    self.layout.entries().len()
                ),
            ));
        }
        Ok(())
    }

    /// Adds the gradients of a loss with `dhidden = ∂loss/∂hidden` into `grads` (one view per layout entry,
    /// f32). Needs a forward run with `keep_all`.
    pub fn backward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EncoderActivations<B>,
        dhidden: View<'_, B>,
        grads: &mut [ViewMut<'_, B>],
    ) -> Result<()> {
        self.check_params(p)?;
        self.check_params(grads)?;
        let cfg = &self.cfg;
        let (cos, sin) = match (&acts.cos, &acts.sin) {
            (Some(c), Some(s)) => (c.view(), s.view()),
            _ => return Err(Error::invalid("backward", "no forward has run")),
        };
        let pl = match acts.planned.as_mut() {
            Some(pl) if pl.saving != Saving::Inference => pl,
            _ => {
                return Err(Error::invalid(
                    "backward",
                    "the forward was run without keeping activations",
                ))
            }
        };
        let (batch, len, h, hd) = (pl.batch, pl.len, cfg.hidden, cfg.head_dim());
        let n = batch * len;
        if dhidden.numel() != n * h {
            return Err(Error::shape(
                "encoder backward",
                format!(
                    "dhidden has {} values, the forward made {}",
                    dhidden.numel(),
                    n * h
                ),
            ));
        }
        if pl.backward.is_none() {
            pl.backward = Some(BackwardBuffers::new(b, cfg, n)?);
        }
        let bw = pl.backward.as_mut().expect("allocated above");
        let dims = AttentionDims::new(batch, cfg.heads, len, len, hd);
        let (fw, fb) = self.final_ln;
        b.zero(bw.d_out.view_mut())?;
        {
            let [gw, gb] = grads.get_disjoint_mut([fw, fb]).expect("distinct entries");
            b.layernorm_backward(
                bw.d_out.view_mut(),
                gw.rb(),
                gb.rb(),
                dhidden,
                pl.xs[cfg.layers].view(),
                p[fw],
                pl.final_mean.view(),
                pl.final_rstd.view(),
            )?;
        }
        for (l, lp) in self.layers.iter().enumerate().rev() {
            let x_in = pl.xs[l].view();
            let la = if pl.saving == Saving::Checkpoints {
                self.layer_forward(
                    b,
                    p,
                    lp,
                    &mut pl.layers[0],
                    &mut pl.proj,
                    x_in,
                    None,
                    pl.kv_lens.view(),
                    Rope { cos, sin },
                    (batch, len),
                    true,
                )?;
                &pl.layers[0]
            } else {
                &pl.layers[l]
            };
            // FFN: x_out = mid + FFN(LN₂(mid)); d_out is ∂/∂x_out, and becomes ∂/∂mid.
            b.zero(bw.d_act.view_mut())?;
            {
                let (gw, gb) = grads_pair(grads, lp.ffn_out.0, lp.ffn_out.1);
                b.linear_backward(
                    Some(bw.d_act.view_mut()),
                    Some(gw),
                    gb,
                    bw.d_out.view(),
                    la.ffn_act.view(),
                    p[lp.ffn_out.0],
                    self.lin(n, cfg.ffn_dim, h),
                )?;
            }
            b.zero(bw.d_pre.view_mut())?;
            match cfg.ffn {
                FeedForward::Gelu => b.activation_backward(
                    bw.d_pre.view_mut(),
                    bw.d_act.view(),
                    la.ffn_pre.view(),
                    Act::GeluErf,
                )?,
                FeedForward::SwiGlu => b.swiglu_backward(
                    bw.d_pre.view_mut(),
                    bw.d_act.view(),
                    la.ffn_pre.view(),
                    cfg.ffn_dim,
                )?,
            }
            b.zero(bw.d_ln.view_mut())?;
            {
                let (gw, gb) = grads_pair(grads, lp.ffn_in.0, lp.ffn_in.1);
                b.linear_backward(
                    Some(bw.d_ln.view_mut()),
                    Some(gw),
                    gb,
                    bw.d_pre.view(),
                    la.ln2.view(),
                    p[lp.ffn_in.0],
                    self.lin(n, h, cfg.ffn_in_width()),
                )?;
            }
            {
                let [gw, gb] = grads
                    .get_disjoint_mut([lp.ln2.0, lp.ln2.1])
                    .expect("distinct entries");
                b.layernorm_backward(
                    bw.d_out.view_mut(),
                    gw.rb(),
                    gb.rb(),
                    bw.d_ln.view(),
                    la.mid.view(),
                    p[lp.ln2.0],
                    la.mean2.view(),
                    la.rstd2.view(),
                )?;
            }
            // Attention: mid = x_in + Attn(LN₁(x_in))·W_oᵀ + b_o; ∂/∂x_in starts as ∂/∂mid.
            b.copy(bw.d_in.view_mut(), bw.d_out.view())?;
            b.zero(bw.d_attn.view_mut())?;
            {
                let (gw, gb) = grads_pair(grads, lp.o.0, Some(lp.o.1));
                b.linear_backward(
                    Some(bw.d_attn.view_mut()),
                    Some(gw),
                    gb,
                    bw.d_out.view(),
                    la.attn.view(),
                    p[lp.o.0],
                    self.lin(n, h, h),
                )?;
            }
            for t in [
                &mut bw.dq_rot,
                &mut bw.dk_rot,
                &mut bw.dv,
                &mut bw.dq,
                &mut bw.dk,
            ] {
                b.zero(t.view_mut())?;
            }
            b.attention_backward(
                bw.dq_rot.view_mut(),
                bw.dk_rot.view_mut(),
                bw.dv.view_mut(),
                None,
                bw.d_attn.view(),
                la.attn.view(),
                la.lse.view(),
                la.q_rot.view(),
                la.k_rot.view(),
                la.v.view(),
                Some(pl.kv_lens.view()),
                None,
                &dims,
            )?;
            b.rotary_backward(
                bw.dq.view_mut(),
                bw.dq_rot.view(),
                cos,
                sin,
                len,
                cfg.heads,
                hd,
            )?;
            b.rotary_backward(
                bw.dk.view_mut(),
                bw.dk_rot.view(),
                cos,
                sin,
                len,
                cfg.heads,
                hd,
            )?;
            b.zero(bw.d_ln.view_mut())?;
            for (proj, dproj) in [(lp.q, &bw.dq), (lp.k, &bw.dk), (lp.v, &bw.dv)] {
                let (gw, gb) = grads_pair(grads, proj.0, Some(proj.1));
                b.linear_backward(
                    Some(bw.d_ln.view_mut()),
                    Some(gw),
                    gb,
                    dproj.view(),
                    la.ln1.view(),
                    p[proj.0],
                    self.lin(n, h, h),
                )?;
            }
            {
                let [gw, gb] = grads
                    .get_disjoint_mut([lp.ln1.0, lp.ln1.1])
                    .expect("distinct entries");
                b.layernorm_backward(
                    bw.d_in.view_mut(),
                    gw.rb(),
                    gb.rb(),
                    bw.d_ln.view(),
                    x_in,
                    p[lp.ln1.0],
                    la.mean1.view(),
                    la.rstd1.view(),
                )?;
            }
            std::mem::swap(&mut bw.d_in, &mut bw.d_out);
        }
        // Embedding: x₀ = E[ids]·row_scale.
        b.scale_rows(bw.d_out.view_mut(), pl.row_scale.view())?;
        b.embedding_backward(grads[self.embed].rb(), bw.d_out.view(), pl.ids.view())
    }
}

/// The rotary tables `[max_len, head_dim/2]` (f32).
struct Rope<'a, B: Backend> {
    cos: View<'a, B>,
    sin: View<'a, B>,
}

impl<B: Backend> Clone for Rope<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Rope<'_, B> {}

/// The weight gradient of a linear layer and, when it has one, its bias gradient.
fn grads_pair<'a, 'g, B>(
    grads: &'a mut [ViewMut<'g, B>],
    w: usize,
    bias: Option<usize>,
) -> (ViewMut<'a, B>, Option<ViewMut<'a, B>>) {
    match bias {
        Some(bi) => {
            let [gw, gb] = grads.get_disjoint_mut([w, bi]).expect("distinct entries");
            (gw.rb(), Some(gb.rb()))
        }
        None => (grads[w].rb(), None),
    }
}
