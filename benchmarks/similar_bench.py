"""Queries per second and recall@10 of the faiss index ``convnets similar`` uses, against exact search.

100,000 L2-normalised 512-dimensional vectors (resnet18's embedding size) drawn as a mixture of 2,000 Gaussian
clusters with noise, like embeddings of a collection with many near-identical groups; 1,000 queries from the same
mixture, not in the index. Exact search is faiss's ``IndexFlatIP`` (brute-force inner product); the approximate one
is ``IndexHNSWFlat`` with the settings of :mod:`common.owndata.embed` (M=32, efConstruction=80), at several
efSearch values. Writes ``benchmarks/results/cpu/similar_bench.json`` with the machine, versions and load average.

    python benchmarks/similar_bench.py [--n 100000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def vectors(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed_search(index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Neighbours and the best queries/s over ``repeats`` passes of the whole query batch."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / best


def main() -> None:
    import faiss

    from common.owndata.embed import HNSW_EF_CONSTRUCTION, HNSW_M

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cpu" / "similar_bench.json")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, args.dim)).astype(np.float32)
    base, queries = vectors(rng, args.n, args.dim, centres), vectors(rng, args.queries, args.dim, centres)

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    truth, exact_qps = timed_search(exact, queries, args.k)
    print(f"exact (IndexFlatIP): {exact_qps:.0f} queries/s", flush=True)

    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(args.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw.add(base)
    build_s = time.perf_counter() - start
    print(f"HNSW build: {build_s:.1f} s", flush=True)
    rows = []
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        found, qps = timed_search(hnsw, queries, args.k)
        recall = float(np.mean([len(set(t) & set(f)) / args.k for t, f in zip(truth, found, strict=True)]))
        rows.append({"ef_search": ef, "queries_per_s": round(qps, 1), "recall_at_10": round(recall, 4),
                     "speedup_over_exact": round(qps / exact_qps, 2)})  # fmt: skip
        print(f"HNSW efSearch={ef}: {qps:.0f} queries/s, recall@10 {recall:.4f}", flush=True)
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "data": {"vectors": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
                 "distribution": "L2-normalised mixture of 2,000 Gaussian clusters (noise 0.6), queries not indexed"},
        "exact": {"index": "IndexFlatIP", "queries_per_s": round(exact_qps, 1)},
        "hnsw": {"index": "IndexHNSWFlat", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                 "build_s": round(build_s, 1), "results": rows},
        "queries_per_s_is": "the whole query batch in one search call, best of 3 passes",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "faiss_threads": args.threads, "load_average": os.getloadavg()},
        "versions": {"faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
