//! `data export`: the samples exactly as the model sees them, as TSV, and the target statistics as a file.

use std::io::Write;
use std::path::Path;

use super::dataset::{Dataset, Split, TargetStats};
use crate::runtime::output::AtomicOutput;
use crate::runtime::safetensors_file::{load_f32, save_f32, NamedTensor};
use crate::{Error, Result};

/// Writes up to `limit` samples of `split` (all splits if `None`), in file order, to `out` as TSV with the
/// header `transcript_id, split, dna, rna, protein, <tissues…>`. Written to a temporary file and renamed.
pub fn export_tsv(
    ds: &Dataset,
    split: Option<Split>,
    limit: Option<usize>,
    out: &Path,
) -> Result<usize> {
    let inputs: Vec<&Path> = ds.input_files();
    let mut file = AtomicOutput::create(out, &inputs)?;
    let io = |e| Error::io(out, e);
    let w = file.writer();
    write!(w, "transcript_id\tsplit\tdna\trna\tprotein").map_err(io)?;
    for t in ds.tissues() {
        write!(w, "\t{t}").map_err(io)?;
    }
    writeln!(w).map_err(io)?;
    let mut written = 0;
    for row in ds
        .rows()
        .iter()
        .filter(|r| split.is_none_or(|s| r.split == s))
    {
        if limit.is_some_and(|l| written >= l) {
            break;
        }
        let s = ds.sample(row)?;
        // TSV has no quoting: an id with a tab or a line break would shift or split the row.
        if s.transcript_id.contains(['\t', '\n', '\r']) {
            return Err(Error::invalid(
                "transcript id",
                format!(
                    "{:?} contains a tab or line break, which TSV cannot hold",
                    s.transcript_id
                ),
            ));
        }
        w.write_all(s.transcript_id.as_bytes()).map_err(io)?;
        write!(w, "\t{}\t", s.split.name()).map_err(io)?;
        w.write_all(&s.dna).map_err(io)?;
        write!(w, "\t{}\t{}", s.rna, s.protein.as_deref().unwrap_or("")).map_err(io)?;
        for t in &s.targets {
            write!(w, "\t{t}").map_err(io)?;
        }
        writeln!(w).map_err(io)?;
        written += 1;
    }
    file.commit()?;
    Ok(written)
}

impl TargetStats {
    /// Saves the statistics as safetensors (`target_mean`, `target_std`; tissue names in the metadata).
    pub fn save(&self, tissues: &[String], path: &Path) -> Result<()> {
        let n = self.mean.len();
        let meta = [("tissues".to_string(), tissues.join("\t"))]
            .into_iter()
            .collect();
        save_f32(
            path,
            &[
                NamedTensor {
                    name: "target_mean".into(),
                    shape: vec![n],
                    data: &self.mean,
                },
                NamedTensor {
                    name: "target_std".into(),
                    shape: vec![n],
                    data: &self.std,
                },
            ],
            meta,
        )
    }

    /// Loads statistics saved by [`TargetStats::save`], checking they cover `tissues` in the same order.
    pub fn load(path: &Path, tissues: &[String]) -> Result<Self> {
        let f = load_f32(path)?;
        let saved = f.metadata.get("tissues").cloned().unwrap_or_default();
        if saved != tissues.join("\t") {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                msg: "target statistics were computed for other tissues".into(),
            });
        }
        let n = tissues.len();
        Ok(TargetStats {
            mean: f.get("target_mean", &[n])?.to_vec(),
            std: f.get("target_std", &[n])?.to_vec(),
        })
    }
}
