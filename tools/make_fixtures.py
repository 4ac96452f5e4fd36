#!/usr/bin/env python3
"""Builds tiny random reference models offline and records what the Rust engine must reproduce.

For each of ESM-2, NT-v2 (native ESM with the bias-free SwiGLU FFN swapped in, module names kept so the keys
match the HF checkpoints) and Enformer, it writes to tests/fixtures/models/<name>/:
  config.json, model.safetensors  - the weights, as a user's checkpoint would hold them
  reference.safetensors           - tokenized inputs (with padding), the last hidden states, the fixed
                                    weights of a scalar loss L = sum(hidden * loss_weight * real_token_mask),
                                    and dL/dparam for every encoder parameter ("grad.<name>")

Pinned environment (CPU, no network at run time; HF_HUB_OFFLINE=1):
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install torch==2.15.0 transformers==4.56.2 enformer-pytorch==0.8.12 safetensors
  HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/make_fixtures.py
"""
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")
torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def randomize_norms(model):
    """LayerNorm/BatchNorm start as identity; make every parameter matter."""
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)


def save_reference(path, tensors, sequences):
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata={"sequences": "\n".join(sequences)})


def esm_like(name, cfg, tokenizer, sequences, glu):
    from transformers import EsmForMaskedLM

    model = EsmForMaskedLM(cfg)
    if glu:
        class GluIntermediate(torch.nn.Module):
            def __init__(self, c):
                super().__init__()
                self.dense = torch.nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)

            def forward(self, h):
                u = self.dense(h)
                u1, u2 = u.chunk(2, dim=-1)
                return torch.nn.functional.silu(u1) * u2

        class GluOutput(torch.nn.Module):
            def __init__(self, c):
                super().__init__()
                self.dense = torch.nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

            def forward(self, h, residual):
                return self.dense(h) + residual

        for layer in model.esm.encoder.layer:
            layer.intermediate = GluIntermediate(cfg)
            layer.output = GluOutput(cfg)
    randomize_norms(model)
    model.eval()
    out_dir = os.path.join(OUT, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    enc = tokenizer(sequences, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    hidden = model.esm(input_ids=ids, attention_mask=mask).last_hidden_state
    weight = torch.randn(hidden.shape)
    loss = (hidden * weight * mask[..., None]).sum()
    params = {n: p for n, p in model.esm.named_parameters() if not n.startswith("contact_head")}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    tensors = {"input_ids": ids, "attention_mask": mask, "last_hidden_state": hidden, "loss_weight": weight}
    for (n, p), g in zip(params.items(), grads):
        tensors["grad." + n] = g if g is not None else torch.zeros_like(p)
    save_reference(os.path.join(out_dir, "reference.safetensors"), tensors, sequences)
    print(name, "params", sum(p.numel() for p in params.values()), "ids", list(ids.shape))


def esm2():
    from transformers import EsmConfig, EsmTokenizer
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    cfg = EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=1026,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                    layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    attn_implementation="eager")
    with tempfile.TemporaryDirectory() as d:
        vocab = os.path.join(d, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(get_default_vocab_list()) + "\n")
        tok = EsmTokenizer(vocab)
    # The longest row carries a <mask> (token dropout's ratio; unpadded, so transformers 4.56 agrees with
    # the fixed versions), the others exercise padding, an unknown letter and a lowercase run.
    sequences = ["MKTAYIAKQRQ<mask>SFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDL",
                 "MKTAYJAKQR", "GSHMSLFDFFKNKgsa"]
    esm_like("esm2", cfg, tok, sequences, glu=False)


def nt_v2():
    import itertools

    from transformers import EsmConfig, EsmTokenizer

    cfg = EsmConfig(vocab_size=4107, pad_token_id=1, mask_token_id=2, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=2050,
                    position_embedding_type="rotary", token_dropout=False, emb_layer_norm_before=False,
                    layer_norm_eps=1e-12, tie_word_embeddings=False, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, attn_implementation="eager")
    cfg.add_bias_fnn = False
    tokens = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    tokens += ["".join(k) for k in itertools.product("ATCG", repeat=6)] + ["A", "T", "C", "G", "N"]
    with tempfile.TemporaryDirectory() as d:
        vocab = os.path.join(d, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(tokens) + "\n")
        tok = EsmTokenizer(vocab, eos_token=None, model_max_length=2048)
    sequences = ["ACGTGTACGTGCACGGACGACTAGTCAGCAATTGCCAGGTACAGATTACAGGCATGACGTAGCTAGCTAGGCAT",
                 "ACGTGTACNTGCACGGANCGACTAGTCTGA", "AAAAANAAAAAAacgt", "ACGRTT"]
    esm_like("nt_v2", cfg, tok, sequences, glu=True)


def enformer():
    from enformer_pytorch import Enformer, EnformerConfig
    from enformer_pytorch.modeling_enformer import get_positional_embed

    cfg = EnformerConfig(dim=48, depth=2, heads=2, attn_dim_key=8, output_heads=dict(human=5), target_length=24,
                         num_downsamples=3, dim_divisible_by=8)
    model = Enformer(cfg)
    randomize_norms(model)
    with torch.no_grad():
        for layer in model.transformer:
            attn = layer[0].fn[1]
            attn.to_out.weight.normal_(0, 0.1)  # zero-initialised in the reference
            attn.to_out.bias.normal_(0, 0.1)
        for m in model.modules():
            if m.__class__.__name__ == "AttentionPool":
                m.to_attn_logits.weight.add_(torch.randn_like(m.to_attn_logits.weight) * 0.3)
    model.eval()
    out_dir = os.path.join(OUT, "enformer")
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("_trunk.") and not k.endswith("num_batches_tracked")}
    save_file(sd, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({k: getattr(cfg, k) for k in ["dim", "depth", "heads", "attn_dim_key", "target_length", "num_downsamples",
                                                   "dim_divisible_by", "use_tf_gamma", "output_heads"]}, f, indent=2)
    # Two sequences of 2 x 128 bins x 8 bp; letters beyond ACGT become all-zero one-hot rows.
    rng = torch.Generator().manual_seed(1)
    letters = "ACGTN"
    sequences = ["".join(letters[i] for i in torch.randint(0, 5, (256,), generator=rng).tolist()) for _ in range(2)]
    from enformer_pytorch import str_to_one_hot
    one_hot = torch.stack([str_to_one_hot(s) for s in sequences])
    emb = model(one_hot, return_only_embeddings=True)
    human = model._heads["human"](emb)
    weight = torch.randn(emb.shape)
    head_weight = torch.randn(human.shape)
    loss = (emb * weight).sum() + (human * head_weight).sum()
    params = dict(model.named_parameters())
    params = {k: v for k, v in params.items() if not k.startswith("_trunk.")}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    n = one_hot.shape[1] // 8
    tensors = {"one_hot": one_hot, "embeddings": emb, "human": human, "loss_weight": weight, "head_loss_weight": head_weight,
               "positional_features": get_positional_embed(n, cfg.dim // cfg.heads, "cpu", False)}
    for (name, p), g in zip(params.items(), grads):
        tensors["grad." + name] = g if g is not None else torch.zeros_like(p)
    save_reference(os.path.join(out_dir, "reference.safetensors"), tensors, sequences)
    print("enformer params", sum(p.numel() for p in params.values()), "emb", list(emb.shape))


if __name__ == "__main__":
    esm2()
    nt_v2()
    enformer()
