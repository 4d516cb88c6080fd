"""Does it pay to search a batch of queries grouped by their nearest IVF list? FAISS alone (no Ray, no files):
one IVF index over the index benchmark's generated vectors, the same queries searched with their lists
preassigned (as the dedup and backfill stages search), in batches, once in the caller's order and once
sorted by each query's nearest list (`ShardedIndex.search` does the latter since 2026-11-23). Prints the
scan seconds of each, their ratio and whether the results are the same.

    PYTHONPATH=. python bench/bench_ivf_order.py 1000000 IVF4096,Flat IVF4096,SQ8 --queries 131072 --batch 8192 --batch 32768

An IVF search scans `nprobe` lists per query; in the caller's order (for the all-pairs dedup, the table's
order: random with respect to the lists) each query reads lists the previous ones did not, from memory.
Grouped, consecutive queries share most of their lists while these are still in the CPU's caches.
"""

from __future__ import annotations

import os
import time

import click
import faiss
import numpy as np

from bench.bench_index import generate
from pipeline.index import set_search_params, train_empty_index, train_sample_size


def scan(index: faiss.Index, queries: np.ndarray, lists: np.ndarray, scores: np.ndarray, batch: int,
         grouped: bool) -> tuple[float, np.ndarray]:
    """Seconds to search `queries` in batches with their lists preassigned, and the ids found (caller's order)."""
    found = np.empty((len(queries), 11), dtype=np.int64)
    start = time.perf_counter()
    for s in range(0, len(queries), batch):
        q, l, d = queries[s:s + batch], lists[s:s + batch], scores[s:s + batch]
        order = np.argsort(l[:, 0], kind="stable") if grouped else np.arange(len(q))
        _, ids = index.search_preassigned(q[order], 11, l[order], d[order])
        found[s + order] = ids
    return time.perf_counter() - start, found


@click.command()
@click.argument("n", type=int)
@click.argument("specs", nargs=-1, required=True)
@click.option("--dim", default=256, show_default=True)
@click.option("--queries", "n_queries", default=131_072, show_default=True)
@click.option("--batch", "batches", type=int, multiple=True, default=(8192,), show_default=True,
              help="Queries per search call (the dedup's default batch is 8,192); repeat for several.")
@click.option("--nprobe", default=8, show_default=True)
def main(n: int, specs: tuple[str, ...], dim: int, n_queries: int, batches: tuple[int, ...], nprobe: int) -> None:
    _, x = generate(n, dim, 0)
    rng = np.random.default_rng(1)
    queries = x[rng.permutation(n)[:n_queries]]
    print("| spec | n | batch | caller's order s | grouped by list s | ratio | same ids |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        index = train_empty_index(spec, x[rng.choice(n, train_sample_size(spec, n), replace=False)], 0)
        index.add(x)
        set_search_params(index, {"nprobe": nprobe})
        scores, lists = faiss.extract_index_ivf(index).quantizer.search(queries, nprobe)
        for batch in batches:
            plain_s, plain = scan(index, queries, lists, scores, batch, grouped=False)
            grouped_s, grouped = scan(index, queries, lists, scores, batch, grouped=True)
            print(f"| `{spec}` | {n:,} | {batch:,} | {plain_s:.1f} | {grouped_s:.1f} | {plain_s / grouped_s:.2f}x | "
                  f"{(plain == grouped).mean():.4f} |", flush=True)
    print(f"\n{n_queries:,} queries, nprobe {nprobe}, {faiss.omp_get_max_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
