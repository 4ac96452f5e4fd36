//! The training run end to end on a small demo dataset: outputs, resume bit-identical to an uninterrupted
//! run, eval and predict from the checkpoint.

use std::path::Path;
use std::process::Command;

use isoformer_engine::runtime::safetensors_file::load_f32;

/// Runs a command that must succeed; its stdout and stderr.
fn engine_out(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(args)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

fn engine(args: &[&str]) -> String {
    engine_out(args).0
}

/// Runs a command that must fail with an error naming every one of `needles`.
fn engine_fails(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(args)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && needles.iter().all(|n| err.contains(n)),
        "{args:?}: {err}"
    );
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = load_f32(p)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, (_, d))| (k, d))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Every run wrote all its outputs, and the run resumed from `half` ended byte for byte where the
/// uninterrupted `full` did: parameters, optimizer state and progress (metadata in a fixed order) alike.
/// Returns the final tensors.
fn check_outputs_and_resume(full: &Path, half: &Path, resumed: &Path) -> Vec<(String, Vec<f32>)> {
    for run in [full, half, resumed] {
        for file in [
            "last.safetensors",
            "best.safetensors",
            "metrics.json",
            "config.json",
            "loss.png",
            "r2_per_tissue.png",
        ] {
            assert!(run.join(file).is_file(), "{run:?} has no {file}");
        }
    }
    let (a, b) = (
        tensors(&full.join("last.safetensors")),
        tensors(&resumed.join("last.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na} differs after resume"
        );
    }
    assert!(
        std::fs::read(full.join("last.safetensors")).unwrap()
            == std::fs::read(resumed.join("last.safetensors")).unwrap(),
        "the resumed run's checkpoint differs from the uninterrupted run's"
    );
    a
}

#[test]
fn train_resume_is_bit_identical_and_checkpoints_serve_eval_and_predict() {
    let dir = std::env::temp_dir().join(format!("isoformer-train-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let d = data.to_str().unwrap();
    engine(&["demo-data", "--out", d, "--genes", "120"]);
    let full = dir.join("full");
    let half = dir.join("half");
    engine(&[
        "train",
        "--config",
        "demo",
        "--data",
        d,
        "--out",
        full.to_str().unwrap(),
        "--max-steps",
        "8",
    ]);
    engine(&[
        "train",
        "--config",
        "demo",
        "--data",
        d,
        "--out",
        half.to_str().unwrap(),
        "--max-steps",
        "4",
    ]);
    let resumed = dir.join("resumed");
    let resume_on = |data: &str, out: &Path| {
        engine_out(&[
            "train",
            "--data",
            data,
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "8",
            "--resume",
            half.join("last.safetensors").to_str().unwrap(),
        ])
        .1
    };
    let note = "differs from the checkpoint's";
    let log = resume_on(d, &resumed);
    assert!(!log.contains(note), "{log}");
    check_outputs_and_resume(&full, &half, &resumed);
    // `--max-steps` below the checkpoint's step is an error (it trained nothing and said "trained 8
    // steps"); at the checkpoint's step, a note says there is nothing more to train.
    let resume_to = |steps: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
            .args(["train", "--data", d, "--out", out.to_str().unwrap()])
            .args(["--max-steps", steps, "--resume"])
            .arg(resumed.join("last.safetensors"))
            .output()
            .unwrap()
    };
    let zero = resume_to("0", &dir.join("zero"));
    let err = String::from_utf8_lossy(&zero.stderr);
    assert!(
        !zero.status.success() && err.contains("0 trains nothing"),
        "{err}"
    );
    let back = resume_to("5", &dir.join("back"));
    let err = String::from_utf8_lossy(&back.stderr);
    assert!(
        !back.status.success() && err.contains("5 is below the checkpoint's step 8"),
        "{err}"
    );
    assert!(!dir.join("back").exists());
    let done = resume_to("8", &dir.join("done"));
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(
        done.status.success() && err.contains("at step 8 of this run's 8: nothing more to train"),
        "{err}"
    );
    // A resume on other data runs, and says it is not the checkpoint's run continued.
    let other = dir.join("other-data");
    engine(&[
        "demo-data",
        "--out",
        other.to_str().unwrap(),
        "--genes",
        "120",
        "--seed",
        "3",
    ]);
    let log = resume_on(other.to_str().unwrap(), &dir.join("resumed-other"));
    assert!(log.contains(note), "{log}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("metrics.json")).unwrap()).unwrap();
    for split in ["validation", "test"] {
        for key in ["r2_mean", "pearson_mean", "spearman_mean"] {
            assert!(metrics[split][key].is_number(), "{split}.{key}");
        }
        assert_eq!(metrics[split]["r2"].as_object().unwrap().len(), 30);
    }
    let ck = full.join("last.safetensors");
    let table = engine(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        d,
        "--split",
        "test",
    ]);
    assert!(table.contains("R²"), "{table}");
    // A dataset with the checkpoint's tissue columns in another order is refused by `eval` (it scored
    // each tissue's predictions against another tissue's targets).
    let swapped = dir.join("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if name == "GTEx_final.csv" {
            let text = std::fs::read_to_string(&path).unwrap();
            let header = text.lines().next().unwrap();
            let swapped_header = header.replacen(
                "Adipose Tissue,Adrenal Gland",
                "Adrenal Gland,Adipose Tissue",
                1,
            );
            assert_ne!(header, swapped_header);
            std::fs::write(
                swapped.join(name),
                text.replacen(header, &swapped_header, 1),
            )
            .unwrap();
        } else if path.is_file() {
            std::fs::copy(&path, swapped.join(name)).unwrap();
        }
    }
    let checkpoint = ck.to_str().unwrap();
    engine_fails(
        &[
            "eval",
            "--checkpoint",
            checkpoint,
            "--data",
            swapped.to_str().unwrap(),
        ],
        &[
            "the same tissues in another order",
            "column 1 is 'Adrenal Gland'",
        ],
    );
    // An engine checkpoint carries its config: another beside it is an error, not silently ignored.
    engine_fails(
        &[
            "eval",
            "--checkpoint",
            checkpoint,
            "--data",
            d,
            "--config",
            "isoformer",
        ],
        &["carries its own config"],
    );
    let predict = |name: &str, dtype: &str| -> String {
        let out = dir.join(name);
        engine(&[
            "predict",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--input",
            d,
            "--output",
            out.to_str().unwrap(),
            "--dtype",
            dtype,
        ]);
        std::fs::read_to_string(&out).unwrap()
    };
    let text = predict("pred.tsv", "f32");
    let header: Vec<&str> = text.lines().next().unwrap().split('\t').collect();
    assert_eq!(header.len(), 31);
    assert!(text.lines().count() > 1);
    // The CPU's bf16 backend predicts the same rows within bf16 accuracy.
    let text16 = predict("pred_bf16.tsv", "bf16");
    let values = |t: &str| -> Vec<f64> {
        t.lines()
            .skip(1)
            .flat_map(|l| {
                l.split('\t')
                    .skip(1)
                    .map(|v| v.parse::<f64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (a, b) = (values(&text), values(&text16));
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= 2e-2 * scale,
        "bf16 predictions differ by {worst:.3e} (scale {scale:.3e})"
    );
    assert!(
        a != b,
        "bf16 must actually run (identical to f32 to 5 decimals is suspicious)"
    );
    // One malformed test row: predict stops at it, naming the way past, and with --skip-bad-rows writes
    // every other row.
    let bad = dir.join("bad-data");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(data.join("genome.fa"), bad.join("genome.fa")).unwrap();
    let csv = std::fs::read_to_string(data.join("GTEx_final.csv")).unwrap();
    let mut lines: Vec<String> = csv.lines().map(String::from).collect();
    let row = lines.iter().position(|l| l.contains(",test,")).unwrap();
    lines[row] = lines[row].replacen(",test,", ",test-ish,", 1);
    std::fs::write(bad.join("GTEx_final.csv"), lines.join("\n") + "\n").unwrap();
    let args = |out: &str| {
        vec![
            "predict".to_string(),
            "--checkpoint".into(),
            ck.to_str().unwrap().into(),
            "--input".into(),
            bad.to_str().unwrap().into(),
            "--output".into(),
            dir.join(out).to_str().unwrap().into(),
        ]
    };
    let stopped = args("stopped.tsv");
    let stopped: Vec<&str> = stopped.iter().map(String::as_str).collect();
    engine_fails(&stopped, &["--skip-bad-rows"]);
    let mut skip = args("skipped.tsv");
    skip.push("--skip-bad-rows".into());
    let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
    let (_, log) = engine_out(&skip);
    assert!(log.contains("skipped 1 bad row"), "{log}");
    let skipped = std::fs::read_to_string(dir.join("skipped.tsv")).unwrap();
    assert_eq!(skipped.lines().count() + 1, text.lines().count());
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA on every encoder: a resumed run is bit-identical too (adapters and their moments are in the
/// checkpoint), and the encoders' base weights never change.
#[test]
fn lora_training_resumes_bit_identically_and_keeps_base_weights() {
    let dir = std::env::temp_dir().join(format!("isoformer-lora-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let d = data.to_str().unwrap();
    engine(&["demo-data", "--out", d, "--genes", "80"]);
    let mut cfg: serde_json::Value =
        serde_json::from_str(include_str!("../src/configs/demo.json")).unwrap();
    cfg["train"]["encoders"] = serde_json::json!({"dna": "lora", "rna": "lora", "protein": "lora"});
    cfg["train"]["lora_targets"] = serde_json::json!(["query", "value", "output"]);
    let cfg_path = dir.join("lora.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let c = cfg_path.to_str().unwrap();
    let (full, half, resumed) = (dir.join("full"), dir.join("half"), dir.join("resumed"));
    engine(&[
        "train",
        "--config",
        c,
        "--data",
        d,
        "--out",
        full.to_str().unwrap(),
        "--max-steps",
        "6",
    ]);
    engine(&[
        "train",
        "--config",
        c,
        "--data",
        d,
        "--out",
        half.to_str().unwrap(),
        "--max-steps",
        "3",
    ]);
    engine(&[
        "train",
        "--data",
        d,
        "--out",
        resumed.to_str().unwrap(),
        "--max-steps",
        "6",
        "--resume",
        half.join("last.safetensors").to_str().unwrap(),
    ]);
    let a = check_outputs_and_resume(&full, &half, &resumed);
    assert!(
        a.iter().any(|(n, _)| n.ends_with(".lora_b")),
        "adapters are checkpointed"
    );
    // The adapted base weights are the initial ones (the half run's, 3 steps earlier).
    let early = tensors(&half.join("last.safetensors"));
    let base = |t: &[(String, Vec<f32>)]| -> Vec<(String, Vec<f32>)> {
        t.iter()
            .filter(|(n, _)| n.starts_with("param/rna.") && n.ends_with("query.weight"))
            .cloned()
            .collect()
    };
    assert!(!base(&a).is_empty());
    assert_eq!(base(&a), base(&early));
    let moved = |t: &[(String, Vec<f32>)]| {
        t.iter()
            .find(|(n, _)| n.starts_with("param/rna.") && n.ends_with("query.weight.lora_b"))
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(moved(&a), moved(&early), "the adapters train");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run whose weights diverge stops at the step where the forward overflows, naming the step and the way
/// out (it said only "mse prediction: non-finite value at index 0").
#[test]
fn a_diverging_run_stops_naming_the_step() {
    let dir = std::env::temp_dir().join(format!("isoformer-diverge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    engine(&[
        "demo-data",
        "--out",
        data.to_str().unwrap(),
        "--genes",
        "20",
    ]);
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/src/configs/demo.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo).unwrap()).unwrap();
    for key in ["lr", "encoder_lr", "max_grad_norm"] {
        config["train"][key] = serde_json::json!(1e30);
    }
    config["train"]["warmup_steps"] = serde_json::json!(0);
    let path = dir.join("diverge.json");
    std::fs::write(&path, config.to_string()).unwrap();
    engine_fails(
        &[
            "train",
            "--config",
            path.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            dir.join("run").to_str().unwrap(),
            "--max-steps",
            "20",
        ],
        &["invalid training: step ", "diverged"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
