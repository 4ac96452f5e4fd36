#!/usr/bin/env bash
# The GPU checks of the open issues as one prepared run, for a session that is lent a GPU machine (the
# `device` tool: no Rust and no network there, 64 MiB of files travel, minutes of device time are scarce).
#
#   here:        bash tools/gpu_check.sh pack
#                  builds the engine and the test binaries with the CUDA kernels (the pinned nvcc of
#                  .ci/run, or $NVCC), strips and compresses them into .gpu/ (git-ignored), under 64 MiB
#                  with the working tree;
#   on the GPU:  run(command="bash tools/gpu_check.sh run", carry=[".gpu"], timeout_s=590)
#                  unpacks, runs every GPU test (each op on CUDA against the CPU, each model's forward and
#                  backward, the execution-model tests), `info`, `bench gpu`, `bench gemm` on CUDA, and a
#                  few demo training steps on CUDA against the same steps on the CPU; each part under
#                  its own time limit; one log, $OUT/gpu_check.log, and the CUDA run's plots come back.
#
# `run` also works without a GPU (the GPU tests then say "skipped: no GPU run" and the CUDA commands fail
# with their reason), which is how it is checked where there is none.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
pack_dir="$root/.gpu"
# The test binaries whose GPU tests run, and the test-name filter for each.
tests=(backend_ops:gpu_ backend_models:gpu_ emu_device:gpu_ cli:unavailable_device)

pack() {
  set -e
  if [ -z "${NVCC:-}" ]; then
    venv="${XDG_CACHE_HOME:-$HOME/.cache}/isoformer-engine/nvcc-13.0.88"
    NVCC="$(find "$venv" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1)"
    [ -n "$NVCC" ] || { echo "no nvcc: run .ci/run once (it installs the pinned wheels) or set NVCC"; exit 1; }
  fi
  export NVCC
  # A target folder of its own: building with and without nvcc must not rebuild each other.
  export CARGO_TARGET_DIR="$root/target/gpu-pack"
  cargo build --release --bin isoformer-engine
  built_with="$("$CARGO_TARGET_DIR/release/isoformer-engine" info | grep -m1 '^  cuda' || true)"
  case "$built_with" in *"built without CUDA kernels"*) echo "the build has no CUDA kernels: $built_with"; exit 1;; esac
  rm -rf "$pack_dir" && mkdir -p "$pack_dir/stage"
  strip -o "$pack_dir/stage/isoformer-engine" "$CARGO_TARGET_DIR/release/isoformer-engine"
  for entry in "${tests[@]}"; do
    name="${entry%%:*}"
    exe="$(cargo test --release --test "$name" --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -n 1)"
    [ -x "$exe" ] || { echo "no test binary for $name"; exit 1; }
    strip -o "$pack_dir/stage/$name" "$exe"
  done
  # Paths compiled into the binaries (fixtures, CARGO_BIN_EXE): `run` links them to wherever the tree lands.
  echo "$root" > "$pack_dir/stage/manifest_dir"
  git rev-parse HEAD > "$pack_dir/stage/commit"
  tar -C "$pack_dir/stage" -cf - . | xz -T0 -6 > "$pack_dir/bins.tar.xz"
  rm -rf "$pack_dir/stage"
  tree_bytes="$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)"
  pack_bytes="$(stat -c %s "$pack_dir/bins.tar.xz")"
  echo "packed $(git rev-parse --short HEAD): $((pack_bytes >> 20)) MiB of binaries + $((tree_bytes >> 20)) MiB of tree (limit 64 MiB)"
  [ $((pack_bytes + tree_bytes)) -lt $((62 << 20)) ] || { echo "too large to travel"; exit 1; }
}

# Runs one part under a time limit; its whole output goes to the log, its last lines to the terminal.
part() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  local rc=0
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" > "$scratch/part.txt" 2>&1 || rc=$?
  cat "$scratch/part.txt" >> "$log"
  tail -n 12 "$scratch/part.txt"
  echo "   rc $rc in $((SECONDS - start)) s" | tee -a "$log"
}

run() {
  out="${OUT:-$root/.gpu/out}"
  mkdir -p "$out"
  log="$out/gpu_check.log"
  : > "$log"
  [ -f "$pack_dir/bins.tar.xz" ] || { echo "no .gpu/bins.tar.xz: run 'bash tools/gpu_check.sh pack' first and carry .gpu"; exit 1; }
  bins="$(mktemp -d)"
  scratch="$bins"
  xz -dc "$pack_dir/bins.tar.xz" | tar -C "$bins" -xf -
  echo "binaries of commit $(cat "$bins/commit"), tree at $(git rev-parse HEAD 2>/dev/null || echo '?')"
  # The binaries look for fixtures and for the engine under the folder they were built in.
  built_in="$(cat "$bins/manifest_dir")"
  if [ "$built_in" != "$root" ] && [ ! -e "$built_in/tests/fixtures" ]; then
    mkdir -p "$(dirname "$built_in")" && ln -sfn "$root" "$built_in"
  fi
  # The CLI test runs the engine where `pack` built it (CARGO_BIN_EXE), so it goes back there.
  engine="$root/target/gpu-pack/release/isoformer-engine"
  if ! cmp -s "$bins/isoformer-engine" "$engine" 2>/dev/null; then
    mkdir -p "$(dirname "$engine")" && cp "$bins/isoformer-engine" "$engine"
  fi
  # cuBLAS from the machine's toolkit or from PyTorch's wheels; cudarc asks for libcublas.so(.12), which a
  # CUDA 13 wheel only has as .so.13: a folder of links gives it both names.
  libs="$(mktemp -d)"
  for lib in cublas cublasLt; do
    found="$(ls /usr/local/cuda/lib64/lib$lib.so* 2>/dev/null | head -n 1)"
    [ -n "$found" ] || found="$(python3 -c "import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in sorted(pathlib.Path(d).rglob('lib$lib.so*'))))" 2>/dev/null)"
    [ -n "$found" ] && ln -sf "$found" "$libs/lib$lib.so" && ln -sf "$found" "$libs/lib$lib.so.12"
  done
  export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
  echo "cuBLAS: $(readlink "$libs/libcublas.so" || echo 'not found')"
  nvidia-smi -L 2>&1 | head -n 2
  # Most telling first (the device time may run out): correctness on CUDA, then speed, then training.
  part info 20 "$engine" info
  for entry in "${tests[@]}"; do
    name="${entry%%:*}"
    part "test_$name" 90 "$bins/$name" "${entry#*:}" --nocapture --test-threads 1
  done
  part bench_gpu 120 "$engine" bench gpu
  part bench_gemm_cuda 30 "$engine" bench gemm --device cuda --dtype bf16 --m 8192 --n 8192 --k 8192
  # The demo's first training steps on CUDA and on the CPU: the same code, bf16 against f32, so the
  # losses agree to a few parts in a hundred, not bit for bit.
  part train_cuda 60 "$engine" train --device cuda --max-steps 20 --out "$bins/run_cuda"
  part train_cpu 60 "$engine" train --device cpu --max-steps 20 --out "$bins/run_cpu"
  python3 - "$bins" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
try:
    runs = {d: json.load(open(f"{sys.argv[1]}/run_{d}/metrics.json")) for d in ("cuda", "cpu")}
except OSError as e:
    sys.exit(f"no loss comparison: {e}")
for step, (g, c) in enumerate(zip(runs["cuda"]["train_loss"], runs["cpu"]["train_loss"])):
    print(f"step {step + 1}: cuda {g:.5f}  cpu {c:.5f}  relative difference {abs(g - c) / abs(c):.2e}")
EOF
  cp "$bins"/run_cuda/*.png "$out/" 2>/dev/null
  echo "log: $log"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: bash tools/gpu_check.sh pack|run"; exit 2 ;;
esac
