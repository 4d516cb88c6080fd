"""Index benchmark on generated clustered vectors: build, recall and queries/s vs exact Flat, all-pairs dedup.

    PYTHONPATH=. python bench/bench_index.py 256 1000000 --shards 4 --memory-budget 512MiB --work bench-output/index

Prints a Markdown table. Exact search over all N queries is infeasible on a laptop-sized CPU, so the exact
baseline's queries/s and the recall are measured on a seeded sample of queries (--exact-queries).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import resource
import shutil
import time

import click
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import storage
from jobs.cli import parse_bytes
from pipeline.dedup import find_duplicate_pairs
from pipeline.index import ShardedIndex, read_embedding_table
from pipeline.index_tuning import measure_recall
from pipeline.index_build import IndexBuildConfig, build_index

ROWS_PER_FILE = 200_000


def generate(n: int, d: int, seed: int, dup_share: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Item ids and L2-normalised vectors: n/1000 Gaussian clusters of varied spread, `dup_share` of items
    being near-duplicates (small noise) of another item. Not uniform noise: real embeddings cluster; within
    a cluster the points are isotropic, so an IVF list splits a cluster and must be probed with its
    neighbours (uniform noise at this dimension would make every point nearly equidistant)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(10, n // 1000)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    spread = rng.uniform(0.5, 1.2, size=n_clusters).astype(np.float32)
    vectors = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        c = rng.integers(0, n_clusters, size=stop - start)
        vectors[start:stop] = centres[c] + spread[c, None] * rng.standard_normal((stop - start, d), dtype=np.float32)
    dups = rng.choice(n, size=int(n * dup_share), replace=False)
    originals = rng.integers(0, n, size=len(dups))
    vectors[dups] = vectors[originals] + 0.05 * rng.standard_normal((len(dups), d), dtype=np.float32)
    faiss.normalize_L2(vectors)
    return np.array([f"item-{i:08d}" for i in range(n)], dtype=object), vectors


def write_table(uri: str, ids: np.ndarray, vectors: np.ndarray, content_hash: np.ndarray | None = None,
                fresh: int | None = None, previous: str | None = None) -> None:
    """A published embedding table of ROWS_PER_FILE-row files; with `fresh`, the first `fresh` rows get
    files of their own, listed as `fresh_files` beside `previous`, as the incremental embed stage writes."""
    storage.remove(uri)
    bounds = [0, *range(fresh or ROWS_PER_FILE, len(ids), ROWS_PER_FILE)] if fresh is None else [
        *range(0, fresh, ROWS_PER_FILE), *range(fresh, len(ids), ROWS_PER_FILE)]
    with storage.staging(uri) as stage:
        for f, start in enumerate(bounds):
            stop = next((b for b in bounds if b > start), len(ids))
            rows = slice(start, stop)
            n = len(ids[rows])
            table = pa.table(
                {
                    "item_id": pa.array(ids[rows].tolist(), pa.string()),
                    "embedding": storage.embedding_array(vectors[rows]),
                    "modalities": pa.array(["image+title"] * n),
                    "content_hash": pa.array([""] * n if content_hash is None else content_hash[rows].tolist(), pa.string()),
                    "model_version": pa.array(["bench-synthetic"] * n),
                    "embedded_at": pa.array([dt.datetime(2025, 1, 1)] * n, pa.timestamp("us")),
                }
            )
            pq.write_table(table, os.path.join(stage, f"part-{f:05d}.parquet"), **storage.parquet_options(table.schema))
        extra = {} if fresh is None else {
            "previous": previous, "fresh_files": [f"part-{f:05d}.parquet" for f, b in enumerate(bounds) if b < fresh]}
        storage.publish(stage, uri, {"model_version": "bench-synthetic", "dim": vectors.shape[1], "model_dir": None,
                                     "rows": len(ids), **extra})


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@click.command()
@click.argument("dim", type=int)
@click.argument("n", type=int)
@click.option("--shards", default=4, show_default=True, help="Index shards.")
@click.option("--memory-budget", default="512MiB", show_default=True, help="Budget for --index auto.")
@click.option("--exact-queries", default=1000, show_default=True, help="Queries timed on exact Flat search.")
@click.option("--index-queries", default=20_000, show_default=True, help="Queries timed on the built index.")
@click.option("--dedup-k", default=10, show_default=True, help="Neighbours per item in the all-pairs run.")
@click.option("--dedup-threshold", default=0.95, show_default=True, help="Pair threshold in the all-pairs run.")
@click.option("--work", default="bench-output/index", show_default=True, help="Scratch directory (deleted first).")
@click.option("--seed", default=0, show_default=True, help="Data and build seed.")
def main(dim, n, shards, memory_budget, exact_queries, index_queries, dedup_k, dedup_threshold, work, seed):
    """Run the benchmark and print a Markdown table.

    Example: python bench/bench_index.py 256 1000000 --memory-budget 512MiB
    """
    shutil.rmtree(work, ignore_errors=True)
    emb, idx = os.path.join(work, "embeddings"), os.path.join(work, "index")
    t = time.perf_counter()
    ids, vectors = generate(n, dim, seed)
    write_table(emb, ids, vectors)
    del vectors
    print(f"generated and wrote {n} x {dim} in {time.perf_counter() - t:.1f} s", flush=True)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    manifest = build_index(emb, idx, IndexBuildConfig(n_shards=shards, memory_budget_bytes=parse_bytes(memory_budget), seed=seed))
    build_s = time.perf_counter() - t
    print(f"built {manifest['spec']} in {build_s:.1f} s: {manifest['timings']}", flush=True)

    ids, vectors, _ = read_embedding_table(emb)
    rng = np.random.default_rng(seed + 1)
    q_exact = vectors[rng.choice(n, size=exact_queries, replace=False)]
    q_index = vectors[rng.choice(n, size=index_queries, replace=False)]
    threads = faiss.omp_get_max_threads()

    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    t = time.perf_counter()
    _, rows = exact.search(q_exact, 10)
    exact_qps = exact_queries / (time.perf_counter() - t)
    truth = ids[rows]
    del exact

    index = ShardedIndex.load(idx)
    index_bytes = sum(os.path.getsize(os.path.join(idx, s["faiss"])) for s in manifest["shards"])
    _, found = index.search(q_exact, 10)
    recall = measure_recall(found, truth)
    t = time.perf_counter()
    index.search(q_index, 10)
    index_qps = index_queries / (time.perf_counter() - t)
    del index, vectors

    t = time.perf_counter()
    pairs = find_duplicate_pairs(idx, emb, k=dedup_k, threshold=dedup_threshold, num_actors=1, threads_per_actor=threads)
    dedup_s = time.perf_counter() - t

    table = [
        ("data", f"{n:,} x {dim} clustered ({max(10, n // 1000):,} clusters, 5% near-duplicates), seed {seed}"),
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, FAISS threads {threads}"),
        ("index (auto, budget " + memory_budget + ")", f"`{manifest['spec']}` x {shards} shards, {manifest['search_params']}"),
        ("build time (read, train, fill, tune, eval)", f"{build_s:.1f} s ({manifest['timings']})"),
        ("index size on disk (all shards)", f"{index_bytes / 2**20:.0f} MiB"),
        ("peak RSS of the driver", f"{peak_rss_gib():.2f} GiB"),
        ("recall@10 at build (manifest, held-back queries)", f"{manifest['recall_at_10']:.4f} ({manifest['n_queries']} queries)"),
        (f"recall@10 vs exact Flat ({exact_queries:,} queries)", f"{recall:.4f}"),
        ("exact Flat queries/s (batch)", f"{exact_qps:,.0f} ({exact_queries:,} queries)"),
        ("index queries/s (batch)", f"{index_qps:,.0f} ({index_queries:,} queries)"),
        ("speed-up vs exact", f"{index_qps / exact_qps:.1f}x"),
        (f"all-pairs top-{dedup_k} dedup over {n:,} items (Ray Data, 1 actor)", f"{dedup_s:.1f} s, {len(pairs):,} pairs >= {dedup_threshold}"),
    ]
    print("\n| measure | value |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
