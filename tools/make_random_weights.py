#!/usr/bin/env python3
"""Writes randomly initialised full-size encoders as save_pretrained-style directories (config.json +
model.safetensors), with numpy only (no torch), to measure `embed` at real size without downloading
weights. Not for accuracy: weights are N(0, 0.02²), norms 1 and 0, batchnorm running statistics 0 and 1.

Usage: make_random_weights.py OUT_DIR [esm2_150m|esm2_35m|nt_v2_250m|enformer ...]
Needs: pip install numpy safetensors
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

RNG = np.random.default_rng(0)


def normal(*shape):
    return (RNG.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)


def esm_like(out, name, hidden, layers, heads, ffn, vocab, swiglu, eps, token_dropout, mask_id):
    t = {"esm.embeddings.word_embeddings.weight": normal(vocab, hidden)}
    for l in range(layers):
        p = f"esm.encoder.layer.{l}."
        t[p + "attention.LayerNorm.weight"] = np.ones(hidden, np.float32)
        t[p + "attention.LayerNorm.bias"] = np.zeros(hidden, np.float32)
        for m in ["query", "key", "value"]:
            t[p + f"attention.self.{m}.weight"] = normal(hidden, hidden)
            t[p + f"attention.self.{m}.bias"] = np.zeros(hidden, np.float32)
        # Published ESM checkpoints carry the rotary frequencies as a buffer (esm-cpp reads it).
        half = hidden // heads // 2
        t[p + "attention.self.rotary_embeddings.inv_freq"] = (
            1.0 / 10000 ** (np.arange(0, half, dtype=np.float32) * 2 / (hidden // heads))).astype(np.float32)
        t[p + "attention.output.dense.weight"] = normal(hidden, hidden)
        t[p + "attention.output.dense.bias"] = np.zeros(hidden, np.float32)
        t[p + "LayerNorm.weight"] = np.ones(hidden, np.float32)
        t[p + "LayerNorm.bias"] = np.zeros(hidden, np.float32)
        t[p + "intermediate.dense.weight"] = normal(2 * ffn if swiglu else ffn, hidden)
        t[p + "output.dense.weight"] = normal(hidden, ffn)
        if not swiglu:
            t[p + "intermediate.dense.bias"] = np.zeros(ffn, np.float32)
            t[p + "output.dense.bias"] = np.zeros(hidden, np.float32)
    if not swiglu:
        # ESM-2 is published as EsmForMaskedLM; esm-cpp requires the masked-LM head.
        t["lm_head.dense.weight"] = normal(hidden, hidden)
        t["lm_head.dense.bias"] = np.zeros(hidden, np.float32)
        t["lm_head.layer_norm.weight"] = np.ones(hidden, np.float32)
        t["lm_head.layer_norm.bias"] = np.zeros(hidden, np.float32)
        t["lm_head.decoder.weight"] = t["esm.embeddings.word_embeddings.weight"].copy()
        t["lm_head.bias"] = np.zeros(vocab, np.float32)
    t["esm.encoder.emb_layer_norm_after.weight"] = np.ones(hidden, np.float32)
    t["esm.encoder.emb_layer_norm_after.bias"] = np.zeros(hidden, np.float32)
    cfg = {"model_type": "esm", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": heads, "intermediate_size": ffn, "layer_norm_eps": eps,
           "token_dropout": token_dropout, "mask_token_id": mask_id, "pad_token_id": 1,
           "position_embedding_type": "rotary", "emb_layer_norm_before": False,
           "max_position_embeddings": 2050, "add_bias_fnn": not swiglu}
    write(out, name, t, cfg)


def filters(dim, num_downsamples, divisible_by):
    half = dim // 2
    n = num_downsamples - 1
    out = [half]
    for i in range(n):
        v = half * (dim / half) ** (i / (max(n, 2) - 1))
        out.append(int(round(v / divisible_by)) * divisible_by)
    return out


def enformer(out, dim=1536, depth=11, heads=8, dk=64, target=896, downsamples=7, div=128):
    t = {}
    half = dim // 2

    def conv_block(prefix, c_in, c_out, width):
        t[prefix + "0.weight"] = np.ones(c_in, np.float32)
        t[prefix + "0.bias"] = np.zeros(c_in, np.float32)
        t[prefix + "0.running_mean"] = np.zeros(c_in, np.float32)
        t[prefix + "0.running_var"] = np.ones(c_in, np.float32)
        t[prefix + "2.weight"] = normal(c_out, c_in, width)
        t[prefix + "2.bias"] = np.zeros(c_out, np.float32)

    t["stem.0.weight"] = normal(half, 4, 15)
    t["stem.0.bias"] = np.zeros(half, np.float32)
    conv_block("stem.1.fn.", half, half, 1)
    t["stem.2.to_attn_logits.weight"] = normal(half, half, 1, 1)
    f = filters(dim, downsamples, div)
    for i, (a, b) in enumerate(zip(f[:-1], f[1:])):
        conv_block(f"conv_tower.{i}.0.", a, b, 5)
        conv_block(f"conv_tower.{i}.1.fn.", b, b, 1)
        t[f"conv_tower.{i}.2.to_attn_logits.weight"] = normal(b, b, 1, 1)
    for l in range(depth):
        a, m = f"transformer.{l}.0.fn.", f"transformer.{l}.1.fn."
        t[a + "0.weight"] = np.ones(dim, np.float32)
        t[a + "0.bias"] = np.zeros(dim, np.float32)
        t[a + "1.rel_content_bias"] = normal(1, heads, 1, dk)
        t[a + "1.rel_pos_bias"] = normal(1, heads, 1, dk)
        t[a + "1.to_q.weight"] = normal(heads * dk, dim)
        t[a + "1.to_k.weight"] = normal(heads * dk, dim)
        t[a + "1.to_v.weight"] = normal(dim, dim)
        t[a + "1.to_out.weight"] = normal(dim, dim)
        t[a + "1.to_out.bias"] = np.zeros(dim, np.float32)
        t[a + "1.to_rel_k.weight"] = normal(heads * dk, dim // heads)
        t[m + "0.weight"] = np.ones(dim, np.float32)
        t[m + "0.bias"] = np.zeros(dim, np.float32)
        t[m + "1.weight"] = normal(2 * dim, dim)
        t[m + "1.bias"] = np.zeros(2 * dim, np.float32)
        t[m + "4.weight"] = normal(dim, 2 * dim)
        t[m + "4.bias"] = np.zeros(dim, np.float32)
    conv_block("final_pointwise.1.", f[-1], 2 * dim, 1)
    cfg = {"dim": dim, "depth": depth, "heads": heads, "attn_dim_key": dk, "target_length": target,
           "num_downsamples": downsamples, "dim_divisible_by": div, "use_tf_gamma": False,
           "output_heads": {}}
    write(out, "enformer", t, cfg)


def write(out, name, tensors, cfg):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    print(f"{d}: {sum(v.size for v in tensors.values()) / 1e6:.1f}M parameters")


def main():
    out = sys.argv[1]
    which = sys.argv[2:] or ["esm2_150m", "enformer"]
    for w in which:
        if w == "esm2_150m":
            esm_like(out, w, 640, 30, 20, 2560, 33, False, 1e-5, True, 32)
        elif w == "esm2_35m":
            esm_like(out, w, 480, 12, 20, 1920, 33, False, 1e-5, True, 32)
        elif w == "nt_v2_250m":
            esm_like(out, w, 768, 24, 16, 3072, 4107, True, 1e-12, False, 2)
        elif w == "enformer":
            enformer(out)
        else:
            sys.exit(f"unknown model {w}")


if __name__ == "__main__":
    main()
