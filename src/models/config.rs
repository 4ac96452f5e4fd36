//! Model configurations read from HF-style `config.json` files.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = crate::runtime::input::read_config_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: Some(e.line()),
        msg: e.to_string(),
    })
}

/// A config read from `path` and checked by `validate`, whose message becomes a parse error naming the file.
fn read_validated<T: for<'de> Deserialize<'de>>(
    path: &Path,
    validate: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let c: T = read_json(path)?;
    validate(&c).map_err(|msg| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg,
    })?;
    Ok(c)
}

/// Bounds on model sizes read from a config: far above any published model (ESM-2 15B: 48 layers, width
/// 5120; Enformer: width 1536), and low enough that a corrupt or hostile config is refused before a layout
/// of its size is built.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_VOCAB: usize = 1 << 20;

/// ESM-2 and NT-v2 (`model_type: "esm"`): the fields the encoder needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct EsmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub token_dropout: bool,
    #[serde(default = "default_mask")]
    pub mask_token_id: u32,
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_rotary")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub emb_layer_norm_before: bool,
    /// NT-v2 sets this false: its FFN is a bias-free SwiGLU.
    #[serde(default = "default_true")]
    pub add_bias_fnn: bool,
}

fn default_ln_eps() -> f64 {
    1e-12
}
fn default_mask() -> u32 {
    32
}
fn default_pad() -> u32 {
    1
}
fn default_rotary() -> String {
    "absolute".into()
}
fn default_true() -> bool {
    true
}

impl EsmConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_validated(path, Self::validate)
    }

    /// Checks what the encoder relies on; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        let bad = |msg: String| Err(msg);
        if c.position_embedding_type != "rotary" {
            return bad(format!(
                "position_embedding_type '{}' is not supported (rotary only: ESM-2, NT-v2)",
                c.position_embedding_type
            ));
        }
        if c.emb_layer_norm_before {
            return bad(
                "emb_layer_norm_before = true is not supported (ESM-2 and NT-v2 use false)".into(),
            );
        }
        if !(c.layer_norm_eps > 0.0 && c.layer_norm_eps < 1.0) {
            return bad(format!(
                "layer_norm_eps {} must be in (0, 1)",
                c.layer_norm_eps
            ));
        }
        for (name, value, max) in [
            ("vocab_size", c.vocab_size, MAX_VOCAB),
            ("hidden_size", c.hidden_size, MAX_WIDTH),
            ("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", c.num_attention_heads, MAX_WIDTH),
            ("intermediate_size", c.intermediate_size, 4 * MAX_WIDTH),
        ] {
            if value == 0 || value > max {
                return bad(format!("{name} {value} is outside 1..={max}"));
            }
        }
        if c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads)
            || !(c.hidden_size / c.num_attention_heads).is_multiple_of(2)
        {
            return bad(format!(
                "hidden_size {} does not split into {} heads of even width",
                c.hidden_size, c.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Enformer (`enformer-pytorch` `EnformerConfig`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct EnformerConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub attn_dim_key: usize,
    #[serde(default = "default_target_length")]
    pub target_length: usize,
    #[serde(default = "default_downsamples")]
    pub num_downsamples: usize,
    #[serde(default = "default_divisible")]
    pub dim_divisible_by: usize,
    #[serde(default)]
    pub use_tf_gamma: bool,
    /// Output heads by name and width (`{"human": 5313, "mouse": 1643}`); may be empty.
    #[serde(default)]
    pub output_heads: std::collections::BTreeMap<String, usize>,
}

fn default_target_length() -> usize {
    896
}
fn default_downsamples() -> usize {
    7
}
fn default_divisible() -> usize {
    128
}

impl EnformerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_validated(path, Self::validate)
    }

    /// Checks what the trunk relies on; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        let bad = |msg: String| Err(msg);
        if c.heads == 0 || !c.dim.is_multiple_of(c.heads) || !(c.dim / c.heads).is_multiple_of(6) {
            return bad(format!(
                "dim {} / heads {} must be a multiple of 6 (relative position features)",
                c.dim, c.heads
            ));
        }
        if c.num_downsamples < 2 || c.num_downsamples > 16 || !c.dim.is_multiple_of(2) {
            return bad("num_downsamples must be in 2..=16 and dim even".into());
        }
        for (name, value, max) in [
            ("dim", c.dim, MAX_WIDTH),
            ("depth", c.depth, MAX_LAYERS),
            ("attn_dim_key", c.attn_dim_key, MAX_WIDTH),
            ("target_length", c.target_length, 1 << 20),
            ("dim_divisible_by", c.dim_divisible_by, MAX_WIDTH),
        ] {
            if value == 0 || value > max {
                return bad(format!("{name} {value} is outside 1..={max}"));
            }
        }
        if let Some((name, &w)) = c.output_heads.iter().find(|(_, &w)| w == 0 || w > 1 << 20) {
            return bad(format!(
                "output head '{name}' has width {w}, outside 1..={}",
                1 << 20
            ));
        }
        Ok(())
    }

    /// Channel widths of the stem and tower: `[dim/2] + exponential_linspace_int(dim/2, dim, n-1, k)`.
    pub fn filters(&self) -> Vec<usize> {
        let half = self.dim / 2;
        let n = self.num_downsamples - 1;
        let k = self.dim_divisible_by as f64;
        let mut f = vec![half];
        for i in 0..n {
            let v = half as f64
                * (self.dim as f64 / half as f64).powf(i as f64 / (n.max(2) - 1) as f64);
            f.push((round_half_even(v / k) * k) as usize);
        }
        f
    }
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enformer_filters_match_the_reference_lists() {
        let full = EnformerConfig {
            dim: 1536,
            depth: 11,
            heads: 8,
            attn_dim_key: 64,
            target_length: 896,
            num_downsamples: 7,
            dim_divisible_by: 128,
            use_tf_gamma: false,
            output_heads: Default::default(),
        };
        assert_eq!(full.filters(), [768, 768, 896, 1024, 1152, 1280, 1536]);
        let tiny = EnformerConfig {
            dim: 96,
            depth: 2,
            heads: 2,
            attn_dim_key: 16,
            num_downsamples: 3,
            dim_divisible_by: 16,
            ..full
        };
        assert_eq!(tiny.filters(), [48, 48, 96]);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }
}
