//! `isoformer-engine embed`: sequences in, embeddings out (safetensors).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::sequences::read_sequences;
use crate::embed::{BatchShape, Embedder, ModelKind, Pool};
use crate::runtime::safetensors_file::StreamingSafetensors;
use crate::{DeviceRequest, Error, Result};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// esm2, nt or enformer.
    #[arg(long)]
    pub model: String,
    /// A directory with config.json and model.safetensors, or a .safetensors file (then --config).
    #[arg(long)]
    pub weights: PathBuf,
    /// config.json, when --weights is a single file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// FASTA, or one sequence per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output .safetensors file: `embeddings` [N, D] when pooled, `seq_<i>` [tokens, D] per sequence with
    /// --pool none; the ids in its metadata.
    #[arg(long)]
    pub output: PathBuf,
    /// mean, cls or none.
    #[arg(long, default_value = "mean")]
    pub pool: String,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Token budget per sequence, special tokens included (ESM-2 crops on the right; NT-v2 keeps the last (N - 1) x 6 letters, split into 6-mers from the first one kept).
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Enformer: DeepMind's TF gamma table (`tools/convert_checkpoint.py --export-tf-gammas`), for weights
    /// used with `use_tf_gamma`.
    #[arg(long)]
    pub tf_gammas: Option<PathBuf>,
    /// Accept weight files with tensors the model does not read (otherwise they are listed as an error).
    #[arg(long)]
    pub allow_unused_weights: bool,
    /// cpu, cuda, emu or auto (every model runs on every device).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: f32 or bf16 on the CPU (bf16 weights and activations, f32 accumulation); kernel
    /// devices compute in bf16. Default: f32 on the CPU, bf16 on kernel devices.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Allocate the forwards' buffers one by one instead of from one planned arena (for comparison:
    /// the output is the same).
    #[arg(long)]
    pub no_arena: bool,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let device = DeviceRequest::parse(&a.device)?.resolve()?;
    let dtype = a.dtype.as_deref().map(crate::DType::parse).transpose()?;
    let kind = ModelKind::parse(&a.model)?;
    let pool = Pool::parse(&a.pool)?;
    if a.batch == 0 {
        return Err(Error::invalid("--batch", "must be positive"));
    }
    if kind == ModelKind::Enformer && pool == Pool::Cls {
        return Err(Error::invalid(
            "--pool",
            "cls is not defined for Enformer (use mean or none)",
        ));
    }
    // The smallest budget that holds one unit of sequence beside the special tokens (Enformer has none).
    let least = match kind {
        ModelKind::Esm2 => Some((3, "a residue next to <cls> and <eos>")),
        ModelKind::NucleotideTransformer => Some((2, "a 6-mer next to <cls>")),
        ModelKind::Enformer => None,
    };
    if let Some((least, room)) = least.filter(|&(least, _)| a.max_tokens < least) {
        return Err(Error::invalid(
            "--max-tokens",
            format!(
                "{} leaves no room for {room} (at least {least})",
                a.max_tokens
            ),
        ));
    }
    // The output is checked (not an input, not a device or a link, its folder writable) before any work.
    let (config_path, weights_path) =
        crate::embed::resolve_weights(&a.weights, a.config.as_deref())?;
    let mut inputs = vec![
        a.input.as_path(),
        config_path.as_path(),
        weights_path.as_path(),
    ];
    if let Some(g) = &a.tf_gammas {
        inputs.push(g.as_path());
    }
    crate::runtime::output::check_writable_target(&a.output, &inputs)?;
    // The file is safetensors whatever its name: a `.npy` or `.pt` name would promise a format it is not.
    if !a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return Err(Error::invalid(
            "--output",
            format!(
                "{}: embed writes safetensors (`safetensors.numpy.load_file` or `safetensors.torch.load_file` \
                 reads it); name the file *.safetensors",
                a.output.display()
            ),
        ));
    }
    let seqs = read_sequences(&a.input)?;
    {
        let all: Vec<&str> = seqs.iter().map(|s| s.seq.as_str()).collect();
        for note in crate::embed::input_notes(kind, &all) {
            eprintln!("warning: {}: {note}", a.input.display());
        }
    }
    let mut embedder = Embedder::load_on(
        kind,
        &a.weights,
        a.config.as_deref(),
        a.allow_unused_weights,
        device,
        dtype,
    )?;
    embedder.max_tokens = a.max_tokens;
    if let Some(path) = &a.tf_gammas {
        embedder.set_tf_gammas(path)?;
    }
    // Longest first (in tokens, as the model runs them), grouped by what can share a batch: little
    // padding, the slow batches show early, and a run's first batch is its largest, which its planned
    // arena is made for.
    let sizes: Vec<usize> = seqs.iter().map(|s| embedder.input_len(&s.seq)).collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| {
        (
            embedder.batch_key(&seqs[i].seq),
            std::cmp::Reverse(sizes[i]),
            i,
        )
    });
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for &i in &order {
        match batches.last_mut() {
            Some(b)
                if b.len() < a.batch
                    && embedder.batch_key(&seqs[b[0]].seq) == embedder.batch_key(&seqs[i].seq) =>
            {
                b.push(i)
            }
            _ => batches.push(vec![i]),
        }
    }
    let texts_of =
        |batch: &[usize]| -> Vec<&str> { batch.iter().map(|&i| seqs[i].seq.as_str()).collect() };
    // Consecutive batches that share a key are one run of forwards, from one planned arena (Enformer:
    // one run per sequence length): the first batch of each run, with the shapes of the run's batches.
    let mut runs: Vec<(usize, Vec<BatchShape>)> = Vec::new();
    for (k, batch) in batches.iter().enumerate() {
        let shape = BatchShape {
            batch: batch.len(),
            len: batch.iter().map(|&i| sizes[i]).max().unwrap_or(0),
        };
        let key = embedder.batch_key(&seqs[batch[0]].seq);
        match runs.last_mut() {
            Some((_, shapes)) if key == embedder.batch_key(&seqs[batches[k - 1][0]].seq) => {
                shapes.push(shape)
            }
            _ => runs.push((k, vec![shape])),
        }
    }
    let mut runs = runs.into_iter().peekable();
    // The output's layout is known before any work: its header is written first and each batch's rows go
    // straight to their place in the file, so memory does not grow with the number of sequences.
    let h = embedder.hidden_size();
    let ids: Vec<&str> = seqs.iter().map(|s| s.id.as_str()).collect();
    let mut meta = HashMap::new();
    meta.insert(
        "ids".to_string(),
        serde_json::to_string(&ids).expect("strings serialise"),
    );
    meta.insert("model".to_string(), kind.name().to_string());
    meta.insert("pool".to_string(), a.pool.clone());
    let layout: Vec<(String, Vec<usize>)> = match pool {
        Pool::Mean | Pool::Cls => vec![("embeddings".into(), vec![seqs.len(), h])],
        Pool::None => seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let rows = embedder
                    .output_rows(&s.seq, pool)
                    .map_err(|e| Error::Context {
                        context: format!("'{}' ({}:{})", s.id, a.input.display(), s.line),
                        source: Box::new(e),
                    })?;
                Ok((format!("seq_{i}"), vec![rows, h]))
            })
            .collect::<Result<_>>()?,
    };
    let mut out = StreamingSafetensors::create(&a.output, &inputs, &layout, meta)?;
    // Pooled rows are gathered in input order and written once (one row per sequence).
    let mut pooled: Vec<f32> = if pool == Pool::None {
        Vec::new()
    } else {
        vec![0.0; seqs.len() * h]
    };
    let bar = ProgressBar::new(seqs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} sequences  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    for (k, batch) in batches.iter().enumerate() {
        if let Some((_, shapes)) = runs.next_if(|(start, _)| *start == k) {
            if !a.no_arena {
                let line = embedder.begin_run(&shapes)?;
                if k == 0 {
                    let line = format!("forward buffers: {line}");
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.println(line);
                    }
                }
            }
        }
        let texts = texts_of(batch);
        let results = embedder.embed(&texts, pool).map_err(|e| Error::Context {
            context: format!(
                "embedding '{}' ({}:{})",
                seqs[batch[0]].id,
                a.input.display(),
                seqs[batch[0]].line
            ),
            source: Box::new(e),
        })?;
        for (&i, v) in batch.iter().zip(results) {
            match pool {
                Pool::None => out.write(i, &v)?,
                _ => pooled[i * h..(i + 1) * h].copy_from_slice(&v),
            }
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if pool != Pool::None {
        out.write(0, &pooled)?;
    }
    out.commit()?;
    eprintln!(
        "embedded {} sequences in {secs:.2} s ({:.1} sequences/s) → {}",
        seqs.len(),
        seqs.len() as f64 / secs,
        a.output.display()
    );
    Ok(())
}
