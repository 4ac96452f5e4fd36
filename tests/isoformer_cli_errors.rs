//! Bad input to `train`, `eval` and `predict`: a clear error that names the file, line or tensor, a
//! non-zero exit, and no output file.

use std::process::Command;

fn engine(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_checkpoints_and_inputs_are_named_errors() {
    let dir = std::env::temp_dir().join(format!("isoformer-cli-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();

    let (ok, err) = engine(&["train", "--config", "no-such-config"]);
    assert!(
        !ok && err.contains("no-such-config") && err.contains("demo"),
        "{err}"
    );

    // A resumed run is the checkpoint's: flags that would change it are refused before any work, not
    // ignored (the checkpoint need not exist for that).
    for flags in [
        &["--config", "isoformer"][..],
        &["--seed", "3"],
        &["--epochs", "2", "--seed", "1"],
        &["--weights-rna", "w"],
    ] {
        let mut args = vec!["train", "--resume", "missing.safetensors", "--out"];
        let out = p("resumed");
        args.push(&out);
        args.extend_from_slice(flags);
        let (ok, err) = engine(&args);
        let named = flags.iter().filter(|f| f.starts_with("--"));
        assert!(!ok && err.contains("resumed run"), "{flags:?}: {err}");
        for f in named {
            assert!(err.contains(f), "{flags:?}: {err}");
        }
        assert!(!dir.join("resumed").exists());
    }

    // Output names that promise another format than the one written are refused before any work.
    let esm_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/esm2");
    for (args, want) in [
        (
            vec![
                "embed",
                "--model",
                "esm2",
                "--weights",
                esm_dir,
                "--input",
                "i",
                "--output",
                "e.npy",
            ],
            "name the file *.safetensors",
        ),
        (
            vec![
                "predict",
                "--checkpoint",
                "c",
                "--input",
                "i",
                "--output",
                "p.csv",
            ],
            "tab-separated text, not .csv",
        ),
        (
            vec!["data", "export", "--data", "d", "--out", "x.parquet"],
            "tab-separated text, not .parquet",
        ),
    ] {
        let (ok, err) = engine(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }

    std::fs::write(p("typo.json"), r#"{"modalitys": ["dna"]}"#).unwrap();
    let (ok, err) = engine(&["train", "--config", &p("typo.json"), "--data", &p("none")]);
    assert!(
        !ok && err.contains("typo.json") && err.contains("modalitys"),
        "{err}"
    );

    // Weights that are not an engine checkpoint need a config, and the error says so.
    let esm = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/esm2/model.safetensors"
    );
    let (ok, err) = engine(&[
        "predict",
        "--checkpoint",
        esm,
        "--input",
        esm,
        "--output",
        &p("a.tsv"),
    ]);
    assert!(!ok && err.contains("--config"), "{err}");
    // With a config they do not fit, the tensors are listed.
    let (ok, err) = engine(&[
        "predict",
        "--checkpoint",
        esm,
        "--config",
        "demo",
        "--input",
        esm,
        "--output",
        &p("a.tsv"),
    ]);
    assert!(!ok && err.contains("missing tensor"), "{err}");

    // A released-layout checkpoint and a TSV without a protein column, then with a short row.
    let released = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/isoformer/model.safetensors"
    );
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/isoformer/config.json"
    );
    std::fs::write(p("no-protein.tsv"), "dna_seq\trna_seq\nACGT\tACGU\n").unwrap();
    let (ok, err) = engine(&[
        "predict",
        "--checkpoint",
        released,
        "--config",
        config,
        "--input",
        &p("no-protein.tsv"),
        "--output",
        &p("b.tsv"),
    ]);
    assert!(
        !ok && err.contains("no-protein.tsv") && err.contains("protein_seq"),
        "{err}"
    );
    std::fs::write(
        p("short.tsv"),
        "dna_seq\trna_seq\tprotein_seq\nACGT\tACGU\tMK\nACGT\tAC\n",
    )
    .unwrap();
    let (ok, err) = engine(&[
        "predict",
        "--checkpoint",
        released,
        "--config",
        config,
        "--input",
        &p("short.tsv"),
        "--output",
        &p("b.tsv"),
    ]);
    assert!(!ok && err.contains("short.tsv:3"), "{err}");
    assert!(
        !dir.join("a.tsv").exists() && !dir.join("b.tsv").exists(),
        "no partial output"
    );

    // A good TSV works, and the output has one row per input.
    std::fs::write(
        p("good.tsv"),
        "id\tdna_seq\trna_seq\tprotein_seq\nt1\tACGTN\tACGU\tMKV\nt2\tACG\tAAAAAA\t\n",
    )
    .unwrap();
    let (ok, err) = engine(&[
        "predict",
        "--checkpoint",
        released,
        "--config",
        config,
        "--input",
        &p("good.tsv"),
        "--output",
        &p("c.tsv"),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(dir.join("c.tsv")).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.lines().nth(2).unwrap().starts_with("t2\t"));
    // A configuration whose planned step exceeds this machine's memory is refused before any work, with the
    // plan's numbers (the released sizes, all encoders fine-tuned, batch 8: about 166 GiB).
    let small_machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(String::from)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .is_some_and(|kb| kb < 100 << 20);
    if small_machine {
        let (ok, err) = engine(&[
            "train",
            "--config",
            "isoformer",
            "--data",
            &p("none"),
            "--out",
            &p("big"),
        ]);
        assert!(!ok && err.contains("GiB") && err.contains("plan"), "{err}");
        assert!(!dir.join("big").exists(), "nothing written");
    }
    // A dataset whose every window is dropped says why it has no training rows.
    let short = dir.join("short-dna");
    std::fs::create_dir_all(&short).unwrap();
    std::fs::write(
        short.join("train.tsv"),
        "dna_seq\trna_seq\tprotein_seq\tlabels_0\tlabels_1\nACGTACGTAC\tACGU\tMKV\t1.0\t2.0\n",
    )
    .unwrap();
    std::fs::write(p("two.json"), r#"{"num_tissues": 2}"#).unwrap();
    let (ok, err) = engine(&[
        "train",
        "--config",
        &p("two.json"),
        "--data",
        short.to_str().unwrap(),
        "--out",
        &p("short-run"),
    ]);
    assert!(
        !ok && err.contains("no training rows")
            && err.contains("1 windows of 196608 bp were dropped"),
        "{err}"
    );
    // `predict` on a split with no rows is an error, as `eval` is (it wrote a file of headers).
    let train_only = dir.join("train-only");
    std::fs::create_dir_all(&train_only).unwrap();
    std::fs::write(
        train_only.join("train.tsv"),
        format!(
            "dna_seq\trna_seq\tprotein_seq\tlabels_0\tlabels_1\tlabels_2\n{}\tACGU\tMKV\t1\t2\t3\n",
            "ACGT".repeat(32)
        ),
    )
    .unwrap();
    let iso = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/isoformer"
    );
    let (ok, err) = engine(&[
        "predict",
        "--checkpoint",
        &format!("{iso}/model.safetensors"),
        "--config",
        &format!("{iso}/config.json"),
        "--input",
        train_only.to_str().unwrap(),
        "--output",
        &p("empty.tsv"),
    ]);
    assert!(!ok && err.contains("has no test rows"), "{err}");
    assert!(!dir.join("empty.tsv").exists());
    let dir_s = dir.to_str().unwrap().to_string();
    // Absurd or empty lengths for `plan` and `bench step` are named errors (a trillion RNA tokens aborted
    // on a 6 TB allocation before).
    for (args, want) in [
        (&["plan", "--rna-tokens", "1"][..], "--rna-tokens"),
        (&["plan", "--protein-tokens", "2"], "--protein-tokens"),
        (
            &["plan", "--rna-tokens", "1000000000000"],
            "num_tokens_per_seq_nuctf_rna",
        ),
        (
            &["plan", "--batch", "65536", "--budget", "1000TB"],
            "lower the batch",
        ),
        (&["bench", "step", "--rna-tokens", "0"], "--rna-tokens"),
        (
            &["bench", "step", "--config", "demo", "--batch", "0"],
            "--batch 0",
        ),
        (
            &["bench", "step", "--config", "demo", "--steps", "0"],
            "--steps 0",
        ),
        // A hundred thousand worker threads stalled the machine before.
        (&["bench", "gemm", "--threads", "100000"], "1..=1024"),
        (&["bench", "gemm", "--repeats", "0"], "repeats"),
        (
            &["demo-data", "--out", &dir_s, "--genes", "0"],
            "outside 10..=1000000",
        ),
        (
            &["data", "check", "--data", &dir_s, "--rna-max-len", "0"],
            "--rna-max-len",
        ),
    ] {
        let (ok, err) = engine(args);
        assert!(
            !ok && err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // The smallest token budget is the model's: NT-v2 has no <eos> (a budget of 2 passes the check and the
    // command goes on to the missing weights).
    for (model, budget, want) in [
        ("nt", "1", "a 6-mer next to <cls> (at least 2)"),
        ("esm2", "2", "<cls> and <eos> (at least 3)"),
        ("nt", "2", "invalid weights"),
    ] {
        let (ok, err) = engine(&[
            "embed",
            "--model",
            model,
            "--weights",
            "w",
            "--input",
            "i",
            "--output",
            "o.safetensors",
            "--max-tokens",
            budget,
        ]);
        assert!(!ok && err.contains(want), "{model} {budget}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
