#!/usr/bin/env python3
"""Builds a tiny random IsoFormer in PyTorch, with the released checkpoint's tensor names, and records its
predictions: the reference for the engine's released-checkpoint mapping (tests/isoformer_release.rs).

The encoders are the reference implementations (enformer-pytorch; transformers' ESM for ESM-2, and for NT-v2
with the bias-free SwiGLU FFN swapped in, as in tools/make_fixtures.py). The aggregation module and head are
written here from the spec (shared/spec/isoformer.md §2.2), independently of the engine:
  z1 = h_dna + dense(softmax(q·kᵀ·d^-½ masked)·v)  with q from h_dna, k, v from h_rna   (cross_attention_layer_rna)
  z2 = z1 + gate·dense(…)                             with k, v from h_prot              (cross_attention_layer_protein)
  prediction = head.1(GELU(head.0(mean of z2 over bins [pool_window_start, pool_window_end))))
A sample without a protein has gate 0 (its protein term is zeroed).

Writes tests/fixtures/models/isoformer/: model.safetensors (released names: enformer.*, nt_model.esm.*,
esm_model.esm.*, cross_attention_layer_*.*, head.*), config.json (the engine's IsoFormer config) and
reference.safetensors (predictions; the input sequences in its metadata).

Environment: the pinned .venv-ref of tools/make_fixtures.py (torch 2.15.0, transformers 4.56.2,
enformer-pytorch 0.8.12). Run: HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/make_isoformer_fixture.py
"""
import itertools
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import randomize_norms  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models", "isoformer")
torch.manual_seed(0)

CONFIG = {
    "name": "tiny-released",
    "modalities": ["dna", "rna", "protein"],
    "dna_encoder": "enformer",
    "aggregator": "cross_attention",
    "num_heads_omics_cross_attention": 2,
    "pool_window_start": 1,
    "pool_window_end": 3,
    "head_hidden": [8],
    "num_tissues": 3,
    "dna_sequence_length": 128,
    "num_tokens_per_seq_nuctf_rna": 64,
    "num_protein_tokens_per_seq": 64,
    "enformer_dim": 24, "enformer_depth": 1, "enformer_heads": 2, "enformer_attn_dim_key": 4,
    "enformer_target_length": 4, "enformer_num_downsamples": 3, "enformer_dim_divisible_by": 4,
    "nt_hidden_size": 16, "nt_num_hidden_layers": 1, "nt_num_attention_heads": 2, "nt_intermediate_size": 16,
    "nt_layer_norm_eps": 1e-12,
    "esm_hidden_size": 16, "esm_num_hidden_layers": 1, "esm_num_attention_heads": 2, "esm_intermediate_size": 32,
    "esm_layer_norm_eps": 1e-5, "esm_token_dropout": True,
}


def tokenizer(tokens, **kw):
    from transformers import EsmTokenizer
    with tempfile.TemporaryDirectory() as d:
        vocab = os.path.join(d, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(tokens) + "\n")
        return EsmTokenizer(vocab, **kw)


def glu(model, cfg):
    class GluIntermediate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)

        def forward(self, h):
            u1, u2 = self.dense(h).chunk(2, dim=-1)
            return torch.nn.functional.silu(u1) * u2

    class GluOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

        def forward(self, h, residual):
            return self.dense(h) + residual

    for layer in model.esm.encoder.layer:
        layer.intermediate = GluIntermediate()
        layer.output = GluOutput()


class CrossAttention(torch.nn.Module):
    def __init__(self, width, context_width, heads):
        super().__init__()
        self.heads = heads
        self.query = torch.nn.Linear(width, width)
        self.key = torch.nn.Linear(context_width, width)
        self.value = torch.nn.Linear(context_width, width)
        self.dense = torch.nn.Linear(width, width)

    def forward(self, h, ctx, key_mask, gate):
        b, lq, d = h.shape
        lk, hd = ctx.shape[1], d // self.heads
        q = self.query(h).view(b, lq, self.heads, hd).transpose(1, 2) * hd ** -0.5
        k = self.key(ctx).view(b, lk, self.heads, hd).transpose(1, 2)
        v = self.value(ctx).view(b, lk, self.heads, hd).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~key_mask[:, None, None, :], -1e30)
        c = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)
        return h + self.dense(c) * gate[:, None, None]


def build_isoformer(c, enformer_heads=3, attn_implementation="eager"):
    """The IsoFormer of config `c` (the engine's field names) in PyTorch, with random weights: the reference
    encoders, the cross-attentions and the head, in a ModuleDict under the released checkpoint's names. The
    fixture pins eager attention (its reference numbers); None leaves transformers' default (SDPA), as
    benchmarks should."""
    from enformer_pytorch import Enformer, EnformerConfig
    from transformers import EsmConfig, EsmForMaskedLM

    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    enformer = Enformer(EnformerConfig(dim=c["enformer_dim"], depth=c["enformer_depth"], heads=c["enformer_heads"],
                                       attn_dim_key=c["enformer_attn_dim_key"], output_heads=dict(human=enformer_heads),
                                       target_length=c["enformer_target_length"],
                                       num_downsamples=c["enformer_num_downsamples"],
                                       dim_divisible_by=c["enformer_dim_divisible_by"]))
    randomize_norms(enformer)
    with torch.no_grad():
        for layer in enformer.transformer:
            layer[0].fn[1].to_out.weight.normal_(0, 0.1)
            layer[0].fn[1].to_out.bias.normal_(0, 0.1)
    nt_cfg = EsmConfig(vocab_size=4107, pad_token_id=1, mask_token_id=2, hidden_size=c["nt_hidden_size"],
                       num_hidden_layers=c["nt_num_hidden_layers"], num_attention_heads=c["nt_num_attention_heads"],
                       intermediate_size=c["nt_intermediate_size"], max_position_embeddings=2050,
                       position_embedding_type="rotary", token_dropout=False, emb_layer_norm_before=False,
                       layer_norm_eps=c.get("nt_layer_norm_eps", 1e-12), tie_word_embeddings=False,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **attn)
    nt = EsmForMaskedLM(nt_cfg)
    glu(nt, nt_cfg)
    esm_cfg = EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=c["esm_hidden_size"],
                        num_hidden_layers=c["esm_num_hidden_layers"], num_attention_heads=c["esm_num_attention_heads"],
                        intermediate_size=c["esm_intermediate_size"], max_position_embeddings=1026,
                        position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                        layer_norm_eps=c.get("esm_layer_norm_eps", 1e-5), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **attn)
    esm = EsmForMaskedLM(esm_cfg)
    for m in (nt, esm):
        randomize_norms(m)
    width = 2 * c["enformer_dim"]
    heads = c["num_heads_omics_cross_attention"]
    hidden = c["head_hidden"][0]
    return torch.nn.ModuleDict({
        "enformer": enformer,
        "nt_model": nt,
        "esm_model": esm,
        "cross_attention_layer_rna": CrossAttention(width, c["nt_hidden_size"], heads),
        "cross_attention_layer_protein": CrossAttention(width, c["esm_hidden_size"], heads),
        "head": torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(),
                                    torch.nn.Linear(hidden, c["num_tissues"])),
    })


def tokenizers():
    """The NT-v2 (6-mer) and ESM-2 tokenizers."""
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    nt_tokens = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    nt_tokens += ["".join(k) for k in itertools.product("ATCG", repeat=6)] + ["A", "T", "C", "G", "N"]
    return tokenizer(nt_tokens, eos_token=None, model_max_length=2048), tokenizer(get_default_vocab_list())


def released_state(modules):
    """The state dict under the released checkpoint's names (nn.Sequential's last linear is head.1)."""
    state = {}
    for k, v in modules.state_dict().items():
        if k.startswith("enformer._trunk.") or k.endswith("num_batches_tracked"):
            continue
        k = k.replace("head.2.", "head.1.")
        state[k] = v.detach().contiguous().clone()
    return state


def main():
    from enformer_pytorch import str_to_one_hot

    c = CONFIG
    modules = build_isoformer(c)
    enformer, nt, esm = modules["enformer"], modules["nt_model"], modules["esm_model"]
    # nn.Sequential names the layers 0, 1, 2: rename the last linear to head.1 (the engine's head layout).
    modules.eval()

    nt_tok, esm_tok = tokenizers()

    rng = torch.Generator().manual_seed(3)
    pick = lambda alphabet, n: "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=rng).tolist())
    dna = [pick("ACGTN", c["dna_sequence_length"]) for _ in range(3)]
    rna = [pick("ACGT", 61), pick("ACGT", 25), pick("ACGT", 100)]
    protein = [pick("ACDEFGHIKLMNPQRSTVWY", 20), "", pick("ACDEFGHIKLMNPQRSTVWY", 9)]
    gate = torch.tensor([1.0 if p else 0.0 for p in protein])

    with torch.no_grad():
        h_dna = enformer(torch.stack([str_to_one_hot(s) for s in dna]), return_only_embeddings=True)
        r = nt_tok(rna, padding=True, return_tensors="pt")
        h_rna = nt.esm(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).last_hidden_state
        p = esm_tok(protein, padding=True, return_tensors="pt")
        h_prot = esm.esm(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).last_hidden_state
        z = modules["cross_attention_layer_rna"](h_dna, h_rna, r["attention_mask"].bool(), torch.ones(3))
        z = modules["cross_attention_layer_protein"](z, h_prot, p["attention_mask"].bool(), gate)
        pooled = z[:, c["pool_window_start"]:c["pool_window_end"]].mean(1)
        pred = modules["head"](pooled)

    state = released_state(modules)
    os.makedirs(OUT, exist_ok=True)
    save_file(state, os.path.join(OUT, "model.safetensors"))
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    save_file({"predictions": pred.contiguous()}, os.path.join(OUT, "reference.safetensors"),
              metadata={"dna": "\n".join(dna), "rna": "\n".join(rna), "protein": "\n".join(protein)})
    print("isoformer tensors", len(state), "params", sum(v.numel() for v in state.values()), "pred", pred.tolist())


if __name__ == "__main__":
    main()
