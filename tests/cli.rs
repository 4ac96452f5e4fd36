//! The command line as users call it.

use std::process::Command;

fn engine(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(args)
        .output()
        .expect("run isoformer-engine")
}

#[test]
fn bench_gemm_prints_the_median_in_gflops() {
    for dtype in ["f32", "bf16"] {
        let out = engine(&[
            "bench",
            "gemm",
            "--m",
            "65",
            "--n",
            "33",
            "--k",
            "17",
            "--threads",
            "2",
            "--dtype",
            dtype,
            "--repeats",
            "3",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let last = stdout.lines().last().expect("output");
        let number = last
            .strip_suffix(" GFLOP/s")
            .unwrap_or_else(|| panic!("last line '{last}'"));
        let value: f64 = number
            .parse()
            .unwrap_or_else(|_| panic!("not a number: '{number}'"));
        assert!(value > 0.0 && value.is_finite());
        assert!(
            stdout.contains(&format!("gemm {dtype} m=65 n=33 k=17")),
            "{stdout}"
        );
    }
}

#[test]
fn unavailable_device_and_bad_arguments_are_clear_errors() {
    let out = engine(&[
        "bench", "gemm", "--m", "8", "--device", "cuda", "--dtype", "bf16",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    if isoformer_engine::gpu::cuda::CudaDevice::new(0).is_ok() {
        // On a machine with a GPU (tools/gpu_check.sh runs this test there) the same command runs.
        assert!(out.status.success(), "{err}");
    } else {
        assert!(
            !out.status.success() && err.contains("CUDA") && err.contains("--device cpu"),
            "{err}"
        );
    }

    let out = engine(&["bench", "gemm", "--dtype", "f64"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid dtype: 'f64'"));

    let out = engine(&["bench", "gemm", "--m", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be positive"));

    // Kernel devices compute in bf16: asking for f32 there is refused before any work.
    let out = engine(&[
        "bench", "step", "--device", "emu", "--dtype", "f32", "--config", "demo",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dtype") && err.contains("bf16"), "{err}");
}

fn fixture_copy(tag: &str) -> std::path::PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data/gtex");
    let dir = std::env::temp_dir().join(format!("isoformer-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["genome.fa", "GTEx_final.csv"] {
        std::fs::copy(format!("{src}/{f}"), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn data_check_summarises_and_export_writes_what_the_model_sees() {
    let dir = fixture_copy("data");
    let d = dir.to_str().unwrap();
    let out = engine(&["data", "check", "--data", d, "--dna-len", "40"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "rows read: 10",
        "train      4",
        "validation 2",
        "test       1",
        "leaving the chromosome: dropped 3",
        "bad rows: 0",
        "tissues: 4",
    ] {
        assert!(text.contains(want), "missing '{want}' in:\n{text}");
    }
    assert!(!text.contains("note:"), "{text}");
    // The expression range, with where its ends are; values no log(1+TPM) can reach get a note.
    let csv = dir.join("GTEx_final.csv");
    let original = std::fs::read_to_string(&csv).unwrap();
    let edited = original.replacen(
        "tac,cct,1.950154,5.840091,3.189592",
        "tac,cct,1.950154,52000.5,-3.25",
        1,
    );
    assert_ne!(edited, original);
    std::fs::write(&csv, edited).unwrap();
    let out = engine(&["data", "check", "--data", d, "--dna-len", "40"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("expression: min -3.25 (line 3, Liver) / max 52000.5 (line 3, Brain)")
            && text.contains("note: expression values reach 52000.5")
            && text.contains("log1p"),
        "{text}"
    );
    // A tissue whose training targets are all equal is named.
    let flat: Vec<String> = original
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let mut fields: Vec<&str> = line.split(',').collect();
            if i > 0 {
                fields[12] = "1.5"; // Whole Blood
            }
            fields.join(",")
        })
        .collect();
    std::fs::write(&csv, flat.join("\n") + "\n").unwrap();
    let out = engine(&["data", "check", "--data", d, "--dna-len", "40"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("note: the training targets are all equal in Whole Blood:"),
        "{text}"
    );
    std::fs::write(&csv, original).unwrap();
    let tsv = dir.join("out.tsv");
    let out = engine(&[
        "data",
        "export",
        "--data",
        d,
        "--dna-len",
        "40",
        "--split",
        "valid",
        "--out",
        tsv.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&tsv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "transcript_id\tsplit\tdna\trna\tprotein\tAdipose Tissue\tBrain\tLiver\tWhole Blood"
    );
    let ids: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(ids, ["ENST03", "ENST07"], "validation rows in file order");
    assert!(lines[1].split('\t').nth(2).unwrap().len() == 40);
    // --limit, and a failing export leaves no output behind
    let out = engine(&[
        "data",
        "export",
        "--data",
        d,
        "--dna-len",
        "40",
        "--limit",
        "1",
        "--out",
        tsv.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&tsv).unwrap().lines().count(), 2);
    let missing = dir.join("no-such-dir").join("x.tsv");
    let out = engine(&[
        "data",
        "export",
        "--data",
        d,
        "--dna-len",
        "40",
        "--out",
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(!missing.exists());
    let leftovers = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial")
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn the_emulator_device_runs_the_gemm_benchmark() {
    let out = engine(&[
        "bench",
        "gemm",
        "--m",
        "48",
        "--n",
        "40",
        "--k",
        "32",
        "--dtype",
        "bf16",
        "--device",
        "emu",
        "--repeats",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("device=emu"));
    let out = engine(&[
        "bench", "gemm", "--m", "48", "--dtype", "f32", "--device", "emu",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --dtype bf16"));
}

/// `bench encoder-step`: forward, loss, backward and AdamW of an encoder from its weights; the loss falls
/// step by step, and the emulator's first loss matches the CPU's within bf16 accuracy.
/// The `step` lines of `bench encoder-step`: the loss of each step.
fn step_losses(args: &[&str]) -> Vec<f64> {
    let out = engine(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("planned peak "), "{text}");
    text.lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!((f[0], f[3], f[4]), ("step", "s", "loss"), "{l}");
            f[5].parse::<f64>().unwrap()
        })
        .collect()
}

#[test]
fn encoder_training_step_benchmark_trains() {
    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/esm2");
    let losses = |device: &str, recompute: &str| -> Vec<f64> {
        step_losses(&[
            "bench",
            "encoder-step",
            "--model",
            "esm2",
            "--weights",
            weights,
            "--batch",
            "2",
            "--len",
            "12",
            "--steps",
            "3",
            "--recompute",
            recompute,
            "--device",
            device,
        ])
    };
    let cpu = losses("cpu", "none");
    assert_eq!(cpu.len(), 3);
    assert!(cpu.iter().all(|l| l.is_finite() && *l > 0.0), "{cpu:?}");
    assert!(
        cpu[1] < cpu[0] && cpu[2] < cpu[1],
        "AdamW must lower the loss: {cpu:?}"
    );
    assert_eq!(losses("cpu", "blocks"), cpu, "recompute changes nothing");
    let emu = losses("emu", "none");
    assert!(
        (emu[0] - cpu[0]).abs() <= cpu[0] / 64.0,
        "emulator {emu:?} against cpu {cpu:?}"
    );
    // The Enformer trunk (fixture: 3 downsamplings, 24 output bins).
    let enformer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/enformer"
    );
    let enformer_losses = |recompute: &str| {
        step_losses(&[
            "bench",
            "encoder-step",
            "--model",
            "enformer",
            "--weights",
            enformer,
            "--batch",
            "2",
            "--len",
            "256",
            "--steps",
            "3",
            "--recompute",
            recompute,
        ])
    };
    let kept = enformer_losses("none");
    assert!(kept[2] < kept[0], "{kept:?}");
    assert_eq!(enformer_losses("blocks"), kept);
    // An absurd length is refused with a message, not an abort (the plan runs before any real memory).
    let out = engine(&[
        "bench",
        "encoder-step",
        "--model",
        "esm2",
        "--weights",
        weights,
        "--batch",
        "1",
        "--len",
        "100000000000",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("above the limit"));
    for (model, recompute, says) in [
        ("bert", "none", "expected esm2, nt or enformer"),
        ("esm2", "sometimes", "not a policy"),
    ] {
        let out = engine(&[
            "bench",
            "encoder-step",
            "--model",
            model,
            "--weights",
            weights,
            "--recompute",
            recompute,
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}

/// `bench gpu --quick` on the emulator: every figure (GEMM, attention forward and backward at the three head
/// dims, the training step) runs through the kernel backend and prints a positive rate; the CPU is refused.
#[test]
fn gpu_benchmark_runs_every_path_on_the_emulator() {
    let out = engine(&["bench", "gpu", "--device", "emu", "--quick"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("bf16 dense peak"), "{stdout}");
    let figures: Vec<&str> = lines[1..].to_vec();
    assert_eq!(figures.len(), 8, "{stdout}");
    for (prefix, count) in [
        ("gemm bf16", 1),
        ("flash attention fwd", 3),
        ("flash attention bwd", 3),
        ("training step", 1),
    ] {
        assert_eq!(
            figures.iter().filter(|l| l.starts_with(prefix)).count(),
            count,
            "{prefix}: {stdout}"
        );
    }
    for d in ["d=64", "d=128", "d=384"] {
        assert!(stdout.contains(d), "{d}: {stdout}");
    }
    for l in &figures {
        let f: Vec<&str> = l.split_whitespace().collect();
        let ms: f64 = f[f.len() - 4].parse().unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "{l}");
        assert_eq!(f[f.len() - 1], "TFLOP/s", "{l}");
    }
    let out = engine(&["bench", "gpu", "--device", "cpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel device"));
}

/// `bench step --weights --input`: a training step of a released-layout checkpoint on the rows of a TSV (the
/// engine's side of bench_vs_torch's IsoFormer row); too few rows is a named error.
#[test]
fn isoformer_step_benchmark_from_weights_and_rows() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/isoformer"
    );
    let rows = std::env::temp_dir().join(format!("isoformer-step-rows-{}.tsv", std::process::id()));
    std::fs::write(
        &rows,
        "id\tdna_seq\trna_seq\tprotein_seq\n\
         a\tACGTACGTACGTTTGACCA\tACGTACGTACGTACGTAAAC\tMKTAYIAKQR\n\
         b\tGGGCCCAAATTT\tACGTTTTTTGGGACGTAC\t\n",
    )
    .unwrap();
    let (config, weights) = (
        format!("{dir}/config.json"),
        format!("{dir}/model.safetensors"),
    );
    let args = |batch: &'static str| {
        vec![
            "bench".to_string(),
            "step".into(),
            "--config".into(),
            config.clone(),
            "--weights".into(),
            weights.clone(),
            "--input".into(),
            rows.display().to_string(),
            "--batch".into(),
            batch.into(),
            "--steps".into(),
            "2".into(),
        ]
    };
    let run = |batch| {
        let a = args(batch);
        engine(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run("2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("step ")).count(),
        2,
        "{text}"
    );
    let out = run("3");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has 2 rows, the batch is 3"));
    let _ = std::fs::remove_file(&rows);
}

/// `info` names every device with what it is (cuda with its GPU, or why it is unavailable) and the bf16
/// GEMM kernel this CPU runs.
#[test]
fn info_lists_every_device_and_the_bf16_kernel() {
    let out = engine(&["info"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for line in ["  cpu ", "  emu ", "  cuda", "cpu threads: ", "bf16 GEMM: "] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}
