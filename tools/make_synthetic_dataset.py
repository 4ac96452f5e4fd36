#!/usr/bin/env python3
"""Writes a synthetic dataset in the GTEx layout for throughput measurements (not for accuracy):
a random genome of CHROMS chromosomes of MB megabases each, and ROWS transcripts with 30 tissues.

Usage: make_synthetic_dataset.py OUT_DIR [ROWS=4000] [CHROMS=3] [MB=40]
Then:  isoformer-engine bench loader --data OUT_DIR --batch 8
"""
import os
import random
import sys

TISSUES = ["Adipose Tissue", "Adrenal Gland", "Bladder", "Blood", "Blood Vessel", "Brain", "Breast", "Cervix Uteri", "Colon",
           "Esophagus", "Fallopian Tube", "Heart", "Kidney", "Liver", "Lung", "Muscle", "Nerve", "Ovary", "Pancreas", "Pituitary",
           "Prostate", "Salivary Gland", "Skin", "Small Intestine", "Spleen", "Stomach", "Testis", "Thyroid", "Uterus", "Vagina"]


def main():
    out = sys.argv[1]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    chroms = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    mb = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    rng = random.Random(0)
    os.makedirs(out, exist_ok=True)
    length = mb * 1_000_000
    block = "".join(rng.choice("ACGTacgtN") for _ in range(60 * 1000))
    with open(os.path.join(out, "genome.fa"), "w") as f:
        for c in range(1, chroms + 1):
            f.write(f">chr{c}\n")
            lines = [block[i:i + 60] for i in range(0, len(block), 60)]
            written = 0
            while written < length:
                for line in lines:
                    if written >= length:
                        break
                    f.write(line[: min(60, length - written)] + "\n")
                    written += 60
    with open(os.path.join(out, "GTEx_final.csv"), "w") as f:
        f.write("transcript_id_gtex,gene_id_gtex,split,chr,strand,start,end,RNA,5UTR,CDS,3UTR,Protein," + ",".join(TISSUES) + "\n")
        for i in range(rows):
            chrom = rng.randint(1, chroms)
            start = rng.randint(1, length - 100_000)
            end = start + rng.randint(500, 90_000)
            rna = "".join(rng.choice("ACGT") for _ in range(rng.randint(300, 15000)))
            prot = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(50, 2500)))
            split = rng.choices(["train", "validation", "test"], [90, 5, 5])[0]
            expr = ",".join(f"{rng.uniform(0, 8):.4f}" for _ in TISSUES)
            f.write(f"T{i},G{i // 4},{split},chr{chrom},{rng.choice('+-')},{start},{end},{rna},,,,{prot},{expr}\n")


if __name__ == "__main__":
    main()
