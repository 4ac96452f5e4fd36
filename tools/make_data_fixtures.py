#!/usr/bin/env python3
"""Builds the small committed data fixtures and the expected DNA windows, independently of the Rust code.

Writes tests/fixtures/data/gtex/{genome.fa, GTEx_final.csv} and tests/fixtures/data/expected_windows.tsv.
The windows come from pyfaidx (pinned: pyfaidx==0.8.1.3), using the dataset rules as the reference loader states
them: 0-based TSS = start-1 on '+', end-1 on '-'; window [tss - L//2, tss - L//2 + L); reverse complement on '-';
upper-case; anything but ACGT -> N; a window leaving the chromosome is dropped (and, padded with N, is what
the pad policy must give).

Regenerate:  python3 -m venv .venv && .venv/bin/pip install pyfaidx==0.8.1.3 && .venv/bin/python tools/make_data_fixtures.py
"""
import os
import random
import shutil
import tempfile

import pyfaidx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "data")
GTEX = os.path.join(ROOT, "gtex")
LENGTHS = (40, 41)
TISSUES = ["Adipose Tissue", "Brain", "Liver", "Whole Blood"]


def random_sequence(rng, n):
    seq = [rng.choice("ACGT") for _ in range(n)]
    for i in range(n):  # soft-masked stretches, Ns and IUPAC codes, as in hg38
        r = rng.random()
        if r < 0.15:
            seq[i] = seq[i].lower()
        elif r < 0.18:
            seq[i] = rng.choice("NRYn")
    return "".join(seq)


def write_fasta(path, chroms):
    with open(path, "w") as f:
        for name, seq, width in chroms:
            f.write(f">{name} fixture\n")
            for i in range(0, len(seq), width):
                f.write(seq[i : i + width] + "\n")


def standardize(s):
    return "".join(c if c in "ACGT" else "N" for c in s.upper())


def main():
    rng = random.Random(20241125)
    os.makedirs(GTEX, exist_ok=True)
    chroms = [("chr1", random_sequence(rng, 1000), 60), ("chr2", random_sequence(rng, 357), 50), ("chrM", random_sequence(rng, 100), 70)]
    fasta = os.path.join(GTEX, "genome.fa")
    write_fasta(fasta, chroms)
    # Rows: (id, gene, split, chr, strand, start, end). Edge cases: windows touching both chromosome ends.
    loci = [
        ("ENST01", "ENSG1", "train", "chr1", "+", 101, 480),
        ("ENST02", "ENSG1", "train", "chr1", "-", 150, 620),
        ("ENST03", "ENSG2", "valid", "chr2", "+", 21, 300),  # window starts at 0 for L=40 (tss0=20)
        ("ENST04", "ENSG2", "test", "chr2", "-", 10, 337),  # window ends exactly at 357 for L=40
        ("ENST05", "ENSG3", "train", "chr2", "+", 5, 90),  # leaves the start
        ("ENST06", "ENSG3", "eval", "chr1", "-", 900, 995),  # leaves the end
        ("ENST07", "ENSG4", "validation", "chrMT", "+", 50, 90),  # named chrMT, the genome says chrM
        ("ENST08", "ENSG4", "test", "chr1", "+", 990, 999),  # leaves the end on +
        ("ENST09", "ENSG5", "train", "chr2", "-", 100, 200),
        ("ENST10", "ENSG5", "Train", "chr1", "+", 500, 700),
    ]
    header = ["transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end", "5UTR", "3UTR"] + TISSUES + ["RNA", "CDS", "Protein"]
    with open(os.path.join(GTEX, "GTEx_final.csv"), "w") as f:
        f.write(",".join(f'"{h}"' if " " in h else h for h in header) + "\n")
        for i, (tid, gene, split, chrom, strand, start, end) in enumerate(loci):
            rna = "".join(rng.choice("ACGT") for _ in range(rng.randint(8, 30)))
            if i == 1:
                rna = rna.lower()
            protein = "" if i in (2, 6) else "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(3, 12)))
            expr = [f"{rng.uniform(0, 6):.6f}" for _ in TISSUES]
            row = [tid, gene, split, chrom, strand, str(start), str(end), rna[:3], rna[-3:]] + expr + [rna, rna[3:-3], protein]
            f.write(",".join(row) + "\n")
    # Expected windows, from pyfaidx on a copy (pyfaidx writes its own .fai next to the file it opens).
    tmp = tempfile.mkdtemp()
    try:
        copy = os.path.join(tmp, "genome.fa")
        shutil.copy(fasta, copy)
        fa = pyfaidx.Fasta(copy, one_based_attributes=False, sequence_always_upper=False)
        with open(os.path.join(ROOT, "expected_windows.tsv"), "w") as out:
            out.write("transcript_id\tdna_len\tinside\twindow_padded\n")
            for tid, _, _, chrom, strand, start, end in loci:
                name = "chrM" if chrom == "chrMT" else chrom
                n = len(fa[name])
                for length in LENGTHS:
                    tss0 = start - 1 if strand == "+" else end - 1
                    lo, hi = tss0 - length // 2, tss0 - length // 2 + length
                    inside = lo >= 0 and hi <= n
                    left, right = max(0, -lo), max(0, hi - n)
                    core = fa[name][max(lo, 0) : min(hi, n)]
                    if strand == "-":
                        core = core.reverse.complement
                        left, right = right, left
                    window = "N" * left + standardize(str(core)) + "N" * right
                    assert len(window) == length
                    out.write(f"{tid}\t{length}\t{int(inside)}\t{window}\n")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
