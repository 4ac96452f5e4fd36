#!/usr/bin/env python3
"""Where a bf16 model's error comes from. Runs an ESM-2 or NT-v2 model in PyTorch fp32, then three more times
with one kind of bf16 rounding each, and prints how far each run's hidden states lie from the plain fp32 run
(relative Frobenius norm per sequence over its real tokens; worst and median). The three roundings:
- the weights of every linear layer (everything else exact): what bf16 weights cost by themselves;
- the inputs of every linear layer;
- both: what a bf16 GEMM with f32 accumulation computes, as the engine's `--dtype bf16` does;
- with `--by-kind`, the weights of one kind of linear layer at a time (query, key, value, attention output,
  feed-forward input, feed-forward output), to see which of them the weights' error comes from;
and, for scale, PyTorch's own bf16 (the whole model cast to bf16, as its users run it).

Compare with the engine's own figure, `embed --dtype bf16` against `embed` on the same weights and inputs
(README, "bf16 accuracy"). Uses the virtual environment, the random full-size weights and the inputs that
tools/bench_vs_torch.py makes (run that once first, e.g. with `--only nt_v2_250m_8x1024`):
    python3 tools/bf16_error_sources.py [--model nt|esm2] [--weights DIR] [--input FASTA] [--count 8]
                                        [--max-tokens 1024] [--threads 2] [--by-kind]
"""
import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_vs_torch as bench  # noqa: E402  (the venv, the model builder and the FASTA reader)

WORK = os.path.expanduser("~/.cache/isoformer-engine/bench-vs-torch")
DEFAULTS = {"nt": ("nt_v2_250m", "nt_v2_250m_8x1024.fa", 1024), "esm2": ("esm2_35m", "esm2_35m_8x512.fa", 512)}


# The kinds of linear layer in transformers' ESM modules (ESM-2 and NT-v2), by module name.
KINDS = ["query", "key", "value", "attention output", "feed-forward input", "feed-forward output"]


def kind_of(name):
    for part, kind in [(".attention.self.query", "query"), (".attention.self.key", "key"),
                       (".attention.self.value", "value"), (".attention.output.dense", "attention output"),
                       (".intermediate.dense", "feed-forward input"), (".output.dense", "feed-forward output")]:
        if part in name:
            return kind
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(DEFAULTS), default="nt")
    ap.add_argument("--weights")
    ap.add_argument("--input")
    ap.add_argument("--count", type=int, default=8, help="sequences, from the start of the input")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--by-kind", action="store_true",
                    help="also round the weights of one kind of linear layer at a time")
    args = ap.parse_args()
    model_dir, fasta, max_tokens = DEFAULTS[args.model]
    args.weights = args.weights or os.path.join(WORK, model_dir)
    args.input = args.input or os.path.join(WORK, fasta)
    args.max_tokens = args.max_tokens or max_tokens
    if os.environ.get("BENCH_VS_TORCH_VENV") != "1":
        python = os.path.join(bench.VENV, "bin", "python")
        if not os.path.exists(python):
            sys.exit(f"no environment at {bench.VENV}: run tools/bench_vs_torch.py once first")
        os.execve(python, [python, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, BENCH_VS_TORCH_VENV="1"))

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model, tok = bench.esm_model(args)
    model.eval()
    seqs = bench.read_fasta(args.input)[:args.count]
    enc = tok(seqs, padding=True, return_tensors="pt", truncation=True, max_length=args.max_tokens)
    mask = enc["attention_mask"].bool()
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = [m for _, m in named]

    def hidden():
        return model(**enc).last_hidden_state.double().numpy()

    def distances(h, ref):
        return [float(np.linalg.norm(h[i][mask[i]] - ref[i][mask[i]]) / np.linalg.norm(ref[i][mask[i]]))
                for i in range(len(seqs))]

    def round_inputs(_module, inputs):
        return (inputs[0].to(torch.bfloat16).float(),)

    with torch.inference_mode():
        ref = hidden()
        weights = [m.weight.detach().clone() for m in linears]
        rows = []
        for name, round_weights, round_inputs_too in [("linear weights", True, False),
                                                      ("linear inputs", False, True),
                                                      ("both", True, True)]:
            for m, w in zip(linears, weights):
                m.weight.copy_(w.to(torch.bfloat16).float() if round_weights else w)
            hooks = [m.register_forward_pre_hook(round_inputs) for m in linears] if round_inputs_too else []
            d = distances(hidden(), ref)
            for h in hooks:
                h.remove()
            rows.append((name, max(d), statistics.median(d)))
        for kind in KINDS if args.by_kind else []:
            for (n, m), w in zip(named, weights):
                m.weight.copy_(w.to(torch.bfloat16).float() if kind_of(n) == kind else w)
            d = distances(hidden(), ref)
            rows.append((f"linear weights: {kind} only", max(d), statistics.median(d)))
        # For scale: PyTorch's own bf16, the whole model cast (what its bf16 users run).
        for m, w in zip(linears, weights):
            m.weight.copy_(w)
        model.to(torch.bfloat16)
        d = distances(model(**enc).last_hidden_state.float().double().numpy(), ref)
        rows.append(("everything (PyTorch bf16: the model cast)", max(d), statistics.median(d)))
    print(f"{args.model} ({args.weights}), {len(seqs)} sequences of {args.input}, fp32 with one bf16 rounding:")
    print("| rounded to bf16 | worst | median |\n|---|---|---|")
    for name, worst, median in rows:
        print(f"| {name} | {worst:.3e} | {median:.3e} |")


if __name__ == "__main__":
    main()
