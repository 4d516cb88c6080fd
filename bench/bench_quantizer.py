"""Would lists of fixed size make the all-pairs search linear? FAISS alone (no Ray, no files): for each
index spec, k-means training, adding, a 100k-query search at several nprobe, and recall@10 of 2,000
queries against exact search, on the generated vectors of the index benchmark.

    PYTHONPATH=. python bench/bench_quantizer.py 1000000 IVF4096,Flat IVF4096_HNSW32,Flat IVF16384,Flat IVF16384_HNSW32,Flat
    PYTHONPATH=. python bench/bench_quantizer.py 1000000 IVF16384_HNSW32,Flat --hnsw-kmeans --train-only

The product's rule (`pipeline.index.n_centroids`) gives ~4 sqrt(n) lists, so a query's scan grows as
sqrt(n); lists of fixed size keep the scan constant but need more lists, and then a quantizer (and a
k-means) whose cost does not grow with the list count. `--hnsw-kmeans` gives FAISS's k-means an HNSW
graph over the centroids to assign the training sample with (`clustering_index`; by default an
`_HNSW` quantizer is still trained by a flat k-means). Training uses `pipeline.index.train_sample_size`
points (FAISS's minimum of 39 per list), as the index build does.
"""

from __future__ import annotations

import time

import click
import faiss
import numpy as np

from bench.bench_index import generate
from pipeline.index import set_search_params, train_empty_index, train_sample_size


def _quantizer_ef(index: faiss.Index, nprobe: int) -> None:
    """An HNSW quantizer must find the nprobe nearest lists: efSearch max(64, 2 nprobe) (with FAISS's default
    of 16, recall@10 stopped at 0.987 on 1M vectors in 4,096 lists whatever the nprobe)."""
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 2 * nprobe)


@click.command()
@click.argument("n", type=int)
@click.argument("specs", nargs=-1, required=True)
@click.option("--dim", default=256, show_default=True)
@click.option("--hnsw-kmeans", is_flag=True, help="Assign k-means points through an HNSW graph (clustering_index).")
@click.option("--train-only", is_flag=True, help="Time the k-means only; quality = mean inner product to the nearest centroid.")
def main(n: int, specs: tuple[str, ...], dim: int, hnsw_kmeans: bool, train_only: bool) -> None:
    _, x = generate(n, dim, 0)
    rng = np.random.default_rng(1)
    q = x[rng.choice(n, 2000, replace=False)]
    start = time.perf_counter()
    _, truth = faiss.knn(q, x, 11, faiss.METRIC_INNER_PRODUCT)
    print(f"exact top-10 of 2,000 queries: {time.perf_counter() - start:.1f} s", flush=True)
    for spec in specs:
        sample = x[rng.choice(n, train_sample_size(spec, n), replace=False)]
        start = time.perf_counter()
        if hnsw_kmeans:
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            assigner = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            assigner.hnsw.efSearch = 32
            faiss.extract_index_ivf(index).clustering_index = assigner
            index.train(sample)
        else:
            index = train_empty_index(spec, sample, 0)
        train_s = time.perf_counter() - start
        _quantizer_ef(index, 1)  # adds assign lists through an HNSW quantizer too
        if train_only:
            ivf = faiss.extract_index_ivf(index)
            centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            best, _ = faiss.knn(q, centroids, 1, faiss.METRIC_INNER_PRODUCT)
            print(f"{spec} n={n} sample={len(sample)} hnsw-kmeans={hnsw_kmeans}: train {train_s:.1f} s, "
                  f"mean inner product to the nearest centroid {best.mean():.4f}", flush=True)
            continue
        start = time.perf_counter()
        index.add(x)
        add_s = time.perf_counter() - start
        for nprobe in (4, 8, 16, 32):
            set_search_params(index, {"nprobe": nprobe})
            _quantizer_ef(index, nprobe)
            start = time.perf_counter()
            index.search(x[:100_000], 11)
            search_s = time.perf_counter() - start
            _, found = index.search(q, 11)
            recall = np.mean([len(set(a[1:]) & set(b[1:])) / 10 for a, b in zip(found, truth)])
            print(f"{spec} n={n} sample={len(sample)}: train {train_s:.1f} s, add {add_s:.1f} s, nprobe {nprobe}: "
                  f"100k-query search {search_s:.1f} s, recall@10 {recall:.4f}", flush=True)


if __name__ == "__main__":
    main()
