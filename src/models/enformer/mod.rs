//! The Enformer trunk (enformer-pytorch layout), channels-last `[batch, length, channels]` throughout:
//!
//! ```text
//! one-hot [B, L, 4] → stem: conv15 → +ConvBlock₁ → AttentionPool          (L/2, dim/2)
//!   → tower × (num_downsamples−1): ConvBlock₅ → +ConvBlock₁ → AttentionPool
//!   → transformer × depth: x += MHA_rel(LN(x));  x += W₂·ReLU(W₁·LN(x)+b₁)+b₂
//!   → crop to target_length → ConvBlock₁(dim → 2·dim) → GELUσ → embeddings [B, T, 2·dim]
//!   → optional heads: softplus(emb·Wᵀ + b)
//! ConvBlock = BatchNorm (running statistics, or the batch's in training) → GELUσ → conv (‘same’ padding)
//! ```
//!
//! Written once over the [`crate::backend::Backend`] trait (`forward`, `backward`): the same code runs
//! on the CPU reference and on the kernel devices. Parameter names are spelled only in
//! [`EnformerTrunk::new`]; the positional features are in [`positional`].
//!
//! The attention adds relative-position logits: with `q ← q·dk^−½`, content `(q + u)·k` and position
//! `(q + w)·R[j − i]`, where `R = P·W_rᵀ` and `P` are the exponential / central-mask / gamma features of the
//! key-minus-query distance (computed here in f64, or injected, e.g. DeepMind's TF gamma table).

mod backward;
mod forward;
pub mod positional;
mod tiled;

use super::recompute::Recompute;
use std::collections::HashMap;
use std::sync::Arc;

pub use forward::{BatchNormMode, EnformerActivations};
pub use positional::positional_features;

use super::config::EnformerConfig;
use super::weights::NameResolver;
use crate::runtime::{Layout, TensorSpec};
use crate::{Error, Result};

const BN_EPS: f32 = 1e-5;
const LN_EPS: f32 = 1e-5;
/// PyTorch's default batchnorm momentum.
const BN_MOMENTUM: f32 = 0.1;

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
    /// Elements per tile buffer of bounded-memory inference ([`tiled`]).
    tile_elements: usize,
    /// What a training forward keeps ([`Recompute`]).
    pub(crate) recompute: Recompute,
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
            tile_elements: tiled::TILE_ELEMENTS,
            recompute: Recompute::None,
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

    /// What a training forward keeps from now on: with [`Recompute::Blocks`], only the input of the stem,
    /// of each tower level and of each transformer layer; the backward recomputes each of them.
    pub fn set_recompute(&mut self, policy: Recompute) {
        self.recompute = policy;
    }

    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Elements per tile buffer when inference runs the convolutional levels tile by tile (default 2²¹,
    /// about 8 MiB of f32): smaller tiles lower the peak a little and cost some speed. At least one
    /// position pair of the widest level plus its halo is always used.
    pub fn set_tile_elements(&mut self, elements: usize) {
        self.tile_elements = elements.max(1);
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
        if k == 0 || !gammas.len().is_multiple_of(k) || (gammas.len() / k).is_multiple_of(2) {
            return Err(Error::shape(
                "tf gammas",
                format!("{} values is not [2n−1, {k}]", gammas.len()),
            ));
        }
        let n = (gammas.len() / k).div_ceil(2);
        let table = positional::positional_features_with_gamma(
            n,
            self.cfg.dim / self.cfg.heads,
            Some(gammas),
        );
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

    /// Layout entries of the running statistics of every batchnorm, in block order: `(mean, var)`.
    pub fn running_stat_entries(&self) -> Vec<(usize, usize)> {
        self.conv_blocks()
            .iter()
            .map(|cb| (cb.bn[2], cb.bn[3]))
            .collect()
    }

    /// Every ConvBlock in forward order: the stem's residual, each tower level's conv and residual, the
    /// final pointwise block (the order of [`EnformerActivations`]' block slots).
    fn conv_blocks(&self) -> Vec<&ConvBlock> {
        let mut out = vec![&self.stem_residual];
        for t in &self.tower {
            out.push(&t.conv);
            out.push(&t.residual);
        }
        out.push(&self.final_block);
        out
    }

    /// Names of the output heads and their widths.
    pub fn head_names(&self) -> impl Iterator<Item = (&str, usize)> {
        self.heads.iter().map(|(n, _, _, w)| (n.as_str(), *w))
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

#[cfg(test)]
mod tests {
    use super::*;

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
