//! Reliability regressions through the command line: bounds that are errors with the limit stated,
//! dataset rows that must not panic or corrupt a TSV, `prepare`'s input checks, and an interrupted export
//! that must not leave its partial file behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn engine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iso-relcli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture dataset with its CSV rewritten by `edit` (given the text, returns the new text).
fn dataset(tag: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/gtex");
    let d = scratch(tag);
    std::fs::copy(src.join("genome.fa"), d.join("genome.fa")).unwrap();
    let csv = std::fs::read_to_string(src.join("GTEx_final.csv")).unwrap();
    std::fs::write(d.join("GTEx_final.csv"), edit(&csv)).unwrap();
    d
}

#[test]
fn sizes_past_their_limits_are_errors_that_state_the_limit() {
    let o = engine(&["bench", "gemm", "--device", "cpu", "--m", "1000000000"]);
    assert!(
        !o.status.success() && stderr(&o).contains("the limit is"),
        "{}",
        stderr(&o)
    );
    let o = engine(&[
        "bench",
        "gemm",
        "--device",
        "cpu",
        "--threads",
        "0",
        "--m",
        "8",
        "--n",
        "8",
        "--k",
        "8",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("0 is outside 1..=1024"),
        "{}",
        stderr(&o)
    );
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/gtex");
    let o = engine(&[
        "data",
        "check",
        "--data",
        data.to_str().unwrap(),
        "--dna-len",
        "1000000000000",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--dna-len"),
        "{}",
        stderr(&o)
    );
    let fa = scratch("maxtok").join("in.fa");
    std::fs::write(&fa, ">a\nMKT\n").unwrap();
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/esm2");
    let o = engine(&[
        "embed",
        "--model",
        "esm2",
        "--device",
        "cpu",
        "--max-tokens",
        "0",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        fa.to_str().unwrap(),
        "--output",
        fa.with_extension("st").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--max-tokens"),
        "{}",
        stderr(&o)
    );
}

/// Coordinates near 2⁶³ used to pass `data check` and panic in `export`; both now report the row.
/// A byte-order mark no longer hides the first column; an id with a tab cannot corrupt the TSV.
#[test]
fn dataset_rows_that_used_to_panic_or_corrupt() {
    let huge = dataset("huge", |csv| {
        csv.replacen(
            ",+,101,480,",
            ",+,9223372036854775000,9223372036854775100,",
            1,
        )
    });
    let d = huge.to_str().unwrap();
    let o = engine(&["data", "check", "--data", d, "--dna-len", "40"]);
    assert!(
        !o.status.success() && stderr(&o).contains("GTEx_final.csv:2"),
        "{}",
        stderr(&o)
    );
    let out = huge.join("out.tsv");
    let o = engine(&[
        "data",
        "export",
        "--data",
        d,
        "--dna-len",
        "40",
        "--skip-bad-rows",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = engine(&[
        "data",
        "export",
        "--data",
        d,
        "--dna-len",
        "40",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );

    let bom = dataset("bom", |csv| format!("\u{feff}{csv}"));
    let o = engine(&[
        "data",
        "check",
        "--data",
        bom.to_str().unwrap(),
        "--dna-len",
        "40",
    ]);
    assert!(
        o.status.success(),
        "a BOM must not hide the first column: {}",
        stderr(&o)
    );

    let tab = dataset("tab", |csv| csv.replacen("ENST01,", "\"ENST\t01\",", 1));
    let out = tab.join("out.tsv");
    let o = engine(&[
        "data",
        "export",
        "--data",
        tab.to_str().unwrap(),
        "--dna-len",
        "40",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("tab"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "no half-written export");
    for d in [huge, bom, tab] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// An export interrupted with Ctrl-C or SIGTERM removes its partial file.
#[cfg(unix)]
#[test]
fn interrupted_export_leaves_no_partial_file() {
    // A dataset big enough to take a while: 1,500 rows of 196,608 bp windows on a 4 Mb chromosome.
    let d = scratch("interrupt");
    let mut genome = String::from(">chr1\n");
    let line: String = (0..60).map(|i| b"ACGT"[(i * 7) % 4] as char).collect();
    for _ in 0..(4_000_000 / 60) {
        genome.push_str(&line);
        genome.push('\n');
    }
    std::fs::write(d.join("genome.fa"), genome).unwrap();
    let mut csv = String::from(
        "transcript_id_gtex,gene_id_gtex,split,chr,strand,start,end,RNA,CDS,Protein,Brain\n",
    );
    for i in 0..6000 {
        let s = 200_000 + (i % 3000) * 1000;
        csv.push_str(&format!(
            "T{i},G{i},train,chr1,+,{s},{},ACGU,ACG,M,1.0\n",
            s + 10
        ));
    }
    std::fs::write(d.join("GTEx_final.csv"), csv).unwrap();
    let out = d.join("out").join("export.tsv");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // Wait for the partial file to appear, then interrupt.
    let partial = || {
        std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
            .count()
    };
    // Ctrl-C, and the SIGTERM a job scheduler sends at a time limit or preemption (which killed the
    // process with its partial file left behind before).
    for signal in ["INT", "TERM"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
            .args([
                "data",
                "export",
                "--data",
                d.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while partial() == 0 && start.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(partial() > 0, "the export never started writing");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export finished before it could be interrupted"
        );
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(130),
            "SIG{signal}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            partial(),
            0,
            "SIG{signal}: the export left its partial file"
        );
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Every input a command names (sequences, configs, weights, checkpoints, gamma tables, genomes, TSVs) is
/// refused by kind when it is a FIFO or a device: a FIFO blocked the open until a writer came, and
/// `/dev/zero` as a config or gamma table was read until memory ran out. A multi-terabyte sparse file is
/// refused by its first bytes. Each run must end within 30 s.
#[test]
fn inputs_that_are_not_regular_files_are_refused_without_blocking() {
    let dir = scratch("fifo");
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let esm = fixtures.join("models/esm2");
    let enformer = fixtures.join("models/enformer");
    let iso = fixtures.join("models/isoformer");
    let gtex = fixtures.join("data/gtex");
    let seqs = dir.join("in.fa");
    std::fs::write(&seqs, ">a\nACGTACGT\n").unwrap();
    let out = dir.join("out.safetensors");
    let tsv = dir.join("out.tsv");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // One command line per input kind, `{bad}` where the FIFO or device goes.
    let templates = [
        "embed --model esm2 --weights {esm} --input {bad} --output {out}",
        "embed --model esm2 --weights {bad} --config {esm}/config.json --input {seqs} --output {out}",
        "embed --model esm2 --weights {esm}/model.safetensors --config {bad} --input {seqs} --output {out}",
        "embed --model enformer --weights {enformer} --tf-gammas {bad} --input {seqs} --output {out}",
        "train --config {bad} --data {gtex} --out {out}",
        "eval --checkpoint {bad} --data {gtex}",
        "predict --checkpoint {iso}/model.safetensors --config {iso}/config.json --input {bad} --output {tsv}",
        "predict --checkpoint {bad} --config {iso}/config.json --input {seqs} --output {tsv}",
        "data check --data {gtex} --genome {bad} --dna-len 128",
    ];
    let cases = |bad: &str| -> Vec<Vec<String>> {
        templates
            .iter()
            .map(|t| {
                // Split first, then fill in: a path with a space stays one argument.
                t.split_whitespace()
                    .map(|word| {
                        [
                            ("{esm}", s(&esm)),
                            ("{enformer}", s(&enformer)),
                            ("{iso}", s(&iso)),
                            ("{gtex}", s(&gtex)),
                            ("{seqs}", s(&seqs)),
                            ("{out}", s(&out)),
                            ("{tsv}", s(&tsv)),
                            ("{bad}", bad.to_string()),
                        ]
                        .iter()
                        .fold(word.to_string(), |w, (k, v)| w.replace(k, v))
                    })
                    .collect()
            })
            .collect()
    };
    // A sparse file of 4 TiB of zeros: a regular file, so refused by what it holds, and that must be
    // found from its first bytes (checkpoints were mapped and paged in whole, genomes scanned for a line
    // break, before the header or the first line was looked at). Skipped where the file system cannot
    // hold it.
    let sparse = dir.join("sparse.safetensors");
    let sparse_made = std::fs::File::create(&sparse)
        .and_then(|f| f.set_len(1 << 42))
        .is_ok();
    let mut bad_inputs = vec!["/dev/zero".to_string()];
    if made {
        bad_inputs.push(s(&fifo));
    }
    if sparse_made {
        bad_inputs.push(s(&sparse));
    }
    for bad in &bad_inputs {
        for args in cases(bad) {
            let mut child = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let start = std::time::Instant::now();
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if start.elapsed() > std::time::Duration::from_secs(30) {
                    let _ = child.kill();
                    panic!("{args:?} still running after 30 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            let named = if *bad == s(&sparse) {
                err.contains("sparse.safetensors") && !err.contains("panicked")
            } else {
                err.contains("not a regular file")
            };
            assert!(!status.success() && named, "{args:?}: {err}");
        }
    }
    assert!(!out.exists() && !tsv.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An output that does not fit (here under the file-size limit, `ulimit -f`: writes fail with EFBIG, as
/// on a full disk with ENOSPC) is an error naming the output file, and leaves nothing in its folder: the
/// safetensors writer (`embed`) and the text writer (`data export`). (A full disk failed the safetensors
/// writer's tensor writes as "output: No space left on device", naming no file; the file-size limit fails
/// its first step, sizing the file, so this test cannot reach that write, which was checked on a 200 KiB
/// tmpfs.)
#[cfg(unix)]
#[test]
fn an_output_that_cannot_be_written_names_its_file_and_leaves_nothing() {
    let dir = scratch("full");
    let seqs = dir.join("in.fa");
    let text: String = (0..64)
        .map(|i| format!(">s{i}\n{}\n", "MKTAYIAKQRQISFVKSHFSRQ".repeat(9)))
        .collect();
    std::fs::write(&seqs, text).unwrap();
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (embedded, exported) = (out_dir.join("e.safetensors"), out_dir.join("x.tsv"));
    let cases = [
        (
            &embedded,
            format!(
                "embed --model esm2 --weights '{}' --input '{}' --output '{}' --pool none",
                s(&fixtures.join("models/esm2")),
                s(&seqs),
                s(&embedded)
            ),
        ),
        (
            &exported,
            format!(
                "data export --data '{}' --edge pad --out '{}'",
                s(&fixtures.join("data/gtex")),
                s(&exported)
            ),
        ),
    ];
    for (target, args) in cases {
        // 64 blocks of 512 bytes at most; SIGXFSZ ignored (kept across exec) so the write fails instead.
        let script = format!("ulimit -f 64; trap '' XFSZ; exec \"$0\" {args}");
        let o = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_isoformer-engine"))
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(&s(target)) && !err.contains("panicked"),
            "{args}: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "{args}: {left:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
