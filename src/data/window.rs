//! DNA windows around a transcription start site, and the sequence rules for RNA and protein.

use super::fasta::Genome;
use crate::{Error, Result};

/// What to do with a window that leaves its chromosome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgePolicy {
    /// Drop the sample (the reference loader's behaviour).
    Drop,
    /// Keep it, filling the part outside the chromosome with N.
    PadN,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strand {
    Plus,
    Minus,
}

impl Strand {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "+" => Some(Strand::Plus),
            "-" => Some(Strand::Minus),
            _ => None,
        }
    }
}

/// A window of `len` bases centred on a TSS: 0-based half-open `[tss0 − len/2, tss0 − len/2 + len)`, where
/// `tss0` is the 0-based TSS (`start − 1` on +, `end − 1` on −, from 1-based inclusive coordinates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// May be negative, and `end` may pass the chromosome: that is what "leaves the chromosome" means.
    pub start: i64,
    pub end: i64,
    pub strand: Strand,
}

/// Largest coordinate accepted (2⁵⁶, far beyond any genome): window arithmetic stays exact in i64.
pub const MAX_COORDINATE: u64 = 1 << 56;

impl Window {
    /// The window around the TSS, or an error for coordinates no genome has (0, or past
    /// [`MAX_COORDINATE`]) or a window longer than that.
    pub fn around_tss(
        start_1based: u64,
        end_1based: u64,
        strand: Strand,
        len: usize,
    ) -> std::result::Result<Self, String> {
        let pos = match strand {
            Strand::Plus => start_1based,
            Strand::Minus => end_1based,
        };
        if pos == 0 || pos > MAX_COORDINATE || len as u64 > MAX_COORDINATE {
            return Err(format!(
                "TSS coordinate {pos} (window {len} bp) is outside 1..={MAX_COORDINATE}"
            ));
        }
        // All terms are below 2⁵⁷ in magnitude: no overflow.
        let start = (pos as i64 - 1) - (len / 2) as i64;
        Ok(Window {
            start,
            end: start + len as i64,
            strand,
        })
    }

    pub fn inside(&self, chrom_len: u64) -> bool {
        self.start >= 0 && self.end <= chrom_len as i64
    }

    /// The window's bases, reverse-complemented on the minus strand; outside the chromosome, N.
    pub fn fetch(&self, genome: &Genome, chrom: &str, out: &mut Vec<u8>) -> Result<()> {
        let chrom_len = genome.length(chrom).ok_or_else(|| {
            Error::invalid(
                "chromosome",
                format!("'{chrom}' is not in {}", genome.path().display()),
            )
        })? as i64;
        out.clear();
        let len = self.end - self.start;
        let lo = self.start.clamp(0, chrom_len);
        let hi = self.end.clamp(0, chrom_len).max(lo);
        // N up to the chromosome's start (all of it when the window lies wholly past the end), the bases
        // inside, then N to the window's end.
        let before = (lo - self.start).clamp(0, len);
        out.resize(before as usize, b'N');
        if hi > lo && before < len {
            genome.fetch_into(chrom, lo as u64, hi as u64, out)?;
        }
        out.resize(len as usize, b'N');
        if self.strand == Strand::Minus {
            reverse_complement(out);
        }
        Ok(())
    }
}

/// In-place reverse complement of A/C/G/T/N text.
pub fn reverse_complement(seq: &mut [u8]) {
    seq.reverse();
    for b in seq.iter_mut() {
        *b = match *b {
            b'A' => b'T',
            b'T' => b'A',
            b'C' => b'G',
            b'G' => b'C',
            _ => b'N',
        };
    }
}

/// IUPAC nucleotide codes for more than one base; the one-hot encoding reads each as N (an all-zero row).
const AMBIGUOUS_BASES: &str = "NRYSWKMBDHV";

/// Checks and normalises DNA given as text (a TSV cell): upper-cased; A, C, G and T kept; N and the other
/// IUPAC ambiguity codes read as N. Anything else (digits, gaps, another column's text) is an error that
/// names the first such letter and its position, rather than silently becoming N.
pub fn normalize_dna(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.trim().chars().enumerate() {
        match c.to_ascii_uppercase() {
            u @ ('A' | 'C' | 'G' | 'T') => out.push(u),
            u if AMBIGUOUS_BASES.contains(u) => out.push('N'),
            other => {
                return Err(format!(
                    "invalid DNA letter '{other}' at position {}",
                    i + 1
                ))
            }
        }
    }
    Ok(out)
}

/// Checks and normalises an RNA string given in DNA letters: upper-cased, U read as T. Letters other than
/// A, C, G, T, U, N are an error that names the first one and its position. Every transcript has a
/// sequence (only its protein may be missing), so an empty one is an error too: encoded, it would be the
/// tokenizer's `<cls>` alone, and the model would predict from nothing without saying so.
pub fn normalize_rna(s: &str) -> std::result::Result<String, String> {
    if s.trim().is_empty() {
        return Err(
            "empty RNA sequence (every transcript has one; only the protein may be missing)".into(),
        );
    }
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.trim().chars().enumerate() {
        match c.to_ascii_uppercase() {
            'A' | 'C' | 'G' | 'T' | 'N' => out.push(c.to_ascii_uppercase()),
            'U' => out.push('T'),
            other => {
                return Err(format!(
                    "invalid RNA letter '{other}' at position {}",
                    i + 1
                ))
            }
        }
    }
    Ok(out)
}

/// The letters ESM-2's vocabulary has for residues.
const PROTEIN_LETTERS: &str = "LAGVSERTIDPKQNFYMHWCXBUZO";

/// Checks and normalises a protein: upper-cased, one trailing stop `*` removed. Empty means missing.
pub fn normalize_protein(s: &str) -> std::result::Result<Option<String>, String> {
    let t = s.trim();
    let t = t.strip_suffix('*').unwrap_or(t);
    if t.is_empty() {
        return Ok(None);
    }
    let mut out = String::with_capacity(t.len());
    for (i, c) in t.chars().enumerate() {
        let u = c.to_ascii_uppercase();
        if !PROTEIN_LETTERS.contains(u) {
            return Err(format!(
                "invalid amino-acid letter '{c}' at position {}",
                i + 1
            ));
        }
        out.push(u);
    }
    Ok(Some(out))
}

/// Keeps the 3′ end: drops letters from the left beyond `max`.
pub fn crop_left(s: &str, max: usize) -> &str {
    &s[s.len().saturating_sub(max)..]
}

/// Keeps the N-terminus: drops letters from the right beyond `max`.
pub fn crop_right(s: &str, max: usize) -> &str {
    &s[..s.len().min(max)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_centred_on_the_zero_based_tss() {
        let w = Window::around_tss(101, 500, Strand::Plus, 10).unwrap();
        assert_eq!((w.start, w.end), (95, 105));
        let w = Window::around_tss(101, 500, Strand::Minus, 11).unwrap();
        assert_eq!((w.start, w.end), (494, 505));
        assert!(!Window::around_tss(3, 9, Strand::Plus, 10)
            .unwrap()
            .inside(100));
    }

    /// Coordinates of every size, 0 and the extremes included: an error or a window, never a panic or a
    /// wrapped value.
    #[test]
    fn window_arithmetic_never_overflows() {
        let values = [
            0u64,
            1,
            2,
            3,
            1 << 31,
            1 << 56,
            (1 << 56) + 1,
            1 << 62,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        let lens = [0usize, 1, 2, 196_608, 1 << 40, usize::MAX];
        for &a in &values {
            for &b in &values {
                for &len in &lens {
                    for strand in [Strand::Plus, Strand::Minus] {
                        if let Ok(w) = Window::around_tss(a, b, strand, len) {
                            assert_eq!(w.end - w.start, len as i64);
                            assert!(w.start <= MAX_COORDINATE as i64);
                        }
                    }
                }
            }
        }
        assert!(Window::around_tss(0, 10, Strand::Plus, 10).is_err());
        assert!(Window::around_tss(1 << 63, 10, Strand::Plus, 10).is_err());
    }

    #[test]
    fn sequence_rules() {
        let mut s = b"AACGTN".to_vec();
        reverse_complement(&mut s);
        assert_eq!(&s, b"NACGTT");
        assert_eq!(normalize_rna("acgU").unwrap(), "ACGT");
        assert!(normalize_rna("ACXG")
            .unwrap_err()
            .contains("'X' at position 3"));
        for blank in ["", "  ", "\t"] {
            assert!(normalize_rna(blank).unwrap_err().contains("empty RNA"));
        }
        assert_eq!(normalize_protein("mkv*").unwrap().as_deref(), Some("MKV"));
        assert_eq!(normalize_protein("").unwrap(), None);
        assert!(normalize_protein("MK1").is_err());
        assert_eq!(crop_left("ABCDE", 3), "CDE");
        assert_eq!(crop_right("ABCDE", 3), "ABC");
    }
}
