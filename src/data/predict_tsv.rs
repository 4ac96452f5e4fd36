//! `predict`'s TSV input (`dna_seq`, `rna_seq`, `protein_seq` and optionally `id` columns, the layout of a
//! third-party ready-made version of the task), read a batch of rows at a time, so memory holds one batch
//! of sequences however long the file is.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::data::sequences::MAX_INPUT_BYTES;
use crate::data::window::{normalize_dna, normalize_protein, normalize_rna};
use crate::{Error, Result};

/// One transcript to predict.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictRow {
    /// The `id` column, or `row<N>` (its line number) without one.
    pub id: String,
    /// Upper-cased DNA; IUPAC ambiguity codes read as N.
    pub dna: String,
    /// Upper-cased, in DNA letters (U read as T), as the RNA encoder's tokenizer takes it.
    pub rna: String,
    /// Upper-cased, without a final stop `*`; `None` for an empty cell (a non-coding transcript).
    pub protein: Option<String>,
}

pub struct PredictTsv {
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    /// Lines read so far.
    line: usize,
    fields: usize,
    dna: usize,
    rna: usize,
    protein: usize,
    id: Option<usize>,
    buf: Vec<u8>,
}

impl PredictTsv {
    /// Opens the file and reads its header. It must be a regular file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::runtime::input::open_regular(path)?;
        let mut tsv = PredictTsv {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            line: 0,
            fields: 0,
            dna: 0,
            rna: 0,
            protein: 0,
            id: None,
            buf: Vec::new(),
        };
        let header = tsv
            .next_line()?
            .ok_or_else(|| tsv.error(1, "empty file".into()))?;
        let header = header
            .strip_prefix('\u{feff}')
            .unwrap_or(&header)
            .to_string();
        let cols: Vec<&str> = header.split('\t').map(str::trim).collect();
        let find = |n: &str| cols.iter().position(|c| c.eq_ignore_ascii_case(n));
        let need = |n: &str| find(n).ok_or_else(|| tsv.error(1, format!("no '{n}' column")));
        (tsv.dna, tsv.rna, tsv.protein, tsv.id) = (
            need("dna_seq")?,
            need("rna_seq")?,
            need("protein_seq")?,
            find("id"),
        );
        tsv.fields = cols.len();
        Ok(tsv)
    }

    fn error(&self, line: usize, msg: String) -> Error {
        Error::Parse {
            path: self.path.clone(),
            line: Some(line),
            msg,
        }
    }

    /// A cell's checked value, or an error naming the current line and the column.
    fn cell<T>(&self, checked: std::result::Result<T, String>, column: &str) -> Result<T> {
        checked.map_err(|m| self.error(self.line, format!("{column}: {m}")))
    }

    /// The next line without its line ending, or `None` at the end. A line longer than one input file may
    /// be, binary data or invalid UTF-8 is an error naming the line.
    fn next_line(&mut self) -> Result<Option<String>> {
        self.buf.clear();
        // Read up to the line break, stopping at the first NUL: a binary file is refused at its first
        // block, not after reading a whole "line" of up to the size limit.
        loop {
            let chunk = self
                .reader
                .fill_buf()
                .map_err(|e| Error::io(&self.path, e))?;
            if chunk.is_empty() {
                break;
            }
            let stop = chunk.iter().position(|&c| c == b'\n' || c == 0);
            let take = stop.map_or(chunk.len(), |i| i + 1);
            if stop.is_some_and(|i| chunk[i] == 0) {
                return Err(self.error(self.line + 1, "binary data (a NUL byte), not text".into()));
            }
            if (self.buf.len() + take) as u64 > MAX_INPUT_BYTES {
                return Err(self.error(
                    self.line + 1,
                    format!("longer than {} GiB", MAX_INPUT_BYTES >> 30),
                ));
            }
            self.buf.extend_from_slice(&chunk[..take]);
            self.reader.consume(take);
            if stop.is_some() {
                break;
            }
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        self.line += 1;
        let text = std::str::from_utf8(&self.buf)
            .map_err(|e| self.error(self.line, format!("not UTF-8 text ({e})")))?;
        Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
    }

    /// Up to `n` more rows (fewer at the end of the file; none once it is done). Blank lines are skipped.
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<PredictRow>> {
        let mut out = Vec::with_capacity(n.min(1024));
        while out.len() < n {
            let Some(line) = self.next_line()? else {
                break;
            };
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != self.fields {
                return Err(self.error(
                    self.line,
                    format!("{} fields, the header has {}", f.len(), self.fields),
                ));
            }
            // The letters are checked and normalised as the dataset's TSV layout does them, so a
            // transcript predicts the same whichever way it arrives (lower case, U or T, a stop `*`).
            let dna = self.cell(normalize_dna(f[self.dna]), "dna_seq")?;
            if dna.is_empty() {
                return Err(self.error(self.line, "dna_seq is empty".into()));
            }
            out.push(PredictRow {
                id: self.id.map_or_else(
                    || format!("row{}", self.line - 1),
                    |c| f[c].trim().to_string(),
                ),
                dna,
                rna: self.cell(normalize_rna(f[self.rna]), "rna_seq")?,
                protein: self.cell(normalize_protein(f[self.protein]), "protein_seq")?,
            });
        }
        Ok(out)
    }
}

/// DNA centre-cropped or N-padded (evenly on both sides) to the model's window of `len` bases.
pub fn fit_window(seq: &[u8], len: usize) -> Vec<u8> {
    if seq.len() >= len {
        let s = (seq.len() - len) / 2;
        seq[s..s + len].to_vec()
    } else {
        let left = (len - seq.len()) / 2;
        let mut v = vec![b'N'; left];
        v.extend_from_slice(seq);
        v.resize(len, b'N');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A unique file under the system temp directory, removed on drop (no extra crate).
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn with(text: &str) -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "predict-tsv-{}-{}.tsv",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn rows_come_in_batches_with_ids_and_missing_proteins() {
        let f = write(
            "id\tdna_seq\trna_seq\tprotein_seq\r\na\tacgt\tACGU\tMK\r\n\r\nb\tGGCC\tUUAA\t\nc\tA\tA\tW\n",
        );
        let mut tsv = PredictTsv::open(&f.0).unwrap();
        let first = tsv.next_batch(2).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].id, "a");
        assert_eq!(first[0].dna, "ACGT");
        assert_eq!(first[0].rna, "ACGT");
        assert_eq!(first[0].protein.as_deref(), Some("MK"));
        assert_eq!(first[1].rna, "TTAA");
        assert_eq!(first[1].protein, None);
        let rest = tsv.next_batch(2).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, "c");
        assert!(tsv.next_batch(2).unwrap().is_empty());
    }

    #[test]
    fn bad_files_name_the_line() {
        let f = write("dna_seq\trna_seq\n");
        let e = PredictTsv::open(&f.0).err().unwrap().to_string();
        assert!(e.contains("protein_seq"), "{e}");
        let f = write("dna_seq\trna_seq\tprotein_seq\nAC\tAC\tM\nAC\tAC\n");
        let mut tsv = PredictTsv::open(&f.0).unwrap();
        let e = tsv.next_batch(10).err().unwrap().to_string();
        assert!(e.contains('3') && e.contains("2 fields"), "{e}");
        let f = write("dna_seq\trna_seq\tprotein_seq\nAC\t\0\tM\n");
        let e = PredictTsv::open(&f.0)
            .unwrap()
            .next_batch(1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("binary"), "{e}");
        assert!(PredictTsv::open(Path::new("/dev/null")).is_err());
    }

    /// The same transcript in lower case, with U for T, IUPAC codes and a stop gives the same row.
    #[test]
    fn letters_are_normalised_as_the_dataset_does() {
        let f = write("dna_seq\trna_seq\tprotein_seq\nACGTNN\tACGTTG\tMKW\nacgtry\tacguug\tmkw*\n");
        let rows = PredictTsv::open(&f.0).unwrap().next_batch(2).unwrap();
        assert_eq!(
            (&rows[0].dna, &rows[0].rna, &rows[0].protein),
            (&rows[1].dna, &rows[1].rna, &rows[1].protein)
        );
    }

    /// A letter outside a column's alphabet is refused with its line, column and position.
    #[test]
    fn invalid_letters_name_the_line_column_and_position() {
        for (row, column, letter) in [
            ("AC1T\tACGT\tMK", "dna_seq", "'1' at position 3"),
            ("ACGT\tACXT\tMK", "rna_seq", "'X' at position 3"),
            ("ACGT\tACGT\tM#K", "protein_seq", "'#' at position 2"),
            ("\tACGT\tMK", "dna_seq", "empty"),
            ("ACGT\t\tMK", "rna_seq", "empty RNA"),
            ("ACGT\t \t", "rna_seq", "empty RNA"),
        ] {
            let f = write(&format!(
                "dna_seq\trna_seq\tprotein_seq\nACGT\tACGT\tMK\n{row}\n"
            ));
            let e = PredictTsv::open(&f.0)
                .unwrap()
                .next_batch(5)
                .err()
                .unwrap_or_else(|| panic!("{row:?} was accepted"))
                .to_string();
            assert!(
                e.contains(":3") && e.contains(column) && e.contains(letter),
                "{row:?}: {e}"
            );
        }
    }
}
