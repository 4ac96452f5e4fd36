//! `prepare` on small raw files: a GTF with a + and a − strand protein-coding transcript (and a lncRNA that is
//! skipped), a GCT with four samples in two tissues, and the fixture genome. Expected sequences are cut from
//! the FASTA text directly, independently of the genome reader.

use std::path::Path;
use std::process::Command;

fn fasta_chrom(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/gtex/genome.fa"
    ))
    .unwrap();
    let mut seq = Vec::new();
    let mut on = false;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('>') {
            on = h.split_whitespace().next() == Some(name);
        } else if on {
            seq.extend(line.bytes().map(|b| match b.to_ascii_uppercase() {
                x @ (b'A' | b'C' | b'G' | b'T') => x,
                _ => b'N',
            }));
        }
    }
    seq
}

fn revcomp(s: &[u8]) -> Vec<u8> {
    s.iter()
        .rev()
        .map(|b| match b {
            b'A' => b'T',
            b'T' => b'A',
            b'C' => b'G',
            b'G' => b'C',
            _ => b'N',
        })
        .collect()
}

#[test]
fn prepare_builds_a_dataset_the_reader_accepts() {
    let dir = std::env::temp_dir().join(format!("isoformer-prepare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/data/gtex/genome.fa"
        ),
        dir.join("genome.fa"),
    )
    .unwrap();
    let attrs = |t: &str, g: &str, ty: &str| {
        format!("gene_id \"{g}\"; transcript_id \"{t}\"; transcript_type \"{ty}\";")
    };
    let gtf = [
        format!(
            "chr1\tHAVANA\texon\t101\t150\t.\t+\t.\t{}",
            attrs("ENST1.1", "ENSG1.3", "protein_coding")
        ),
        format!(
            "chr1\tHAVANA\texon\t201\t260\t.\t+\t.\t{}",
            attrs("ENST1.1", "ENSG1.3", "protein_coding")
        ),
        format!(
            "chr1\tHAVANA\tCDS\t121\t150\t.\t+\t0\t{}",
            attrs("ENST1.1", "ENSG1.3", "protein_coding")
        ),
        format!(
            "chr1\tHAVANA\tCDS\t201\t230\t.\t+\t0\t{}",
            attrs("ENST1.1", "ENSG1.3", "protein_coding")
        ),
        format!(
            "chr2\tHAVANA\texon\t51\t90\t.\t-\t.\t{}",
            attrs("ENST2.4", "ENSG2.1", "protein_coding")
        ),
        format!(
            "chr2\tHAVANA\tCDS\t61\t84\t.\t-\t0\t{}",
            attrs("ENST2.4", "ENSG2.1", "protein_coding")
        ),
        format!(
            "chr1\tHAVANA\texon\t300\t400\t.\t+\t.\t{}",
            attrs("ENST3.1", "ENSG3.1", "lncRNA")
        ),
    ]
    .join("\n");
    std::fs::write(
        dir.join("genes.gtf"),
        format!("##description: test\n{gtf}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("attrs.txt"),
        "SAMPID\tSMTS\tSMTSD\nS1\tLiver\tx\nS2\tLiver\tx\nS3\tBrain\ty\nS4\tBrain\ty\nS5\t\tz\n",
    )
    .unwrap();
    let gct = "#1.2\n3\t5\ntranscript_id\tgene_id\tS1\tS2\tS3\tS4\tS5\nENST1.2\tENSG1.3\t1\t3\t0\t0\t9\nENST2.4\tENSG2.1\t5\t5\t10\t30\t9\nENST3.1\tENSG3.1\t1\t1\t1\t1\t1\n";
    std::fs::write(dir.join("tpm.gct"), gct).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(["prepare", "--gct"])
        .arg(dir.join("tpm.gct"))
        .arg("--attributes")
        .arg(dir.join("attrs.txt"))
        .arg("--gtf")
        .arg(dir.join("genes.gtf"))
        .arg("--genome")
        .arg(dir.join("genome.fa"))
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(dir.join("out/GTEx_final.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "transcript_id_gtex,gene_id_gtex,split,chr,strand,start,end,RNA,5UTR,CDS,3UTR,Protein,\"Brain\",\"Liver\"");
    assert_eq!(
        lines.len(),
        3,
        "two protein-coding transcripts; the lncRNA is skipped"
    );
    // + strand: exons 101-150 and 201-260, CDS 121-150 + 201-230.
    let c1 = fasta_chrom("chr1");
    let f: Vec<&str> = lines[1].split(',').collect();
    let rna: Vec<u8> = [&c1[100..150], &c1[200..260]].concat();
    assert_eq!(
        (f[0], f[1], f[3], f[4], f[5], f[6]),
        ("ENST1.2", "ENSG1.3", "chr1", "+", "101", "260"),
        "versioned GCT id matched unversioned"
    );
    assert_eq!(f[7].as_bytes(), &rna[..]);
    assert_eq!(f[8].as_bytes(), &rna[..20]);
    assert_eq!(f[9].as_bytes(), &rna[20..80]);
    assert_eq!(f[10].as_bytes(), &rna[80..]);
    assert_eq!(
        (f[12], f[13]),
        ("0.000000", format!("{:.6}", 2f64.ln_1p()).as_str()),
        "log1p of the per-tissue mean"
    );
    // − strand: reverse complement; the 5'UTR is the genomic right side.
    let c2 = fasta_chrom("chr2");
    let g: Vec<&str> = lines[2].split(',').collect();
    let rna2 = revcomp(&c2[50..90]);
    assert_eq!(g[7].as_bytes(), &rna2[..]);
    assert_eq!(g[8].as_bytes(), &revcomp(&c2[84..90])[..], "5'UTR");
    assert_eq!(g[9].as_bytes(), &revcomp(&c2[60..84])[..], "CDS");
    assert_eq!(g[10].as_bytes(), &revcomp(&c2[50..60])[..], "3'UTR");
    assert_eq!(
        (g[12], g[13]),
        (
            format!("{:.6}", 20f64.ln_1p()).as_str(),
            format!("{:.6}", 5f64.ln_1p()).as_str()
        )
    );
    // The dataset reader takes it (protein may be empty where the CDS hits a stop codon at once).
    let mut c = isoformer_engine::data::DataConfig::new(dir.join("out"));
    c.genome = Some(dir.join("genome.fa"));
    c.dna_len = 40;
    c.edge = isoformer_engine::data::EdgePolicy::PadN;
    c.cache_dir = dir.join("cache");
    let ds = isoformer_engine::data::Dataset::open(c).unwrap();
    assert_eq!(ds.rows().len(), 2);
    assert_eq!(ds.tissues(), ["Brain", "Liver"]);
    assert!(Path::new(&dir.join("out")).read_dir().unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    // A negative TPM is an error naming the file and line, and leaves no output behind.
    std::fs::write(
        dir.join("neg.gct"),
        gct.replace("\t5\t5\t10", "\t5\t-5\t10"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(["prepare", "--gct"])
        .arg(dir.join("neg.gct"))
        .arg("--attributes")
        .arg(dir.join("attrs.txt"))
        .arg("--gtf")
        .arg(dir.join("genes.gtf"))
        .arg("--genome")
        .arg(dir.join("genome.fa"))
        .arg("--out")
        .arg(dir.join("out_neg"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("neg.gct:5") && err.contains("non-negative"),
        "{err}"
    );
    assert!(!dir.join("out_neg/GTEx_final.csv").exists());
}
