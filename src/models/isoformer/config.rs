//! The IsoFormer configuration: one JSON file that names the modalities, the encoders' shapes and weights,
//! the aggregator, the head and the training recipe. Field names follow the released `IsoformerConfig`
//! where it has them (`esm_*`, `nt_*`, `enformer_*`, `num_heads_omics_cross_attention`,
//! `pool_window_start/end`, `num_tokens_per_seq_*`); the defaults are the released model's sizes.
//!
//! Named configurations, one per row of the paper's tables plus the demo, are JSON files under
//! `src/configs/`, embedded in the binary: `--config NAME` finds them, `--config FILE` reads a path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::models::config::{EnformerConfig, EsmConfig, MAX_LAYERS, MAX_WIDTH};
use crate::models::transformer::TransformerConfig;
use crate::{Error, Result};

/// The configurations shipped in the binary: (name, JSON).
pub const NAMED_CONFIGS: &[(&str, &str)] = &[
    ("demo", include_str!("../../configs/demo.json")),
    ("isoformer", include_str!("../../configs/isoformer.json")),
    ("nt-dna", include_str!("../../configs/nt-dna.json")),
    ("nt-rna", include_str!("../../configs/nt-rna.json")),
    ("nt-protein", include_str!("../../configs/nt-protein.json")),
    ("nt-dna-rna", include_str!("../../configs/nt-dna-rna.json")),
    (
        "nt-dna-rna-protein",
        include_str!("../../configs/nt-dna-rna-protein.json"),
    ),
    (
        "isoformer-linear-mean",
        include_str!("../../configs/isoformer-linear-mean.json"),
    ),
    (
        "isoformer-perceiver",
        include_str!("../../configs/isoformer-perceiver.json"),
    ),
    (
        "isoformer-modality-centred",
        include_str!("../../configs/isoformer-modality-centred.json"),
    ),
    (
        "isoformer-random-dna",
        include_str!("../../configs/isoformer-random-dna.json"),
    ),
    (
        "isoformer-random-rna",
        include_str!("../../configs/isoformer-random-rna.json"),
    ),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Dna,
    Rna,
    Protein,
}

impl Modality {
    pub const ALL: [Modality; 3] = [Modality::Dna, Modality::Rna, Modality::Protein];

    pub fn name(self) -> &'static str {
        match self {
            Modality::Dna => "dna",
            Modality::Rna => "rna",
            Modality::Protein => "protein",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnaEncoderKind {
    /// The Enformer trunk on a one-hot window (the released model).
    Enformer,
    /// Nucleotide Transformer v2 on 6-mer tokens of the window (the paper's Table 2).
    Nt,
}

/// How the encoders' outputs are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregator {
    /// The released model: the first modality's stream is the query and cross-attends to each other modality
    /// in turn (DNA ← RNA, then ← protein), with a residual after each; the head pools the query stream.
    CrossAttention,
    /// The paper's general form: every modality's stream is built the same way with the others as context;
    /// each is mean-pooled (the DNA one over the pool window) and the results are concatenated.
    ModalityCentred,
    /// The ablation: a linear projection of each modality to a common width, mean pooling, and a sum.
    LinearMean,
    /// The ablation: a Perceiver Resampler (learned latents cross-attend to every modality, then an FFN,
    /// `perceiver_depth` times); the head averages the latents.
    Perceiver,
}

/// What training does with an encoder's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderMode {
    /// Not trained (and, when every encoder is frozen, its outputs are cached on disk).
    Frozen,
    /// Every weight trained, at `encoder_lr`.
    Finetune,
    /// Frozen weights plus trained low-rank adapters `W + (α/r)·B·Aᵀ` on the attention projections
    /// (`train.lora_targets`), at `encoder_lr`.
    Lora,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderModes {
    #[serde(default = "frozen")]
    pub dna: EncoderMode,
    #[serde(default = "frozen")]
    pub rna: EncoderMode,
    #[serde(default = "frozen")]
    pub protein: EncoderMode,
}

fn frozen() -> EncoderMode {
    EncoderMode::Frozen
}

impl Default for EncoderModes {
    fn default() -> Self {
        EncoderModes {
            dna: EncoderMode::Frozen,
            rna: EncoderMode::Frozen,
            protein: EncoderMode::Frozen,
        }
    }
}

impl EncoderModes {
    pub fn get(&self, m: Modality) -> EncoderMode {
        match m {
            Modality::Dna => self.dna,
            Modality::Rna => self.rna,
            Modality::Protein => self.protein,
        }
    }
}

/// What a trained encoder keeps for its backward ([`crate::models::recompute::Recompute`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeChoice {
    /// The cheapest policy that fits the memory budget: `train` on the CPU and `plan` choose it (fewest
    /// extra FLOPs); without a budget, none.
    #[default]
    Auto,
    /// Keep every block's activations.
    None,
    /// Per-block checkpointing: keep block inputs, recompute each block in the backward.
    Blocks,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecomputeChoices {
    #[serde(default)]
    pub dna: RecomputeChoice,
    #[serde(default)]
    pub rna: RecomputeChoice,
    #[serde(default)]
    pub protein: RecomputeChoice,
}

impl RecomputeChoices {
    pub fn get(&self, m: Modality) -> RecomputeChoice {
        match m {
            Modality::Dna => self.dna,
            Modality::Rna => self.rna,
            Modality::Protein => self.protein,
        }
    }

    pub fn set(&mut self, m: Modality, choice: RecomputeChoice) {
        match m {
            Modality::Dna => self.dna = choice,
            Modality::Rna => self.rna = choice,
            Modality::Protein => self.protein = choice,
        }
    }
}

/// The training recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches summed into one optimiser step.
    #[serde(default = "d_one")]
    pub grad_accum_steps: usize,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Learning rate of the aggregator and the head.
    #[serde(default = "d_lr")]
    pub lr: f32,
    /// Learning rate of fine-tuned encoders.
    #[serde(default = "d_encoder_lr")]
    pub encoder_lr: f32,
    /// AdamW decoupled weight decay (never on biases, norms or running statistics).
    #[serde(default = "d_wd")]
    pub weight_decay: f32,
    #[serde(default = "d_beta1")]
    pub beta1: f32,
    #[serde(default = "d_beta2")]
    pub beta2: f32,
    #[serde(default = "d_eps")]
    pub adam_eps: f32,
    /// Linear warmup steps, then a cosine decay to `min_lr_ratio·lr` at the last step.
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub min_lr_ratio: f32,
    /// Global-norm gradient clipping (none when null).
    #[serde(default = "d_clip")]
    pub max_grad_norm: Option<f32>,
    /// Evaluate on the validation split every N optimiser steps (null: at the end of every epoch).
    #[serde(default)]
    pub eval_every_steps: Option<usize>,
    /// Stop after this many evaluations without a better validation loss (null: never).
    #[serde(default)]
    pub patience: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub encoders: EncoderModes,
    /// Recompute policy of each trained encoder (frozen ones keep nothing): auto, none or blocks.
    #[serde(default)]
    pub recompute: RecomputeChoices,
    /// LoRA rank r and scale α (the update is (α/r)·B·Aᵀ).
    #[serde(default = "d_lora_rank")]
    pub lora_rank: usize,
    #[serde(default = "d_lora_alpha")]
    pub lora_alpha: f32,
    /// Attention projections that get adapters: any of query, key, value, output.
    #[serde(default = "d_lora_targets")]
    pub lora_targets: Vec<String>,
}

fn d_lora_rank() -> usize {
    8
}
fn d_lora_alpha() -> f32 {
    16.0
}
fn d_lora_targets() -> Vec<String> {
    vec!["query".into(), "value".into()]
}

fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_epochs() -> usize {
    10
}
fn d_lr() -> f32 {
    1e-4
}
fn d_encoder_lr() -> f32 {
    1e-5
}
fn d_wd() -> f32 {
    0.01
}
fn d_beta1() -> f32 {
    0.9
}
fn d_beta2() -> f32 {
    0.999
}
fn d_eps() -> f32 {
    1e-8
}
fn d_clip() -> Option<f32> {
    Some(1.0)
}

impl Default for TrainConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// The whole model and its recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsoformerConfig {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The modalities used, in the order the aggregator takes them (the first is the query stream).
    #[serde(default = "d_modalities")]
    pub modalities: Vec<Modality>,
    #[serde(default = "d_dna_encoder")]
    pub dna_encoder: DnaEncoderKind,
    #[serde(default = "d_aggregator")]
    pub aggregator: Aggregator,
    #[serde(default = "d_cross_heads")]
    pub num_heads_omics_cross_attention: usize,
    /// Width of the linear-mean aggregator's common space (default: the first modality's width).
    #[serde(default)]
    pub aggregator_width: Option<usize>,
    /// The Perceiver Resampler's latents and layers.
    #[serde(default = "d_latents")]
    pub perceiver_latents: usize,
    #[serde(default = "d_one")]
    pub perceiver_depth: usize,
    /// Bins (Enformer) or tokens (NT) of the DNA stream that the head averages: `[start, end)`.
    #[serde(default)]
    pub pool_window_start: usize,
    #[serde(default = "d_one")]
    pub pool_window_end: usize,
    /// Hidden widths of the head's MLP (GELU between layers); empty: one linear layer.
    #[serde(default)]
    pub head_hidden: Vec<usize>,
    #[serde(default = "d_tissues")]
    pub num_tissues: usize,
    /// DNA window around the TSS, in bases.
    #[serde(default = "d_dna_len")]
    pub dna_sequence_length: usize,
    /// Token budgets, special tokens included: DNA through NT, RNA through NT, protein through ESM-2.
    #[serde(default = "d_tokens")]
    pub num_tokens_per_seq_nuctf: usize,
    #[serde(default = "d_tokens")]
    pub num_tokens_per_seq_nuctf_rna: usize,
    #[serde(default = "d_tokens")]
    pub num_protein_tokens_per_seq: usize,

    #[serde(default = "d_enf_dim")]
    pub enformer_dim: usize,
    #[serde(default = "d_enf_depth")]
    pub enformer_depth: usize,
    #[serde(default = "d_eight")]
    pub enformer_heads: usize,
    #[serde(default = "d_enf_key")]
    pub enformer_attn_dim_key: usize,
    #[serde(default = "d_enf_target")]
    pub enformer_target_length: usize,
    #[serde(default = "d_enf_down")]
    pub enformer_num_downsamples: usize,
    #[serde(default = "d_enf_div")]
    pub enformer_dim_divisible_by: usize,
    #[serde(default)]
    pub enformer_use_tf_gamma: bool,

    #[serde(default = "d_nt_hidden")]
    pub nt_hidden_size: usize,
    #[serde(default = "d_nt_layers")]
    pub nt_num_hidden_layers: usize,
    #[serde(default = "d_nt_heads")]
    pub nt_num_attention_heads: usize,
    #[serde(default = "d_nt_ffn")]
    pub nt_intermediate_size: usize,
    #[serde(default = "d_ln_eps")]
    pub nt_layer_norm_eps: f64,

    #[serde(default = "d_esm_hidden")]
    pub esm_hidden_size: usize,
    #[serde(default = "d_esm_layers")]
    pub esm_num_hidden_layers: usize,
    #[serde(default = "d_esm_heads")]
    pub esm_num_attention_heads: usize,
    #[serde(default = "d_esm_ffn")]
    pub esm_intermediate_size: usize,
    #[serde(default = "d_ln_eps")]
    pub esm_layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub esm_token_dropout: bool,

    /// Pre-trained weights per encoder (a `save_pretrained` directory); null: random initialisation.
    #[serde(default)]
    pub weights_dna: Option<PathBuf>,
    #[serde(default)]
    pub weights_rna: Option<PathBuf>,
    #[serde(default)]
    pub weights_protein: Option<PathBuf>,
    /// Encoders that start from random weights (the paper's transfer ablation, and the demo). Every other
    /// encoder needs pre-trained weights.
    #[serde(default)]
    pub random_init: Vec<Modality>,

    #[serde(default)]
    pub train: TrainConfig,
}

fn d_latents() -> usize {
    64
}
fn d_modalities() -> Vec<Modality> {
    Modality::ALL.to_vec()
}
fn d_dna_encoder() -> DnaEncoderKind {
    DnaEncoderKind::Enformer
}
fn d_aggregator() -> Aggregator {
    Aggregator::CrossAttention
}
fn d_cross_heads() -> usize {
    8
}
fn d_eight() -> usize {
    8
}
fn d_tissues() -> usize {
    30
}
fn d_dna_len() -> usize {
    196_608
}
fn d_tokens() -> usize {
    2048
}
fn d_enf_dim() -> usize {
    1536
}
fn d_enf_depth() -> usize {
    11
}
fn d_enf_key() -> usize {
    64
}
fn d_enf_target() -> usize {
    896
}
fn d_enf_down() -> usize {
    7
}
fn d_enf_div() -> usize {
    128
}
fn d_nt_hidden() -> usize {
    768
}
fn d_nt_layers() -> usize {
    24
}
fn d_nt_heads() -> usize {
    16
}
fn d_nt_ffn() -> usize {
    3072
}
fn d_ln_eps() -> f64 {
    1e-12
}
fn d_esm_hidden() -> usize {
    640
}
fn d_esm_layers() -> usize {
    30
}
fn d_esm_heads() -> usize {
    20
}
fn d_esm_ffn() -> usize {
    2560
}
fn d_true() -> bool {
    true
}

/// The longest DNA window (the data pipeline's bound too).
pub const MAX_DNA_LEN: usize = 1 << 24;

/// ESM-2's vocabulary and special ids; NT-v2's.
const ESM_VOCAB: usize = 33;
const NT_VOCAB: usize = 4107;

impl Default for IsoformerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl IsoformerConfig {
    /// A named configuration shipped in the binary, or a JSON file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if let Some((_, json)) = NAMED_CONFIGS.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(
                json,
                Path::new(&format!("<built-in config {name_or_path}>")),
            );
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<&str> = NAMED_CONFIGS.iter().map(|(n, _)| *n).collect();
            return Err(Error::invalid(
                "--config",
                format!(
                    "'{name_or_path}' is neither a file nor a built-in config ({})",
                    names.join(", ")
                ),
            ));
        }
        let text = crate::runtime::input::read_config_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses and validates a configuration; errors name `origin` and the JSON line.
    pub fn parse(json: &str, origin: &Path) -> Result<Self> {
        let c: Self = serde_json::from_str(json).map_err(|e| Error::Parse {
            path: origin.to_path_buf(),
            line: Some(e.line()),
            msg: e.to_string(),
        })?;
        c.validate().map_err(|msg| Error::Parse {
            path: origin.to_path_buf(),
            line: None,
            msg,
        })?;
        Ok(c)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }

    /// The RNA letters the RNA encoder reads, from the 3′ end: its token budget less `<cls>`, six letters a
    /// token. The dataset keeps these, and the tokenizer cuts any longer text to them before it splits it
    /// ([`crate::models::tokenizers::Tokenizer::encode`]), so a transcript's 6-mers start at the same
    /// letter whichever way it arrives.
    pub fn rna_letters(&self) -> usize {
        self.num_tokens_per_seq_nuctf_rna.saturating_sub(1).max(1) * 6
    }

    /// The protein residues the protein encoder reads, from the N-terminus: its token budget less `<cls>`
    /// and `<eos>`.
    pub fn protein_residues(&self) -> usize {
        self.num_protein_tokens_per_seq.saturating_sub(2).max(1)
    }

    pub fn has(&self, m: Modality) -> bool {
        self.modalities.contains(&m)
    }

    /// Checks everything a model build relies on, with a message naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.modalities.is_empty() {
            return Err("modalities: at least one of dna, rna, protein".into());
        }
        let mut seen = self.modalities.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.modalities.len() {
            return Err("modalities: a modality is listed twice".into());
        }
        for (name, v, max) in [
            (
                "num_heads_omics_cross_attention",
                self.num_heads_omics_cross_attention,
                1024,
            ),
            ("num_tissues", self.num_tissues, 1 << 16),
            ("dna_sequence_length", self.dna_sequence_length, MAX_DNA_LEN),
            (
                "num_tokens_per_seq_nuctf",
                self.num_tokens_per_seq_nuctf,
                1 << 20,
            ),
            (
                "num_tokens_per_seq_nuctf_rna",
                self.num_tokens_per_seq_nuctf_rna,
                1 << 20,
            ),
            (
                "num_protein_tokens_per_seq",
                self.num_protein_tokens_per_seq,
                1 << 20,
            ),
            ("train.batch_size", self.train.batch_size, 1 << 16),
            (
                "train.grad_accum_steps",
                self.train.grad_accum_steps,
                1 << 16,
            ),
            ("train.epochs", self.train.epochs, 1 << 20),
        ] {
            if v == 0 || v > max {
                return Err(format!("{name} {v} is outside 1..={max}"));
            }
        }
        for (name, v) in self.head_hidden.iter().map(|&w| ("head_hidden", w)) {
            if v == 0 || v > MAX_WIDTH {
                return Err(format!("{name} width {v} is outside 1..={MAX_WIDTH}"));
            }
        }
        if self.head_hidden.len() > MAX_LAYERS {
            return Err("head_hidden has too many layers".into());
        }
        if self.pool_window_start >= self.pool_window_end {
            return Err(format!(
                "pool window [{}, {}) is empty",
                self.pool_window_start, self.pool_window_end
            ));
        }
        let t = &self.train;
        for (name, v) in [
            ("train.lr", t.lr),
            ("train.encoder_lr", t.encoder_lr),
            ("train.weight_decay", t.weight_decay),
            ("train.min_lr_ratio", t.min_lr_ratio),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} {v} must be finite and non-negative"));
            }
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) || t.adam_eps <= 0.0 {
            return Err("train.beta1/beta2 must be in [0, 1) and adam_eps positive".into());
        }
        if let Some(c) = t.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("train.max_grad_norm {c} must be positive"));
            }
        }
        if t.lora_rank == 0
            || t.lora_rank > 4096
            || !(t.lora_alpha.is_finite() && t.lora_alpha > 0.0)
        {
            return Err(format!(
                "train.lora_rank {} must be in 1..=4096 and lora_alpha {} positive",
                t.lora_rank, t.lora_alpha
            ));
        }
        if let Some(bad) = t
            .lora_targets
            .iter()
            .find(|x| !["query", "key", "value", "output"].contains(&x.as_str()))
        {
            return Err(format!(
                "train.lora_targets: '{bad}' (expected query, key, value or output)"
            ));
        }
        if t.eval_every_steps == Some(0) {
            return Err("train.eval_every_steps must be positive (or null)".into());
        }
        // Build every encoder config to run their own checks.
        if self.has(Modality::Dna) {
            match self.dna_encoder {
                DnaEncoderKind::Enformer => {
                    let e = self.enformer_config();
                    e.validate()?;
                    let bins = self.dna_sequence_length >> e.num_downsamples;
                    if !self
                        .dna_sequence_length
                        .is_multiple_of(1 << e.num_downsamples)
                        || bins < e.target_length
                    {
                        return Err(format!(
                            "dna_sequence_length {} must be a multiple of 2^{} giving at least enformer_target_length {} bins",
                            self.dna_sequence_length, e.num_downsamples, e.target_length
                        ));
                    }
                    if self.pool_window_end > e.target_length {
                        return Err(format!(
                            "pool_window_end {} is past the {} Enformer bins",
                            self.pool_window_end, e.target_length
                        ));
                    }
                }
                DnaEncoderKind::Nt => {
                    self.nt_esm_config().validate()?;
                    if self.pool_window_end > self.num_tokens_per_seq_nuctf {
                        return Err(format!(
                            "pool_window_end {} is past num_tokens_per_seq_nuctf {}",
                            self.pool_window_end, self.num_tokens_per_seq_nuctf
                        ));
                    }
                }
            }
        }
        if self.has(Modality::Rna) {
            self.nt_esm_config().validate()?;
        }
        if self.has(Modality::Protein) {
            self.esm_esm_config().validate()?;
        }
        let q = self.width(self.modalities[0]);
        let agg_width = match self.aggregator {
            Aggregator::CrossAttention | Aggregator::ModalityCentred => {
                for &m in &self.modalities {
                    let w = self.width(m);
                    let queried =
                        self.aggregator == Aggregator::ModalityCentred || m == self.modalities[0];
                    if queried && !w.is_multiple_of(self.num_heads_omics_cross_attention) {
                        return Err(format!(
                            "the {} width {w} does not split into {} cross-attention heads",
                            m.name(),
                            self.num_heads_omics_cross_attention
                        ));
                    }
                }
                q
            }
            Aggregator::LinearMean => self.aggregator_width.unwrap_or(q),
            Aggregator::Perceiver => {
                let w = self.aggregator_width.unwrap_or(q);
                if !w.is_multiple_of(self.num_heads_omics_cross_attention) {
                    return Err(format!(
                        "the resampler width {w} does not split into {} heads",
                        self.num_heads_omics_cross_attention
                    ));
                }
                for (name, v) in [
                    ("perceiver_latents", self.perceiver_latents),
                    ("perceiver_depth", self.perceiver_depth),
                ] {
                    if v == 0 || v > 4096 {
                        return Err(format!("{name} {v} is outside 1..=4096"));
                    }
                }
                w
            }
        };
        if agg_width == 0 || agg_width > MAX_WIDTH {
            return Err(format!(
                "aggregator_width {agg_width} is outside 1..={MAX_WIDTH}"
            ));
        }
        Ok(())
    }

    pub fn enformer_config(&self) -> EnformerConfig {
        EnformerConfig {
            dim: self.enformer_dim,
            depth: self.enformer_depth,
            heads: self.enformer_heads,
            attn_dim_key: self.enformer_attn_dim_key,
            target_length: self.enformer_target_length,
            num_downsamples: self.enformer_num_downsamples,
            dim_divisible_by: self.enformer_dim_divisible_by,
            use_tf_gamma: self.enformer_use_tf_gamma,
            output_heads: Default::default(),
        }
    }

    fn nt_esm_config(&self) -> EsmConfig {
        EsmConfig {
            vocab_size: NT_VOCAB,
            hidden_size: self.nt_hidden_size,
            num_hidden_layers: self.nt_num_hidden_layers,
            num_attention_heads: self.nt_num_attention_heads,
            intermediate_size: self.nt_intermediate_size,
            layer_norm_eps: self.nt_layer_norm_eps,
            token_dropout: false,
            mask_token_id: 2,
            pad_token_id: 1,
            position_embedding_type: "rotary".into(),
            emb_layer_norm_before: false,
            add_bias_fnn: false,
        }
    }

    fn esm_esm_config(&self) -> EsmConfig {
        EsmConfig {
            vocab_size: ESM_VOCAB,
            hidden_size: self.esm_hidden_size,
            num_hidden_layers: self.esm_num_hidden_layers,
            num_attention_heads: self.esm_num_attention_heads,
            intermediate_size: self.esm_intermediate_size,
            layer_norm_eps: self.esm_layer_norm_eps,
            token_dropout: self.esm_token_dropout,
            mask_token_id: 32,
            pad_token_id: 1,
            position_embedding_type: "rotary".into(),
            emb_layer_norm_before: false,
            add_bias_fnn: true,
        }
    }

    /// The NT-v2 transformer (RNA, and DNA when NT is the DNA encoder).
    pub fn nt_transformer(&self) -> TransformerConfig {
        TransformerConfig::nucleotide_transformer_v2(&self.nt_esm_config())
    }

    pub fn esm_transformer(&self) -> TransformerConfig {
        TransformerConfig::esm2(&self.esm_esm_config())
    }

    /// Width of a modality's per-position embedding.
    pub fn width(&self, m: Modality) -> usize {
        match m {
            Modality::Dna => match self.dna_encoder {
                DnaEncoderKind::Enformer => 2 * self.enformer_dim,
                DnaEncoderKind::Nt => self.nt_hidden_size,
            },
            Modality::Rna => self.nt_hidden_size,
            Modality::Protein => self.esm_hidden_size,
        }
    }

    /// Weights directory of a modality's encoder, if pre-trained.
    pub fn weights(&self, m: Modality) -> Option<&Path> {
        match m {
            Modality::Dna => self.weights_dna.as_deref(),
            Modality::Rna => self.weights_rna.as_deref(),
            Modality::Protein => self.weights_protein.as_deref(),
        }
    }

    pub fn set_weights(&mut self, m: Modality, path: Option<PathBuf>) {
        match m {
            Modality::Dna => self.weights_dna = path,
            Modality::Rna => self.weights_rna = path,
            Modality::Protein => self.weights_protein = path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_config_parses_and_validates() {
        for (name, _) in NAMED_CONFIGS {
            let c = IsoformerConfig::resolve(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.name, *name);
        }
    }

    #[test]
    fn typos_and_bad_values_are_errors_that_name_the_field() {
        let e =
            IsoformerConfig::parse(r#"{"modalitys": ["dna"]}"#, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("modalitys"), "{e}");
        let e = IsoformerConfig::parse(
            r#"{"pool_window_start": 3, "pool_window_end": 3}"#,
            Path::new("c.json"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("pool window"), "{e}");
        let e =
            IsoformerConfig::parse(r#"{"train": {"lr": -1}}"#, Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("train.lr"), "{e}");
    }
}
