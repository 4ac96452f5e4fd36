//! The Enformer trunk (enformer-pytorch layout), channels-last `[batch, length, channels]` throughout:
//!
//! ```text
//! one-hot [B, L, 4] → stem: conv15 → +ConvBlock₁ → AttentionPool          (L/2, dim/2)
//!   → tower × (num_downsamples−1): ConvBlock₅ → +ConvBlock₁ → AttentionPool
//!   → transformer × depth: x += MHA_rel(LN(x));  x += W₂·ReLU(W₁·LN(x)+b₁)+b₂
//!   → crop to target_length → ConvBlock₁(dim → 2·dim) → GELUσ → embeddings [B, T, 2·dim]
//!   → optional heads: softplus(emb·Wᵀ + b)
//! ConvBlock = BatchNorm (running statistics) → GELUσ → conv (‘same’ padding)
//! ```
//!
//! The attention adds relative-position logits: with `q ← q·dk^−½`, content `(q + u)·k` and position
//! `(q + w)·R[j − i]`, where `R = P·W_rᵀ` and `P` are the exponential / central-mask / gamma features of the
//! key-minus-query distance (computed here in f64, or injected, e.g. DeepMind's TF gamma table).

use std::collections::HashMap;
use std::sync::Arc;

use super::config::EnformerConfig;
use super::weights::{ModelParams, NameResolver};
use crate::ops::attention::{
    attention, attention_backward, AttentionBias, AttentionDims, AttentionInputs,
};
use crate::ops::conv::{conv1d, conv1d_backward, Conv1dDims};
use crate::ops::elementwise::{
    accumulate, activation, activation_backward, GeluSigmoid, Relu, Softplus,
};
use crate::ops::matmul::{gemm_views, linear, linear_backward, LinearDims, View};
use crate::ops::norm::{batchnorm_backward, batchnorm_eval, layernorm, layernorm_backward};
use crate::ops::pool::{attention_pool, attention_pool_backward, PoolDims};
use crate::runtime::{Layout, TensorSpec};
use crate::{Error, Result};

const BN_EPS: f32 = 1e-5;
const LN_EPS: f32 = 1e-5;

/// Name aliases of enformer-pytorch checkpoints: `_trunk.{1,2,4,6}.` duplicate the named modules.
pub struct EnformerNames {
    pub prefixes: Vec<String>,
}

impl NameResolver for EnformerNames {
    fn candidates(&self, name: &str) -> Vec<String> {
        let alias = [
            ("stem.", "_trunk.1."),
            ("conv_tower.", "_trunk.2."),
            ("transformer.", "_trunk.4."),
            ("final_pointwise.", "_trunk.6."),
        ]
        .iter()
        .find_map(|(a, b)| name.strip_prefix(a).map(|rest| format!("{b}{rest}")));
        let mut out = Vec::new();
        for p in &self.prefixes {
            out.push(format!("{p}{name}"));
            if let Some(a) = &alias {
                out.push(format!("{p}{a}"));
            }
        }
        out
    }
}

/// Parameter positions of a ConvBlock (and its geometry).
#[derive(Clone, Debug)]
struct ConvBlock {
    bn: [usize; 4], // weight, bias, running_mean, running_var
    conv_w: usize,
    conv_b: usize,
    c_in: usize,
    c_out: usize,
    width: usize,
}

#[derive(Clone, Debug)]
struct TowerBlock {
    conv: ConvBlock,
    residual: ConvBlock,
    pool: usize,
    channels: usize,
}

#[derive(Clone, Debug)]
struct AttnLayer {
    ln1: (usize, usize),
    content_bias: usize,
    pos_bias: usize,
    q: usize,
    k: usize,
    v: usize,
    out: (usize, usize),
    rel_k: usize,
    ln2: (usize, usize),
    ff1: (usize, usize),
    ff2: (usize, usize),
}

#[derive(Clone, Debug)]
pub struct EnformerTrunk {
    pub cfg: EnformerConfig,
    layout: Arc<Layout>,
    stem_conv: (usize, usize),
    /// The stem's residual block and pool, then the tower, as uniform blocks (the stem's "conv" is the
    /// plain 15-wide convolution, handled separately).
    stem_residual: ConvBlock,
    stem_pool: usize,
    tower: Vec<TowerBlock>,
    layers: Vec<AttnLayer>,
    final_block: ConvBlock,
    heads: Vec<(String, usize, usize, usize)>, // name, weight, bias, width
    /// Running statistics: loaded with the weights, but not trained.
    buffers: Vec<usize>,
    positional_override: HashMap<usize, Arc<Vec<f32>>>,
}

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: Vec<usize>) -> usize {
        self.0.push(TensorSpec::f32(name, shape));
        self.0.len() - 1
    }

    fn conv_block(
        &mut self,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        width: usize,
        buffers: &mut Vec<usize>,
    ) -> ConvBlock {
        let bn = ["weight", "bias", "running_mean", "running_var"]
            .map(|s| self.push(format!("{prefix}0.{s}"), vec![c_in]));
        buffers.extend(&bn[2..]);
        let conv_w = self.push(format!("{prefix}2.weight"), vec![c_out, c_in, width]);
        let conv_b = self.push(format!("{prefix}2.bias"), vec![c_out]);
        ConvBlock {
            bn,
            conv_w,
            conv_b,
            c_in,
            c_out,
            width,
        }
    }
}

/// Saved tensors of one ConvBlock's forward.
#[derive(Default)]
struct ConvBlockActs {
    x: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    normed: Vec<f32>,
    act: Vec<f32>,
}

#[derive(Default)]
struct PoolActs {
    x: Vec<f32>,
    logits: Vec<f32>,
}

#[derive(Default)]
struct AttnActs {
    x_in: Vec<f32>,
    ln1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    q_scaled: Vec<f32>,
    q_content: Vec<f32>,
    q_pos: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    rel_k: Vec<f32>,
    bias: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    ff_pre: Vec<f32>,
    ff_act: Vec<f32>,
}

/// Everything the backward needs, kept by [`EnformerTrunk::forward`] when asked.
#[derive(Default)]
pub struct EnformerActivations {
    batch: usize,
    input: Vec<f32>,
    stem_residual: ConvBlockActs,
    stem_pool: PoolActs,
    tower: Vec<(ConvBlockActs, ConvBlockActs, PoolActs)>,
    layers: Vec<AttnActs>,
    positions: Arc<Vec<f32>>,
    /// Transformer output before the crop.
    trunk: Vec<f32>,
    final_block: ConvBlockActs,
    final_pre: Vec<f32>,
    /// `[B, T, 2·dim]`.
    pub embeddings: Vec<f32>,
    /// Head outputs by name, `[B, T, width]`.
    pub heads: HashMap<String, Vec<f32>>,
    pub transformer_len: usize,
    pub out_len: usize,
}

impl EnformerTrunk {
    pub fn new(cfg: EnformerConfig) -> Result<Self> {
        let filters = cfg.filters();
        let (dim, half, heads, dk) = (cfg.dim, cfg.dim / 2, cfg.heads, cfg.attn_dim_key);
        let rel = dim / heads;
        let mut s = Specs(Vec::new());
        let mut buffers = Vec::new();
        let stem_conv = (
            s.push("stem.0.weight".into(), vec![half, 4, 15]),
            s.push("stem.0.bias".into(), vec![half]),
        );
        let stem_residual = s.conv_block("stem.1.fn.", half, half, 1, &mut buffers);
        let stem_pool = s.push(
            "stem.2.to_attn_logits.weight".into(),
            vec![half, half, 1, 1],
        );
        let mut tower = Vec::new();
        for (t, w) in filters.windows(2).enumerate() {
            let conv = s.conv_block(&format!("conv_tower.{t}.0."), w[0], w[1], 5, &mut buffers);
            let residual = s.conv_block(
                &format!("conv_tower.{t}.1.fn."),
                w[1],
                w[1],
                1,
                &mut buffers,
            );
            let pool = s.push(
                format!("conv_tower.{t}.2.to_attn_logits.weight"),
                vec![w[1], w[1], 1, 1],
            );
            tower.push(TowerBlock {
                conv,
                residual,
                pool,
                channels: w[1],
            });
        }
        let mut layers = Vec::new();
        for l in 0..cfg.depth {
            let a = format!("transformer.{l}.0.fn.");
            let f = format!("transformer.{l}.1.fn.");
            layers.push(AttnLayer {
                ln1: (
                    s.push(format!("{a}0.weight"), vec![dim]),
                    s.push(format!("{a}0.bias"), vec![dim]),
                ),
                content_bias: s.push(format!("{a}1.rel_content_bias"), vec![1, heads, 1, dk]),
                pos_bias: s.push(format!("{a}1.rel_pos_bias"), vec![1, heads, 1, dk]),
                q: s.push(format!("{a}1.to_q.weight"), vec![heads * dk, dim]),
                k: s.push(format!("{a}1.to_k.weight"), vec![heads * dk, dim]),
                v: s.push(format!("{a}1.to_v.weight"), vec![dim, dim]),
                out: (
                    s.push(format!("{a}1.to_out.weight"), vec![dim, dim]),
                    s.push(format!("{a}1.to_out.bias"), vec![dim]),
                ),
                rel_k: s.push(format!("{a}1.to_rel_k.weight"), vec![heads * dk, rel]),
                ln2: (
                    s.push(format!("{f}0.weight"), vec![dim]),
                    s.push(format!("{f}0.bias"), vec![dim]),
                ),
                ff1: (
                    s.push(format!("{f}1.weight"), vec![2 * dim, dim]),
                    s.push(format!("{f}1.bias"), vec![2 * dim]),
                ),
                ff2: (
                    s.push(format!("{f}4.weight"), vec![dim, 2 * dim]),
                    s.push(format!("{f}4.bias"), vec![dim]),
                ),
            });
        }
        let last = *filters.last().expect("filters");
        let final_block = s.conv_block("final_pointwise.1.", last, 2 * dim, 1, &mut buffers);
        let heads_list = cfg
            .output_heads
            .iter()
            .map(|(name, &width)| {
                let w = s.push(format!("_heads.{name}.0.weight"), vec![width, 2 * dim]);
                let b = s.push(format!("_heads.{name}.0.bias"), vec![width]);
                (name.clone(), w, b, width)
            })
            .collect();
        Ok(EnformerTrunk {
            layout: Arc::new(Layout::sequential(s.0)?),
            cfg,
            stem_conv,
            stem_residual,
            stem_pool,
            tower,
            layers,
            final_block,
            heads: heads_list,
            buffers,
            positional_override: HashMap::new(),
        })
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Layout entries that are running statistics (no gradient).
    pub fn is_buffer(&self, entry: usize) -> bool {
        self.buffers.contains(&entry)
    }

    /// Total downsampling factor of stem and tower.
    pub fn downsample(&self) -> usize {
        1 << (self.tower.len() + 1)
    }

    /// Uses `table` (`[2n−1, dim/heads]`) as the positional features for transformer length `n`.
    pub fn set_positional_table(&mut self, n: usize, table: Vec<f32>) -> Result<()> {
        let want = (2 * n - 1) * (self.cfg.dim / self.cfg.heads);
        if table.len() != want {
            return Err(Error::shape(
                "positional table",
                format!("{} values, expected {want} for length {n}", table.len()),
            ));
        }
        self.positional_override.insert(n, Arc::new(table));
        Ok(())
    }

    /// Replaces the gamma features by DeepMind's TF table (`[2n−1, dim/heads/6]`, as enformer-pytorch ships
    /// it for n = 1536; `tools/convert_checkpoint.py --export-tf-gammas` writes it), as `use_tf_gamma` does.
    pub fn set_tf_gammas(&mut self, gammas: &[f32]) -> Result<()> {
        let k = self.cfg.dim / self.cfg.heads / 6;
        if k == 0 || gammas.len() % k != 0 || (gammas.len() / k) % 2 == 0 {
            return Err(Error::shape(
                "tf gammas",
                format!("{} values is not [2n−1, {k}]", gammas.len()),
            ));
        }
        let n = (gammas.len() / k).div_ceil(2);
        let table = positional_features_with_gamma(n, self.cfg.dim / self.cfg.heads, Some(gammas));
        self.set_positional_table(n, table)
    }

    pub fn positional_table(&self, n: usize) -> Result<Arc<Vec<f32>>> {
        if let Some(t) = self.positional_override.get(&n) {
            return Ok(t.clone());
        }
        if self.cfg.use_tf_gamma {
            return Err(Error::invalid(
                "positional features",
                format!("the config sets use_tf_gamma, but no TF gamma table for length {n} was given (--tf-gammas)"),
            ));
        }
        Ok(Arc::new(positional_features(
            n,
            self.cfg.dim / self.cfg.heads,
        )))
    }

    fn conv_block_forward(
        &self,
        p: &ModelParams,
        cb: &ConvBlock,
        x: Vec<f32>,
        batch: usize,
        len: usize,
    ) -> Result<(Vec<f32>, ConvBlockActs)> {
        let mut a = ConvBlockActs {
            mean: vec![0.0; cb.c_in],
            rstd: vec![0.0; cb.c_in],
            normed: vec![0.0; x.len()],
            act: vec![0.0; x.len()],
            x,
        };
        let [w, b, rm, rv] = cb.bn.map(|i| p.get(i));
        batchnorm_eval(
            &mut a.normed,
            &mut a.mean,
            &mut a.rstd,
            &a.x,
            w,
            b,
            rm,
            rv,
            cb.c_in,
            BN_EPS,
        )?;
        activation::<GeluSigmoid>(&mut a.act, &a.normed)?;
        let mut out = vec![0.0; batch * len * cb.c_out];
        let d = Conv1dDims {
            batch,
            len,
            c_in: cb.c_in,
            c_out: cb.c_out,
            width: cb.width,
        };
        conv1d(
            &mut out,
            &a.act,
            p.get(cb.conv_w),
            Some(p.get(cb.conv_b)),
            d,
        )?;
        Ok((out, a))
    }

    /// Adds into `dx` (the block input's gradient) and the block's parameter gradients.
    fn conv_block_backward(
        &self,
        p: &ModelParams,
        cb: &ConvBlock,
        a: &ConvBlockActs,
        dout: &[f32],
        dx: &mut [f32],
        g: &mut [&mut [f32]],
        batch: usize,
        len: usize,
    ) -> Result<()> {
        let d = Conv1dDims {
            batch,
            len,
            c_in: cb.c_in,
            c_out: cb.c_out,
            width: cb.width,
        };
        let mut d_act = vec![0.0; a.x.len()];
        {
            let [gw, gb] = g
                .get_disjoint_mut([cb.conv_w, cb.conv_b])
                .expect("distinct");
            conv1d_backward(
                Some(&mut d_act),
                Some(gw),
                Some(gb),
                dout,
                &a.act,
                p.get(cb.conv_w),
                d,
            )?;
        }
        let mut d_norm = vec![0.0; a.x.len()];
        activation_backward::<GeluSigmoid>(&mut d_norm, &d_act, &a.normed)?;
        let [gw, gb] = g.get_disjoint_mut([cb.bn[0], cb.bn[1]]).expect("distinct");
        batchnorm_backward(
            dx,
            gw,
            gb,
            &d_norm,
            &a.x,
            p.get(cb.bn[0]),
            &a.mean,
            &a.rstd,
            cb.c_in,
            false,
        )
    }

    fn pool_forward(
        &self,
        p: &ModelParams,
        w: usize,
        x: Vec<f32>,
        batch: usize,
        len: usize,
        c: usize,
    ) -> Result<(Vec<f32>, PoolActs)> {
        let d = PoolDims {
            batch,
            len,
            channels: c,
        };
        let mut out = vec![0.0; batch * d.out_len() * c];
        let mut logits = vec![0.0; x.len()];
        attention_pool(&mut out, &mut logits, &x, p.get(w), d)?;
        Ok((out, PoolActs { x, logits }))
    }

    /// Forward on one-hot DNA `[batch, seq_len, 4]`. With `keep`, saves what [`Self::backward`] needs.
    pub fn forward(
        &self,
        p: &ModelParams,
        one_hot: &[f32],
        batch: usize,
        seq_len: usize,
        keep: bool,
    ) -> Result<EnformerActivations> {
        let ds = self.downsample();
        if one_hot.len() != batch * seq_len * 4 {
            return Err(Error::shape(
                "enformer",
                format!(
                    "{} values for one-hot [{batch}, {seq_len}, 4]",
                    one_hot.len()
                ),
            ));
        }
        if seq_len % ds != 0 || seq_len / ds < self.cfg.target_length {
            return Err(Error::invalid(
                "DNA length",
                format!("{seq_len} bp: Enformer needs a multiple of {ds} giving at least {} bins ({} bp)", self.cfg.target_length, ds * self.cfg.target_length),
            ));
        }
        let mut acts = EnformerActivations {
            batch,
            ..Default::default()
        };
        let half = self.cfg.dim / 2;
        // Stem.
        let mut len = seq_len;
        let mut x = vec![0.0; batch * len * half];
        let d = Conv1dDims {
            batch,
            len,
            c_in: 4,
            c_out: half,
            width: 15,
        };
        conv1d(
            &mut x,
            one_hot,
            p.get(self.stem_conv.0),
            Some(p.get(self.stem_conv.1)),
            d,
        )?;
        let (mut r, ra) = self.conv_block_forward(p, &self.stem_residual, x, batch, len)?;
        accumulate(&mut r, &ra.x)?;
        let (mut x, pa) = self.pool_forward(p, self.stem_pool, r, batch, len, half)?;
        len /= 2;
        if keep {
            acts.input = one_hot.to_vec();
            acts.stem_residual = ra;
            acts.stem_pool = pa;
        }
        // Tower.
        for tb in &self.tower {
            let (y, ca) = self.conv_block_forward(p, &tb.conv, x, batch, len)?;
            let (mut z, rab) = self.conv_block_forward(p, &tb.residual, y, batch, len)?;
            accumulate(&mut z, &rab.x)?;
            let (pooled, pa) = self.pool_forward(p, tb.pool, z, batch, len, tb.channels)?;
            x = pooled;
            len /= 2;
            if keep {
                acts.tower.push((ca, rab, pa));
            }
        }
        // Transformer.
        let n = len;
        acts.transformer_len = n;
        acts.positions = self.positional_table(n)?;
        for layer in &self.layers {
            let la = self.attention_layer_forward(p, layer, &mut x, batch, n, &acts.positions)?;
            if keep {
                acts.layers.push(la);
            }
        }
        // Crop: trim = ⌊(target − n)/2⌋ rows from each end (as enformer-pytorch).
        let (start, out_len) = crop_range(n, self.cfg.target_length);
        acts.out_len = out_len;
        let dim = self.cfg.dim;
        let mut cropped = Vec::with_capacity(batch * out_len * dim);
        for b in 0..batch {
            cropped.extend_from_slice(&x[(b * n + start) * dim..(b * n + start + out_len) * dim]);
        }
        if keep {
            acts.trunk = x;
        }
        let (pre, fa) = self.conv_block_forward(p, &self.final_block, cropped, batch, out_len)?;
        let mut emb = vec![0.0; pre.len()];
        activation::<GeluSigmoid>(&mut emb, &pre)?;
        for (name, w, bias, width) in &self.heads {
            let mut pre_head = vec![0.0; batch * out_len * width];
            linear(
                &mut pre_head,
                &emb,
                p.get(*w),
                Some(p.get(*bias)),
                LinearDims {
                    rows: batch * out_len,
                    d_in: 2 * dim,
                    d_out: *width,
                },
            )?;
            let mut out = vec![0.0; pre_head.len()];
            activation::<Softplus>(&mut out, &pre_head)?;
            acts.heads.insert(name.clone(), out);
        }
        if keep {
            acts.final_block = fa;
            acts.final_pre = pre;
        }
        acts.embeddings = emb;
        Ok(acts)
    }

    fn attention_layer_forward(
        &self,
        p: &ModelParams,
        l: &AttnLayer,
        x: &mut Vec<f32>,
        batch: usize,
        n: usize,
        positions: &[f32],
    ) -> Result<AttnActs> {
        let (dim, heads, dk) = (self.cfg.dim, self.cfg.heads, self.cfg.attn_dim_key);
        let (rows, hk, rel) = (batch * n, heads * dk, dim / heads);
        let mut a = AttnActs {
            x_in: std::mem::take(x),
            ..Default::default()
        };
        a.ln1 = vec![0.0; rows * dim];
        a.mean1 = vec![0.0; rows];
        a.rstd1 = vec![0.0; rows];
        layernorm(
            &mut a.ln1,
            &mut a.mean1,
            &mut a.rstd1,
            &a.x_in,
            p.get(l.ln1.0),
            p.get(l.ln1.1),
            dim,
            LN_EPS,
        )?;
        let lin = |d_in: usize, d_out: usize| LinearDims { rows, d_in, d_out };
        a.q_scaled = vec![0.0; rows * hk];
        a.k = vec![0.0; rows * hk];
        a.v = vec![0.0; rows * dim];
        linear(&mut a.q_scaled, &a.ln1, p.get(l.q), None, lin(dim, hk))?;
        linear(&mut a.k, &a.ln1, p.get(l.k), None, lin(dim, hk))?;
        linear(&mut a.v, &a.ln1, p.get(l.v), None, lin(dim, dim))?;
        let scale = (dk as f32).powf(-0.5);
        a.q_scaled.iter_mut().for_each(|v| *v *= scale);
        let add_head_bias = |q: &[f32], bias: &[f32]| -> Vec<f32> {
            let mut out = q.to_vec();
            out.chunks_mut(hk)
                .for_each(|row| row.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
            out
        };
        a.q_content = add_head_bias(&a.q_scaled, p.get(l.content_bias));
        a.q_pos = add_head_bias(&a.q_scaled, p.get(l.pos_bias));
        // R = P·W_rᵀ  [2n−1, H·dk]
        a.rel_k = vec![0.0; (2 * n - 1) * hk];
        linear(
            &mut a.rel_k,
            positions,
            p.get(l.rel_k),
            None,
            LinearDims {
                rows: 2 * n - 1,
                d_in: rel,
                d_out: hk,
            },
        )?;
        a.bias = vec![0.0; batch * heads * n * n];
        relative_logits(&mut a.bias, &a.q_pos, &a.rel_k, heads, n, dk);
        let dims = AttentionDims {
            batch,
            heads,
            q_len: n,
            kv_len: n,
            head_dim: dk,
            v_head_dim: dim / heads,
            scale: 1.0,
        };
        a.attn = vec![0.0; rows * dim];
        a.lse = vec![0.0; batch * heads * n];
        let mut ws = vec![0.0; dims.workspace_len(rayon::current_num_threads())];
        let inputs = AttentionInputs {
            q: &a.q_content,
            k: &a.k,
            v: &a.v,
            kv_lens: None,
            bias: Some(AttentionBias {
                data: &a.bias,
                per_batch: true,
            }),
        };
        attention(&mut a.attn, &mut a.lse, inputs, &dims, &mut ws)?;
        a.x_mid = vec![0.0; rows * dim];
        linear(
            &mut a.x_mid,
            &a.attn,
            p.get(l.out.0),
            Some(p.get(l.out.1)),
            lin(dim, dim),
        )?;
        accumulate(&mut a.x_mid, &a.x_in)?;
        a.ln2 = vec![0.0; rows * dim];
        a.mean2 = vec![0.0; rows];
        a.rstd2 = vec![0.0; rows];
        layernorm(
            &mut a.ln2,
            &mut a.mean2,
            &mut a.rstd2,
            &a.x_mid,
            p.get(l.ln2.0),
            p.get(l.ln2.1),
            dim,
            LN_EPS,
        )?;
        a.ff_pre = vec![0.0; rows * 2 * dim];
        linear(
            &mut a.ff_pre,
            &a.ln2,
            p.get(l.ff1.0),
            Some(p.get(l.ff1.1)),
            lin(dim, 2 * dim),
        )?;
        a.ff_act = vec![0.0; rows * 2 * dim];
        activation::<Relu>(&mut a.ff_act, &a.ff_pre)?;
        let mut out = vec![0.0; rows * dim];
        linear(
            &mut out,
            &a.ff_act,
            p.get(l.ff2.0),
            Some(p.get(l.ff2.1)),
            lin(2 * dim, dim),
        )?;
        accumulate(&mut out, &a.x_mid)?;
        *x = out;
        Ok(a)
    }

    /// Adds the gradients of a loss with `d_emb = ∂loss/∂embeddings` (and optionally `∂loss/∂head`) into
    /// `grads`, one slice per layout entry (running statistics get none).
    pub fn backward(
        &self,
        p: &ModelParams,
        acts: &EnformerActivations,
        d_emb: &[f32],
        grads: &mut [&mut [f32]],
    ) -> Result<()> {
        if acts.layers.len() != self.layers.len() || acts.input.is_empty() {
            return Err(Error::invalid(
                "backward",
                "the forward was run without keeping activations",
            ));
        }
        if d_emb.len() != acts.embeddings.len() || grads.len() != self.layout.entries().len() {
            return Err(Error::shape(
                "enformer backward",
                "gradient sizes do not match the forward",
            ));
        }
        let (batch, dim) = (acts.batch, self.cfg.dim);
        let (n, out_len) = (acts.transformer_len, acts.out_len);
        // Final GELU and block.
        let mut d_pre = vec![0.0; d_emb.len()];
        activation_backward::<GeluSigmoid>(&mut d_pre, d_emb, &acts.final_pre)?;
        let mut d_crop = vec![0.0; batch * out_len * dim];
        self.conv_block_backward(
            p,
            &self.final_block,
            &acts.final_block,
            &d_pre,
            &mut d_crop,
            grads,
            batch,
            out_len,
        )?;
        // Un-crop.
        let (start, _) = crop_range(n, self.cfg.target_length);
        let mut dx = vec![0.0; batch * n * dim];
        for b in 0..batch {
            dx[(b * n + start) * dim..(b * n + start + out_len) * dim]
                .copy_from_slice(&d_crop[b * out_len * dim..(b + 1) * out_len * dim]);
        }
        for (l, a) in self.layers.iter().zip(&acts.layers).rev() {
            self.attention_layer_backward(p, l, a, &mut dx, batch, n, &acts.positions, grads)?;
        }
        // Tower, last block first.
        let mut len = n;
        for (tb, (ca, ra, pa)) in self.tower.iter().zip(&acts.tower).rev() {
            let pre_len = len * 2;
            let mut dz = vec![0.0; batch * pre_len * tb.channels];
            self.pool_backward(
                p,
                tb.pool,
                pa,
                &dx,
                &mut dz,
                grads,
                batch,
                pre_len,
                tb.channels,
            )?;
            // z = y + CB(y): dy = dz + CBᵀ(dz)
            let mut dy = dz.clone();
            self.conv_block_backward(p, &tb.residual, ra, &dz, &mut dy, grads, batch, pre_len)?;
            let mut dxin = vec![0.0; batch * pre_len * tb.conv.c_in];
            self.conv_block_backward(p, &tb.conv, ca, &dy, &mut dxin, grads, batch, pre_len)?;
            dx = dxin;
            len = pre_len;
        }
        // Stem.
        let half = dim / 2;
        let stem_len = len * 2;
        let mut dr = vec![0.0; batch * stem_len * half];
        self.pool_backward(
            p,
            self.stem_pool,
            &acts.stem_pool,
            &dx,
            &mut dr,
            grads,
            batch,
            stem_len,
            half,
        )?;
        let mut ds0 = dr.clone();
        self.conv_block_backward(
            p,
            &self.stem_residual,
            &acts.stem_residual,
            &dr,
            &mut ds0,
            grads,
            batch,
            stem_len,
        )?;
        let d = Conv1dDims {
            batch,
            len: stem_len,
            c_in: 4,
            c_out: half,
            width: 15,
        };
        let [gw, gb] = grads
            .get_disjoint_mut([self.stem_conv.0, self.stem_conv.1])
            .expect("distinct");
        conv1d_backward(
            None,
            Some(gw),
            Some(gb),
            &ds0,
            &acts.input,
            p.get(self.stem_conv.0),
            d,
        )
    }

    fn pool_backward(
        &self,
        p: &ModelParams,
        w: usize,
        a: &PoolActs,
        dout: &[f32],
        dx: &mut [f32],
        g: &mut [&mut [f32]],
        batch: usize,
        len: usize,
        c: usize,
    ) -> Result<()> {
        let mut scratch = vec![0.0; a.x.len()];
        attention_pool_backward(
            dx,
            g[w],
            &mut scratch,
            dout,
            &a.x,
            p.get(w),
            &a.logits,
            PoolDims {
                batch,
                len,
                channels: c,
            },
        )
    }

    fn attention_layer_backward(
        &self,
        p: &ModelParams,
        l: &AttnLayer,
        a: &AttnActs,
        dx: &mut [f32],
        batch: usize,
        n: usize,
        positions: &[f32],
        g: &mut [&mut [f32]],
    ) -> Result<()> {
        let (dim, heads, dk) = (self.cfg.dim, self.cfg.heads, self.cfg.attn_dim_key);
        let (rows, hk, rel) = (batch * n, heads * dk, dim / heads);
        let lin = |d_in: usize, d_out: usize| LinearDims { rows, d_in, d_out };
        // FFN.
        let mut d_act = vec![0.0; rows * 2 * dim];
        {
            let [gw, gb] = g.get_disjoint_mut([l.ff2.0, l.ff2.1]).expect("distinct");
            linear_backward(
                Some(&mut d_act),
                Some(gw),
                Some(gb),
                dx,
                &a.ff_act,
                p.get(l.ff2.0),
                lin(2 * dim, dim),
            )?;
        }
        let mut d_pre = vec![0.0; rows * 2 * dim];
        activation_backward::<Relu>(&mut d_pre, &d_act, &a.ff_pre)?;
        let mut d_ln = vec![0.0; rows * dim];
        {
            let [gw, gb] = g.get_disjoint_mut([l.ff1.0, l.ff1.1]).expect("distinct");
            linear_backward(
                Some(&mut d_ln),
                Some(gw),
                Some(gb),
                &d_pre,
                &a.ln2,
                p.get(l.ff1.0),
                lin(dim, 2 * dim),
            )?;
        }
        {
            let [gw, gb] = g.get_disjoint_mut([l.ln2.0, l.ln2.1]).expect("distinct");
            layernorm_backward(
                dx,
                gw,
                gb,
                &d_ln,
                &a.x_mid,
                p.get(l.ln2.0),
                &a.mean2,
                &a.rstd2,
                dim,
            )?;
        }
        // Attention output projection.
        let mut d_attn = vec![0.0; rows * dim];
        {
            let [gw, gb] = g.get_disjoint_mut([l.out.0, l.out.1]).expect("distinct");
            linear_backward(
                Some(&mut d_attn),
                Some(gw),
                Some(gb),
                dx,
                &a.attn,
                p.get(l.out.0),
                lin(dim, dim),
            )?;
        }
        let dims = AttentionDims {
            batch,
            heads,
            q_len: n,
            kv_len: n,
            head_dim: dk,
            v_head_dim: dim / heads,
            scale: 1.0,
        };
        let (mut dqc, mut dk_, mut dv, mut dbias) = (
            vec![0.0; rows * hk],
            vec![0.0; rows * hk],
            vec![0.0; rows * dim],
            vec![0.0; a.bias.len()],
        );
        let mut ws = vec![0.0; dims.workspace_len(rayon::current_num_threads())];
        let inputs = AttentionInputs {
            q: &a.q_content,
            k: &a.k,
            v: &a.v,
            kv_lens: None,
            bias: Some(AttentionBias {
                data: &a.bias,
                per_batch: true,
            }),
        };
        attention_backward(
            &mut dqc,
            &mut dk_,
            &mut dv,
            Some(&mut dbias),
            &d_attn,
            &a.attn,
            &a.lse,
            inputs,
            &dims,
            &mut ws,
        )?;
        // Relative logits: bias = shift((q + w)·Rᵀ).
        let (mut dqp, mut d_rel_k) = (vec![0.0; rows * hk], vec![0.0; (2 * n - 1) * hk]);
        relative_logits_backward(
            &mut dqp,
            &mut d_rel_k,
            &dbias,
            &a.q_pos,
            &a.rel_k,
            batch,
            heads,
            n,
            dk,
        );
        linear_backward(
            None,
            Some(g[l.rel_k]),
            None,
            &d_rel_k,
            positions,
            p.get(l.rel_k),
            LinearDims {
                rows: 2 * n - 1,
                d_in: rel,
                d_out: hk,
            },
        )?;
        for (dq_part, bias_idx) in [(&dqc, l.content_bias), (&dqp, l.pos_bias)] {
            for row in dq_part.chunks(hk) {
                g[bias_idx].iter_mut().zip(row).for_each(|(gb, v)| *gb += v);
            }
        }
        // q_scaled feeds both; q_scaled = scale·(ln1·W_qᵀ).
        let scale = (dk as f32).powf(-0.5);
        let dq: Vec<f32> = dqc.iter().zip(&dqp).map(|(a, b)| (a + b) * scale).collect();
        let mut d_ln1 = vec![0.0; rows * dim];
        for (grad, w, width) in [(&dq, l.q, hk), (&dk_, l.k, hk), (&dv, l.v, dim)] {
            linear_backward(
                Some(&mut d_ln1),
                Some(g[w]),
                None,
                grad,
                &a.ln1,
                p.get(w),
                lin(dim, width),
            )?;
        }
        let [gw, gb] = g.get_disjoint_mut([l.ln1.0, l.ln1.1]).expect("distinct");
        layernorm_backward(
            dx,
            gw,
            gb,
            &d_ln1,
            &a.x_in,
            p.get(l.ln1.0),
            &a.mean1,
            &a.rstd1,
            dim,
        )
    }
}

/// Rows kept by enformer-pytorch's `TargetLengthCrop`: `(start, count)`.
pub(crate) fn crop_range(n: usize, target: usize) -> (usize, usize) {
    let trim = (target as i64 - n as i64).div_euclid(2); // ≤ 0
    if trim == 0 {
        return (0, n);
    }
    let t = (-trim) as usize;
    (t, n - 2 * t)
}

/// `bias[b, h, i, j] = (q_pos[b, i, h]·R[(n−1) + j − i, h])` for every query i and key j.
fn relative_logits(
    bias: &mut [f32],
    q_pos: &[f32],
    rel_k: &[f32],
    heads: usize,
    n: usize,
    dk: usize,
) {
    use rayon::prelude::*;
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
}

/// Gradients of [`relative_logits`]: `dq_pos += dFull·R`, `d_rel_k += dFullᵀ·q_pos` (summed over the batch in
/// order, so the result is deterministic).
fn relative_logits_backward(
    dq_pos: &mut [f32],
    d_rel_k: &mut [f32],
    dbias: &[f32],
    q_pos: &[f32],
    rel_k: &[f32],
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) {
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
}

/// Enformer's relative positional features for transformer length `n`, `[2n−1, features]`, row r for the
/// distance `r − (n−1)`: exponential, central mask and gamma (normalised per distance, as enformer-pytorch),
/// each `features/6` wide, then the same multiplied by the distance's sign. Computed in f64.
pub fn positional_features(n: usize, features: usize) -> Vec<f32> {
    positional_features_with_gamma(n, features, None)
}

/// [`positional_features`] with the gamma block taken from `gammas` (`[2n−1, features/6]`) when given.
fn positional_features_with_gamma(n: usize, features: usize, gammas: Option<&[f32]>) -> Vec<f32> {
    let k = features / 6;
    let nf = n as f64;
    let linspace = |a: f64, b: f64, i: usize| {
        if k == 1 {
            a
        } else {
            a + (b - a) * i as f64 / (k - 1) as f64
        }
    };
    let half_life: Vec<f64> = (0..k)
        .map(|i| 2f64.powf(linspace(3.0, nf.ln() / 2f64.ln(), i)))
        .collect();
    let widths: Vec<f64> = (1..=k).map(|i| 2f64.powi(i as i32) - 1.0).collect();
    let std = nf / (2.0 * k as f64);
    let gamma: Vec<(f64, f64)> = (0..k)
        .map(|i| {
            let mean = linspace(nf / k as f64, nf, i);
            ((mean / std).powi(2), mean / (std * std))
        })
        .collect();
    let mut out = Vec::with_capacity((2 * n - 1) * features);
    for r in 0..2 * n - 1 {
        let delta = r as f64 - (nf - 1.0);
        let x = delta.abs();
        let mut e: Vec<f64> = half_life
            .iter()
            .map(|hl| (-(2f64.ln()) / hl * x).exp())
            .collect();
        e.extend(widths.iter().map(|w| if *w > x { 1.0 } else { 0.0 }));
        let pdf: Vec<f64> = gamma
            .iter()
            .map(|&(conc, rate)| {
                let log_unnorm = if x == 0.0 {
                    f64::NEG_INFINITY
                } else {
                    (conc - 1.0) * x.ln()
                } - rate * x;
                (log_unnorm - (ln_gamma(conc) - conc * rate.ln())).exp() + 1e-8
            })
            .collect();
        match gammas {
            Some(g) => e.extend(g[r * k..(r + 1) * k].iter().map(|&v| v as f64)),
            None => {
                let max = pdf.iter().cloned().fold(f64::MIN, f64::max);
                e.extend(pdf.iter().map(|v| v / max));
            }
        }
        let sign = delta.signum() * (delta != 0.0) as i32 as f64;
        let signed: Vec<f64> = e.iter().map(|v| v * sign).collect();
        out.extend(e.iter().chain(&signed).map(|&v| v as f32));
    }
    out
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let s = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |s, (i, c)| s + c / (x + 1.0 + i as f64));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut fact = 1.0f64;
        for k in 1..30 {
            fact *= k as f64;
            assert!(
                (ln_gamma(k as f64 + 1.0) - fact.ln()).abs() < 1e-10 * fact.ln().max(1.0),
                "{k}"
            );
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn crop_follows_the_reference() {
        assert_eq!(crop_range(1536, 896), (320, 896));
        assert_eq!(
            crop_range(899, 896),
            (2, 895),
            "odd differences leave 895 rows, as enformer-pytorch"
        );
        assert_eq!(crop_range(896, 896), (0, 896));
    }
}
