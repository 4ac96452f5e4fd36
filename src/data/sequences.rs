//! Sequence files for `embed`: FASTA (`>id` headers, sequences possibly wrapped over lines) or one sequence
//! per line (ids `seq_<i>`). Characters other than letters and `.-*<>_` are refused with the file and line.

use std::path::Path;

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedSequence {
    pub id: String,
    pub seq: String,
    /// 1-based line where the record starts.
    pub line: usize,
}

fn check_letters(path: &Path, line: usize, s: &str) -> Result<()> {
    match s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphabetic() || ".-*<>_".contains(*c)))
    {
        Some((i, c)) => Err(Error::Parse {
            path: path.to_path_buf(),
            line: Some(line),
            msg: format!("invalid character {c:?} at column {}", i + 1),
        }),
        None => Ok(()),
    }
}

/// Parses sequence-file text; `path` is used in messages.
pub fn parse_sequences(text: &str, path: &Path) -> Result<Vec<NamedSequence>> {
    let mut out: Vec<NamedSequence> = Vec::new();
    let fasta = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with('>'));
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let no = i + 1;
        if line.is_empty() {
            continue;
        }
        if fasta {
            if let Some(header) = line.strip_prefix('>') {
                let id = header.split_whitespace().next().unwrap_or("").to_string();
                if id.is_empty() {
                    return Err(Error::Parse {
                        path: path.to_path_buf(),
                        line: Some(no),
                        msg: "FASTA header without an id".into(),
                    });
                }
                if let Some(prev) = out.last() {
                    if prev.seq.is_empty() {
                        return Err(Error::Parse {
                            path: path.to_path_buf(),
                            line: Some(prev.line),
                            msg: format!("record '{}' has no sequence", prev.id),
                        });
                    }
                }
                out.push(NamedSequence {
                    id,
                    seq: String::new(),
                    line: no,
                });
            } else {
                check_letters(path, no, line)?;
                out.last_mut()
                    .expect("a FASTA file starts with a header")
                    .seq
                    .push_str(line);
            }
        } else {
            if line.starts_with('>') {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line: Some(no),
                    msg: "a FASTA header in a one-sequence-per-line file".into(),
                });
            }
            check_letters(path, no, line)?;
            out.push(NamedSequence {
                id: format!("seq_{}", out.len()),
                seq: line.to_string(),
                line: no,
            });
        }
    }
    if let Some(last) = out.last() {
        if last.seq.is_empty() {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: Some(last.line),
                msg: format!("record '{}' has no sequence", last.id),
            });
        }
    }
    if out.is_empty() {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: "no sequences".into(),
        });
    }
    Ok(out)
}

pub fn read_sequences(path: &Path) -> Result<Vec<NamedSequence>> {
    let text = read_text_bounded(path, MAX_INPUT_BYTES)?;
    parse_sequences(&text, path)
}

/// Largest sequence file read into memory (`embed` holds its inputs; larger sets can be split).
pub const MAX_INPUT_BYTES: u64 = 4 << 30;

/// Reads a text file of at most `limit` bytes: binary data (a NUL byte, e.g. `/dev/zero`) or a file past
/// the limit is an error as soon as it is seen, not after memory runs out.
pub fn read_text_bounded(path: &Path, limit: u64) -> Result<String> {
    use std::io::Read;
    let file = crate::runtime::input::open_regular(path)?;
    let mut reader = file.take(limit + 1);
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut chunk).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        if let Some(i) = chunk[..n].iter().position(|&b| b == 0) {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                msg: format!(
                    "binary data (a NUL byte at offset {}), not a text file",
                    bytes.len() + i
                ),
            });
        }
        bytes.extend_from_slice(&chunk[..n]);
        if bytes.len() as u64 > limit {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                msg: format!(
                    "larger than the {} GiB limit of one input file; split it",
                    limit >> 30
                ),
            });
        }
    }
    let mut text = String::from_utf8(bytes).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: format!("not UTF-8 text ({e})"),
    })?;
    // A UTF-8 byte-order mark is not part of the first line.
    if text.starts_with('\u{feff}') {
        text.drain(..3);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fasta_and_plain_lines() {
        let p = Path::new("in.fa");
        let v = parse_sequences(">a desc\nMKT\nAY\n\n>b\nGG*\n", p).unwrap();
        assert_eq!(
            (v[0].id.as_str(), v[0].seq.as_str(), v[1].seq.as_str()),
            ("a", "MKTAY", "GG*")
        );
        let v = parse_sequences("ACGT\r\n\nTTN\n", p).unwrap();
        assert_eq!(
            (v[1].id.as_str(), v[1].seq.as_str(), v[1].line),
            ("seq_1", "TTN", 3)
        );
        let e = parse_sequences(">a\nMK1T\n", p).unwrap_err().to_string();
        assert!(e.contains("in.fa:2") && e.contains("'1'"), "{e}");
        assert!(parse_sequences(">a\n>b\nMK\n", p)
            .unwrap_err()
            .to_string()
            .contains("in.fa:1"));
        assert!(parse_sequences("\n\n", p).is_err());
    }
}
