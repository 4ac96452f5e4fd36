//! The pre-LN transformer encoder shared by ESM-2 and Nucleotide Transformer v2 (one block, with options):
//!
//! ```text
//! x = E[ids] (ESM-2: token-dropout scaling), padded rows zeroed
//! per layer:  h = LN₁(x);  q,k,v = h·Wᵀ + b;  q,k = RoPE(q,k);  x += softmax(q·kᵀ/√d + mask)·v · W_oᵀ + b_o
//!             h = LN₂(x);  x += FFN(h)      FFN = GELU(h·W₁ᵀ+b₁)·W₂ᵀ+b₂ (ESM-2) | SwiGLU(h·W₁ᵀ)·W₂ᵀ (NT-v2)
//! out = LN_f(x)
//! ```
//!
//! Parameter names are the HF names without the `esm.` prefix. Forward keeps what the backward needs when
//! asked to (training, gradient tests); for inference one layer's buffers are reused for every layer.

use std::sync::Arc;

use super::config::EsmConfig;
use crate::ops::attention::{attention, attention_backward, AttentionDims, AttentionInputs};
use crate::ops::elementwise::{
    accumulate, activation, activation_backward, swiglu, swiglu_backward, GeluErf,
};
use crate::ops::embedding::{embedding, embedding_backward};
use crate::ops::matmul::{linear, linear_backward, LinearDims};
use crate::ops::norm::{layernorm, layernorm_backward};
use crate::ops::rotary::{rotary, rotary_backward, RotaryTable};
use crate::runtime::{Layout, TensorSpec};
use crate::{Error, Result};

use super::weights::ModelParams;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForward {
    /// `GELU(h·W₁ᵀ + b₁)·W₂ᵀ + b₂`, exact erf GELU (ESM-2).
    Gelu,
    /// `(silu(u₁) ∘ u₂)·W₂ᵀ` with `[u₁ | u₂] = h·W₁ᵀ`, no biases (NT-v2).
    SwiGlu,
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
}

/// Buffers of one layer's forward that the backward reads.
#[derive(Default, Clone)]
struct LayerActs {
    x_in: Vec<f32>,
    ln1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    q_rot: Vec<f32>,
    k_rot: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    ffn_pre: Vec<f32>,
    ffn_act: Vec<f32>,
}

/// Forward state for one batch shape; reused across calls of the same shape.
#[derive(Default)]
pub struct EncoderActivations {
    batch: usize,
    len: usize,
    keep_all: bool,
    ids: Vec<u32>,
    lens: Vec<usize>,
    /// Per-row embedding scale (token dropout × padding mask).
    row_scale: Vec<f32>,
    x: Vec<f32>,
    layers: Vec<LayerActs>,
    final_mean: Vec<f32>,
    final_rstd: Vec<f32>,
    x_final: Vec<f32>,
    pub hidden: Vec<f32>,
    workspace: Vec<f32>,
    rotary: Option<RotaryTable>,
}

impl EncoderActivations {
    /// The last hidden state `[batch, len, hidden]` of the latest forward.
    pub fn hidden(&self) -> &[f32] {
        &self.hidden
    }
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl TransformerEncoder {
    pub fn new(cfg: TransformerConfig) -> Result<Self> {
        if cfg.heads == 0 || cfg.hidden % cfg.heads != 0 || cfg.head_dim() % 2 != 0 {
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
        })
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    fn prepare(
        &self,
        acts: &mut EncoderActivations,
        ids: &[u32],
        lens: &[usize],
        len: usize,
        keep_all: bool,
    ) -> Result<()> {
        let batch = lens.len();
        if ids.len() != batch * len {
            return Err(Error::shape(
                "encoder",
                format!("{} ids for {batch} sequences of {len}", ids.len()),
            ));
        }
        if let Some((b, l)) = lens.iter().enumerate().find(|(_, &l)| l > len || l == 0) {
            return Err(Error::invalid(
                "sequence length",
                format!("sequence {b} has length {l}, padded length {len}"),
            ));
        }
        let (n, h) = (batch * len, self.cfg.hidden);
        acts.batch = batch;
        acts.len = len;
        acts.keep_all = keep_all;
        acts.ids.clear();
        acts.ids.extend_from_slice(ids);
        acts.lens.clear();
        acts.lens.extend_from_slice(lens);
        let n_layers = if keep_all { self.cfg.layers } else { 1 };
        acts.layers.resize_with(n_layers.max(1), LayerActs::default);
        let fi = self.cfg.ffn_in_width();
        let lse_len = batch * self.cfg.heads * len;
        for la in acts.layers.iter_mut() {
            for (v, size) in [
                (&mut la.x_in, n * h),
                (&mut la.ln1, n * h),
                (&mut la.mean1, n),
                (&mut la.rstd1, n),
                (&mut la.q, n * h),
                (&mut la.k, n * h),
                (&mut la.v, n * h),
                (&mut la.q_rot, n * h),
                (&mut la.k_rot, n * h),
                (&mut la.attn, n * h),
                (&mut la.lse, lse_len),
                (&mut la.x_mid, n * h),
                (&mut la.ln2, n * h),
                (&mut la.mean2, n),
                (&mut la.rstd2, n),
                (&mut la.ffn_pre, n * fi),
                (&mut la.ffn_act, n * self.cfg.ffn_dim),
            ] {
                resize(v, size);
            }
        }
        resize(&mut acts.x, n * h);
        resize(&mut acts.final_mean, n);
        resize(&mut acts.final_rstd, n);
        resize(&mut acts.x_final, n * h);
        resize(&mut acts.hidden, n * h);
        let d = AttentionDims::new(batch, self.cfg.heads, len, len, self.cfg.head_dim());
        resize(
            &mut acts.workspace,
            d.workspace_len(rayon::current_num_threads()),
        );
        if acts.rotary.as_ref().is_none_or(|t| t.max_len() < len) {
            acts.rotary = Some(RotaryTable::new(
                len.max(64),
                self.cfg.head_dim(),
                10_000.0,
            )?);
        }
        acts.row_scale = self.embedding_row_scales(ids, lens, len);
        Ok(())
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

    /// Forward for `ids [batch, len]` (right-padded, `lens` real tokens each). The last hidden state is in
    /// `acts.hidden()`. With `keep_all`, every layer's activations are kept for [`Self::backward`].
    pub fn forward(
        &self,
        p: &ModelParams,
        ids: &[u32],
        lens: &[usize],
        len: usize,
        acts: &mut EncoderActivations,
        keep_all: bool,
    ) -> Result<()> {
        self.prepare(acts, ids, lens, len, keep_all)?;
        let cfg = &self.cfg;
        let (batch, n, h) = (lens.len(), lens.len() * len, cfg.hidden);
        embedding(&mut acts.x, ids, p.get(self.embed), h)?;
        for (row, &s) in acts.x.chunks_mut(h).zip(&acts.row_scale) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        let lin = |d_out: usize, d_in: usize| LinearDims {
            rows: n,
            d_in,
            d_out,
        };
        let dims = AttentionDims::new(batch, cfg.heads, len, len, cfg.head_dim());
        let rotary_table = acts.rotary.take().expect("prepared");
        for (l, lp) in self.layers.iter().enumerate() {
            let la = &mut acts.layers[if keep_all { l } else { 0 }];
            la.x_in.copy_from_slice(&acts.x);
            layernorm(
                &mut la.ln1,
                &mut la.mean1,
                &mut la.rstd1,
                &la.x_in,
                p.get(lp.ln1.0),
                p.get(lp.ln1.1),
                h,
                cfg.ln_eps,
            )?;
            for (out, (w, b)) in [(&mut la.q, lp.q), (&mut la.k, lp.k), (&mut la.v, lp.v)] {
                linear(out, &la.ln1, p.get(w), Some(p.get(b)), lin(h, h))?;
            }
            rotary(&mut la.q_rot, &la.q, &rotary_table, len, cfg.heads)?;
            rotary(&mut la.k_rot, &la.k, &rotary_table, len, cfg.heads)?;
            let inputs = AttentionInputs {
                q: &la.q_rot,
                k: &la.k_rot,
                v: &la.v,
                kv_lens: Some(lens),
                bias: None,
            };
            attention(
                &mut la.attn,
                &mut la.lse,
                inputs,
                &dims,
                &mut acts.workspace,
            )?;
            // x_mid = x_in + attn·W_oᵀ + b_o
            linear(
                &mut la.x_mid,
                &la.attn,
                p.get(lp.o.0),
                Some(p.get(lp.o.1)),
                lin(h, h),
            )?;
            accumulate(&mut la.x_mid, &la.x_in)?;
            layernorm(
                &mut la.ln2,
                &mut la.mean2,
                &mut la.rstd2,
                &la.x_mid,
                p.get(lp.ln2.0),
                p.get(lp.ln2.1),
                h,
                cfg.ln_eps,
            )?;
            linear(
                &mut la.ffn_pre,
                &la.ln2,
                p.get(lp.ffn_in.0),
                lp.ffn_in.1.map(|b| p.get(b)),
                lin(cfg.ffn_in_width(), h),
            )?;
            match cfg.ffn {
                FeedForward::Gelu => activation::<GeluErf>(&mut la.ffn_act, &la.ffn_pre)?,
                FeedForward::SwiGlu => swiglu(&mut la.ffn_act, &la.ffn_pre, cfg.ffn_dim)?,
            }
            linear(
                &mut acts.x,
                &la.ffn_act,
                p.get(lp.ffn_out.0),
                lp.ffn_out.1.map(|b| p.get(b)),
                lin(h, cfg.ffn_dim),
            )?;
            accumulate(&mut acts.x, &la.x_mid)?;
        }
        acts.rotary = Some(rotary_table);
        acts.x_final.copy_from_slice(&acts.x);
        let (fw, fb) = self.final_ln;
        layernorm(
            &mut acts.hidden,
            &mut acts.final_mean,
            &mut acts.final_rstd,
            &acts.x_final,
            p.get(fw),
            p.get(fb),
            h,
            cfg.ln_eps,
        )
    }

    /// Adds the gradients of a loss with `dhidden = ∂loss/∂hidden` into `grads` (one slice per layout entry).
    pub fn backward(
        &self,
        p: &ModelParams,
        acts: &mut EncoderActivations,
        dhidden: &[f32],
        grads: &mut [&mut [f32]],
    ) -> Result<()> {
        if !acts.keep_all {
            return Err(Error::invalid(
                "backward",
                "the forward was run without keeping activations",
            ));
        }
        let cfg = &self.cfg;
        let (batch, len, h) = (acts.batch, acts.len, cfg.hidden);
        let n = batch * len;
        if dhidden.len() != n * h || grads.len() != self.layout.entries().len() {
            return Err(Error::shape(
                "encoder backward",
                "dhidden or gradient list does not match the forward",
            ));
        }
        let lin = |d_out: usize, d_in: usize| LinearDims {
            rows: n,
            d_in,
            d_out,
        };
        let dims = AttentionDims::new(batch, cfg.heads, len, len, cfg.head_dim());
        let mut dx = vec![0.0f32; n * h];
        let (fw, fb) = self.final_ln;
        {
            let [gw, gb] = grads.get_disjoint_mut([fw, fb]).expect("distinct entries");
            layernorm_backward(
                &mut dx,
                gw,
                gb,
                dhidden,
                &acts.x_final,
                p.get(fw),
                &acts.final_mean,
                &acts.final_rstd,
                h,
            )?;
        }
        let (mut d_act, mut d_pre) = (
            vec![0.0f32; n * cfg.ffn_dim],
            vec![0.0f32; n * cfg.ffn_in_width()],
        );
        let (mut d_ln, mut d_attn) = (vec![0.0f32; n * h], vec![0.0f32; n * h]);
        let (mut dq_rot, mut dk_rot, mut dv) = (
            vec![0.0f32; n * h],
            vec![0.0f32; n * h],
            vec![0.0f32; n * h],
        );
        let (mut dq, mut dk) = (vec![0.0f32; n * h], vec![0.0f32; n * h]);
        let table = acts.rotary.take().expect("prepared");
        let zero = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = 0.0);
        for (l, lp) in self.layers.iter().enumerate().rev() {
            let la = &acts.layers[l];
            // FFN: x_out = x_mid + FFN(LN₂(x_mid))
            zero(&mut d_act);
            {
                let (w, b) = lp.ffn_out;
                let (gw, gb) = grads_pair(grads, w, b);
                linear_backward(
                    Some(&mut d_act),
                    Some(gw),
                    gb,
                    &dx,
                    &la.ffn_act,
                    p.get(w),
                    lin(h, cfg.ffn_dim),
                )?;
            }
            zero(&mut d_pre);
            match cfg.ffn {
                FeedForward::Gelu => {
                    activation_backward::<GeluErf>(&mut d_pre, &d_act, &la.ffn_pre)?
                }
                FeedForward::SwiGlu => {
                    swiglu_backward(&mut d_pre, &d_act, &la.ffn_pre, cfg.ffn_dim)?
                }
            }
            zero(&mut d_ln);
            {
                let (w, b) = lp.ffn_in;
                let (gw, gb) = grads_pair(grads, w, b);
                linear_backward(
                    Some(&mut d_ln),
                    Some(gw),
                    gb,
                    &d_pre,
                    &la.ln2,
                    p.get(w),
                    lin(cfg.ffn_in_width(), h),
                )?;
            }
            {
                let [gw, gb] = grads
                    .get_disjoint_mut([lp.ln2.0, lp.ln2.1])
                    .expect("distinct entries");
                layernorm_backward(
                    &mut dx,
                    gw,
                    gb,
                    &d_ln,
                    &la.x_mid,
                    p.get(lp.ln2.0),
                    &la.mean2,
                    &la.rstd2,
                    h,
                )?;
            }
            // Attention: x_mid = x_in + Attn(LN₁(x_in))·W_oᵀ + b_o
            zero(&mut d_attn);
            {
                let [gw, gb] = grads
                    .get_disjoint_mut([lp.o.0, lp.o.1])
                    .expect("distinct entries");
                linear_backward(
                    Some(&mut d_attn),
                    Some(gw),
                    Some(gb),
                    &dx,
                    &la.attn,
                    p.get(lp.o.0),
                    lin(h, h),
                )?;
            }
            zero(&mut dq_rot);
            zero(&mut dk_rot);
            zero(&mut dv);
            let inputs = AttentionInputs {
                q: &la.q_rot,
                k: &la.k_rot,
                v: &la.v,
                kv_lens: Some(&acts.lens),
                bias: None,
            };
            attention_backward(
                &mut dq_rot,
                &mut dk_rot,
                &mut dv,
                None,
                &d_attn,
                &la.attn,
                &la.lse,
                inputs,
                &dims,
                &mut acts.workspace,
            )?;
            zero(&mut dq);
            zero(&mut dk);
            rotary_backward(&mut dq, &dq_rot, &table, len, cfg.heads)?;
            rotary_backward(&mut dk, &dk_rot, &table, len, cfg.heads)?;
            zero(&mut d_ln);
            for (proj, dproj) in [(lp.q, &dq), (lp.k, &dk), (lp.v, &dv)] {
                let [gw, gb] = grads
                    .get_disjoint_mut([proj.0, proj.1])
                    .expect("distinct entries");
                linear_backward(
                    Some(&mut d_ln),
                    Some(gw),
                    Some(gb),
                    dproj,
                    &la.ln1,
                    p.get(proj.0),
                    lin(h, h),
                )?;
            }
            {
                let [gw, gb] = grads
                    .get_disjoint_mut([lp.ln1.0, lp.ln1.1])
                    .expect("distinct entries");
                layernorm_backward(
                    &mut dx,
                    gw,
                    gb,
                    &d_ln,
                    &la.x_in,
                    p.get(lp.ln1.0),
                    &la.mean1,
                    &la.rstd1,
                    h,
                )?;
            }
        }
        acts.rotary = Some(table);
        for (row, &s) in dx.chunks_mut(h).zip(&acts.row_scale) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        embedding_backward(&mut *grads[self.embed], &dx, &acts.ids, h)
    }
}

fn grads_pair<'a>(
    grads: &'a mut [&mut [f32]],
    w: usize,
    b: Option<usize>,
) -> (&'a mut [f32], Option<&'a mut [f32]>) {
    match b {
        Some(b) => {
            let [gw, gb] = grads.get_disjoint_mut([w, b]).expect("distinct entries");
            (&mut **gw, Some(&mut **gb))
        }
        None => (&mut *grads[w], None),
    }
}
