//! Embedding sequences with ESM-2, NT-v2 or the Enformer trunk: the library entry point behind
//! `isoformer-engine embed`. It sits above the models and the backends: the models are generic over the
//! backend trait, and this is where the concrete backend is chosen ([`AnyBackend`]).
//!
//! ```
//! use isoformer_engine::embed::{Embedder, ModelKind, Pool};
//! # fn main() -> isoformer_engine::Result<()> {
//! # let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/esm2");
//! // `weights`: a directory as `save_pretrained` writes it (config.json + model.safetensors).
//! let esm = Embedder::load(ModelKind::Esm2, weights.as_ref(), None)?;
//! let vectors = esm.embed(&["MKTAYIAKQR", "GSHMSLFDFF"], Pool::Mean)?;
//! assert_eq!(vectors.len(), 2);
//! assert_eq!(vectors[0].len(), esm.hidden_size());
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::any::AnyBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::kernel::KernelBackend;
use crate::backend::record::{RecordingBackend, StepLifetimes};
use crate::backend::run_plan::{begin_run, plan_run, record_steps, RunArena};
use crate::backend::state::ParamSet;
use crate::backend::{Backend, View};
use crate::gpu::cuda::CudaDevice;
use crate::gpu::emulator::EmuDevice;
use crate::models::config::{EnformerConfig, EsmConfig};
use crate::models::enformer::{BatchNormMode, EnformerActivations, EnformerNames, EnformerTrunk};
use crate::models::tokenizers::{dna_one_hot, Tokenizer};
use crate::models::transformer::{EncoderActivations, TransformerConfig, TransformerEncoder};
use crate::models::weights::{ModelParams, Prefixes, WeightFile};
use crate::runtime::Layout;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    Esm2,
    NucleotideTransformer,
    Enformer,
}

impl ModelKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "esm2" | "esm" | "esm-2" => Ok(ModelKind::Esm2),
            "nt" | "nt-v2" | "ntv2" | "nucleotide-transformer" => {
                Ok(ModelKind::NucleotideTransformer)
            }
            "enformer" => Ok(ModelKind::Enformer),
            other => Err(Error::invalid(
                "model",
                format!("'{other}' (expected esm2, nt or enformer)"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Esm2 => "esm2",
            ModelKind::NucleotideTransformer => "nt",
            ModelKind::Enformer => "enformer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Average over real tokens (no `<cls>`/`<eos>`, no padding); Enformer: over the output bins.
    Mean,
    /// Position 0 (`<cls>`); not defined for Enformer.
    Cls,
    /// Every position: tokens including the special ones, or Enformer's bins.
    None,
}

impl Pool {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pool::Mean),
            "cls" => Ok(Pool::Cls),
            "none" => Ok(Pool::None),
            other => Err(Error::invalid(
                "pool",
                format!("'{other}' (expected mean, cls or none)"),
            )),
        }
    }
}

/// The shape one batch runs at: its sequences, and the positions of the longest (tokens with the special
/// ones for transformers, base pairs for Enformer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub batch: usize,
    pub len: usize,
}

impl std::fmt::Display for BatchShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} sequences of {} positions", self.batch, self.len)
    }
}

enum Network {
    Transformer {
        encoder: TransformerEncoder,
        tokenizer: Tokenizer,
    },
    Enformer(EnformerTrunk),
}

impl Network {
    /// The lifetimes of this network's inference buffers at `shape` on `rec` (placeholder inputs: the
    /// recording backend computes nothing), with the rotary tables sized for `longest` tokens as the run
    /// sizes them.
    fn record_forward(
        &self,
        rec: &RecordingBackend,
        layout: &Arc<Layout>,
        shape: &BatchShape,
        longest: usize,
    ) -> Result<StepLifetimes> {
        let params = ParamSet::zeros(rec, layout.clone(), false)?;
        let views = params.views()?;
        let BatchShape { batch, len } = *shape;
        let positions = batch
            .checked_mul(len)
            .ok_or_else(|| Error::invalid("embed", format!("{shape} overflows")))?;
        match self {
            Network::Transformer { encoder, .. } => {
                let mut acts = EncoderActivations::default();
                acts.reserve_len(longest);
                let (ids, lens) = (vec![0u32; positions], vec![len; batch]);
                record_steps(rec, || {
                    encoder.forward(rec, &views, &ids, &lens, len, &mut acts, false)
                })
            }
            Network::Enformer(trunk) => {
                let mut acts = EnformerActivations::default();
                let one_hot = vec![0.0f32; positions.saturating_mul(4)];
                record_steps(rec, || {
                    trunk.forward(
                        rec,
                        &views,
                        &one_hot,
                        batch,
                        len,
                        &mut acts,
                        false,
                        BatchNormMode::Eval,
                    )
                })
            }
        }
    }
}

/// A model's state on one backend: the backend, the parameters uploaded to it (none on the CPU, which
/// reads the host parameters in place, mapped from the weight file when they are f32), and activations
/// kept between batches so that equal shapes reuse their memory.
struct Placement<B: Backend> {
    backend: B,
    params: Option<ParamSet<B>>,
    acts: std::sync::Mutex<EncoderActivations<B>>,
    enformer_acts: std::sync::Mutex<EnformerActivations<B>>,
    /// While a planned run ([`Embedder::begin_run`]) waits for its first batch: the largest batch the
    /// plan serves. That batch makes every buffer of the run; later ones allocate nothing.
    run_first: std::sync::Mutex<Option<BatchShape>>,
}

enum Placed {
    Cpu(Box<Placement<CpuBackend>>),
    Emu(Box<Placement<KernelBackend<EmuDevice>>>),
    Cuda(Box<Placement<KernelBackend<CudaDevice>>>),
}

impl<B: Backend> Placement<B> {
    fn new(backend: B, host: &ModelParams, upload: bool) -> Result<Self> {
        let params = if upload {
            // Loading left the mapped pages resident (it checks every value); each entry's are dropped
            // once it is copied, so that the resident file shrinks as the copy grows and the peak stays
            // the loaded file's. (Dropping them all first, as before, kept the same peak but made the copy
            // fault every page back in: 0.28 s of NT-v2 250M's bf16 upload, 0.9 GB.)
            // Values still unchecked are checked by the copy, in its pass over them.
            let non_finite = |i: usize, j: usize| host.non_finite_error(i, j);
            let params = ParamSet::upload_with(
                &backend,
                host.layout().clone(),
                |i| host.get(i),
                false,
                host.is_unchecked()
                    .then_some(&non_finite as &dyn Fn(usize, usize) -> Error),
                |i| host.release_entry_pages(i),
            )?;
            host.mark_checked();
            Some(params)
        } else {
            None
        };
        Ok(Placement {
            backend,
            params,
            acts: std::sync::Mutex::new(EncoderActivations::default()),
            enformer_acts: std::sync::Mutex::new(EnformerActivations::default()),
            run_first: std::sync::Mutex::new(None),
        })
    }

    /// Starts a run of batches of `shapes` on this backend, the first the largest: from one arena when
    /// the placement planned at the first serves the others ([`plan_run`]). Says which.
    fn begin_run(
        &self,
        network: &Network,
        layout: &Arc<Layout>,
        shapes: &[BatchShape],
    ) -> Result<String> {
        let poisoned = || Error::invalid("embed", "activations poisoned by an earlier panic");
        // The run's buffers are made anew, in the order the plan records them.
        *self.acts.lock().map_err(|_| poisoned())? = EncoderActivations::default();
        *self.enformer_acts.lock().map_err(|_| poisoned())? = EnformerActivations::default();
        let Some(largest) = shapes.first().copied() else {
            return Ok("no batches".into());
        };
        let plan: RunArena = if shapes
            .iter()
            .any(|s| s.batch > largest.batch || s.len > largest.len)
        {
            Err("the first batch is not the largest".into())
        } else if matches!(network, Network::Enformer(_))
            && shapes.iter().any(|s| s.len != largest.len)
        {
            Err("Enformer batches of several lengths (each length is a run)".into())
        } else {
            let shortest = shapes.iter().map(|s| s.len).min().unwrap_or(largest.len);
            let mut sizes: Vec<usize> = shapes.iter().map(|s| s.batch).collect();
            sizes.sort_unstable();
            sizes.dedup();
            let smaller: Vec<BatchShape> = sizes
                .iter()
                .flat_map(|&batch| [shortest, largest.len].map(|len| BatchShape { batch, len }))
                .filter(|s| *s != largest)
                .collect();
            let (compute, weight) = (self.backend.compute_dtype(), self.backend.weight_dtype());
            plan_run(&largest, &smaller, |shape| {
                let rec = RecordingBackend::new(compute).with_weight_dtype(weight);
                network.record_forward(&rec, layout, shape, largest.len)
            })?
        };
        let planned = plan.is_ok();
        if let Network::Transformer { .. } = network {
            self.acts
                .lock()
                .map_err(|_| poisoned())?
                .reserve_len(largest.len);
        }
        let line = begin_run(&self.backend, plan)?;
        *self.run_first.lock().map_err(|_| poisoned())? = planned.then_some(largest);
        Ok(line)
    }

    /// Before a batch of `shape`: refuses one larger than a planned run's first batch may be.
    fn check_run_shape(&self, shape: BatchShape) -> Result<()> {
        let first = *self
            .run_first
            .lock()
            .map_err(|_| Error::invalid("embed", "run state poisoned by an earlier panic"))?;
        match first {
            Some(limit) if shape.batch > limit.batch || shape.len > limit.len => {
                Err(Error::invalid(
                    "embed",
                    format!("a batch of {shape} is larger than the run planned for {limit}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// After a batch: the first batch of a planned run made every buffer, so the replay of the plan
    /// ends there.
    fn end_first_batch(&self) {
        let mut first = self.run_first.lock().unwrap_or_else(|e| e.into_inner());
        if first.take().is_some() {
            self.backend.warm_step();
        }
    }

    /// The uploaded parameters' views.
    fn views(&self) -> Result<Vec<View<'_, B>>> {
        self.params
            .as_ref()
            .ok_or_else(|| Error::invalid("embed", "the parameters were not uploaded"))?
            .views()
    }

    /// Runs the encoder on this backend and hands its last hidden state `[batch, len, hidden]` (f32, in
    /// place on the CPU) to `pool`.
    fn transformer_hidden<R>(
        &self,
        encoder: &TransformerEncoder,
        views: &[View<'_, B>],
        ids: &[u32],
        lens: &[usize],
        len: usize,
        pool: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        self.check_run_shape(BatchShape {
            batch: lens.len(),
            len,
        })?;
        let mut acts = self
            .acts
            .lock()
            .map_err(|_| Error::invalid("embed", "activations poisoned by an earlier panic"))?;
        encoder.forward(&self.backend, views, ids, lens, len, &mut acts, false)?;
        self.end_first_batch();
        self.backend.with_host_f32(acts.hidden()?, pool)
    }

    /// The Enformer embeddings `[batch, bins, 2·dim]` on this backend, as f32, and the number of bins.
    fn enformer_embeddings(
        &self,
        trunk: &EnformerTrunk,
        views: &[View<'_, B>],
        one_hot: &[f32],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<f32>, usize)> {
        self.check_run_shape(BatchShape { batch, len })?;
        let mut acts = self
            .enformer_acts
            .lock()
            .map_err(|_| Error::invalid("embed", "activations poisoned by an earlier panic"))?;
        trunk.forward(
            &self.backend,
            views,
            one_hot,
            batch,
            len,
            &mut acts,
            false,
            BatchNormMode::Eval,
        )?;
        self.end_first_batch();
        Ok((self.backend.read_f32(acts.embeddings()?)?, acts.out_len))
    }
}

pub struct Embedder {
    kind: ModelKind,
    network: Network,
    params: ModelParams,
    placed: Placed,
    /// Token budget per sequence, special tokens included (transformers).
    pub max_tokens: usize,
}

/// `(config.json, weights.safetensors)` from a directory or a file plus `--config`.
pub fn resolve_weights(weights: &Path, config: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    if weights.is_dir() {
        let cfg = config
            .map(Path::to_path_buf)
            .unwrap_or_else(|| weights.join("config.json"));
        let file = weights.join("model.safetensors");
        if !file.is_file() {
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} has no model.safetensors (convert a .bin with tools/convert_checkpoint.py)",
                    weights.display()
                ),
            ));
        }
        Ok((cfg, file))
    } else {
        let cfg = config.ok_or_else(|| {
            Error::invalid(
                "weights",
                format!(
                    "{} is a file: pass its config.json with --config",
                    weights.display()
                ),
            )
        })?;
        Ok((cfg.to_path_buf(), weights.to_path_buf()))
    }
}

impl Embedder {
    /// Loads a model from a `save_pretrained`-style directory, or a `.safetensors` file with its config.
    pub fn load(kind: ModelKind, weights: &Path, config: Option<&Path>) -> Result<Self> {
        Self::load_with(kind, weights, config, false)
    }

    /// [`Self::load`], where `allow_unused` accepts weight files holding tensors the model does not read
    /// (beyond the usual extras: LM and contact heads, position ids, Enformer's output heads). Without it
    /// they are an error that lists them: a config with fewer layers than its weights would otherwise run a
    /// truncated model without a word.
    pub fn load_with(
        kind: ModelKind,
        weights: &Path,
        config: Option<&Path>,
        allow_unused: bool,
    ) -> Result<Self> {
        Self::load_on(
            kind,
            weights,
            config,
            allow_unused,
            crate::Device::Cpu,
            None,
        )
    }

    /// [`Self::load_with`], then [`Self::to_device_as`] `device` and `dtype`, with one pass over the
    /// weights: where the device takes a copy of them (bf16, the emulator, a GPU), their values are
    /// checked as they are copied rather than first at load and again by the copy.
    pub fn load_on(
        kind: ModelKind,
        weights: &Path,
        config: Option<&Path>,
        allow_unused: bool,
        device: crate::Device,
        dtype: Option<crate::DType>,
    ) -> Result<Self> {
        let (cfg_path, file_path) = resolve_weights(weights, config)?;
        let file = Arc::new(WeightFile::open(&file_path)?);
        let (network, params) = match kind {
            ModelKind::Esm2 | ModelKind::NucleotideTransformer => {
                let c = EsmConfig::from_file(&cfg_path)?;
                let (tc, tokenizer) = match kind {
                    ModelKind::Esm2 => (TransformerConfig::esm2(&c), Tokenizer::esm2()),
                    _ => (
                        TransformerConfig::nucleotide_transformer_v2(&c),
                        Tokenizer::nucleotide_transformer_v2(),
                    ),
                };
                if tc.vocab != tokenizer.vocab_size() {
                    return Err(Error::Parse {
                        path: cfg_path,
                        line: None,
                        msg: format!(
                            "vocab_size {} does not match the {} tokenizer ({})",
                            tc.vocab,
                            kind.name(),
                            tokenizer.vocab_size()
                        ),
                    });
                }
                let encoder = TransformerEncoder::new(tc)?;
                let params = ModelParams::load_unchecked(
                    encoder.layout().clone(),
                    file,
                    &Prefixes(vec!["esm.".into(), "".into()]),
                    false,
                )?;
                (Network::Transformer { encoder, tokenizer }, params)
            }
            ModelKind::Enformer => {
                let mut c = EnformerConfig::from_file(&cfg_path)?;
                c.output_heads.clear(); // embeddings only
                let trunk = EnformerTrunk::new(c)?;
                let names = EnformerNames {
                    prefixes: vec!["".into(), "enformer.".into()],
                };
                let params =
                    ModelParams::load_unchecked(trunk.layout().clone(), file, &names, false)?;
                (Network::Enformer(trunk), params)
            }
        };
        let unexpected: Vec<&String> = params
            .unused()
            .iter()
            .filter(|n| !expected_extra(kind, n))
            .collect();
        if !unexpected.is_empty() && !allow_unused {
            let shown: Vec<&str> = unexpected.iter().take(8).map(|s| s.as_str()).collect();
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} holds {} tensors the {} config does not use (does the config have fewer layers \
                     than the weights?): {}{}; pass --allow-unused-weights to ignore them",
                    file_path.display(),
                    unexpected.len(),
                    kind.name(),
                    shown.join(", "),
                    if unexpected.len() > shown.len() { ", …" } else { "" }
                ),
            ));
        }
        // A placeholder that reads nothing: `to_device_as` checks the values before any placement that
        // does.
        let placed = Placed::Cpu(Box::new(Placement::new(CpuBackend::new(), &params, false)?));
        let mut embedder = Embedder {
            kind,
            network,
            params,
            placed,
            max_tokens: 2048,
        };
        embedder.to_device_as(device, dtype)?;
        Ok(embedder)
    }

    /// Enformer only: use DeepMind's TF gamma positional table (a safetensors file with `tf_gammas`).
    pub fn set_tf_gammas(&mut self, path: &Path) -> Result<()> {
        let Network::Enformer(trunk) = &mut self.network else {
            return Err(Error::invalid(
                "--tf-gammas",
                "only Enformer has gamma positional features",
            ));
        };
        let f = crate::runtime::safetensors_file::load_f32(path)?;
        let (_, data) = f.tensors.get("tf_gammas").ok_or_else(|| Error::Tensor {
            name: "tf_gammas".into(),
            msg: format!("missing from {}", path.display()),
        })?;
        trunk.set_tf_gammas(data)
    }

    /// Runs the model on `device` from now on: the CPU (f32), or the emulator or a GPU, with the weights
    /// uploaded as bf16 and the GPU kernels.
    pub fn to_device(&mut self, device: crate::Device) -> Result<()> {
        self.to_device_as(device, None)
    }

    /// Runs the model on `device` computing in `dtype` (`None`: the device's default). On the CPU, bf16
    /// keeps a bf16 copy of the weights and runs the bf16 backend ([`CpuBackend::bf16`]).
    pub fn to_device_as(
        &mut self,
        device: crate::Device,
        dtype: Option<crate::DType>,
    ) -> Result<()> {
        let params = &self.params;
        self.placed = match AnyBackend::open_as(device, dtype)? {
            // f32 reads the host parameters in place, so it checks them all first; bf16 needs its own
            // copy, checked as it is made.
            AnyBackend::Cpu(b) => {
                let upload = b.weight_dtype() != crate::DType::F32;
                if !upload {
                    params.check_all()?;
                }
                Placed::Cpu(Box::new(Placement::new(*b, params, upload)?))
            }
            AnyBackend::Emu(b) => Placed::Emu(Box::new(Placement::new(*b, params, true)?)),
            AnyBackend::Cuda(b) => Placed::Cuda(Box::new(Placement::new(*b, params, true)?)),
        };
        let uploaded = match &self.placed {
            Placed::Cpu(p) => p.params.is_some(),
            _ => true,
        };
        if uploaded {
            // The backend holds its own copy: the mapped f32 weights need not stay resident.
            self.params.release_mapped_pages();
        }
        Ok(())
    }

    /// The dtype of the weights the model computes with on its backend.
    pub fn weight_dtype(&self) -> crate::DType {
        match &self.placed {
            Placed::Cpu(p) => p.backend.weight_dtype(),
            Placed::Emu(p) => p.backend.weight_dtype(),
            Placed::Cuda(p) => p.backend.weight_dtype(),
        }
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Width of one embedding vector.
    pub fn hidden_size(&self) -> usize {
        match &self.network {
            Network::Transformer { encoder, .. } => encoder.cfg.hidden,
            Network::Enformer(t) => 2 * t.cfg.dim,
        }
    }

    /// Sequences that can share a batch have the same key (Enformer needs equal lengths).
    pub fn batch_key(&self, seq: &str) -> usize {
        match self.network {
            Network::Transformer { .. } => 0,
            Network::Enformer(_) => seq.len(),
        }
    }

    /// Positions `seq` runs at: its tokens, special ones included and cropped to `max_tokens`
    /// (transformers), or its base pairs (Enformer).
    pub fn input_len(&self, seq: &str) -> usize {
        match &self.network {
            Network::Transformer { tokenizer, .. } => self.encode(tokenizer, seq).len(),
            Network::Enformer(_) => seq.len(),
        }
    }

    /// The shape `seqs` run at as one batch.
    pub fn batch_shape(&self, seqs: &[&str]) -> BatchShape {
        BatchShape {
            batch: seqs.len(),
            len: seqs.iter().map(|s| self.input_len(s)).max().unwrap_or(0),
        }
    }

    /// Starts a run of batches whose shapes ([`Self::batch_shape`]) are `shapes`, in the order they will
    /// be embedded. When the first is the largest (most sequences, longest), every buffer of the run's
    /// forwards comes from one arena, planned by recording the forward at that shape and placing its
    /// buffers by their lifetimes, and checked to serve the other shapes: one allocation for the run,
    /// none after its first batch. Otherwise (or for Enformer batches of several lengths, each of which
    /// is a run of its own) the buffers are allocated one by one. Returns which, for the user.
    ///
    /// A first batch larger than the planned one is refused; later batches larger than it allocate.
    pub fn begin_run(&self, shapes: &[BatchShape]) -> Result<String> {
        let layout = self.params.layout();
        match &self.placed {
            Placed::Cpu(p) => p.begin_run(&self.network, layout, shapes),
            Placed::Emu(p) => p.begin_run(&self.network, layout, shapes),
            Placed::Cuda(p) => p.begin_run(&self.network, layout, shapes),
        }
    }

    /// Allocations the backend has made so far (parameters, arenas, buffers).
    pub fn allocations(&self) -> usize {
        match &self.placed {
            Placed::Cpu(p) => p.backend.allocations(),
            Placed::Emu(p) => p.backend.allocations(),
            Placed::Cuda(p) => p.backend.allocations(),
        }
    }

    /// Token ids of one sequence as the transformer reads it (NT-v2 reads an RNA's U as T).
    fn encode(&self, tokenizer: &Tokenizer, s: &str) -> Vec<u32> {
        if self.kind == ModelKind::NucleotideTransformer && s.contains(['U', 'u']) {
            let dna: String = s
                .chars()
                .map(|c| match c {
                    'U' => 'T',
                    'u' => 't',
                    c => c,
                })
                .collect();
            tokenizer.encode(&dna, self.max_tokens)
        } else {
            tokenizer.encode(s, self.max_tokens)
        }
    }

    /// Rows of `seq`'s result under `pool` (1 when pooled; its tokens or Enformer bins otherwise), known
    /// before running the model, so outputs can be laid out up front.
    pub fn output_rows(&self, seq: &str, pool: Pool) -> Result<usize> {
        if pool != Pool::None {
            return Ok(1);
        }
        match &self.network {
            Network::Transformer { tokenizer, .. } => Ok(self.encode(tokenizer, seq).len()),
            Network::Enformer(trunk) => trunk.output_bins(seq.len()),
        }
    }

    /// Embeds a batch. With `Pool::Mean`/`Cls`, each result is one vector; with `Pool::None`, a row-major
    /// `[positions, hidden]` matrix.
    pub fn embed(&self, seqs: &[&str], pool: Pool) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // An empty sequence has no token to average (its mean was all zeros) and no context for `<cls>`: the
        // command line refuses such a record, and so does the library, naming it.
        if let Some(i) = seqs.iter().position(|s| s.trim().is_empty()) {
            return Err(Error::invalid(
                "sequence",
                format!("sequence {i} of the batch is empty"),
            ));
        }
        let h = self.hidden_size();
        match &self.network {
            Network::Transformer { encoder, tokenizer } => {
                let encoded: Vec<Vec<u32>> =
                    seqs.iter().map(|s| self.encode(tokenizer, s)).collect();
                let (ids, lens, len) = tokenizer.pad_batch(&encoded);
                let specials_after = tokenizer.eos.is_some() as usize;
                let pooled = |hidden: &[f32]| -> Vec<Vec<f32>> {
                    lens.iter()
                        .enumerate()
                        .map(|(b, &l)| {
                            let rows = &hidden[b * len * h..(b * len + l) * h];
                            match pool {
                                Pool::None => rows.to_vec(),
                                Pool::Cls => rows[..h].to_vec(),
                                Pool::Mean => mean_rows(&rows[h..(l - specials_after) * h], h),
                            }
                        })
                        .collect()
                };
                match &self.placed {
                    Placed::Cpu(p) => p.transformer_hidden(
                        encoder,
                        &cpu_views(p, &self.params)?,
                        &ids,
                        &lens,
                        len,
                        pooled,
                    ),
                    Placed::Emu(p) => {
                        p.transformer_hidden(encoder, &p.views()?, &ids, &lens, len, pooled)
                    }
                    Placed::Cuda(p) => {
                        p.transformer_hidden(encoder, &p.views()?, &ids, &lens, len, pooled)
                    }
                }
            }
            Network::Enformer(trunk) => {
                if pool == Pool::Cls {
                    return Err(Error::invalid(
                        "pool",
                        "cls is not defined for Enformer (use mean or none)",
                    ));
                }
                let len = seqs[0].len();
                if seqs.iter().any(|s| s.len() != len) {
                    return Err(Error::invalid(
                        "enformer batch",
                        "sequences of one batch must have the same length",
                    ));
                }
                let mut one_hot = Vec::with_capacity(seqs.len() * len * 4);
                let mut row = Vec::new();
                for s in seqs {
                    dna_one_hot(s.as_bytes(), &mut row);
                    one_hot.extend_from_slice(&row);
                }
                let batch = seqs.len();
                let (embeddings, bins) = match &self.placed {
                    Placed::Cpu(p) => p.enformer_embeddings(
                        trunk,
                        &cpu_views(p, &self.params)?,
                        &one_hot,
                        batch,
                        len,
                    ),
                    Placed::Emu(p) => {
                        p.enformer_embeddings(trunk, &p.views()?, &one_hot, batch, len)
                    }
                    Placed::Cuda(p) => {
                        p.enformer_embeddings(trunk, &p.views()?, &one_hot, batch, len)
                    }
                }?;
                Ok((0..seqs.len())
                    .map(|b| {
                        let rows = &embeddings[b * bins * h..(b + 1) * bins * h];
                        match pool {
                            Pool::Mean => mean_rows(rows, h),
                            _ => rows.to_vec(),
                        }
                    })
                    .collect())
            }
        }
    }
}

/// Notes about inputs that are accepted but may not mean what the user thinks, one line per kind with a
/// count (the CLI prints them once, on stderr).
pub fn input_notes(kind: ModelKind, seqs: &[&str]) -> Vec<String> {
    let count = |f: &dyn Fn(&str) -> bool| seqs.iter().filter(|s| f(s)).count();
    let mut notes = Vec::new();
    if kind != ModelKind::Enformer {
        let lower = count(&|s| s.bytes().any(|b| b.is_ascii_lowercase()));
        if lower > 0 {
            notes.push(format!(
                "{lower} sequence(s) have lowercase letters: as with the Hugging Face tokenizer, each lowercase \
                 run becomes one <unk> token; upper-case them if they are real residues"
            ));
        }
    }
    // Upper-case letters the vocabulary has no token for (lower case has its own note above).
    let known: &[u8] = match kind {
        ModelKind::Esm2 => b"LAGVSERTIDPKQNFYMHWCXBUZO",
        ModelKind::NucleotideTransformer => b"ACGTNU",
        ModelKind::Enformer => b"",
    };
    if kind != ModelKind::Enformer {
        let foreign = |s: &str| {
            s.bytes()
                .find(|b| b.is_ascii_uppercase() && !known.contains(b))
        };
        let odd = count(&|s| foreign(s).is_some());
        if let Some(first) = seqs.iter().find_map(|s| foreign(s)) {
            notes.push(format!(
                "{odd} sequence(s) have letters outside {}'s vocabulary (the first: '{}'): as with the \
                 Hugging Face tokenizer, each run of them becomes one <unk> token; check that these are {} \
                 sequences",
                if kind == ModelKind::Esm2 { "ESM-2" } else { "NT-v2" },
                first as char,
                if kind == ModelKind::Esm2 { "protein" } else { "nucleotide" },
            ));
        }
    }
    if kind == ModelKind::NucleotideTransformer {
        let with_u = count(&|s| s.contains(['U', 'u']));
        if with_u > 0 {
            notes.push(format!(
                "{with_u} sequence(s) contain U: read as T (NT-v2's vocabulary is DNA letters)"
            ));
        }
    }
    if kind == ModelKind::Enformer {
        let odd = count(&|s| s.bytes().any(|b| !b"ACGTacgt".contains(&b)));
        if odd > 0 {
            notes.push(format!(
                "{odd} sequence(s) have letters other than A, C, G, T: they are read as N (all-zero one-hot)"
            ));
        }
    }
    notes
}

/// Tensors a published checkpoint carries that embedding does not need.
fn expected_extra(kind: ModelKind, name: &str) -> bool {
    match kind {
        ModelKind::Esm2 | ModelKind::NucleotideTransformer => [
            "lm_head",
            "contact_head",
            "position_ids",
            "inv_freq",
            "position_embeddings",
            "pooler",
        ]
        .iter()
        .any(|p| name.contains(p)),
        // Embedding stops at the trunk: the output heads are read only when predicting tracks.
        ModelKind::Enformer => name.starts_with("_heads.") || name.contains("._heads."),
    }
}

/// The parameters a CPU placement reads: the uploaded bf16 copy, or (f32) the host parameters in place.
fn cpu_views<'a>(
    p: &'a Placement<CpuBackend>,
    host: &'a ModelParams,
) -> Result<Vec<View<'a, CpuBackend>>> {
    match p.params {
        Some(_) => p.views(),
        None => Ok(host_views(host)),
    }
}

/// The host parameters as CPU views (in place: mapped weights are not copied).
fn host_views(host: &ModelParams) -> Vec<View<'_, CpuBackend>> {
    (0..host.layout().entries().len())
        .map(|i| CpuBackend::host_view(host.get(i)))
        .collect()
}

fn mean_rows(rows: &[f32], h: usize) -> Vec<f32> {
    let n = (rows.len() / h).max(1);
    let mut acc = vec![0.0f64; h];
    for r in rows.chunks_exact(h) {
        acc.iter_mut().zip(r).for_each(|(a, v)| *a += *v as f64);
    }
    acc.iter().map(|a| (a / n as f64) as f32).collect()
}
