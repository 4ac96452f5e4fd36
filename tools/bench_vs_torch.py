#!/usr/bin/env python3
"""Side by side: isoformer-engine against PyTorch as its users run it, on the same random full-size weights and
the same inputs, alternating, in one run. Prints one table of ratios, with the CPU and the versions.

PyTorch runs the way its users run it: transformers' default attention (SDPA), one warm-up batch, then
`torch.inference_mode()`, the same thread count as the engine, in fp32 and in bf16. The engine runs in f32 and
with `--dtype bf16`; a last table compares the GEMM rates (`bench gemm` against `torch.matmul`). esm-cpp (PyPI `esm-cpp`,
a CPU-first C++ ESM-2 engine) is a third column for the ESM-2 rows where it installs. The engine's time is the
whole `embed` command (process start, weight loading and output writing included); PyTorch's and esm-cpp's
exclude loading. So that the ratios also compare like with like, the table adds the engine's own timing of its
loop over the batches (the `embedded N sequences in X s` line: tokenising, planning, the forwards and writing
the output, but not process start, loading or the bf16 weight copy, which PyTorch's figure leaves out too; no
warm-up batch is left out, where PyTorch's is) and the ratios against it. Every run is a fresh process, so each
peak RSS is that run's own.

The script makes its own virtual environment with pinned versions on first use (from PyPI), then re-runs
itself inside it:
    python3 tools/bench_vs_torch.py [--engine target/release/isoformer-engine] [--threads 2] [--rounds 2]
                                    [--only esm2_35m_8x512,enformer] [--work DIR] [--skip-torch-bf16]
                                    [--skip-engine-bf16] [--skip-gemm] [--gemm-size 2048]
Workloads: esm2_35m_8x512, esm2_35m_1x1024, esm2_150m_8x512, esm2_150m_1x1024, esm2_35m_8000,
esm2_150m_32x20_1 and esm2_150m_32x200_1 (32 peptides of 20 residues and 32 proteins of 200, one per
forward), nt_v2_250m_8x1024, enformer (one 196,608 bp sequence), and the training steps esm2_35m_train_4x512 and
enformer_train_196608 (the engine's `bench encoder-step` against the same step in PyTorch, each without and with
recompute: the engine's per-block checkpointing, and PyTorch's own checkpointing as its users switch it on; the
engine's planned peak is printed beside its measured one), and isoformer_demo_train_16 (a small IsoFormer's
training step, the demo config with every encoder fine-tuned, against the same model built in PyTorch by
tools/make_isoformer_fixture.py on the same weights and rows). Weights come from tools/make_random_weights.py
(N(0, 0.02²)); inputs are random with a fixed seed.
"""
import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PINS = ["torch==2.15.0", "transformers==4.56.2", "enformer-pytorch==0.8.12", "safetensors==0.6.2",
        "numpy<2"]
OPTIONAL_PINS = ["esm-cpp==0.2.1"]
# BENCH_VENV names an existing environment with these pins instead.
VENV = os.environ.get("BENCH_VENV") or os.path.expanduser("~/.cache/isoformer-engine/bench-venv-torch2.15.0")

# name: (model dir, engine --model, sequences, length, batch, max tokens)
WORKLOADS = {
    "esm2_35m_8x512": ("esm2_35m", "esm2", 64, 510, 8, 512),
    "esm2_35m_1x1024": ("esm2_35m", "esm2", 8, 1022, 1, 1024),
    "esm2_150m_8x512": ("esm2_150m", "esm2", 64, 510, 8, 512),
    "esm2_150m_1x1024": ("esm2_150m", "esm2", 8, 1022, 1, 1024),
    "esm2_35m_8000": ("esm2_35m", "esm2", 1, 8000, 1, 8002),
    # One sequence per forward, as the library embeds them one at a time: peptides, and short proteins.
    "esm2_150m_32x20_1": ("esm2_150m", "esm2", 32, 20, 1, 22),
    "esm2_150m_32x200_1": ("esm2_150m", "esm2", 32, 200, 1, 202),
    # 6,138 nt = 1,023 six-mers + <cls> = 1,024 tokens.
    "nt_v2_250m_8x1024": ("nt_v2_250m", "nt", 16, 6138, 8, 1024),
    "enformer": ("enformer", "enformer", 1, 196_608, 1, 0),
}
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# Training steps (forward, MSE on the last hidden state, backward, AdamW on every parameter):
# name: (model dir, engine --model, batch, tokens per sequence including <cls> and <eos> (Enformer: bp),
#        steps per run; the first is a warm-up).
TRAIN_WORKLOADS = {
    "esm2_35m_train_4x512": ("esm2_35m", "esm2", 4, 512, 4),
    "enformer_train_196608": ("enformer", "enformer", 1, 196_608, 2),
}
# Each training workload runs without and with recompute: the engine's per-block checkpointing
# (`--recompute blocks`) and PyTorch's own (transformers' gradient_checkpointing_enable(),
# enformer-pytorch's use_checkpointing, which checkpoints its transformer layers).
# A small IsoFormer's training step: the built-in demo config (Enformer at 1,024 bp, NT-v2 and ESM-2, the
# DNA-centred cross-attention, every encoder fine-tuned), batch 16, RNA of 1,500 nt (251 tokens), proteins of
# 200 residues; the engine's `bench step --weights --input` against the same model built in PyTorch from
# tools/make_isoformer_fixture.py, on the same weights (released names) and rows.
ISOFORMER_TRAIN = ("isoformer_demo_train_16", 16, 4)
TRAIN_COLUMNS = {
    "engine": ("engine-train", ["--recompute", "none"]),
    "engine blocks": ("engine-train", ["--recompute", "blocks"]),
    "torch fp32": ("torch-train", []),
    "torch checkpointing": ("torch-train", ["--checkpointing"]),
}


def ensure_venv():
    if os.environ.get("BENCH_VS_TORCH_VENV") == "1":
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(os.path.join(VENV, ".complete")) and not os.environ.get("BENCH_VENV"):
        print(f"creating {VENV} with {' '.join(PINS)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
        for pin in OPTIONAL_PINS:
            if subprocess.run([py, "-m", "pip", "install", "-q", pin]).returncode != 0:
                print(f"{pin} does not install here; its column stays empty", flush=True)
        open(os.path.join(VENV, ".complete"), "w").close()
    env = dict(os.environ, BENCH_VS_TORCH_VENV="1")
    os.execve(py, [py, os.path.abspath(__file__), *sys.argv[1:]], env)


def write_inputs(path, kind, count, length, seed):
    rng = random.Random(seed)
    letters = AMINO if kind == "esm2" else "ACGT"
    with open(path, "w") as f:
        for i in range(count):
            f.write(f">s{i}\n{''.join(rng.choice(letters) for _ in range(length))}\n")


def read_fasta(path):
    seqs = []
    for line in open(path):
        if not line.startswith(">") and line.strip():
            seqs.append(line.strip())
    return seqs


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- children: one measurement each, in its own process ----

def child_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    seqs = read_fasta(args.input)
    batches = [seqs[i:i + args.batch] for i in range(0, len(seqs), args.batch)]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model == "enformer":
        from enformer_pytorch import Enformer, EnformerConfig, str_to_one_hot
        from safetensors.torch import load_file

        cfg = json.load(open(os.path.join(args.weights, "config.json")))
        model = Enformer(EnformerConfig(**cfg))
        model.load_state_dict(load_file(os.path.join(args.weights, "model.safetensors")), strict=False)
        model = model.eval().to(dtype)

        def run(batch):
            return model(torch.stack([str_to_one_hot(s) for s in batch]).to(dtype), return_only_embeddings=True)
    else:
        model, tok = esm_model(args)
        model = model.eval().to(dtype)

        def run(batch):
            enc = tok(batch, padding=True, return_tensors="pt", truncation=True, max_length=args.max_tokens)
            return model(**enc).last_hidden_state
    with torch.inference_mode():
        run(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            run(b)
        secs = time.perf_counter() - start
    print(json.dumps({"seconds": secs, "peak_rss": peak_rss_bytes()}))


def child_torch_train(args):
    """The engine's `bench encoder-step` in PyTorch: the same weights and batch shape, forward in train mode
    (dropout off, as the engine has none; Enformer's batchnorms on batch statistics), MSE of the last hidden
    state (Enformer: the embeddings) against zero, backward, AdamW (lr 1e-4, decay 0.01). With
    --checkpointing, the model's own activation checkpointing. The first step is a warm-up; the median of the
    others is reported."""
    import torch

    torch.set_num_threads(args.threads)
    if args.model == "enformer":
        from enformer_pytorch import Enformer, EnformerConfig
        from safetensors.torch import load_file

        cfg = json.load(open(os.path.join(args.weights, "config.json")))
        model = Enformer(EnformerConfig(**cfg, use_checkpointing=args.checkpointing))
        model.load_state_dict(load_file(os.path.join(args.weights, "model.safetensors")), strict=False)
        g = torch.Generator().manual_seed(0)
        one_hot = torch.nn.functional.one_hot(torch.randint(0, 4, (args.batch, args.max_tokens), generator=g),
                                              4).float()

        def forward():
            return model(one_hot, return_only_embeddings=True)
    else:
        model, _ = esm_model(args)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        if args.checkpointing:
            model.gradient_checkpointing_enable()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 24, (args.batch, args.max_tokens), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2
        mask = torch.ones_like(ids)

        def forward():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = forward().pow(2).mean()
        loss.backward()
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_rss": peak_rss_bytes()}))


def child_isoformer_weights(args):
    """Random weights of the demo-sized IsoFormer in PyTorch, saved under the released names, and the
    engine's config for them."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, HERE)
    import make_isoformer_fixture as fx

    c = json.load(open(os.path.join(HERE, "..", "src", "configs", "demo.json")))
    c.pop("random_init", None)
    c["name"] = "demo-from-weights"
    torch.manual_seed(0)
    modules = fx.build_isoformer(c)
    os.makedirs(args.weights, exist_ok=True)
    save_file(fx.released_state(modules), os.path.join(args.weights, "model.safetensors"))
    json.dump(c, open(os.path.join(args.weights, "config.json"), "w"), indent=1)
    print(json.dumps({"ok": True}))


def child_torch_isoformer_train(args):
    """The IsoFormer training step in PyTorch: the encoders (train mode, dropout off; Enformer on batch
    statistics), both cross-attentions and the head, the mean squared prediction as the loss, backward, AdamW
    (lr 1e-4, decay 0.01) on every parameter. Tokenisation is done once, outside the timed steps."""
    import torch
    from enformer_pytorch import str_to_one_hot
    from safetensors.torch import load_file

    sys.path.insert(0, HERE)
    import make_isoformer_fixture as fx

    torch.set_num_threads(args.threads)
    c = json.load(open(os.path.join(args.weights, "config.json")))
    modules = fx.build_isoformer(c, attn_implementation=None)  # transformers' default attention (SDPA)
    state = {k.replace("head.1.", "head.2."): v for k, v in
             load_file(os.path.join(args.weights, "model.safetensors")).items()}
    modules.load_state_dict(state, strict=False)
    rows = [l.rstrip("\n").split("\t") for l in open(args.input)][1:args.batch + 1]
    n = c["dna_sequence_length"]
    dna = torch.stack([str_to_one_hot(r[1][(len(r[1]) - n) // 2:][:n]) for r in rows])
    nt_tok, esm_tok = fx.tokenizers()
    rt = nt_tok([r[2] for r in rows], padding=True, return_tensors="pt")
    pt = esm_tok([r[3] for r in rows], padding=True, return_tensors="pt")
    gate = torch.tensor([1.0 if r[3] else 0.0 for r in rows])
    for m in modules.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    modules.train()
    opt = torch.optim.AdamW(modules.parameters(), lr=1e-4, weight_decay=0.01)
    s0, s1 = c["pool_window_start"], c["pool_window_end"]
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        h_dna = modules["enformer"](dna, return_only_embeddings=True)
        h_rna = modules["nt_model"].esm(input_ids=rt["input_ids"], attention_mask=rt["attention_mask"]).last_hidden_state
        h_prot = modules["esm_model"].esm(input_ids=pt["input_ids"], attention_mask=pt["attention_mask"]).last_hidden_state
        z = modules["cross_attention_layer_rna"](h_dna, h_rna, rt["attention_mask"].bool(), torch.ones(len(rows)))
        z = modules["cross_attention_layer_protein"](z, h_prot, pt["attention_mask"].bool(), gate)
        loss = modules["head"](z[:, s0:s1].mean(1)).pow(2).mean()
        loss.backward()
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_rss": peak_rss_bytes()}))


def child_engine_isoformer_train(args):
    out = subprocess.run([args.engine, "bench", "step", "--config", os.path.join(args.weights, "config.json"),
                          "--weights", os.path.join(args.weights, "model.safetensors"), "--input", args.input,
                          "--batch", str(args.batch), "--steps", str(args.steps), "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    secs = [float(l.split()[2]) for l in out.stdout.splitlines() if l.startswith("step ")]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": statistics.median(secs[1:]), "peak_rss": rss}))


def child_engine_train(args):
    out = subprocess.run([args.engine, "bench", "encoder-step", "--model", args.model, "--weights", args.weights,
                          "--batch", str(args.batch), "--len", str(args.max_tokens), "--steps", str(args.steps),
                          "--recompute", args.recompute, "--device", "cpu"], capture_output=True, text=True,
                         check=True)
    secs = [float(l.split()[2]) for l in out.stdout.splitlines() if l.startswith("step ")]
    planned = [float(l.split()[2]) * 1024 ** 3 for l in out.stdout.splitlines() if l.startswith("planned peak")]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": statistics.median(secs[1:]), "peak_rss": rss, "planned": planned[0]}))


def child_torch_gemm(args):
    """torch.matmul at n×n×n in fp32 or bf16: 2 warm-ups, the median of 10 runs, as GFLOP/s."""
    import torch

    torch.set_num_threads(args.threads)
    n = args.gemm_size
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, n, generator=g) - 0.5).to(dtype)
    b = (torch.rand(n, n, generator=g) - 0.5).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(12):
            start = time.perf_counter()
            torch.matmul(a, b)
            if i >= 2:
                times.append(time.perf_counter() - start)
    print(json.dumps({"gflops": 2 * n ** 3 / statistics.median(times) / 1e9}))


def child_engine_gemm(args):
    out = subprocess.run([args.engine, "bench", "gemm", "--m", str(args.gemm_size), "--n", str(args.gemm_size),
                          "--k", str(args.gemm_size), "--threads", str(args.threads), "--dtype", args.dtype,
                          "--device", "cpu"], capture_output=True, text=True, check=True)
    print(json.dumps({"gflops": float(out.stdout.strip().splitlines()[-1].split()[0])}))


def esm_model(args):
    import itertools
    import tempfile

    import torch
    from safetensors.torch import load_file
    from transformers import EsmConfig, EsmModel, EsmTokenizer
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    cfg = EsmConfig.from_pretrained(args.weights)  # attention implementation: transformers' default
    with tempfile.TemporaryDirectory() as d:
        vocab = os.path.join(d, "vocab.txt")
        if args.model == "esm2":
            tokens = get_default_vocab_list()
        else:
            tokens = (["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
                      + ["".join(k) for k in itertools.product("ATCG", repeat=6)] + list("ATCGN"))
        open(vocab, "w").write("\n".join(tokens) + "\n")
        tok = (EsmTokenizer(vocab) if args.model == "esm2"
               else EsmTokenizer(vocab, eos_token=None, model_max_length=args.max_tokens))
    model = EsmModel(cfg, add_pooling_layer=False)
    if args.model == "nt":
        # NT-v2's FFN (bias-free SwiGLU) in the native ESM layers.
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

        for layer in model.encoder.layer:
            layer.intermediate = GluIntermediate(cfg)
            layer.output = GluOutput(cfg)
    sd = {k.removeprefix("esm."): v for k, v in load_file(os.path.join(args.weights, "model.safetensors")).items()
          if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not any(k in m for k in ("position", "contact", "inv_freq"))]:
        sys.exit(f"weights do not fit the PyTorch model: missing {missing}, unexpected {unexpected}")
    return model, tok


def child_esm_cpp(args):
    os.environ["ESM_NUM_THREADS"] = str(args.threads)  # read at the first model load
    import numpy as np
    import esm_cpp

    model = esm_cpp.Model.load_from_safetensors(os.path.join(args.weights, "model.safetensors"))
    if esm_cpp.Model.num_threads != args.threads:
        sys.exit(f"esm-cpp runs {esm_cpp.Model.num_threads} threads, not {args.threads}")
    tok = esm_cpp.Tokenizer()
    seqs = read_fasta(args.input)
    ids = [np.array(tok.encode(s, True, False)[:args.max_tokens], dtype=np.int32) for s in seqs]
    batches = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
    model.forward_batch(batches[0])
    start = time.perf_counter()
    for b in batches:
        model.forward_batch(b)
    secs = time.perf_counter() - start
    print(json.dumps({"seconds": secs, "peak_rss": peak_rss_bytes()}))


def child_measure(cmd):
    start = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    secs = time.perf_counter() - start
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        sys.exit(f"{' '.join(cmd)} failed with {out.returncode}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {"seconds": secs, "peak_rss": rss}
    # `embed` reports its loop over the batches: the scope of PyTorch's figure (see the module's text).
    loop = re.search(r"embedded \d+ sequences in ([0-9.]+) s", out.stderr)
    if loop:
        result["loop_seconds"] = float(loop.group(1))
    print(json.dumps(result))


# ---- the parent ----

def warm_file_cache(paths):
    """Reads each file once, so that the first timed run does not read the weights from disk: the engine's
    figure includes loading, PyTorch's does not, and a cold cache once added 1.8 s to the engine's first
    Enformer run (12.5 s against 10.7 s warm)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def run_child(argv, env=None):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name():
    name = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read()
    feats = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(feats) or 'no AVX-512'})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["torch", "esm-cpp", "measure", "torch-gemm", "engine-gemm",
                                        "torch-train", "engine-train", "isoformer-weights",
                                        "torch-isoformer-train", "engine-isoformer-train"])
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the workload's)")
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--skip-gemm", action="store_true", help="leave out the GEMM table")
    ap.add_argument("--skip-engine-bf16", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--weights")
    ap.add_argument("--input")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--engine", default=os.path.join(HERE, "..", "target", "release", "isoformer-engine"))
    ap.add_argument("--engine-args", default="", help="extra arguments for every engine run, e.g. '--dtype bf16'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join([*WORKLOADS, *TRAIN_WORKLOADS, ISOFORMER_TRAIN[0]]))
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/isoformer-engine/bench-vs-torch"))
    ap.add_argument("--skip-torch-bf16", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.child == "measure":
        return child_measure(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    ensure_venv()
    if args.child == "torch":
        return child_torch(args)
    if args.child == "esm-cpp":
        return child_esm_cpp(args)
    if args.child == "torch-train":
        return child_torch_train(args)
    if args.child == "engine-train":
        return child_engine_train(args)
    if args.child == "isoformer-weights":
        return child_isoformer_weights(args)
    if args.child == "torch-isoformer-train":
        return child_torch_isoformer_train(args)
    if args.child == "engine-isoformer-train":
        return child_engine_isoformer_train(args)
    if args.child == "torch-gemm":
        return child_torch_gemm(args)
    if args.child == "engine-gemm":
        return child_engine_gemm(args)

    import torch
    import transformers

    try:
        import esm_cpp
        esm_cpp_version = esm_cpp.__version__
    except ImportError:
        esm_cpp_version = None
    os.makedirs(args.work, exist_ok=True)
    names = [w for w in args.only.split(",") if w]
    for w in names:
        if w not in WORKLOADS and w not in TRAIN_WORKLOADS and w != ISOFORMER_TRAIN[0]:
            sys.exit(f"unknown workload {w}; known: "
                     f"{', '.join([*WORKLOADS, *TRAIN_WORKLOADS, ISOFORMER_TRAIN[0]])}")
    isoformer_train = ISOFORMER_TRAIN[0] in names
    train_names = [w for w in names if w in TRAIN_WORKLOADS]
    names = [w for w in names if w in WORKLOADS]
    engine = os.path.abspath(args.engine)
    version = subprocess.run([engine, "--version"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    rows = []
    for w in names:
        model_dir, kind, count, length, batch, max_tokens = WORKLOADS[w]
        weights = os.path.join(args.work, model_dir)
        if not os.path.exists(os.path.join(weights, "model.safetensors")):
            subprocess.run([sys.executable, os.path.join(HERE, "make_random_weights.py"), args.work, model_dir],
                           check=True)
        fasta = os.path.join(args.work, f"{w}.fa")
        if not os.path.exists(fasta):
            write_inputs(fasta, kind, count, length, seed=7)
        tokens = count * (min(length + 2, max_tokens) if kind == "esm2" else
                          (length // 6 + 1 if kind == "nt" else length // 128))
        common = ["--model", kind, "--weights", weights, "--input", fasta, "--batch", str(batch),
                  "--max-tokens", str(max_tokens or 2048), "--threads", str(args.threads)]
        engine_run = (["--child", "measure", "--", engine, "embed", "--model", kind, "--weights", weights,
                       "--input", fasta, "--output", os.path.join(args.work, "out.safetensors"), "--pool",
                       "none", "--batch", str(batch), "--device", "cpu", *args.engine_args.split()]
                      + (["--max-tokens", str(max_tokens)] if max_tokens else []))
        columns = {"engine": engine_run}
        if not args.skip_engine_bf16:
            columns["engine bf16"] = engine_run + ["--dtype", "bf16"]
        columns["torch fp32"] = ["--child", "torch", *common, "--dtype", "fp32"]
        if not args.skip_torch_bf16:
            columns["torch bf16"] = ["--child", "torch", *common, "--dtype", "bf16"]
        if kind == "esm2" and esm_cpp_version:
            columns["esm-cpp"] = ["--child", "esm-cpp", *common]
        results = {c: [] for c in columns}
        warm_file_cache([os.path.join(weights, "model.safetensors"), fasta])
        for r in range(args.rounds):
            for c, argv in columns.items():
                res = run_child(argv, env)
                results[c].append(res)
                shown = (f"{res['seconds']:.2f} s, {res['peak_rss'] / 1e9:.2f} GB" if "seconds" in res
                         else f"failed: {res['error']}")
                if "loop_seconds" in res:
                    shown += f" (loop {res['loop_seconds']:.2f} s)"
                print(f"[{w} round {r + 1}] {c}: {shown}", flush=True)
        summary = {}
        for c, rs in results.items():
            ok = [x for x in rs if "seconds" in x]
            if ok:
                summary[c] = (statistics.median(x["seconds"] for x in ok), max(x["peak_rss"] for x in ok))
            loops = [x["loop_seconds"] for x in ok if "loop_seconds" in x]
            if loops and len(loops) == len(ok):
                summary[c + " loop"] = (statistics.median(loops), None)
        rows.append((w, tokens, summary))

    print()
    print(f"Machine: {cpu_name()}, {args.threads} threads. {version}; PyTorch {torch.__version__}, transformers "
          f"{transformers.__version__}" + (f", esm-cpp {esm_cpp_version}" if esm_cpp_version else "")
          + f". Median of {args.rounds} alternating rounds.")
    print()
    cols = ["engine", "engine bf16", "torch fp32", "torch bf16", "esm-cpp"]
    if rows:
        print("| workload | " + " | ".join(f"{c} s (tok/s, peak RSS)" for c in cols)
              + " | engine fp32 vs PyTorch fp32 | engine bf16 vs best PyTorch | best engine vs esm-cpp "
              "| engine loop f32, bf16 s | same scope: f32 vs PyTorch fp32, bf16 vs best PyTorch |")
        print("|---" * (len(cols) + 6) + "|")
    for w, tokens, s in rows:
        cells = []
        for c in cols:
            if c in s:
                secs, rss = s[c]
                cells.append(f"{secs:.2f} ({tokens / secs:,.0f}, {rss / 1e9:.2f} GB)")
            else:
                cells.append("–")
        torch_best = min((s[c][0] for c in ("torch fp32", "torch bf16") if c in s), default=None)
        engine_best = min((s[c][0] for c in ("engine", "engine bf16") if c in s), default=None)
        ratio = f"{torch_best / s['engine bf16'][0]:.2f}×" if torch_best and "engine bf16" in s else "–"
        vs_cpp = f"{s['esm-cpp'][0] / engine_best:.2f}×" if "esm-cpp" in s and engine_best else "–"
        vs_fp32 = f"{s['torch fp32'][0] / s['engine'][0]:.2f}×" if "torch fp32" in s and "engine" in s else "–"
        loop = lambda c: s.get(c + " loop", (None,))[0]
        loops = ", ".join(f"{loop(c):.2f}" if loop(c) else "–" for c in ("engine", "engine bf16"))
        scoped = ", ".join([
            f"{s['torch fp32'][0] / loop('engine'):.2f}×" if "torch fp32" in s and loop("engine") else "–",
            f"{torch_best / loop('engine bf16'):.2f}×" if torch_best and loop("engine bf16") else "–",
        ])
        print(f"| {w} | " + " | ".join(cells) + f" | {vs_fp32} | {ratio} | {vs_cpp} | {loops} | {scoped} |")

    if train_names:
        print()
        print("Training steps (forward, MSE on the last hidden state, backward, AdamW on every parameter), fp32, "
              "median of the steps after the first of each run, median of the rounds; the engine's planned peak "
              "(`bench encoder-step`, from the recording backend) beside its measured one:")
        print("| workload | " + " | ".join(f"{c} s/step (peak RSS)" for c in TRAIN_COLUMNS)
              + " | engine vs PyTorch | engine blocks vs PyTorch checkpointing | engine RSS / plan |")
        print("|---" * (len(TRAIN_COLUMNS) + 4) + "|")
    for w in train_names:
        model_dir, kind, batch, tokens, steps = TRAIN_WORKLOADS[w]
        weights = os.path.join(args.work, model_dir)
        if not os.path.exists(os.path.join(weights, "model.safetensors")):
            subprocess.run([sys.executable, os.path.join(HERE, "make_random_weights.py"), args.work, model_dir],
                           check=True)
        common = ["--model", kind, "--weights", weights, "--batch", str(batch), "--max-tokens", str(tokens),
                  "--threads", str(args.threads), "--steps", str(args.steps or steps), "--engine", engine]
        res = {c: [] for c in TRAIN_COLUMNS}
        for r in range(args.rounds):
            for c, (child, extra) in TRAIN_COLUMNS.items():
                out = run_child(["--child", child, *common, *extra], env)
                print(f"[{w} round {r + 1}] {c}: {out}", flush=True)
                if "seconds" in out:
                    res[c].append(out)
        med = {c: (statistics.median(x["seconds"] for x in v), max(x["peak_rss"] for x in v))
               for c, v in res.items() if v}
        cells = [f"{med[c][0]:.2f} ({med[c][1] / 1e9:.2f} GB)" if c in med else "failed" for c in TRAIN_COLUMNS]
        ratio = lambda a, b: (f"{med[b][0] / med[a][0]:.2f}× time, {med[a][1] / med[b][1]:.2f}× RSS"
                              if a in med and b in med else "–")
        plans = [f"{c}: {max(x['peak_rss'] for x in res[c]) / max(x['planned'] for x in res[c]):.2f}"
                 for c in ("engine", "engine blocks") if res[c]]
        print(f"| {w} | " + " | ".join(cells) + f" | {ratio('engine', 'torch fp32')} | "
              f"{ratio('engine blocks', 'torch checkpointing')} | {', '.join(plans) or '–'} |")

    if isoformer_train:
        w, batch, steps = ISOFORMER_TRAIN
        weights = os.path.join(args.work, "isoformer_demo")
        if not os.path.exists(os.path.join(weights, "model.safetensors")):
            print(run_child(["--child", "isoformer-weights", "--weights", weights], env))
        rows = os.path.join(args.work, "isoformer_demo_rows.tsv")
        if not os.path.exists(rows):
            rng = random.Random(11)
            with open(rows, "w") as f:
                f.write("id\tdna_seq\trna_seq\tprotein_seq\n")
                for i in range(batch):
                    f.write("\t".join([f"t{i}", "".join(rng.choice("ACGT") for _ in range(1024)),
                                       "".join(rng.choice("ACGT") for _ in range(1500)),
                                       "".join(rng.choice(AMINO) for _ in range(200))]) + "\n")
        common = ["--weights", weights, "--input", rows, "--batch", str(batch), "--steps", str(args.steps or steps),
                  "--threads", str(args.threads), "--engine", engine]
        res = {"engine": [], "torch fp32": []}
        for r in range(args.rounds):
            for c, child in (("engine", "engine-isoformer-train"), ("torch fp32", "torch-isoformer-train")):
                out = run_child(["--child", child, *common], env)
                print(f"[{w} round {r + 1}] {c}: {out}", flush=True)
                if "seconds" in out:
                    res[c].append(out)
        print()
        print(f"A small IsoFormer's training step (the demo config, every encoder fine-tuned, batch {batch}; "
              "forward, mean squared prediction, backward, AdamW), fp32, median of the steps after the first, "
              "median of the rounds:")
        print("| workload | engine s/step (peak RSS) | PyTorch s/step (peak RSS) | engine vs PyTorch |")
        print("|---|---|---|---|")
        if res["engine"] and res["torch fp32"]:
            e = statistics.median(x["seconds"] for x in res["engine"])
            t = statistics.median(x["seconds"] for x in res["torch fp32"])
            er = max(x["peak_rss"] for x in res["engine"])
            tr = max(x["peak_rss"] for x in res["torch fp32"])
            print(f"| {w} | {e:.3f} ({er / 1e9:.2f} GB) | {t:.3f} ({tr / 1e9:.2f} GB) | {t / e:.2f}× |")

    if not args.skip_gemm:
        n = args.gemm_size
        gemm_cols = {"engine f32": ("engine-gemm", "f32"), "engine bf16": ("engine-gemm", "bf16"),
                     "torch fp32": ("torch-gemm", "fp32"), "torch bf16": ("torch-gemm", "bf16")}
        rates = {c: [] for c in gemm_cols}
        for r in range(max(args.rounds, 2)):
            for c, (child, dt) in gemm_cols.items():
                res = run_child(["--child", child, "--engine", engine, "--dtype", dt, "--gemm-size", str(n),
                                 "--threads", str(args.threads)], env)
                if "gflops" in res:
                    rates[c].append(res["gflops"])
                print(f"[gemm {n}³ round {r + 1}] {c}: {res}", flush=True)
        med = {c: statistics.median(v) for c, v in rates.items() if v}
        print()
        print(f"GEMM {n}×{n}×{n}, {args.threads} threads, GFLOP/s (median of the rounds' medians):")
        print("| engine f32 | engine bf16 | torch fp32 | torch bf16 | engine bf16 / engine f32 "
              "| engine bf16 / best torch |")
        print("|---|---|---|---|---|---|")
        cell = lambda c: f"{med[c]:.0f}" if c in med else "–"
        best_torch = max((med[c] for c in ("torch fp32", "torch bf16") if c in med), default=None)
        own = f"{med['engine bf16'] / med['engine f32']:.2f}×" if "engine bf16" in med and "engine f32" in med else "–"
        vs = f"{med['engine bf16'] / best_torch:.2f}×" if "engine bf16" in med and best_torch else "–"
        print(f"| {cell('engine f32')} | {cell('engine bf16')} | {cell('torch fp32')} | {cell('torch bf16')} "
              f"| {own} | {vs} |")


if __name__ == "__main__":
    main()
