//! Tokenizers, exactly as the references behave (HF `EsmTokenizer` for ESM-2 and NT-v2, enformer-pytorch's
//! one-hot for Enformer).
//!
//! ESM-2 and NT-v2 share one algorithm: every vocabulary entry is a "no-split" token; the text is cut at
//! the leftmost-longest vocabulary match; whatever lies between matches is split on whitespace and each
//! piece becomes one `<unk>` (so lowercase `"mkta"` is a single `<unk>`, as in HF). For NT-v2's 6-mer
//! vocabulary that is the reference rule: split at `N`, 6-mers left to right, a leftover tail as single
//! bases, `N` its own token.

use std::collections::HashMap;

/// The 33 ESM-2 tokens, id = position.
pub const ESM_VOCAB: [&str; 33] = [
    "<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K",
    "Q", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>",
    "<mask>",
];

/// Which end of an over-long sequence is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Keep the start (protein: crop on the right).
    Start,
    /// Keep the end (RNA: crop from the left, keeping the 3′ end).
    End,
}

#[derive(Clone, Debug)]
pub struct Tokenizer {
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    longest: usize,
    pub cls: u32,
    pub pad: u32,
    pub unk: u32,
    pub mask: u32,
    /// Appended after the sequence when set (ESM-2 `<eos>`; NT-v2 has none).
    pub eos: Option<u32>,
    pub keep: Keep,
}

impl Tokenizer {
    fn from_tokens(tokens: Vec<String>, eos: bool, keep: Keep) -> Self {
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let id = |t: &str| vocab[t];
        Tokenizer {
            longest: tokens.iter().map(|t| t.chars().count()).max().unwrap_or(1),
            cls: id("<cls>"),
            pad: id("<pad>"),
            unk: id("<unk>"),
            mask: id("<mask>"),
            eos: eos.then(|| id("<eos>")),
            vocab,
            tokens,
            keep,
        }
    }

    /// ESM-2's protein tokenizer: `<cls> … <eos>`, cropped on the right.
    pub fn esm2() -> Self {
        Self::from_tokens(
            ESM_VOCAB.iter().map(|s| s.to_string()).collect(),
            true,
            Keep::Start,
        )
    }

    /// NT-v2's 6-mer tokenizer (4107 tokens): `<cls> …`, no `<eos>`, cropped from the left.
    pub fn nucleotide_transformer_v2() -> Self {
        let mut tokens: Vec<String> = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
            .map(String::from)
            .to_vec();
        const BASES: [char; 4] = ['A', 'T', 'C', 'G'];
        for i in 0..4096usize {
            tokens.push((0..6).map(|k| BASES[(i >> (2 * (5 - k))) & 3]).collect());
        }
        tokens.extend(["A", "T", "C", "G", "N"].map(String::from));
        Self::from_tokens(tokens, false, Keep::End)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The token ids of `text` without special tokens.
    pub fn split(&self, text: &str) -> Vec<u32> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut ids = Vec::with_capacity(chars.len());
        let mut unknown_from: Option<usize> = None;
        let mut i = 0;
        let byte_at = |k: usize| chars.get(k).map_or(text.len(), |c| c.0);
        while i < chars.len() {
            let matched = (1..=self.longest.min(chars.len() - i)).rev().find_map(|n| {
                self.vocab
                    .get(&text[byte_at(i)..byte_at(i + n)])
                    .map(|&id| (n, id))
            });
            match matched {
                Some((n, id)) => {
                    if let Some(start) = unknown_from.take() {
                        self.push_unknown(&text[byte_at(start)..byte_at(i)], &mut ids);
                    }
                    ids.push(id);
                    i += n;
                }
                None => {
                    unknown_from.get_or_insert(i);
                    i += 1;
                }
            }
        }
        if let Some(start) = unknown_from {
            self.push_unknown(&text[byte_at(start)..], &mut ids);
        }
        ids
    }

    fn push_unknown(&self, fragment: &str, ids: &mut Vec<u32>) {
        ids.extend(fragment.split_whitespace().map(|_| self.unk));
    }

    /// Token ids with `<cls>` (and `<eos>`), at most `max_tokens` long: an over-long sequence loses
    /// tokens at the end the tokenizer does not keep. Keeping the end, the text is first cut to the last
    /// letters the budget can hold (`longest` a token), so that the kept tokens are framed from the first
    /// kept letter: a 6-mer tokenization of the whole text would frame them from its start, and the
    /// tokens of the same 3′ end would then depend on the length of what precedes it.
    pub fn encode(&self, text: &str, max_tokens: usize) -> Vec<u32> {
        let room = max_tokens.saturating_sub(1 + self.eos.is_some() as usize);
        let text = match self.keep {
            Keep::Start => text,
            Keep::End => {
                let letters = room.saturating_mul(self.longest);
                let skip = text.chars().count().saturating_sub(letters);
                text.char_indices()
                    .nth(skip)
                    .map_or("", |(at, _)| &text[at..])
            }
        };
        let mut body = self.split(text);
        if body.len() > room {
            match self.keep {
                Keep::Start => body.truncate(room),
                Keep::End => {
                    body.drain(..body.len() - room);
                }
            }
        }
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(self.cls);
        ids.extend(body);
        ids.extend(self.eos);
        ids
    }

    /// Pads encoded sequences on the right to a common length; returns `[B, L]` ids and the lengths.
    pub fn pad_batch(&self, seqs: &[Vec<u32>]) -> (Vec<u32>, Vec<usize>, usize) {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(self.pad, len - s.len()));
        }
        (ids, seqs.iter().map(Vec::len).collect(), len)
    }
}

/// Enformer's input: one-hot `[len, 4]` in A, C, G, T order; N and every other letter are all-zero rows.
/// Lowercase (soft-masked) bases count as bases.
pub fn dna_one_hot(seq: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.resize(seq.len() * 4, 0.0);
    for (row, &b) in out.chunks_exact_mut(4).zip(seq) {
        match b.to_ascii_uppercase() {
            b'A' => row[0] = 1.0,
            b'C' => row[1] = 1.0,
            b'G' => row[2] = 1.0,
            b'T' => row[3] = 1.0,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esm2_matches_the_reference_examples() {
        let t = Tokenizer::esm2();
        let enc = |s: &str| t.encode(s, 1024);
        assert_eq!(
            enc("MKTAYIAKQR"),
            [0, 20, 15, 11, 5, 19, 12, 5, 15, 16, 10, 2]
        );
        assert_eq!(enc("MKT<mask>AY"), [0, 20, 15, 11, 32, 5, 19, 2]);
        assert_eq!(enc("mkta"), [0, 3, 2]);
        assert_eq!(enc("MKJJT"), [0, 20, 15, 3, 11, 2]);
        assert_eq!(enc("MKJ JT"), [0, 20, 15, 3, 3, 11, 2]);
        assert_eq!(enc(""), [0, 2]);
        assert_eq!(
            t.encode("MKTAYIAKQR", 5),
            [0, 20, 15, 11, 2],
            "protein is cropped on the right"
        );
    }

    #[test]
    fn nt_v2_matches_the_reference_examples() {
        let t = Tokenizer::nucleotide_transformer_v2();
        assert_eq!(t.vocab_size(), 4107);
        let id = |s: &str| t.vocab[s];
        assert_eq!(
            (
                id("AAAAAA"),
                id("AAAAAT"),
                id("ATTCCG"),
                id("GGGGGG"),
                id("N")
            ),
            (6, 7, 369, 4101, 4106)
        );
        let words = |s: &str| {
            t.encode(s, 2048)
                .iter()
                .map(|&i| t.token(i).unwrap().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            words("ACGTGTACGTGCACGGACGACTAGTCAGCA"),
            "<cls> ACGTGT ACGTGC ACGGAC GACTAG TCAGCA"
        );
        assert_eq!(
            words("ACGTGTACNTGCACGGANCGACTAGTCTGA"),
            "<cls> ACGTGT A C N TGCACG G A N CGACTA GTCTGA"
        );
        assert_eq!(words("AAAAANAAAAAA"), "<cls> A A A A A N AAAAAA");
        assert_eq!(words("AAAAAAA"), "<cls> AAAAAA A");
        assert_eq!(words("NNNN"), "<cls> N N N N");
        assert_eq!(
            words("acgtac"),
            "<cls> <unk>",
            "lowercase is one unknown run, as in HF"
        );
        assert_eq!(words("ACGRTT"), "<cls> A C G <unk> T T");
        assert_eq!(
            t.encode("ACGTGTACGTGCA", 3),
            [3, id("CGTGTA"), id("CGTGCA")],
            "RNA keeps its 3' end, framed from the first kept letter"
        );
        for prefix in ["", "A", "GG", "TTTTTTT"] {
            assert_eq!(
                t.encode(&format!("{prefix}ACGTGTACGTGC"), 3),
                [3, id("ACGTGT"), id("ACGTGC")],
                "the same 3' end whatever precedes it ({prefix:?})"
            );
        }
        assert_eq!(
            t.encode("CCCCCCANAAAAAA", 3),
            [3, id("N"), id("AAAAAA")],
            "letters that are not 6-mers still leave the last tokens"
        );
    }

    #[test]
    fn one_hot() {
        let mut out = Vec::new();
        dna_one_hot(b"ACGTNn.x", &mut out);
        assert_eq!(
            &out[..16],
            &[1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1.]
        );
        assert!(out[16..].iter().all(|&v| v == 0.0));
        dna_one_hot(b"acgt", &mut out);
        assert_eq!(out.iter().sum::<f32>(), 4.0);
    }

    #[test]
    fn padding() {
        let t = Tokenizer::esm2();
        let (ids, lens, len) = t.pad_batch(&[t.encode("MK", 10), t.encode("MKTA", 10)]);
        assert_eq!((len, lens), (6, vec![4, 6]));
        assert_eq!(ids, [0, 20, 15, 2, 1, 1, 0, 20, 15, 11, 5, 2]);
    }
}
