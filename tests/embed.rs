//! `isoformer-engine embed` against the PyTorch reference hidden states of the fixtures: the output
//! contract (tensor names and shapes, input order, pooling rules, ids in the metadata).

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;
type Metadata = std::collections::HashMap<String, String>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn tensors(path: &Path) -> (Tensors, Metadata) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut out = std::collections::HashMap::new();
    for (name, v) in st.tensors() {
        let data = match v.dtype() {
            safetensors::tensor::Dtype::F32 => v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            _ => v
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
        };
        out.insert(name, (v.shape().to_vec(), data));
    }
    (out, meta.metadata().clone().unwrap_or_default())
}

fn close(got: &[f32], want: &[f32]) -> bool {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(a, b)| (a - b).abs() <= 1e-4 * scale)
}

/// Writes the fixture's sequences as FASTA (ids s0, s1, …) and runs embed with `pool`.
fn run_embed(model: &str, dir: &Path, pool: &str, tag: &str) -> (Tensors, Metadata) {
    let meta = tensors(&dir.join("reference.safetensors")).1;
    let tmp = std::env::temp_dir().join(format!(
        "isoformer-embed-{model}-{tag}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp).unwrap();
    let fasta: String = meta["sequences"]
        .split('\n')
        .enumerate()
        .map(|(i, s)| format!(">s{i} description\n{s}\n"))
        .collect();
    std::fs::write(tmp.join("in.fa"), fasta).unwrap();
    let out = tmp.join("out.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args([
            "embed",
            "--model",
            model,
            "--weights",
            dir.to_str().unwrap(),
            "--input",
            tmp.join("in.fa").to_str().unwrap(),
        ])
        .args([
            "--output",
            out.to_str().unwrap(),
            "--pool",
            pool,
            "--batch",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    tensors(&out)
}

#[test]
fn transformer_embeddings_follow_the_contract() {
    for (model, specials_after) in [("esm2", 1usize), ("nt", 0)] {
        let dir = fixture(if model == "esm2" { "esm2" } else { "nt_v2" });
        let (reference, meta) = tensors(&dir.join("reference.safetensors"));
        let (hshape, hidden) = &reference["last_hidden_state"];
        let (len, h) = (hshape[1], hshape[2]);
        let mask = &reference["attention_mask"].1;
        let n = meta["sequences"].split('\n').count();
        let lens: Vec<usize> = (0..n)
            .map(|b| mask[b * len..(b + 1) * len].iter().sum::<f32>() as usize)
            .collect();

        let (none, out_meta) = run_embed(model, &dir, "none", "none");
        let ids: Vec<String> = serde_json::from_str(&out_meta["ids"]).unwrap();
        assert_eq!(ids, (0..n).map(|i| format!("s{i}")).collect::<Vec<_>>());
        for (b, &l) in lens.iter().enumerate() {
            let (shape, data) = &none[&format!("seq_{b}")];
            assert_eq!(
                shape,
                &vec![l, h],
                "{model} seq_{b}: special tokens included, padding excluded"
            );
            assert!(
                close(data, &hidden[b * len * h..(b * len + l) * h]),
                "{model} seq_{b} differs from the reference"
            );
        }
        let (mean, _) = run_embed(model, &dir, "mean", "mean");
        let (cls, _) = run_embed(model, &dir, "cls", "cls");
        assert_eq!(mean["embeddings"].0, vec![n, h]);
        for (b, &l) in lens.iter().enumerate() {
            let rows = &hidden[(b * len + 1) * h..(b * len + l - specials_after) * h];
            let want: Vec<f32> = (0..h)
                .map(|c| rows.chunks(h).map(|r| r[c]).sum::<f32>() / (rows.len() / h) as f32)
                .collect();
            assert!(
                close(&mean["embeddings"].1[b * h..(b + 1) * h], &want),
                "{model} mean of sequence {b}"
            );
            assert!(
                close(
                    &cls["embeddings"].1[b * h..(b + 1) * h],
                    &hidden[b * len * h..(b * len + 1) * h]
                ),
                "{model} cls of {b}"
            );
        }
    }
}

#[test]
fn enformer_embeddings_follow_the_contract() {
    let dir = fixture("enformer");
    let (reference, _) = tensors(&dir.join("reference.safetensors"));
    let (eshape, emb) = &reference["embeddings"];
    let (bins, d) = (eshape[1], eshape[2]);
    let (none, _) = run_embed("enformer", &dir, "none", "none");
    let (mean, _) = run_embed("enformer", &dir, "mean", "mean");
    for b in 0..eshape[0] {
        let rows = &emb[b * bins * d..(b + 1) * bins * d];
        assert_eq!(none[&format!("seq_{b}")].0, vec![bins, d]);
        assert!(close(&none[&format!("seq_{b}")].1, rows));
        let want: Vec<f32> = (0..d)
            .map(|c| rows.chunks(d).map(|r| r[c]).sum::<f32>() / bins as f32)
            .collect();
        assert!(close(&mean["embeddings"].1[b * d..(b + 1) * d], &want));
    }
}

#[test]
fn bad_requests_are_clear_errors() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
            .args(args)
            .output()
            .unwrap()
    };
    let tmp = std::env::temp_dir().join(format!("isoformer-embed-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("bad.fa"), ">a\nMK9T\n").unwrap();
    std::fs::write(tmp.join("ok.fa"), ">a\nACGT\n").unwrap();
    let esm = fixture("esm2");
    let out = tmp.join("o.safetensors");
    let o = run(&[
        "embed",
        "--model",
        "esm2",
        "--weights",
        esm.to_str().unwrap(),
        "--input",
        tmp.join("bad.fa").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad.fa:2"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&[
        "embed",
        "--model",
        "enformer",
        "--weights",
        fixture("enformer").to_str().unwrap(),
        "--input",
        tmp.join("ok.fa").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("DNA length"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&[
        "embed",
        "--model",
        "enformer",
        "--weights",
        fixture("enformer").to_str().unwrap(),
        "--input",
        tmp.join("ok.fa").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--pool",
        "cls",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cls is not defined for Enformer"));
    // NT-v2 weights under the ESM-2 tokenizer: the vocabulary sizes disagree.
    let o = run(&[
        "embed",
        "--model",
        "esm2",
        "--weights",
        fixture("nt_v2").to_str().unwrap(),
        "--input",
        tmp.join("ok.fa").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("vocab_size 4107"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists(), "no output is left behind by a failed run");
}

/// Max |got − want| over a batch, relative to max |want|, and the worst per-sequence relative Frobenius
/// error against `f32` (the engine's own f32 CPU output).
fn bf16_errors(got: &[Vec<f32>], want: &[f32], f32_out: &[Vec<f32>]) -> (f32, f64) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut worst = 0.0f32;
    let mut at = 0;
    for rows in got {
        let w = &want[at..at + rows.len()];
        worst = rows
            .iter()
            .zip(w)
            .fold(worst, |m, (g, w)| m.max((g - w).abs() / scale));
        at += rows.len();
    }
    let frob = got
        .iter()
        .zip(f32_out)
        .map(|(g, f)| {
            let (d, n) = g.iter().zip(f).fold((0.0f64, 0.0f64), |(d, n), (a, b)| {
                (d + (*a as f64 - *b as f64).powi(2), n + (*b as f64).powi(2))
            });
            (d / n).sqrt()
        })
        .fold(0.0f64, f64::max);
    (worst, frob)
}

/// ESM-2, NT-v2 and Enformer with bf16 weights on `device` against the PyTorch outputs (2⁻⁶ of the scale
/// for these bf16 pipelines) and, where `vs_f32` is given, within that relative error (per sequence) of
/// the engine's f32 CPU run.
fn bf16_embed_matches_pytorch(
    device: isoformer_engine::Device,
    dtype: Option<isoformer_engine::DType>,
    vs_f32: Option<f64>,
) {
    use isoformer_engine::embed::{Embedder, ModelKind, Pool};
    for (kind, dir, output) in [
        (ModelKind::Esm2, "esm2", "last_hidden_state"),
        (
            ModelKind::NucleotideTransformer,
            "nt_v2",
            "last_hidden_state",
        ),
        (ModelKind::Enformer, "enformer", "embeddings"),
    ] {
        let (reference, meta) = tensors(&fixture(dir).join("reference.safetensors"));
        let seqs: Vec<String> = meta["sequences"].split('\n').map(String::from).collect();
        let refs: Vec<&str> = seqs.iter().map(String::as_str).collect();
        let mut e = Embedder::load(kind, &fixture(dir), None).unwrap();
        let f32_out = e.embed(&refs, Pool::None).unwrap();
        e.to_device_as(device, dtype).unwrap();
        assert_eq!(e.weight_dtype(), isoformer_engine::DType::BF16);
        let got = e.embed(&refs, Pool::None).unwrap();
        let (shape, values) = &reference[output];
        // Transformer references are padded to the longest sequence: take each sequence's rows.
        let want: Vec<f32> = if kind == ModelKind::Enformer {
            values.clone()
        } else {
            let (len, h) = (shape[1], shape[2]);
            got.iter()
                .enumerate()
                .flat_map(|(b, rows)| values[b * len * h..b * len * h + rows.len()].to_vec())
                .collect()
        };
        let (err, frob) = bf16_errors(&got, &want, &f32_out);
        println!(
            "{dir} on {device} bf16: max error / max value {err:.3e} vs PyTorch; relative error {frob:.3e} vs f32"
        );
        assert!(err <= 1.0 / 64.0, "{dir}: error {err:.3e} of the scale");
        if let Some(bound) = vs_f32 {
            assert!(
                frob <= bound,
                "{dir}: relative error {frob:.3e} against f32"
            );
        }
    }
}

/// `embed --device emu`: ESM-2, NT-v2 and Enformer run with the GPU kernels on the host emulator.
#[test]
fn emu_embed_runs_the_transformers_with_the_gpu_kernels() {
    bf16_embed_matches_pytorch(isoformer_engine::Device::Emulator, None, None);
}

/// `embed --dtype bf16` on the CPU: bf16 weights, the bf16 GEMM.
#[test]
fn cpu_bf16_embed_matches_pytorch_and_f32() {
    bf16_embed_matches_pytorch(
        isoformer_engine::Device::Cpu,
        Some(isoformer_engine::DType::BF16),
        Some(1e-2),
    );
}

/// Regression: `embed --device emu|cuda --tf-gammas F` used to upload the trunk before the gammas were set,
/// so they were ignored (and `use_tf_gamma: true` failed). The positional table is now read at every
/// forward, so the gammas apply whatever the order, on every device.
#[test]
fn emu_enformer_uses_tf_gammas_set_after_the_device() {
    use isoformer_engine::embed::{Embedder, ModelKind, Pool};
    use isoformer_engine::runtime::safetensors_file::{save_f32, NamedTensor};
    let dir = std::env::temp_dir().join(format!("iso-gammas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The fixture: dim 48, 2 heads → 4 gamma features; 240 bp → transformer length 30.
    let (len, n, k) = (240usize, 30usize, 4usize);
    let gammas: Vec<f32> = (0..(2 * n - 1) * k)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 * 40.0 - 20.0)
        .collect();
    let path = dir.join("gammas.safetensors");
    save_f32(
        &path,
        &[NamedTensor {
            name: "tf_gammas".into(),
            shape: vec![2 * n - 1, k],
            data: &gammas,
        }],
        Default::default(),
    )
    .unwrap();
    let seq: String = (0..len)
        .map(|i| b"ACGTTGCA"[(i * 5 + i / 7) % 8] as char)
        .collect();
    let embed =
        |device, gammas_first: bool, with_gammas: bool, config: Option<&std::path::Path>| {
            let weights = match config {
                Some(_) => fixture("enformer").join("model.safetensors"),
                None => fixture("enformer"),
            };
            let mut e = Embedder::load(ModelKind::Enformer, &weights, config).unwrap();
            if with_gammas && gammas_first {
                e.set_tf_gammas(&path).unwrap();
            }
            e.to_device(device).unwrap();
            if with_gammas && !gammas_first {
                e.set_tf_gammas(&path).unwrap();
            }
            e.embed(&[&seq], Pool::None).unwrap().concat()
        };
    use isoformer_engine::Device::{Cpu, Emulator};
    let cpu = embed(Cpu, true, true, None);
    let plain = embed(Cpu, true, false, None);
    let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
    };
    println!("gamma effect {:.3e}, scale {scale:.3e}", diff(&cpu, &plain));
    assert!(
        diff(&cpu, &plain) > scale / 16.0,
        "the test gammas must change the embeddings"
    );
    for gammas_first in [true, false] {
        let emu = embed(Emulator, gammas_first, true, None);
        let err = diff(&emu, &cpu);
        assert!(
            err <= scale / 64.0,
            "emu with gammas set {} the device: error {err:.3e} (scale {scale:.3e})",
            if gammas_first { "before" } else { "after" }
        );
    }
    // use_tf_gamma: true in the config works on the emulator too.
    let config = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("enformer").join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["use_tf_gamma"] = serde_json::Value::Bool(true);
    std::fs::write(&config, cfg.to_string()).unwrap();
    let emu = embed(Emulator, false, true, Some(&config));
    assert!(diff(&emu, &cpu) <= scale / 64.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Random sequences over `letters`, with lengths in `lens`, from a fixed seed.
fn random_seqs(seed: u64, letters: &[u8], lens: &[usize]) -> Vec<String> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    lens.iter()
        .map(|&len| {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    letters[(state >> 33) as usize % letters.len()] as char
                })
                .collect()
        })
        .collect()
}

/// What embedding `runs` (each a list of batches, as `embed` orders them) gives: the bits of every
/// vector, and per run the allocations its start and first batch made and those made after.
fn embed_runs(
    e: &isoformer_engine::embed::Embedder,
    runs: &[Vec<Vec<&str>>],
    pool: isoformer_engine::embed::Pool,
    arena: bool,
) -> (Vec<u32>, Vec<(usize, usize)>) {
    let mut bits = Vec::new();
    let mut counts = Vec::new();
    for run in runs {
        let before = e.allocations();
        if arena {
            let shapes: Vec<_> = run.iter().map(|b| e.batch_shape(b)).collect();
            let line = e.begin_run(&shapes).unwrap();
            assert!(line.starts_with("one arena"), "{line}");
        }
        let mut first = 0;
        for (k, batch) in run.iter().enumerate() {
            for v in e.embed(batch, pool).unwrap() {
                bits.extend(v.iter().map(|x| x.to_bits()));
            }
            if k == 0 {
                first = e.allocations();
            }
        }
        counts.push((first - before, e.allocations() - first));
    }
    (bits, counts)
}

/// `embed` runs its forwards from one planned arena: over batches of varying sizes and lengths (and,
/// for Enformer, one run per sequence length), the embeddings are identical to the last bit to those of
/// one allocation per buffer; each run allocates once (plus the kernel devices' own scratch), and
/// nothing after its first batch. ESM-2, NT-v2 and Enformer, on the CPU in f32 and bf16, and on the
/// emulator.
#[test]
fn embeddings_of_varying_shapes_are_bit_identical_from_one_planned_arena() {
    use isoformer_engine::embed::{Embedder, ModelKind, Pool};
    use isoformer_engine::{DType, Device};
    let protein = random_seqs(
        1,
        b"ACDEFGHIKLMNPQRSTVWY",
        &[61, 58, 40, 33, 33, 30, 17, 9, 5, 2],
    );
    let rna = random_seqs(2, b"ACGU", &[290, 250, 121, 64, 40, 13, 7]);
    let dna = random_seqs(3, b"ACGT", &[2048, 2048, 2048, 1536, 1536]);
    fn batches<'a>(seqs: &'a [String], sizes: &[usize]) -> Vec<Vec<Vec<&'a str>>> {
        let mut rest: Vec<&str> = seqs.iter().map(String::as_str).collect();
        let mut run = Vec::new();
        for &n in sizes {
            run.push(rest.drain(..n).collect());
        }
        vec![run]
    }
    let mut dna_runs = batches(&dna[..3], &[2, 1]);
    dna_runs.extend(batches(&dna[3..], &[2]));
    let cases = [
        (
            ModelKind::Esm2,
            "esm2",
            batches(&protein, &[4, 4, 2]),
            Pool::None,
        ),
        (
            ModelKind::NucleotideTransformer,
            "nt_v2",
            batches(&rna, &[3, 3, 1]),
            Pool::Mean,
        ),
        (ModelKind::Enformer, "enformer", dna_runs, Pool::Mean),
    ];
    let devices = [
        (Device::Cpu, None, 1),
        (Device::Cpu, Some(DType::BF16), 1),
        (Device::Emulator, None, 2),
    ];
    for (kind, dir, runs, pool) in &cases {
        for &(device, dtype, arena_allocations) in &devices {
            if device == Device::Emulator && *kind == ModelKind::Enformer {
                // One Enformer run on the emulator (its convolutions are slow there).
                continue;
            }
            let load = || {
                let mut e = Embedder::load(*kind, &fixture(dir), None).unwrap();
                e.to_device_as(device, dtype).unwrap();
                e
            };
            let what = format!("{dir} on {device:?} {dtype:?}");
            let (heap, heap_counts) = embed_runs(&load(), runs, *pool, false);
            let (planned, counts) = embed_runs(&load(), runs, *pool, true);
            println!("{what}: one by one {heap_counts:?}, planned {counts:?}");
            assert!(planned == heap, "{what}: embeddings with the arena");
            for (run, (first, later)) in counts.iter().enumerate() {
                assert_eq!(*first, arena_allocations, "{what}: run {run}'s allocations");
                assert_eq!(
                    *later, 0,
                    "{what}: run {run}'s allocations after its first batch"
                );
                assert!(
                    heap_counts[run].0 > 10 * arena_allocations,
                    "{what}: buffers one by one"
                );
            }
        }
    }
    let e = {
        let mut e = Embedder::load(ModelKind::Enformer, &fixture("enformer"), None).unwrap();
        e.to_device(Device::Emulator).unwrap();
        e
    };
    let run = vec![vec![
        vec![dna[3].as_str(), dna[4].as_str()],
        vec![dna[4].as_str()],
    ]];
    let (_, counts) = embed_runs(&e, &run, Pool::Mean, true);
    assert_eq!(counts, vec![(2, 0)], "enformer on the emulator");
}

/// A planned run refuses a first batch larger than the one it was planned for, and plans nothing (the
/// buffers are allocated one by one) when the first batch is not the largest.
#[test]
fn a_planned_embedding_run_refuses_a_larger_first_batch() {
    use isoformer_engine::embed::{BatchShape, Embedder, ModelKind, Pool};
    let e = Embedder::load(ModelKind::Esm2, &fixture("esm2"), None).unwrap();
    let line = e.begin_run(&[BatchShape { batch: 2, len: 8 }]).unwrap();
    assert!(line.starts_with("one arena"), "{line}");
    let err = e
        .embed(&["MKTAYIAKQRQISFVKSHFSRQ"], Pool::Mean)
        .unwrap_err();
    assert!(
        err.to_string().contains("larger than the run planned"),
        "{err}"
    );
    let shapes = [
        BatchShape { batch: 1, len: 8 },
        BatchShape { batch: 2, len: 8 },
    ];
    let line = e.begin_run(&shapes).unwrap();
    assert!(line.contains("not the largest"), "{line}");
    assert_eq!(
        e.embed(&["MKTAYIAKQR", "MKT"], Pool::Mean).unwrap().len(),
        2
    );
}
