#!/usr/bin/env bash
# Side-by-side CPU f32 GEMM: isoformer-engine against OpenBLAS (numpy), same machine, same run, alternating
# so that both see the same machine state. Needs numpy and threadpoolctl in .venv (created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q numpy threadpoolctl
fi
cargo build --release -q
for n in 1024 2048; do
  for t in 1 2; do
    ours=$(./target/release/isoformer-engine bench gemm --m "$n" --n "$n" --k "$n" --threads "$t" --device cpu | tail -1)
    theirs=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python tools/bench_openblas_gemm.py "$n" "$t")
    o=${ours% GFLOP/s}
    b=$(echo "$theirs" | sed -E 's/.*: ([0-9.]+) GFLOP\/s/\1/')
    echo "n=$n threads=$t  isoformer-engine: $o GFLOP/s   $theirs   ratio: $(python3 -c "print(f'{$o/$b:.3f}')")"
  done
done
