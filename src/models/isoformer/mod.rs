//! IsoFormer (Garau-Luis et al., NeurIPS 2024): three encoders, an aggregation module and a regression head
//! that predicts a transcript's expression in every tissue.
//!
//! ```text
//! DNA window → Enformer trunk (or NT-v2)  → h_dna  [B, bins, D]
//! RNA        → NT-v2                      → h_rna  [B, L_r, 768]
//! protein    → ESM-2                      → h_prot [B, L_p, 640]   (missing protein: gated to zero)
//! aggregator (cross_attention, the released model):
//!   z₁ = h_dna + W_o·Attn(W_q·h_dna, W_k·h_rna, W_v·h_rna) ;  z₂ = z₁ + W_o·Attn(W_q·z₁, W_k·h_prot, W_v·h_prot)
//! head: mean of z₂ over the bins [pool_window_start, pool_window_end) → MLP → [B, tissues]
//! ```
//!
//! Written once over the [`Backend`] trait, forward and backward, like the encoders it calls. Parameters
//! are grouped in *sections* (one per encoder, then the aggregator and head), so a training run can keep
//! frozen sections in an inference parameter set and trainable ones in a [`crate::backend::state::TrainState`]:
//! each section's views are a contiguous run of one set. Names are spelled only in [`Isoformer::new`] (the
//! aggregator's follow the released checkpoint: `cross_attention_layer_rna.query.weight`, …).

mod aggregate;
pub mod config;
mod cross;
pub mod init;
mod perceiver;
pub mod release;

use std::sync::Arc;

pub use aggregate::AggregateActivations;
pub use config::{
    Aggregator, DnaEncoderKind, EncoderMode, IsoformerConfig, Modality, RecomputeChoice,
    RecomputeChoices, NAMED_CONFIGS,
};

use crate::backend::{Backend, View, ViewMut};
use crate::models::enformer::{BatchNormMode, EnformerActivations, EnformerTrunk};
use crate::models::recompute::Recompute;
use crate::models::tokenizers::{dna_one_hot, Tokenizer};
use crate::models::transformer::{EncoderActivations, TransformerEncoder};
use crate::runtime::{Layout, TensorSpec};
use crate::{Error, Result};

/// The most one-hot values one batch's DNA may hold (4 GiB of f32).
pub const MAX_INPUT_ELEMENTS: usize = 1 << 30;

/// One encoder's network.
#[derive(Clone, Debug)]
pub enum EncoderNet {
    Enformer(Box<EnformerTrunk>),
    Transformer(TransformerEncoder),
}

impl EncoderNet {
    pub fn layout(&self) -> &Arc<Layout> {
        match self {
            EncoderNet::Enformer(t) => t.layout(),
            EncoderNet::Transformer(t) => t.layout(),
        }
    }

    /// What its training forward keeps ([`Recompute`]).
    pub fn set_recompute(&mut self, policy: Recompute) {
        match self {
            EncoderNet::Enformer(t) => t.set_recompute(policy),
            EncoderNet::Transformer(t) => t.set_recompute(policy),
        }
    }

    pub fn recompute(&self) -> Recompute {
        match self {
            EncoderNet::Enformer(t) => t.recompute(),
            EncoderNet::Transformer(t) => t.recompute(),
        }
    }
}

/// The module name of the aggregator and head (memory attribution, [`Backend::enter_module`]).
pub const AGGREGATOR: &str = "aggregator";

/// A modality's encoder and how its inputs are prepared.
#[derive(Clone, Debug)]
pub struct Encoder {
    pub modality: Modality,
    pub net: EncoderNet,
    tokenizer: Option<Tokenizer>,
    max_tokens: usize,
}

/// A run of entries of the combined layout that belongs to one part of the model.
#[derive(Clone, Debug)]
pub struct Section {
    /// `dna`, `rna`, `protein` or `aggregator` (the aggregator and head).
    pub name: String,
    /// The name prefix of its entries in the combined layout.
    pub prefix: String,
    pub layout: Arc<Layout>,
}

/// Positions, in the aggregator section's layout, of one cross-attention block's linears.
#[derive(Clone, Debug)]
struct CrossAttnParams {
    /// The modality whose stream is the query, and the context modality.
    query: Modality,
    context: Modality,
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    o: (usize, usize),
    width: usize,
    heads: usize,
}

/// Positions of the aggregator's and head's parameters.
#[derive(Clone, Debug)]
struct TopParams {
    /// Cross-attention blocks in the order they run.
    cross: Vec<CrossAttnParams>,
    /// Linear-mean projections per modality: (modality, weight, bias).
    project: Vec<(Modality, usize, usize)>,
    /// The head's first layer: one weight per pooled part (their sum is the linear map of the
    /// concatenation), and its bias.
    head_in: Vec<(Modality, usize)>,
    head_in_bias: usize,
    /// The rest of the head: (weight, bias, d_in, d_out).
    head_rest: Vec<(usize, usize, usize, usize)>,
    perceiver: Option<perceiver::PerceiverParams>,
}

/// The model: configuration, encoders, parameter sections.
#[derive(Clone, Debug)]
pub struct Isoformer {
    pub cfg: IsoformerConfig,
    pub encoders: Vec<Encoder>,
    sections: Vec<Section>,
    top: TopParams,
    layout: Arc<Layout>,
}

/// The prepared inputs of one batch (host side).
#[derive(Clone, Debug)]
pub struct IsoformerInputs {
    pub batch: usize,
    /// Per encoder, in `encoders` order.
    pub encoded: Vec<EncodedInput>,
    /// Per modality present: 1 where the sample has it, 0 where it is missing (protein of non-coding RNA).
    pub present: Vec<(Modality, Vec<f32>)>,
}

#[derive(Clone, Debug)]
pub enum EncodedInput {
    /// Enformer: one-hot `[batch, len, 4]`.
    OneHot { data: Vec<f32>, len: usize },
    /// Transformers: right-padded ids `[batch, len]` and real lengths.
    Tokens {
        ids: Vec<u32>,
        lens: Vec<usize>,
        len: usize,
    },
}

impl EncodedInput {
    /// Valid positions of each sample in the encoder's output, and the padded length.
    fn output_rows(&self, enc: &Encoder, batch: usize) -> (Vec<usize>, usize) {
        match (self, &enc.net) {
            (EncodedInput::Tokens { lens, len, .. }, _) => (lens.clone(), *len),
            (EncodedInput::OneHot { .. }, EncoderNet::Enformer(t)) => {
                (vec![t.cfg.target_length; batch], t.cfg.target_length)
            }
            (EncodedInput::OneHot { .. }, EncoderNet::Transformer(_)) => (vec![0; batch], 0),
        }
    }
}

/// One sample's raw sequences.
#[derive(Clone, Copy, Debug)]
pub struct SampleSeqs<'a> {
    pub dna: &'a [u8],
    pub rna: &'a str,
    pub protein: Option<&'a str>,
}

/// What an encoder keeps from a forward.
// One value per encoder per model: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum EncoderActs<B: Backend> {
    Transformer(EncoderActivations<B>),
    Enformer(EnformerActivations<B>),
}

/// Activations of a whole forward.
pub struct IsoformerActivations<B: Backend> {
    pub encoders: Vec<EncoderActs<B>>,
    pub aggregate: AggregateActivations<B>,
}

impl<B: Backend> Default for IsoformerActivations<B> {
    fn default() -> Self {
        IsoformerActivations {
            encoders: Vec::new(),
            aggregate: AggregateActivations::default(),
        }
    }
}

/// Encoder outputs handed to the aggregator: per modality, `[batch, len, width]` and valid rows.
pub struct EncoderOutput<'a, B> {
    pub modality: Modality,
    pub hidden: View<'a, B>,
    pub lens: Vec<usize>,
    pub len: usize,
}

struct TopSpecs(Vec<TensorSpec>);

impl TopSpecs {
    fn push(&mut self, name: String, shape: Vec<usize>) -> usize {
        self.0.push(TensorSpec::f32(name, shape));
        self.0.len() - 1
    }

    /// A LayerNorm's scale and shift.
    fn linear_norm(&mut self, name: &str, d: usize) -> (usize, usize) {
        (
            self.push(format!("{name}.weight"), vec![d]),
            self.push(format!("{name}.bias"), vec![d]),
        )
    }

    fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> (usize, usize) {
        (
            self.push(format!("{name}.weight"), vec![d_out, d_in]),
            self.push(format!("{name}.bias"), vec![d_out]),
        )
    }
}

impl Isoformer {
    /// What modality `m`'s encoder keeps in a training forward from now on.
    pub fn set_recompute(&mut self, m: Modality, policy: Recompute) {
        for e in self.encoders.iter_mut().filter(|e| e.modality == m) {
            e.net.set_recompute(policy);
        }
    }

    pub fn new(cfg: IsoformerConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|m| Error::invalid("isoformer config", m))?;
        let mut encoders = Vec::new();
        for &m in &cfg.modalities {
            let (net, tokenizer, max_tokens) = match (m, cfg.dna_encoder) {
                (Modality::Dna, DnaEncoderKind::Enformer) => (
                    EncoderNet::Enformer(Box::new(EnformerTrunk::new(cfg.enformer_config())?)),
                    None,
                    0,
                ),
                (Modality::Dna, DnaEncoderKind::Nt) => (
                    EncoderNet::Transformer(TransformerEncoder::new(cfg.nt_transformer())?),
                    Some(Tokenizer::nucleotide_transformer_v2()),
                    cfg.num_tokens_per_seq_nuctf,
                ),
                (Modality::Rna, _) => (
                    EncoderNet::Transformer(TransformerEncoder::new(cfg.nt_transformer())?),
                    Some(Tokenizer::nucleotide_transformer_v2()),
                    cfg.num_tokens_per_seq_nuctf_rna,
                ),
                (Modality::Protein, _) => (
                    EncoderNet::Transformer(TransformerEncoder::new(cfg.esm_transformer())?),
                    Some(Tokenizer::esm2()),
                    cfg.num_protein_tokens_per_seq,
                ),
            };
            let mut encoder = Encoder {
                modality: m,
                net,
                tokenizer,
                max_tokens,
            };
            if cfg.train.recompute.get(m) == RecomputeChoice::Blocks {
                encoder.net.set_recompute(Recompute::Blocks);
            }
            encoders.push(encoder);
        }

        // The aggregator and head.
        let mut s = TopSpecs(Vec::new());
        let heads = cfg.num_heads_omics_cross_attention;
        let mut cross = Vec::new();
        let mut project = Vec::new();
        let mut head_parts = Vec::new();
        let queries: Vec<Modality> = match cfg.aggregator {
            Aggregator::CrossAttention => vec![cfg.modalities[0]],
            Aggregator::ModalityCentred => cfg.modalities.clone(),
            Aggregator::LinearMean | Aggregator::Perceiver => Vec::new(),
        };
        for &q in &queries {
            let width = cfg.width(q);
            for &c in cfg.modalities.iter().filter(|&&c| c != q) {
                // The released names for the DNA-centred blocks; `<query>_to_<context>` otherwise.
                let name = if cfg.aggregator == Aggregator::CrossAttention && q == Modality::Dna {
                    format!("cross_attention_layer_{}", c.name())
                } else {
                    format!("cross_attention_{}_to_{}", q.name(), c.name())
                };
                let cw = cfg.width(c);
                cross.push(CrossAttnParams {
                    query: q,
                    context: c,
                    q: s.linear(&format!("{name}.query"), width, width),
                    k: s.linear(&format!("{name}.key"), cw, width),
                    v: s.linear(&format!("{name}.value"), cw, width),
                    o: s.linear(&format!("{name}.dense"), width, width),
                    width,
                    heads,
                });
            }
            head_parts.push((q, width));
        }
        if cfg.aggregator == Aggregator::LinearMean {
            let w = cfg.aggregator_width.unwrap_or(cfg.width(cfg.modalities[0]));
            for &m in &cfg.modalities {
                let (pw, pb) = s.linear(&format!("projection_{}", m.name()), cfg.width(m), w);
                project.push((m, pw, pb));
            }
            head_parts = vec![(cfg.modalities[0], w)];
        }
        let mut perceiver = None;
        if cfg.aggregator == Aggregator::Perceiver {
            let d = cfg.aggregator_width.unwrap_or(cfg.width(cfg.modalities[0]));
            let n = cfg.perceiver_latents;
            let latents = s.push("perceiver.latents".into(), vec![n, d]);
            let mut layers = Vec::new();
            for l in 0..cfg.perceiver_depth {
                let pre = format!("perceiver.layers.{l}");
                let cross = cfg
                    .modalities
                    .iter()
                    .map(|&m| {
                        let norm = s.linear_norm(&format!("{pre}.norm_{}", m.name()), d);
                        let name = format!("{pre}.cross_attention_{}", m.name());
                        let cw = cfg.width(m);
                        let c = CrossAttnParams {
                            query: cfg.modalities[0],
                            context: m,
                            q: s.linear(&format!("{name}.query"), d, d),
                            k: s.linear(&format!("{name}.key"), cw, d),
                            v: s.linear(&format!("{name}.value"), cw, d),
                            o: s.linear(&format!("{name}.dense"), d, d),
                            width: d,
                            heads,
                        };
                        (norm, c)
                    })
                    .collect();
                layers.push(perceiver::PerceiverLayer {
                    cross,
                    ffn_norm: s.linear_norm(&format!("{pre}.ffn_norm"), d),
                    ffn_in: s.linear(&format!("{pre}.ffn.0"), d, 4 * d),
                    ffn_out: s.linear(&format!("{pre}.ffn.1"), 4 * d, d),
                });
            }
            let norm = s.linear_norm("perceiver.norm", d);
            perceiver = Some(perceiver::PerceiverParams {
                latents,
                n,
                width: d,
                layers,
                norm,
            });
            head_parts = vec![(cfg.modalities[0], d)];
        }
        let first_out = cfg.head_hidden.first().copied().unwrap_or(cfg.num_tissues);
        let head_in: Vec<(Modality, usize)> = if head_parts.len() == 1 {
            vec![(
                head_parts[0].0,
                s.push("head.0.weight".into(), vec![first_out, head_parts[0].1]),
            )]
        } else {
            head_parts
                .iter()
                .map(|&(m, w)| {
                    (
                        m,
                        s.push(format!("head.0.weight_{}", m.name()), vec![first_out, w]),
                    )
                })
                .collect()
        };
        let head_in_bias = s.push("head.0.bias".into(), vec![first_out]);
        let mut head_rest = Vec::new();
        let mut widths = cfg.head_hidden.clone();
        widths.push(cfg.num_tissues);
        for (i, pair) in widths.windows(2).enumerate() {
            let (w, b) = s.linear(&format!("head.{}", i + 1), pair[0], pair[1]);
            head_rest.push((w, b, pair[0], pair[1]));
        }
        let top_layout = Arc::new(Layout::sequential(s.0)?);

        let mut sections: Vec<Section> = encoders
            .iter()
            .map(|e| Section {
                name: e.modality.name().into(),
                prefix: format!("{}.", e.modality.name()),
                layout: e.net.layout().clone(),
            })
            .collect();
        sections.push(Section {
            name: "aggregator".into(),
            prefix: String::new(),
            layout: top_layout,
        });
        let layout = Arc::new(Self::combine(
            &sections,
            &(0..sections.len()).collect::<Vec<_>>(),
        )?);
        Ok(Isoformer {
            cfg,
            encoders,
            sections,
            top: TopParams {
                cross,
                project,
                head_in,
                head_in_bias,
                head_rest,
                perceiver,
            },
            layout,
        })
    }

    /// The sections: one per encoder (in `cfg.modalities` order), then the aggregator and head.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// Every parameter, with its section prefix, in section order.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// One layout holding the given sections, one after the other, names prefixed.
    pub fn combine(sections: &[Section], which: &[usize]) -> Result<Layout> {
        let mut specs = Vec::new();
        for &i in which {
            let s = &sections[i];
            for e in s.layout.entries() {
                let mut spec = e.spec.clone();
                spec.name = format!("{}{}", s.prefix, spec.name);
                specs.push(spec);
            }
        }
        Layout::sequential(specs)
    }

    /// Entries of encoder `e`'s section that LoRA adapts: its attention projections named by `targets`
    /// (query, key, value, output).
    pub fn lora_entries(&self, e: usize, targets: &[String]) -> Vec<usize> {
        let suffixes: Vec<&str> = targets
            .iter()
            .flat_map(|t| match (&self.encoders[e].net, t.as_str()) {
                (EncoderNet::Transformer(_), "query") => vec!["attention.self.query.weight"],
                (EncoderNet::Transformer(_), "key") => vec!["attention.self.key.weight"],
                (EncoderNet::Transformer(_), "value") => vec!["attention.self.value.weight"],
                (EncoderNet::Transformer(_), "output") => vec!["attention.output.dense.weight"],
                (EncoderNet::Enformer(_), "query") => vec![".1.to_q.weight"],
                (EncoderNet::Enformer(_), "key") => vec![".1.to_k.weight"],
                (EncoderNet::Enformer(_), "value") => vec![".1.to_v.weight"],
                (EncoderNet::Enformer(_), "output") => vec![".1.to_out.weight"],
                _ => vec![],
            })
            .collect();
        self.encoders[e]
            .net
            .layout()
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, x)| suffixes.iter().any(|s| x.spec.name.ends_with(s)))
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether entry `i` of section `s` is a running statistic (never trained).
    pub fn is_buffer(&self, s: usize, i: usize) -> bool {
        match self.encoders.get(s).map(|e| &e.net) {
            Some(EncoderNet::Enformer(t)) => t.is_buffer(i),
            _ => false,
        }
    }

    /// Tokenises or one-hot encodes a batch. DNA windows must all have the configured length.
    pub fn prepare_inputs(&self, samples: &[SampleSeqs<'_>]) -> Result<IsoformerInputs> {
        let batch = samples.len();
        if batch == 0 {
            return Err(Error::invalid("isoformer batch", "no samples"));
        }
        // The one-hot DNA of the batch is the largest host buffer: its size is checked before it is made.
        let one_hot = crate::error::checked_product(
            "isoformer inputs",
            &[batch, self.cfg.dna_sequence_length, 4],
        )?;
        if one_hot > MAX_INPUT_ELEMENTS {
            return Err(Error::invalid(
                "isoformer batch",
                format!(
                    "{batch} windows of {} bp make {one_hot} one-hot values, above the {MAX_INPUT_ELEMENTS} \
                     one batch may hold; lower the batch size",
                    self.cfg.dna_sequence_length
                ),
            ));
        }
        let mut encoded = Vec::new();
        let mut present = Vec::new();
        for enc in &self.encoders {
            let m = enc.modality;
            let mut here = vec![1.0f32; batch];
            let input = match (&enc.net, &enc.tokenizer) {
                (EncoderNet::Enformer(_), _) => {
                    let len = self.cfg.dna_sequence_length;
                    let mut data = Vec::with_capacity(batch * len * 4);
                    let mut row = Vec::new();
                    for (i, s) in samples.iter().enumerate() {
                        if s.dna.len() != len {
                            return Err(Error::invalid(
                                "dna window",
                                format!(
                                    "sample {i} has {} bases, the model takes {len} (dna_sequence_length)",
                                    s.dna.len()
                                ),
                            ));
                        }
                        dna_one_hot(s.dna, &mut row);
                        data.extend_from_slice(&row);
                    }
                    EncodedInput::OneHot { data, len }
                }
                (EncoderNet::Transformer(_), Some(tok)) => {
                    if m == Modality::Rna {
                        if let Some(i) = samples.iter().position(|s| s.rna.trim().is_empty()) {
                            return Err(Error::invalid(
                                "rna sequence",
                                format!(
                                    "sample {i} has an empty RNA sequence (every transcript has one; only the \
                                     protein may be missing)"
                                ),
                            ));
                        }
                    }
                    let seqs: Vec<Vec<u32>> = samples
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let text: String = match m {
                                Modality::Dna => String::from_utf8_lossy(s.dna).into_owned(),
                                // NT-v2's vocabulary is DNA letters: an RNA's U is its T. (The
                                // tokenizer cuts a transcript to the 3′ letters its budget holds.)
                                Modality::Rna => s.rna.replace(['U', 'u'], "T"),
                                Modality::Protein => match s.protein {
                                    // Blank is missing too: a protein of no residues is no protein.
                                    Some(p) if !p.trim().is_empty() => p.to_string(),
                                    _ => {
                                        here[i] = 0.0;
                                        String::new()
                                    }
                                },
                            };
                            tok.encode(&text, enc.max_tokens)
                        })
                        .collect();
                    let (ids, lens, len) = tok.pad_batch(&seqs);
                    EncodedInput::Tokens { ids, lens, len }
                }
                (EncoderNet::Transformer(_), None) => unreachable!("transformers have tokenizers"),
            };
            encoded.push(input);
            present.push((m, here));
        }
        Ok(IsoformerInputs {
            batch,
            encoded,
            present,
        })
    }

    /// Valid rows per sample and the padded length of encoder `e`'s output for these inputs.
    pub fn encoder_output_rows(&self, e: usize, inputs: &IsoformerInputs) -> (Vec<usize>, usize) {
        inputs.encoded[e].output_rows(&self.encoders[e], inputs.batch)
    }

    /// The bytes that determine encoder `e`'s output for sample `i` (its token ids or its one-hot window):
    /// the embedding cache's key.
    pub fn encoder_input_bytes(&self, e: usize, inputs: &IsoformerInputs, i: usize) -> Vec<u8> {
        match &inputs.encoded[e] {
            EncodedInput::Tokens { ids, lens, len } => ids[i * len..i * len + lens[i]]
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect(),
            EncodedInput::OneHot { data, len } => data[i * len * 4..(i + 1) * len * 4]
                .iter()
                .map(|&v| v as u8)
                .collect(),
        }
    }

    fn check_sections<V>(&self, what: &str, p: &[&[V]]) -> Result<()> {
        if p.len() != self.sections.len()
            || p.iter()
                .zip(&self.sections)
                .any(|(v, s)| v.len() != s.layout.entries().len())
        {
            return Err(Error::shape(
                "isoformer",
                format!(
                    "{what}: one view per entry of each of the {} sections",
                    self.sections.len()
                ),
            ));
        }
        Ok(())
    }

    /// Runs encoder `e` on its input. With `keep`, it keeps what its backward needs; `mode` is Enformer's
    /// batchnorm statistics.
    pub fn encode<B: Backend>(
        &self,
        b: &B,
        e: usize,
        p: &[View<'_, B>],
        input: &EncodedInput,
        batch: usize,
        acts: &mut EncoderActs<B>,
        keep: bool,
        mode: BatchNormMode,
    ) -> Result<()> {
        match (&self.encoders[e].net, input, acts) {
            (
                EncoderNet::Enformer(t),
                EncodedInput::OneHot { data, len },
                EncoderActs::Enformer(a),
            ) => t.forward(b, p, data, batch, *len, a, keep, mode),
            (
                EncoderNet::Transformer(t),
                EncodedInput::Tokens { ids, lens, len },
                EncoderActs::Transformer(a),
            ) => {
                a.reserve_len(self.encoders[e].max_tokens);
                t.forward(b, p, ids, lens, *len, a, keep)
            }
            _ => Err(Error::invalid(
                "isoformer",
                "encoder input of the wrong kind",
            )),
        }
    }

    /// The output `[batch, len, width]` of encoder `e`'s latest forward.
    pub fn encoder_hidden<'a, B: Backend>(&self, acts: &'a EncoderActs<B>) -> Result<View<'a, B>> {
        match acts {
            EncoderActs::Enformer(a) => a.embeddings(),
            EncoderActs::Transformer(a) => a.hidden(),
        }
    }

    /// Empty activations for each encoder.
    pub fn fresh_acts<B: Backend>(&self) -> Vec<EncoderActs<B>> {
        self.encoders
            .iter()
            .map(|e| match e.net {
                EncoderNet::Enformer(_) => EncoderActs::Enformer(EnformerActivations::default()),
                EncoderNet::Transformer(_) => {
                    EncoderActs::Transformer(EncoderActivations::default())
                }
            })
            .collect()
    }

    /// The full forward: every encoder, the aggregator and the head. Predictions are in
    /// `acts.aggregate.predictions()`. `train_encoders[e]` says whether encoder `e` keeps its activations
    /// for a backward (and, for Enformer, uses batch statistics).
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        p: &[&[View<'_, B>]],
        inputs: &IsoformerInputs,
        acts: &mut IsoformerActivations<B>,
        train_encoders: &[bool],
        keep: bool,
    ) -> Result<()> {
        self.check_sections("parameters", p)?;
        if acts.encoders.len() != self.encoders.len() {
            acts.encoders = self.fresh_acts();
        }
        for (e, params) in p.iter().enumerate().take(self.encoders.len()) {
            let train = train_encoders.get(e).copied().unwrap_or(false);
            // Batch statistics only where the whole trunk trains; LoRA keeps the base's running ones.
            let finetuned =
                self.cfg.train.encoders.get(self.encoders[e].modality) == EncoderMode::Finetune;
            let mode = if train && finetuned {
                BatchNormMode::Train
            } else {
                BatchNormMode::Eval
            };
            b.enter_module(self.encoders[e].modality.name());
            self.encode(
                b,
                e,
                params,
                &inputs.encoded[e],
                inputs.batch,
                &mut acts.encoders[e],
                train && keep,
                mode,
            )?;
        }
        let outputs = self.encoder_outputs(&acts.encoders, inputs)?;
        b.enter_module(AGGREGATOR);
        self.aggregate_forward(
            b,
            p[self.encoders.len()],
            &outputs,
            &inputs.present,
            &mut acts.aggregate,
            inputs.batch,
        )
    }

    /// The encoders' outputs of the latest forward, as the aggregator takes them.
    pub fn encoder_outputs<'a, B: Backend>(
        &self,
        acts: &'a [EncoderActs<B>],
        inputs: &IsoformerInputs,
    ) -> Result<Vec<EncoderOutput<'a, B>>> {
        self.encoders
            .iter()
            .enumerate()
            .map(|(e, enc)| {
                let (lens, len) = inputs.encoded[e].output_rows(enc, inputs.batch);
                Ok(EncoderOutput {
                    modality: enc.modality,
                    hidden: self.encoder_hidden(&acts[e])?,
                    lens,
                    len,
                })
            })
            .collect()
    }

    /// The full backward of a forward run with `keep`: the head and aggregator into the aggregator section's
    /// gradients, then each encoder whose gradient views are given (`None`: frozen, skipped).
    pub fn backward<B: Backend>(
        &self,
        b: &B,
        p: &[&[View<'_, B>]],
        inputs: &IsoformerInputs,
        acts: &mut IsoformerActivations<B>,
        dpred: View<'_, B>,
        grads: &mut [Option<&mut [ViewMut<'_, B>]>],
    ) -> Result<()> {
        self.check_sections("parameters", p)?;
        let n_enc = self.encoders.len();
        if grads.len() != n_enc + 1 {
            return Err(Error::shape(
                "isoformer backward",
                "one gradient slot per section",
            ));
        }
        let want_encoder_grads: Vec<bool> = grads[..n_enc].iter().map(Option::is_some).collect();
        let top_grads = grads[n_enc].as_deref_mut().ok_or_else(|| {
            Error::invalid("isoformer backward", "the aggregator is always trained")
        })?;
        {
            let outputs = self.encoder_outputs(&acts.encoders, inputs)?;
            b.enter_module(AGGREGATOR);
            self.aggregate_backward(
                b,
                p[n_enc],
                &outputs,
                &inputs.present,
                &mut acts.aggregate,
                inputs.batch,
                dpred,
                top_grads,
                &want_encoder_grads,
            )?;
        }
        for e in 0..n_enc {
            let Some(g) = grads[e].as_deref_mut() else {
                continue;
            };
            let d_hidden = acts.aggregate.encoder_grad(e)?;
            b.enter_module(self.encoders[e].modality.name());
            match (&self.encoders[e].net, &mut acts.encoders[e]) {
                (EncoderNet::Enformer(t), EncoderActs::Enformer(a)) => {
                    t.backward(b, p[e], a, d_hidden, g)?
                }
                (EncoderNet::Transformer(t), EncoderActs::Transformer(a)) => {
                    t.backward(b, p[e], a, d_hidden, g)?
                }
                _ => {
                    return Err(Error::invalid(
                        "isoformer",
                        "encoder activations of the wrong kind",
                    ))
                }
            }
        }
        Ok(())
    }
}
