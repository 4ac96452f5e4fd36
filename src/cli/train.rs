//! `train`, `eval`, `predict` and `demo-data`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::backend::any::AnyBackend;
use crate::backend::Backend;
use crate::data::demo::{write_demo_data, DemoSpec, TISSUES};
use crate::data::predict_tsv::{fit_window, PredictTsv};
use crate::data::{tissue_mismatch, Dataset, Split, TargetStats};
use crate::models::isoformer::release::load_released;
use crate::models::isoformer::{Isoformer, IsoformerConfig, Modality, SampleSeqs};
use crate::runtime::output::AtomicOutput;
use crate::training::checkpoint::Checkpoint;
use crate::training::params::IsoformerParams;
use crate::training::step::predict;
use crate::training::trainer::{
    begin_planned_steps, evaluate_split, open_dataset, predict_split_batches, train, TrainOptions,
};
use crate::{DeviceRequest, Error, Result};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A built-in config name (demo, isoformer, nt-rna, …) or a JSON file. Default: demo (with --resume: the
    /// checkpoint's).
    #[arg(long)]
    pub config: Option<String>,
    /// Dataset directory (GTEx_final.csv + genome FASTA, or train/validation/test TSVs). Default with the demo
    /// config: the demo data, generated into the output directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// cpu, cuda, emu or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output directory. Default: runs/<config>-<unix time>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from a checkpoint (bit-identical to an uninterrupted run on the same device). The run's
    /// config, seed, epochs and weights are the checkpoint's.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimiser steps in total, counting those before a resume.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the training split (default: the config's `train.epochs`).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Seed of the random initialisation and of the data order (default: the config's `train.seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Pre-trained DNA encoder weights (a save_pretrained directory or a .safetensors file); default:
    /// the config's path, else random initialisation.
    #[arg(long)]
    pub weights_dna: Option<PathBuf>,
    /// Pre-trained RNA encoder weights, as --weights-dna.
    #[arg(long)]
    pub weights_rna: Option<PathBuf>,
    /// Pre-trained protein encoder weights, as --weights-dna.
    #[arg(long)]
    pub weights_protein: Option<PathBuf>,
    /// Where frozen encoders' embeddings are cached (default: ~/.cache/isoformer-engine/embeddings).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Allocate the step buffers one by one instead of from one arena planned for the largest step
    /// (same results; more memory).
    #[arg(long)]
    pub no_arena: bool,
    /// Skip (and count) malformed dataset rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// An engine checkpoint, or the released IsoFormer weights (safetensors) with --config.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The config of a released checkpoint (engine checkpoints carry their own).
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long)]
    pub data: PathBuf,
    /// train, validation or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 or bf16 on the CPU (bf16 weights and activations, f32 accumulation); kernel
    /// devices compute in bf16. Default: f32 on the CPU, bf16 on kernel devices.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Skip (and count) malformed dataset rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// An engine checkpoint, or the released IsoFormer weights (safetensors) with --config.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The config of a released checkpoint (engine checkpoints carry their own).
    #[arg(long)]
    pub config: Option<String>,
    /// A dataset directory, or a TSV with dna_seq, rna_seq and protein_seq columns (and optionally id).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    /// With a dataset directory: the split to predict.
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 or bf16 on the CPU (bf16 weights and activations, f32 accumulation); kernel
    /// devices compute in bf16. Default: f32 on the CPU, bf16 on kernel devices.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Skip (and count) malformed dataset rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

#[derive(Args, Debug)]
pub struct DemoDataArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, default_value_t = 4000)]
    pub genes: usize,
    /// Permute the labels across transcripts (a control where nothing can be learned).
    #[arg(long)]
    pub shuffle_labels: bool,
}

fn with_backend<R>(device: &str, f: impl FnOnce(&AnyBackend) -> Result<R>) -> Result<R> {
    with_backend_as(device, None, f)
}

/// The backend of `device` computing in `dtype` (`--dtype`; `None`: the device's default).
fn with_backend_as<R>(
    device: &str,
    dtype: Option<&str>,
    f: impl FnOnce(&AnyBackend) -> Result<R>,
) -> Result<R> {
    let dtype = dtype.map(crate::DType::parse).transpose()?;
    let backend = AnyBackend::open_as(DeviceRequest::parse(device)?.resolve()?, dtype)?;
    f(&backend)
}

macro_rules! dispatch {
    ($backend:expr, $b:ident => $body:expr) => {
        match $backend {
            AnyBackend::Cpu($b) => $body,
            AnyBackend::Emu($b) => $body,
            AnyBackend::Cuda($b) => $body,
        }
    };
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    if a.resume.is_some() {
        // A resumed run is the checkpoint's run: its config (seed, epochs, encoders and weights included)
        // is read from the checkpoint, so a flag that would change it is refused rather than ignored.
        let changes: Vec<&str> = [
            ("--config", a.config.is_some()),
            ("--epochs", a.epochs.is_some()),
            ("--seed", a.seed.is_some()),
            ("--weights-dna", a.weights_dna.is_some()),
            ("--weights-rna", a.weights_rna.is_some()),
            ("--weights-protein", a.weights_protein.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if !changes.is_empty() {
            return Err(Error::invalid(
                "--resume",
                format!(
                    "{} cannot change a resumed run: the checkpoint carries its config, seed, epochs and \
                     weights, and the run continues as it would have uninterrupted (start a new run to change \
                     them)",
                    changes.join(", ")
                ),
            ));
        }
    }
    let mut config = IsoformerConfig::resolve(a.config.as_deref().unwrap_or("demo"))?;
    if let Some(e) = a.epochs {
        config.train.epochs = e;
    }
    if let Some(s) = a.seed {
        config.train.seed = s;
    }
    for (m, w) in [
        (Modality::Dna, &a.weights_dna),
        (Modality::Rna, &a.weights_rna),
        (Modality::Protein, &a.weights_protein),
    ] {
        if let Some(w) = w {
            config.set_weights(m, Some(w.clone()));
        }
    }
    config.validate().map_err(|m| Error::invalid("config", m))?;
    let out = a.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from("runs").join(format!(
            "{}-{secs}",
            if config.name.is_empty() {
                "run"
            } else {
                &config.name
            }
        ))
    });
    let data = match a.data.clone() {
        Some(d) => d,
        None if config.name == "demo" || a.resume.is_some() => {
            let d = out.join("demo-data");
            if !d.join("GTEx_final.csv").is_file() {
                let n = write_demo_data(&d, &DemoSpec::default())?;
                eprintln!(
                    "wrote the demo dataset ({n} transcripts) to {}",
                    d.display()
                );
            }
            d
        }
        None => {
            return Err(Error::invalid(
                "--data",
                "a dataset directory is needed for this config",
            ))
        }
    };
    let mut opts = TrainOptions {
        config,
        data_dir: data,
        out_dir: out.clone(),
        resume: a.resume.clone(),
        max_steps: a.max_steps,
        progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        cache_dir: a.cache_dir.clone(),
        memory_budget: None,
        planned_arena: !a.no_arena,
        skip_bad_rows: a.skip_bad_rows,
    };
    let outcome = with_backend(&a.device, |backend| {
        // The plan is checked against the memory of the device the step runs on, before any work: this
        // machine's on the CPU, the GPU's on CUDA (the emulator has no memory of its own to speak of).
        opts.memory_budget = match backend {
            AnyBackend::Cpu(_) => crate::cli::plan::machine_memory(),
            AnyBackend::Cuda(b) => b.device().total_memory().ok(),
            AnyBackend::Emu(_) => None,
        };
        dispatch!(backend, b => train(b.as_ref(), &opts))
    })?;
    if let Some(v) = &outcome.validation {
        println!("{}", v.table("validation"));
    }
    if let Some(t) = &outcome.test {
        println!("{}", t.table("test"));
    }
    println!("outputs in {}", out.display());
    Ok(())
}

/// A model to run: an engine checkpoint (its own config, target statistics and tissues), or released
/// weights with a config (predictions in the released model's units; tissues named as GTEx's 30).
struct Loaded {
    model: Isoformer,
    host: Vec<Vec<Vec<f32>>>,
    /// LoRA adapters by name (engine checkpoints of LoRA runs).
    lora: std::collections::HashMap<String, Vec<f32>>,
    stats: TargetStats,
    tissues: Vec<String>,
    /// Whether `tissues` are the names the model was trained on (engine checkpoints), rather than assumed.
    tissues_known: bool,
}

impl Loaded {
    /// Evaluating against a dataset compares prediction column k with target column k: the dataset's
    /// tissues must be the checkpoint's, in its order (a CSV with its tissue columns in another order
    /// scored each tissue against another's targets without a word).
    fn check_tissues(&self, data: &Dataset) -> Result<()> {
        if !self.tissues_known {
            return Ok(());
        }
        match tissue_mismatch(&self.tissues, data.tissues()) {
            None => Ok(()),
            Some(why) => Err(Error::invalid(
                "dataset",
                format!("{}: {why}", data.config().data_dir.display()),
            )),
        }
    }
}

fn load_model(path: &Path, config: Option<&str>) -> Result<Loaded> {
    let is_engine = crate::runtime::safetensors_file::read_metadata(path)?
        .get("format")
        .is_some_and(|f| f == crate::training::checkpoint::FORMAT);
    if is_engine {
        if let Some(name) = config {
            // The checkpoint's own config runs; another given beside it would be silently ignored.
            return Err(Error::invalid(
                "--config",
                format!(
                    "'{name}' given with {}, an engine checkpoint, which carries its own config; \
                     --config is for released weights",
                    path.display()
                ),
            ));
        }
        let ck = Checkpoint::load(path)?;
        let model = Isoformer::new(ck.config.clone())?;
        let host = ck.sections(&model)?;
        return Ok(Loaded {
            host,
            lora: ck.lora_values(),
            stats: ck.progress.target_stats(),
            tissues: ck.progress.tissues.clone(),
            tissues_known: true,
            model,
        });
    }
    let config = config.ok_or_else(|| {
        Error::invalid(
            "--checkpoint",
            format!(
                "{} is not an engine checkpoint: pass --config for released weights",
                path.display()
            ),
        )
    })?;
    let model = Isoformer::new(IsoformerConfig::resolve(config)?)?;
    let host = load_released(&model, path)?;
    let n = model.cfg.num_tissues;
    let tissues = if n == TISSUES.len() {
        TISSUES.iter().map(|t| t.to_string()).collect()
    } else {
        (0..n).map(|i| format!("tissue_{i}")).collect()
    };
    Ok(Loaded {
        model,
        host,
        lora: Default::default(),
        stats: TargetStats {
            mean: vec![0.0; n],
            std: vec![1.0; n],
        },
        tissues,
        tissues_known: false,
    })
}

fn parse_split(s: &str) -> Result<Split> {
    Split::parse(s).ok_or_else(|| {
        Error::invalid(
            "--split",
            format!("'{s}' (expected train, validation or test)"),
        )
    })
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let loaded = load_model(&a.checkpoint, a.config.as_deref())?;
    let split = parse_split(&a.split)?;
    let data = open_dataset(&loaded.model.cfg, &a.data, a.skip_bad_rows)?;
    loaded.check_tissues(&data)?;
    let Loaded {
        model,
        host,
        lora,
        stats,
        ..
    } = loaded;
    let metrics = with_backend_as(&a.device, a.dtype.as_deref(), |backend| {
        dispatch!(backend, b => {
            let params = IsoformerParams::upload_for_inference(b.as_ref(), &model, &host, Some(&lora))?;
            evaluate_split(b.as_ref(), &model, &params, &data, split, &stats, None)
        })
    })?;
    match metrics {
        Some(m) => println!("{}", m.table(split.name())),
        None => {
            return Err(Error::invalid(
                "--split",
                format!("{} has no {} rows", a.data.display(), split.name()),
            ))
        }
    }
    Ok(())
}

/// Rows of a TSV with `dna_seq`, `rna_seq`, `protein_seq` (and optionally `id`) columns.
/// One row to predict: id, DNA, RNA, protein.
pub fn run_predict(a: PredictArgs) -> Result<()> {
    super::check_tsv_name("--output", &a.output)?;
    let Loaded {
        model,
        host,
        lora,
        stats,
        tissues,
        ..
    } = load_model(&a.checkpoint, a.config.as_deref())?;
    let mut out = AtomicOutput::create(&a.output, &[&a.input, &a.checkpoint])?;
    let path = a.output.clone();
    {
        let w = out.writer();
        let io = |e| Error::io(&path, e);
        write!(w, "id").map_err(io)?;
        for t in &tissues {
            write!(w, "\t{t}").map_err(io)?;
        }
        writeln!(w).map_err(io)?;
    }
    // Rows are written as each batch is done: memory does not grow with the number of transcripts.
    let mut written = 0usize;
    let mut sink = |ids: &[String], preds: &[f32]| -> Result<()> {
        let w = out.writer();
        let io = |e| Error::io(&path, e);
        for (id, row) in ids.iter().zip(preds.chunks(tissues.len())) {
            write!(w, "{id}").map_err(io)?;
            for v in row {
                write!(w, "\t{v:.5}").map_err(io)?;
            }
            writeln!(w).map_err(io)?;
        }
        written += ids.len();
        Ok(())
    };
    with_backend_as(&a.device, a.dtype.as_deref(), |backend| {
        dispatch!(backend, b => {
            let b = b.as_ref();
            let params = IsoformerParams::upload_for_inference(b, &model, &host, Some(&lora))?;
            if a.input.is_dir() {
                let data = open_dataset(&model.cfg, &a.input, a.skip_bad_rows)?;
                let split = parse_split(&a.split)?;
                // As `eval`: an empty split is a mistake to name, not a file of headers.
                if data.split_rows(split).is_empty() {
                    return Err(Error::invalid(
                        "--split",
                        format!("{} has no {} rows", a.input.display(), split.name()),
                    ));
                }
                predict_split_batches(b, &model, &params, &data, split, &stats, None, |ids, p, _| sink(ids, p))?;
                Ok(())
            } else {
                // Read a batch at a time: memory holds one batch of sequences, whatever the file's length.
                let mut tsv = PredictTsv::open(&a.input)?;
                let len = model.cfg.dna_sequence_length;
                let mut acts = Default::default();
                let batch = model.cfg.train.batch_size.max(1);
                // Full batches, and a shorter last one: one arena serves both.
                begin_planned_steps(b, &model.cfg, &[batch, 1], false, false)?;
                loop {
                    let chunk = tsv.next_batch(batch)?;
                    if chunk.is_empty() {
                        break;
                    }
                    // Centre-crop or N-pad each DNA sequence to the model's window.
                    let dna: Vec<Vec<u8>> = chunk.iter().map(|r| fit_window(r.dna.as_bytes(), len)).collect();
                    let seqs: Vec<SampleSeqs<'_>> = chunk
                        .iter()
                        .zip(&dna)
                        .map(|(r, d)| SampleSeqs { dna: d, rna: &r.rna, protein: r.protein.as_deref() })
                        .collect();
                    let inputs = model.prepare_inputs(&seqs)?;
                    let mut p = predict(b, &model, &params, &inputs, &mut acts)?;
                    for row in p.chunks_mut(tissues.len()) {
                        stats.denormalize(row);
                    }
                    let ids: Vec<String> = chunk.iter().map(|r| r.id.clone()).collect();
                    sink(&ids, &p)?;
                    b.warm_step();
                }
                b.warm_step();
                Ok(())
            }
        })
    })?;
    let ids_len = written;
    out.commit()?;
    eprintln!("wrote {ids_len} predictions to {}", a.output.display());
    Ok(())
}

pub fn run_demo_data(a: DemoDataArgs) -> Result<()> {
    let n = write_demo_data(
        &a.out,
        &DemoSpec {
            genes: a.genes,
            seed: a.seed,
            shuffle_labels: a.shuffle_labels,
        },
    )?;
    println!("wrote {n} transcripts: {}", a.out.display());
    Ok(())
}

// The backend's trait must be in scope for `dispatch!` bodies.
#[allow(unused)]
fn _uses(b: &impl Backend) {}
