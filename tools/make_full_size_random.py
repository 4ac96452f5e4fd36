#!/usr/bin/env python3
"""Writes randomly initialised full-size encoders (ESM-2 150M, NT-v2 250M, Enformer) as save_pretrained-style
directories, to measure `embed` at real size without downloading weights. Not for accuracy.

Usage: make_full_size_random.py OUT_DIR      (uses the .venv-ref environment of tools/make_fixtures.py)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    from transformers import EsmConfig, EsmForMaskedLM

    esm = EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=640, num_hidden_layers=30,
                    num_attention_heads=20, intermediate_size=2560, max_position_embeddings=1026,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=1e-5)
    EsmForMaskedLM(esm).save_pretrained(os.path.join(out, "esm2_150m"), safe_serialization=True)
    nt = EsmConfig(vocab_size=4107, pad_token_id=1, mask_token_id=2, hidden_size=768, num_hidden_layers=24,
                   num_attention_heads=16, intermediate_size=3072, max_position_embeddings=2050,
                   position_embedding_type="rotary", token_dropout=False, emb_layer_norm_before=False,
                   layer_norm_eps=1e-12, tie_word_embeddings=False)
    d = os.path.join(out, "nt_v2_250m")
    os.makedirs(d, exist_ok=True)
    cfg = nt.to_dict()
    cfg["add_bias_fnn"] = False
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    h, f, tensors = 768, 3072, {}
    tensors["esm.embeddings.word_embeddings.weight"] = torch.randn(4107, h) * 0.02
    for i in range(24):
        p = f"esm.encoder.layer.{i}."
        for name in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]:
            tensors[p + name + ".weight"] = torch.randn(h, h) * 0.02
            tensors[p + name + ".bias"] = torch.zeros(h)
        for name in ["attention.LayerNorm", "LayerNorm"]:
            tensors[p + name + ".weight"] = torch.ones(h)
            tensors[p + name + ".bias"] = torch.zeros(h)
        tensors[p + "intermediate.dense.weight"] = torch.randn(2 * f, h) * 0.02
        tensors[p + "output.dense.weight"] = torch.randn(h, f) * 0.02
    tensors["esm.encoder.emb_layer_norm_after.weight"] = torch.ones(h)
    tensors["esm.encoder.emb_layer_norm_after.bias"] = torch.zeros(h)
    save_file(tensors, os.path.join(d, "model.safetensors"))
    from enformer_pytorch import Enformer, EnformerConfig

    ecfg = EnformerConfig()
    model = Enformer(ecfg)
    d = os.path.join(out, "enformer")
    os.makedirs(d, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("_trunk.") and not k.endswith("num_batches_tracked")}
    save_file(sd, os.path.join(d, "model.safetensors"))
    json.dump({k: getattr(ecfg, k) for k in ["dim", "depth", "heads", "attn_dim_key", "target_length", "num_downsamples",
                                              "dim_divisible_by", "use_tf_gamma", "output_heads"]}, open(os.path.join(d, "config.json"), "w"))


if __name__ == "__main__":
    main()
