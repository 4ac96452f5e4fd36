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
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_sequences(&text, path)
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
