//! Random access to a FASTA genome through a `.fai` index and a memory map.
//!
//! The index is read from `<fasta>.fai` when present and consistent with the file. Otherwise it is built by
//! one scan, then saved beside the FASTA if that folder is writable, or in the cache folder otherwise
//! (written to a temporary file and renamed, so a half-written index is never picked up).
//! A gzip-compressed FASTA is refused with instructions: random access needs the plain text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::runtime::input::{open_regular, read_config_text};
use crate::runtime::output::write_atomically;
use crate::{Error, Result};

/// One sequence's entry in a `.fai` index (samtools' format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaiEntry {
    pub name: String,
    /// Bases in the sequence.
    pub length: u64,
    /// Byte offset of the first base.
    pub offset: u64,
    /// Bases per full line.
    pub line_bases: u64,
    /// Bytes per full line, line terminator included.
    pub line_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaiIndex {
    pub entries: Vec<FaiEntry>,
}

impl FaiIndex {
    /// Parses `.fai` text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut entries = Vec::new();
        let mut seen = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |msg: String| Error::Parse {
                path: path.to_path_buf(),
                line: Some(i + 1),
                msg,
            };
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() < 5 {
                return Err(err(format!(
                    "expected 5 tab-separated columns, found {}",
                    cols.len()
                )));
            }
            let num = |k: usize, what: &str| -> Result<u64> {
                cols[k].trim().parse::<u64>().map_err(|_| {
                    err(format!(
                        "{what} '{}' is not a non-negative integer",
                        cols[k]
                    ))
                })
            };
            let e = FaiEntry {
                name: cols[0].to_string(),
                length: num(1, "length")?,
                offset: num(2, "offset")?,
                line_bases: num(3, "line bases")?,
                line_bytes: num(4, "line bytes")?,
            };
            if e.line_bases == 0 && e.length > 0 || e.line_bytes < e.line_bases {
                return Err(err(format!(
                    "inconsistent line widths {} bases / {} bytes",
                    e.line_bases, e.line_bytes
                )));
            }
            if seen.insert(e.name.clone(), ()).is_some() {
                return Err(err(format!("sequence '{}' is listed twice", e.name)));
            }
            entries.push(e);
        }
        Ok(FaiIndex { entries })
    }

    pub fn to_text(&self) -> String {
        self.entries
            .iter()
            .map(|e| {
                format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    e.name, e.length, e.offset, e.line_bases, e.line_bytes
                )
            })
            .collect()
    }

    /// Builds the index by scanning FASTA bytes. Every line of a sequence but its last must have the same
    /// width, as samtools requires; anything else is reported with its line number.
    pub fn build(bytes: &[u8], path: &Path) -> Result<Self> {
        let err = |line: usize, msg: String| Error::Parse {
            path: path.to_path_buf(),
            line: Some(line),
            msg,
        };
        let mut entries: Vec<FaiEntry> = Vec::new();
        let mut names = HashMap::new();
        let mut pos = 0usize;
        let mut line_no = 0usize;
        // State of the current sequence: its last line was shorter than the full width.
        let mut short_line_seen = false;
        while pos < bytes.len() {
            line_no += 1;
            let rest = &bytes[pos..];
            if rest[0] == b'>' {
                let end = memchr_newline(rest).map_or(bytes.len(), |i| pos + i + 1);
                let line = &bytes[pos + 1..end];
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let header = line.strip_suffix(b"\r").unwrap_or(line);
                let name = String::from_utf8_lossy(header)
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                if name.is_empty() {
                    return Err(err(line_no, "sequence header without a name".into()));
                }
                if names.insert(name.clone(), ()).is_some() {
                    return Err(err(line_no, format!("sequence '{name}' appears twice")));
                }
                entries.push(FaiEntry {
                    name,
                    length: 0,
                    offset: end as u64,
                    line_bases: 0,
                    line_bytes: 0,
                });
                short_line_seen = false;
                pos = end;
                continue;
            }
            // A sequence line is scanned once, up to its first byte that is not a letter: the line break,
            // or an invalid byte reported at once (a binary file is refused at its first byte, not after
            // a search for a line break through all of it).
            let letters = rest
                .iter()
                .position(|c| !c.is_ascii_alphabetic() && *c != b'*' && *c != b'-')
                .unwrap_or(rest.len());
            let content = &rest[..letters];
            let line_len = match &rest[letters..] {
                [] => letters,
                [b'\n', ..] | [b'\r'] => letters + 1,
                [b'\r', b'\n', ..] => letters + 2,
                [bad, ..] => {
                    return Err(match entries.last() {
                        None => err(line_no, "sequence data before the first '>' header".into()),
                        Some(e) => err(
                            line_no,
                            format!(
                                "invalid character '{}' in sequence '{}'",
                                bad.escape_ascii(),
                                e.name
                            ),
                        ),
                    });
                }
            };
            if content.is_empty() {
                // A blank line ends the sequence's lines; only more blank lines or a header may follow.
                short_line_seen = entries.last().is_some_and(|e| e.length > 0);
            } else {
                let Some(e) = entries.last_mut() else {
                    return Err(err(
                        line_no,
                        "sequence data before the first '>' header".into(),
                    ));
                };
                if e.line_bases == 0 {
                    e.line_bases = content.len() as u64;
                    e.line_bytes = line_len as u64;
                } else if short_line_seen || content.len() as u64 > e.line_bases {
                    return Err(err(
                        line_no,
                        format!("sequence '{}' has lines of different widths; re-wrap it (e.g. `samtools faidx` needs the same)", e.name),
                    ));
                } else if (content.len() as u64) < e.line_bases || line_len as u64 != e.line_bytes {
                    short_line_seen = true;
                }
                e.length += content.len() as u64;
            }
            pos += line_len;
        }
        Ok(FaiIndex { entries })
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Where an index for `fasta` lives when not beside it.
fn cache_index_path(fasta: &Path, cache_dir: &Path) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let canonical = fasta.canonicalize().unwrap_or_else(|_| fasta.to_path_buf());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canonical.hash(&mut h);
    let stem = fasta
        .file_name()
        .map_or("genome".into(), |n| n.to_string_lossy().into_owned());
    cache_dir.join(format!("{stem}.{:016x}.fai", h.finish()))
}

/// The user's cache folder for isoformer-engine (`$XDG_CACHE_HOME`, else `~/.cache`, else the temp dir).
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("isoformer-engine")
}

/// A memory-mapped FASTA with its index.
pub struct Genome {
    path: PathBuf,
    map: Mmap,
    index: FaiIndex,
    by_name: HashMap<String, usize>,
    /// Where the index came from, for reports.
    pub index_source: PathBuf,
}

impl std::fmt::Debug for Genome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Genome")
            .field("path", &self.path)
            .field("sequences", &self.index.entries.len())
            .finish()
    }
}

impl Genome {
    /// Opens `path`, using or creating its index (see the module docs for where it is kept).
    pub fn open(path: &Path, cache_dir: &Path) -> Result<Self> {
        let file = open_regular(path)?;
        // SAFETY: the genome is opened read-only; like every mmap-based reader we assume nobody truncates it
        // while we run.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if map.starts_with(&[0x1f, 0x8b]) {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                msg: "the genome is gzip-compressed; random access needs the plain FASTA. Decompress it once \
                      (`gunzip -k hg38.fa.gz`) and pass the .fa file"
                    .into(),
            });
        }
        let beside = PathBuf::from(format!("{}.fai", path.display()));
        let cached = cache_index_path(path, cache_dir);
        for candidate in [&beside, &cached] {
            if let Ok(text) = read_config_text(candidate) {
                let index = FaiIndex::parse(&text, candidate)?;
                if index_fits(&index, &map) {
                    return Ok(Self::with_index(path, map, index, candidate.clone()));
                }
            }
        }
        let index = FaiIndex::build(&map, path)?;
        let text = index.to_text();
        let source = match write_atomically(&beside, text.as_bytes()) {
            Ok(()) => beside,
            Err(_) => {
                std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
                write_atomically(&cached, text.as_bytes())?;
                cached
            }
        };
        Ok(Self::with_index(path, map, index, source))
    }

    fn with_index(path: &Path, map: Mmap, index: FaiIndex, source: PathBuf) -> Self {
        let by_name = index
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Genome {
            path: path.to_path_buf(),
            map,
            index,
            by_name,
            index_source: source,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn index(&self) -> &FaiIndex {
        &self.index
    }

    /// Length of sequence `name`, or `None` if the genome has no such sequence.
    pub fn length(&self, name: &str) -> Option<u64> {
        self.by_name
            .get(name)
            .map(|&i| self.index.entries[i].length)
    }

    /// Appends bases `start..end` (0-based, half-open) of `name` to `out`, upper-cased, with every letter
    /// other than A, C, G, T written as N.
    pub fn fetch_into(&self, name: &str, start: u64, end: u64, out: &mut Vec<u8>) -> Result<()> {
        let e = self
            .by_name
            .get(name)
            .map(|&i| &self.index.entries[i])
            .ok_or_else(|| {
                Error::invalid(
                    "chromosome",
                    format!("'{name}' is not in {}", self.path.display()),
                )
            })?;
        if start > end || end > e.length {
            return Err(Error::invalid(
                "genome range",
                format!("{name}:{start}-{end} outside 0-{}", e.length),
            ));
        }
        let past_end = |pos: u64| Error::Parse {
            path: self.path.clone(),
            line: None,
            msg: format!(
                "the index points past the end of the file at {name}:{pos}; rebuild the .fai"
            ),
        };
        let mut pos = start;
        while pos < end {
            let col = pos % e.line_bases;
            let take = (e.line_bases - col).min(end - pos);
            let byte = byte_of(e, pos).ok_or_else(|| past_end(pos))?;
            let chunk = self
                .map
                .get(byte..byte.saturating_add(take as usize))
                .ok_or_else(|| past_end(pos))?;
            out.extend(chunk.iter().map(|&c| normalize_base(c)));
            pos += take;
        }
        Ok(())
    }
}

/// Upper-cases a base and maps anything but A, C, G, T to N.
pub fn normalize_base(c: u8) -> u8 {
    match c.to_ascii_uppercase() {
        b @ (b'A' | b'C' | b'G' | b'T') => b,
        _ => b'N',
    }
}

/// File offset of base `pos` of a sequence, or `None` if the arithmetic overflows (a corrupt index).
fn byte_of(e: &FaiEntry, pos: u64) -> Option<usize> {
    let line = pos.checked_div(e.line_bases)?;
    let byte = line
        .checked_mul(e.line_bytes)?
        .checked_add(e.offset)?
        .checked_add(pos % e.line_bases)?;
    usize::try_from(byte).ok()
}

/// Checks that an index describes this file (guards against a stale or foreign `.fai`):
/// - the line before each sequence is its own `>name` header (swapped or renamed sequences fail);
/// - lines end exactly where the index says: the first, the last and up to 64 evenly spaced lines in
///   between have `line_bases` letters and then their line break at `line_bytes` (another line width fails);
/// - the sequence ends where its length says: its last base is a letter, followed by a line break and then
///   the next header or the end of the file (another length fails).
fn index_fits(index: &FaiIndex, map: &[u8]) -> bool {
    index.entries.iter().all(|e| entry_fits(e, map))
}

fn entry_fits(e: &FaiEntry, map: &[u8]) -> bool {
    let Ok(offset) = usize::try_from(e.offset) else {
        return false;
    };
    if offset == 0 || offset > map.len() || map[offset - 1] != b'\n' {
        return false;
    }
    // The header line: `>name` then whitespace or the line break.
    let header_start = map[..offset - 1]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |p| p + 1);
    let header = &map[header_start..offset - 1];
    let name = e.name.as_bytes();
    if !(header.first() == Some(&b'>')
        && header[1..].starts_with(name)
        && header
            .get(1 + name.len())
            .is_none_or(|c| c.is_ascii_whitespace()))
    {
        return false;
    }
    if e.length == 0 {
        return true;
    }
    let lines = (e.length - 1) / e.line_bases + 1;
    let check_line = |line: u64| -> bool {
        let Some(start) = line
            .checked_mul(e.line_bytes)
            .and_then(|b| b.checked_add(e.offset))
        else {
            return false;
        };
        let bases = if line + 1 == lines {
            e.length - line * e.line_bases
        } else {
            e.line_bases
        };
        let (Ok(start), Ok(bases)) = (usize::try_from(start), usize::try_from(bases)) else {
            return false;
        };
        let end = start + bases;
        end < map.len()
            && map[start..end].iter().all(u8::is_ascii_alphabetic)
            && matches!(map[end], b'\n' | b'\r')
    };
    let step = (lines / 64).max(1);
    let sampled = (0..lines).step_by(step as usize).chain([lines - 1]);
    if !sampled.into_iter().all(check_line) {
        return false;
    }
    // After the last line: its break, then the next header or the end of the file.
    let Some(last) = byte_of(e, e.length - 1) else {
        return false;
    };
    let mut after = last + 1;
    while after < map.len() && matches!(map[after], b'\n' | b'\r') {
        after += 1;
    }
    after == map.len() || map[after] == b'>'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_round_trip() {
        let fa = b">chr1 description\nACGTA\nCGTAC\nGG\n>chr2\nNNNN\nAC\n";
        let idx = FaiIndex::build(fa, Path::new("g.fa")).unwrap();
        assert_eq!(
            idx.entries[0],
            FaiEntry {
                name: "chr1".into(),
                length: 12,
                offset: 18,
                line_bases: 5,
                line_bytes: 6
            }
        );
        assert_eq!(
            idx.entries[1],
            FaiEntry {
                name: "chr2".into(),
                length: 6,
                offset: 39,
                line_bases: 4,
                line_bytes: 5
            }
        );
        assert_eq!(
            FaiIndex::parse(&idx.to_text(), Path::new("g.fa.fai")).unwrap(),
            idx
        );
    }

    #[test]
    fn windows_line_endings_are_indexed_with_their_width() {
        let fa = b">chr1\r\nACGTA\r\nCG\r\n>chr2\r\nNN\r";
        let idx = FaiIndex::build(fa, Path::new("g.fa")).unwrap();
        let (a, b) = (&idx.entries[0], &idx.entries[1]);
        assert_eq!(
            (a.length, a.offset, a.line_bases, a.line_bytes),
            (7, 7, 5, 7)
        );
        assert_eq!(
            (b.length, b.offset, b.line_bases, b.line_bytes),
            (2, 25, 2, 3)
        );
    }

    #[test]
    fn malformed_fasta_is_reported_with_its_line() {
        let e = FaiIndex::build(b">a\nACG\nA\nACG\n", Path::new("g.fa"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("g.fa:4") && e.contains("different widths"),
            "{e}"
        );
        let e = FaiIndex::build(b"ACGT\n", Path::new("g.fa"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("g.fa:1") && e.contains("before the first"),
            "{e}"
        );
        let e = FaiIndex::build(b">a\nAC1T\n", Path::new("g.fa"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid character '1'"), "{e}");
        // Binary data is refused at its first byte, before or after a header.
        let e = FaiIndex::build(b"\0\0\0\0", Path::new("g.fa"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("g.fa:1") && e.contains("before the first"),
            "{e}"
        );
        let e = FaiIndex::build(b">a\nACGT\nAC\0\0\0", Path::new("g.fa"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("g.fa:3") && e.contains("invalid character '\\x00' in sequence 'a'"),
            "{e}"
        );
        let e = FaiIndex::build(b">a\nAC\rGT\n", Path::new("g.fa"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid character '\\r'"), "{e}");
        let e = FaiIndex::parse("chr1\t10\tx\t5\t6\n", Path::new("g.fai"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("g.fai:1") && e.contains("offset"), "{e}");
    }
}
