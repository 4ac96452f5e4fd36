//! Regression tests for the reliability classes (sizes that overflow, windows past the chromosome): every
//! input gives a result or an error that says what is wrong, never a panic.

use isoformer_engine::backend::cpu::CpuBackend;
use isoformer_engine::backend::kernel::KernelBackend;
use isoformer_engine::backend::{AttentionDims, Backend, LinearDims, Role, Tensor};
use isoformer_engine::data::fasta::Genome;
use isoformer_engine::data::window::{Strand, Window};
use isoformer_engine::gpu::emulator::EmuDevice;
use isoformer_engine::ops::matmul::{matmul, MatmulDims};

const EXTREMES: [usize; 8] = [0, 1, 2, 3, 1 << 31, 1 << 32, 1 << 63, usize::MAX];

/// GEMM bounds: sizes whose products wrap must not pass the check and reach the unsafe kernel.
#[test]
fn gemm_sizes_that_overflow_are_errors() {
    let (a, b) = (vec![1.0f32; 16], vec![1.0f32; 16]);
    let mut c = vec![0.0f32; 16];
    for &batch in &EXTREMES {
        for &m in &EXTREMES {
            for &n in &EXTREMES {
                for &k in &EXTREMES {
                    for (ta, tb) in [(false, false), (true, true)] {
                        let d = MatmulDims {
                            batch,
                            m,
                            n,
                            k,
                            trans_a: ta,
                            trans_b: tb,
                        };
                        let fits = d
                            .checked_sizes("t")
                            .is_ok_and(|(x, y, z)| x == 16 && y == 16 && z == 16);
                        let r = matmul(&mut c, &a, &b, d, false);
                        assert_eq!(r.is_ok(), fits, "{d:?}");
                    }
                }
            }
        }
    }
}

/// The same through the backend trait, on the CPU and on the kernel path (whose launchers would hand the
/// sizes to a kernel).
#[test]
fn emu_backend_ops_refuse_overflowing_dims() {
    fn check<B: Backend>(b: &B) {
        let x = Tensor::new(b, Role::Activation, 64).unwrap();
        let mut y = Tensor::new(b, Role::Activation, 64).unwrap();
        let mut lse = Tensor::new(b, Role::Exact, 64).unwrap();
        for &rows in &EXTREMES {
            for &d in &EXTREMES {
                let dims = LinearDims {
                    rows,
                    d_in: d,
                    d_out: 1 << 33,
                };
                assert!(b
                    .linear(y.view_mut(), x.view(), x.view(), None, dims)
                    .is_err());
                let ad = AttentionDims::new(rows.max(1), 1 << 40, 8, 8, d.max(1));
                assert!(b
                    .attention(
                        y.view_mut(),
                        lse.view_mut(),
                        x.view(),
                        x.view(),
                        x.view(),
                        None,
                        None,
                        &ad
                    )
                    .is_err());
            }
        }
    }
    check(&CpuBackend::new());
    check(&KernelBackend::new(EmuDevice::default()));
}

/// `--edge pad` with a window that starts past the chromosome's end (a genome-build mismatch) used to
/// overflow a size and panic; it is all N now, and coordinates near 2⁶³ are an error.
#[test]
fn windows_past_the_chromosome_are_all_n() {
    let dir = std::env::temp_dir().join(format!("iso-rel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fa = dir.join("g.fa");
    std::fs::write(&fa, ">c\nACGTACGTAC\nGT\n").unwrap();
    let g = Genome::open(&fa, &dir).unwrap();
    let mut out = Vec::new();
    for (start, len) in [(1_000_000u64, 20usize), (13, 8), (12, 8), (1, 30), (5, 0)] {
        let w = Window::around_tss(start, start, Strand::Plus, len).unwrap();
        w.fetch(&g, "c", &mut out).unwrap();
        assert_eq!(out.len(), len, "start {start} len {len}");
        if start > 100 {
            assert!(out.iter().all(|&b| b == b'N'));
        }
    }
    for start in [1u64 << 62, 1 << 63, u64::MAX] {
        assert!(Window::around_tss(start, start, Strand::Minus, 196_608).is_err());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// A copy of a fixture model in a fresh folder, with its config edited by `edit` and, optionally, one
/// tensor's first value replaced.
fn edited_fixture(
    name: &str,
    tag: &str,
    edit: impl Fn(&mut serde_json::Value),
    poison: Option<(&str, f32)>,
) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("iso-rel-{name}-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    if let Some((target, value)) = poison {
        let t = owned
            .iter_mut()
            .find(|(n, _, _)| n.ends_with(target))
            .expect("tensor to poison");
        t.2[..4].copy_from_slice(&value.to_le_bytes());
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir
}

/// Non-finite f32 weights are refused, naming the tensor, whether they are used in place (f32 on the CPU)
/// or checked as they are copied (bf16, the emulator), and so are impossible config values.
#[test]
fn nan_weights_and_bad_configs_are_refused() {
    use isoformer_engine::embed::{Embedder, ModelKind};
    use isoformer_engine::{DType, Device};
    let nan = edited_fixture(
        "esm2",
        "nan",
        |_| {},
        Some(("encoder.layer.1.attention.self.key.weight", f32::NAN)),
    );
    let inf = edited_fixture(
        "enformer",
        "inf",
        |_| {},
        Some(("stem.0.weight", f32::INFINITY)),
    );
    let placements = [
        (Device::Cpu, None),
        (Device::Cpu, Some(DType::BF16)),
        (Device::Emulator, None),
    ];
    for (kind, dir, tensor) in [
        (
            ModelKind::Esm2,
            &nan,
            "encoder.layer.1.attention.self.key.weight",
        ),
        (ModelKind::Enformer, &inf, "stem.0.weight"),
    ] {
        assert!(Embedder::load(kind, dir, None).is_err());
        for (device, dtype) in placements {
            let err = Embedder::load_on(kind, dir, None, false, device, dtype)
                .err()
                .expect("non-finite weights must fail")
                .to_string();
            assert!(
                err.contains(tensor) && err.contains("non-finite"),
                "{device} {dtype:?}: {err}"
            );
        }
    }
    for (tag, key, value) in [
        ("eps0", "layer_norm_eps", serde_json::json!(0.0)),
        ("epsneg", "layer_norm_eps", serde_json::json!(-1e-5)),
        (
            "layers",
            "num_hidden_layers",
            serde_json::json!(1_000_000_000_000u64),
        ),
        ("vocab0", "vocab_size", serde_json::json!(0)),
    ] {
        let dir = edited_fixture("esm2", tag, |c| c[key] = value.clone(), None);
        let err = Embedder::load(ModelKind::Esm2, &dir, None)
            .err()
            .expect("bad config")
            .to_string();
        assert!(err.contains(key) || err.contains("vocab"), "{tag}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let dir = edited_fixture(
        "enformer",
        "target0",
        |c| c["target_length"] = serde_json::json!(0),
        None,
    );
    let err = Embedder::load(ModelKind::Enformer, &dir, None)
        .err()
        .expect("target_length 0")
        .to_string();
    assert!(err.contains("target_length"), "{err}");
    for d in [nan, inf, dir] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// The output writer: a device node, an input, or a folder that does not exist are refused before any
/// work, with the path named, and the target is left as it was.
#[test]
fn embed_refuses_outputs_that_are_devices_inputs_or_unwritable() {
    let bin = env!("CARGO_BIN_EXE_isoformer-engine");
    let dir = std::env::temp_dir().join(format!("iso-rel-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.fa");
    std::fs::write(&input, ">a\nMKTAYIAKQR\n").unwrap();
    let weights = fixture("esm2");
    let run = |out: &std::path::Path| {
        std::process::Command::new(bin)
            .args(["embed", "--model", "esm2", "--device", "cpu", "--weights"])
            .arg(&weights)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(out)
            .output()
            .unwrap()
    };
    for (out, want) in [
        (std::path::PathBuf::from("/dev/null"), "not a regular file"),
        (input.clone(), "same file as the input"),
        (weights.join("model.safetensors"), "same file as the input"),
        (dir.join("missing/x.safetensors"), "missing"),
    ] {
        let o = run(&out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "{}: {err}",
            out.display()
        );
    }
    assert_eq!(std::fs::read_to_string(&input).unwrap(), ">a\nMKTAYIAKQR\n");
    let o = run(&dir.join("ok.safetensors"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let partial = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")
        })
        .count();
    assert_eq!(partial, 0, "no temporary file is left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `.fai` left over from another FASTA (another line width, another length, swapped names) is detected
/// and rebuilt, never trusted: the bases read are the file's own.
#[test]
fn stale_fasta_indexes_are_rebuilt() {
    let dir = std::env::temp_dir().join(format!("iso-rel-fai-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fa = dir.join("g.fa");
    let (a, b) = ("ACGTACGTACGTAC", "TTTTGGGGCC");
    let write = |text: &str| std::fs::write(&fa, text).unwrap();
    let wrap = |s: &str, w: usize| {
        s.as_bytes()
            .chunks(w)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect::<String>()
    };
    let layouts = [
        format!(">a\n{}>b\n{}", wrap(a, 5), wrap(b, 5)),
        format!(">a\n{}>b\n{}", wrap(a, 4), wrap(b, 4)),
        format!(">b\n{}>a\n{}", wrap(b, 4), wrap(a, 4)),
        format!(">a\n{}>b\n{}", wrap(a, 4), wrap(&b[..7], 4)),
    ];
    // Index the first layout, then swap the file under the index each time.
    for (i, text) in layouts.iter().enumerate() {
        write(text);
        let g = Genome::open(&fa, &dir.join("cache")).unwrap();
        let mut out = Vec::new();
        g.fetch_into("a", 0, a.len() as u64, &mut out).unwrap();
        assert_eq!(out, a.as_bytes(), "layout {i}: sequence a");
        let b_len = g.length("b").unwrap() as usize;
        out.clear();
        g.fetch_into("b", 0, b_len as u64, &mut out).unwrap();
        assert_eq!(out, &b.as_bytes()[..b_len], "layout {i}: sequence b");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config with fewer layers than its weights used to run a truncated model silently; the unread tensors
/// are now an error that lists them, unless `--allow-unused-weights` is given.
#[test]
fn unused_weights_are_an_error_unless_allowed() {
    use isoformer_engine::embed::{Embedder, ModelKind};
    let dir = edited_fixture(
        "esm2",
        "fewer",
        |c| c["num_hidden_layers"] = serde_json::json!(1),
        None,
    );
    let err = Embedder::load(ModelKind::Esm2, &dir, None)
        .err()
        .expect("unused layer")
        .to_string();
    assert!(
        err.contains("encoder.layer.1.") && err.contains("--allow-unused-weights"),
        "{err}"
    );
    assert!(Embedder::load_with(ModelKind::Esm2, &dir, None, true).is_ok());
    assert!(
        Embedder::load(ModelKind::Esm2, &fixture("esm2"), None).is_ok(),
        "the usual extras pass"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Quiet acceptances now say so, and binary or huge inputs are refused as soon as they are seen.
#[test]
fn input_notes_and_bounded_text_input() {
    use isoformer_engine::data::sequences::read_text_bounded;
    use isoformer_engine::embed::{input_notes, Embedder, ModelKind, Pool};
    let notes = input_notes(ModelKind::Esm2, &["MKTa", "MKT", "mk"]);
    assert!(
        notes.len() == 1 && notes[0].starts_with("2 sequence(s)"),
        "{notes:?}"
    );
    let notes = input_notes(ModelKind::NucleotideTransformer, &["ACGU", "ACGT"]);
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("1 sequence(s) contain U")),
        "{notes:?}"
    );
    assert!(input_notes(ModelKind::Esm2, &["MKT"]).is_empty());
    // Letters outside a vocabulary (a protein given to NT-v2, a J in a protein) are named.
    for (kind, seqs, first) in [
        (ModelKind::NucleotideTransformer, ["MKVLA", "ACGTN"], 'M'),
        (ModelKind::NucleotideTransformer, ["ACGT", "ACZGU"], 'Z'),
        (ModelKind::Esm2, ["MKJV", "MKV"], 'J'),
    ] {
        let notes = input_notes(kind, &seqs);
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("1 sequence(s) have letters outside")
                    && n.contains(&format!("'{first}'"))),
            "{kind:?} {seqs:?}: {notes:?}"
        );
    }
    assert!(
        input_notes(ModelKind::NucleotideTransformer, &["ACGTNACGU"])
            .iter()
            .all(|n| !n.contains("outside"))
    );
    // An empty sequence is refused by index, for every model (its mean embedding was all zeros).
    for (kind, name, good) in [
        (ModelKind::Esm2, "esm2", "MKV"),
        (ModelKind::NucleotideTransformer, "nt_v2", "ACGTAC"),
    ] {
        let e = Embedder::load(kind, &fixture(name), None).unwrap();
        for (batch, at) in [(vec![""], 0), (vec![good, "  "], 1)] {
            let err = e.embed(&batch, Pool::Mean).unwrap_err().to_string();
            assert!(
                err.contains(&format!("sequence {at} ")) && err.contains("empty"),
                "{err}"
            );
        }
        assert_eq!(e.embed(&[good], Pool::Mean).unwrap().len(), 1);
    }
    // U is read as T by NT-v2.
    let nt = Embedder::load(ModelKind::NucleotideTransformer, &fixture("nt_v2"), None).unwrap();
    let (rna, dna) = ("ACGUACGUUUGGCCAAUU", "ACGTACGTTTGGCCAATT");
    assert_eq!(
        nt.embed(&[rna], Pool::Mean).unwrap(),
        nt.embed(&[dna], Pool::Mean).unwrap()
    );
    // Binary input and byte-order marks.
    let dir = std::env::temp_dir().join(format!("iso-rel-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("bin.fa");
    std::fs::write(&bin, b">a\nMK\0T\n").unwrap();
    let err = read_text_bounded(&bin, 1 << 20).unwrap_err().to_string();
    assert!(err.contains("NUL") && err.contains("bin.fa"), "{err}");
    let big = dir.join("big.fa");
    std::fs::write(&big, vec![b'A'; 2048]).unwrap();
    assert!(read_text_bounded(&big, 1024)
        .unwrap_err()
        .to_string()
        .contains("limit"));
    let bom = dir.join("bom.fa");
    std::fs::write(&bom, "\u{feff}>a\nMKT\n").unwrap();
    assert_eq!(read_text_bounded(&bom, 1 << 20).unwrap(), ">a\nMKT\n");
    #[cfg(unix)]
    {
        // A device is refused before it is read (it was read until its first NUL before).
        let err = read_text_bounded(std::path::Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("a device, not a regular file"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A panic on the loader thread used to end the epoch early and quietly (`bench loader` printed 0
/// samples/s and exited 0); it is now an error that says how many batches came and why.
#[test]
fn a_panicking_loader_thread_is_an_error() {
    use isoformer_engine::data::loader::{epoch_plan, Loader, LoaderConfig};
    use isoformer_engine::data::{DataConfig, Dataset, Split};
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/gtex");
    let mut c = DataConfig::new(data);
    c.dna_len = 40;
    c.cache_dir = std::env::temp_dir().join(format!("iso-rel-loader-{}", std::process::id()));
    let ds = std::sync::Arc::new(Dataset::open(c).unwrap());
    let mut cfg = LoaderConfig::new(Split::Train, 1);
    cfg.shuffle = false;
    let plan = epoch_plan(&ds.split_rows(Split::Train), &cfg);
    assert!(plan.len() >= 2);
    let poison = plan[1][0].line;
    let source = ds.clone();
    let loader = Loader::spawn(plan, 2, move |r| {
        if r.line == poison {
            panic!("a sample that cannot be read");
        }
        source.sample(r)
    })
    .unwrap();
    let results: Vec<_> = loader.collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("the panic must surface as an error")
        .to_string();
    assert!(
        err.contains("panicked") && err.contains("cannot be read") && err.contains("1 of"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("iso-rel-loader-{}", std::process::id())),
    );
}
