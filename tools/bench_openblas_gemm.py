#!/usr/bin/env python3
"""OpenBLAS f32 GEMM through numpy, timed like `isoformer-engine bench gemm`: warm-up, repeats, median.

Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (this machine's environment pins an older core type);
the script prints the kernel OpenBLAS actually chose, so a comparison states what it compared against.
Usage: bench_openblas_gemm.py N THREADS [REPEATS]
"""
import os
import sys
import time


def main() -> None:
    n, threads = int(sys.argv[1]), int(sys.argv[2])
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    idx = np.arange(n * n, dtype=np.float32)
    a = ((idx * 7 + 1) % 13 / 13.0 - 0.5).astype(np.float32).reshape(n, n)
    b = ((idx * 7 + 2) % 13 / 13.0 - 0.5).astype(np.float32).reshape(n, n)
    c = np.empty((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        for _ in range(2):
            np.matmul(a, b, out=c)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=c)
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    kernel = blas[0].get("architecture", "?") if blas else "?"
    print(f"openblas kernel={kernel} f32 {n}x{n}x{n} threads={threads}: {2 * n**3 / median / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
