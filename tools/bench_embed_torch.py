#!/usr/bin/env python3
"""The PyTorch reference for `embed` throughput, same inputs and batching as isoformer-engine
(longest first, batches of --batch), no_grad, float32, eager attention. Prints sequences/s.

Usage: bench_embed_torch.py esm2|nt|enformer WEIGHTS_DIR INPUT.fa [--batch 8] [--threads 2]
"""
import argparse
import json
import os
import time

import torch


def read_fasta(path):
    seqs, cur = [], None
    for line in open(path):
        line = line.strip()
        if line.startswith(">"):
            cur = []
            seqs.append(cur)
        elif line:
            cur.append(line)
    return ["".join(s) for s in seqs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("weights")
    ap.add_argument("input")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seqs = sorted(read_fasta(a.input), key=len, reverse=True)
    batches = [seqs[i:i + a.batch] for i in range(0, len(seqs), a.batch)]
    if a.model in ("esm2", "nt"):
        import itertools
        import tempfile

        from transformers import EsmConfig, EsmModel, EsmTokenizer
        from transformers.models.esm.configuration_esm import get_default_vocab_list

        cfg = EsmConfig.from_pretrained(a.weights)
        cfg._attn_implementation = "eager"
        with tempfile.TemporaryDirectory() as d:
            vocab = os.path.join(d, "vocab.txt")
            if a.model == "esm2":
                tokens = get_default_vocab_list()
            else:
                tokens = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"] + ["".join(k) for k in itertools.product("ATCG", repeat=6)] + list("ATCGN")
            open(vocab, "w").write("\n".join(tokens) + "\n")
            tok = EsmTokenizer(vocab) if a.model == "esm2" else EsmTokenizer(vocab, eos_token=None, model_max_length=2048)
        if a.model == "nt":
            # The NT-v2 FFN (bias-free SwiGLU) swapped into the native ESM layers.
            class GluIntermediate(torch.nn.Module):
                def __init__(self, c):
                    super().__init__()
                    self.dense = torch.nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)

                def forward(self, h):
                    u1, u2 = self.dense(h).chunk(2, dim=-1)
                    return torch.nn.functional.silu(u1) * u2

            class GluOutput(torch.nn.Module):
                def __init__(self, c):
                    super().__init__()
                    self.dense = torch.nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

                def forward(self, h, residual):
                    return self.dense(h) + residual

            model = EsmModel(cfg, add_pooling_layer=False)
            for layer in model.encoder.layer:
                layer.intermediate = GluIntermediate(cfg)
                layer.output = GluOutput(cfg)
        else:
            model = EsmModel(cfg, add_pooling_layer=False)
        from safetensors.torch import load_file

        sd = {k.removeprefix("esm."): v for k, v in load_file(os.path.join(a.weights, "model.safetensors")).items()}
        model.load_state_dict(sd, strict=False)
        model.eval()

        def run(batch):
            enc = tok(batch, padding=True, return_tensors="pt", truncation=True, max_length=2048)
            return model(**enc).last_hidden_state
    else:
        from enformer_pytorch import Enformer, EnformerConfig, str_to_one_hot
        from safetensors.torch import load_file

        cfg = json.load(open(os.path.join(a.weights, "config.json")))
        model = Enformer(EnformerConfig(**cfg))
        model.load_state_dict(load_file(os.path.join(a.weights, "model.safetensors")), strict=False)
        model.eval()

        def run(batch):
            return model(torch.stack([str_to_one_hot(s) for s in batch]), return_only_embeddings=True)
    with torch.no_grad():
        start = time.perf_counter()
        for b in batches:
            run(b)
        secs = time.perf_counter() - start
    print(f"pytorch {torch.__version__} {a.model}: {len(seqs)} sequences in {secs:.2f} s ({len(seqs) / secs:.2f} sequences/s)")


if __name__ == "__main__":
    main()
