"""Index update vs rebuild: a night where a share of the catalog changed, on generated clustered vectors.

    PYTHONPATH=. python bench/bench_index_update.py 256 1000000 --changed 0.01 --shards 4 --memory-budget 512MiB --work /tmp/bu

Day 0: the table and its full build. Day 1: `--changed` of the items changed (40% new listings, 30% edited
= a new vector under the same id, 30% deleted), written as a new table the way the incremental embed stage
writes one (tonight's rows in files of their own, listed as `fresh_files`). Then, in the same run, the day-1
index is made twice: updated from day 0's index (pipeline/index_update.py) and rebuilt from scratch
(index_build.build_index). Both are measured on the same queries against an exact search over the day-1
table: the new and edited vectors (what the update touched) and random rows. Prints a Markdown table.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time

import click
import faiss
import numpy as np
import ray

from bench.bench_index import generate, peak_rss_gib, write_table
from jobs.cli import parse_bytes
from pipeline import storage
from pipeline.embedding_scan import exact_neighbours_streamed
from pipeline.index import ShardedIndex
from pipeline.index_build import IndexBuildConfig, build_index
from pipeline.index_tuning import measure_recall
from pipeline.index_update import build_or_update


def change(ids: np.ndarray, vectors: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Day 1 from day 0: (ids, vectors, content hashes, counts); new and edited vectors are drawn near
    existing ones (a new listing is like the catalog's; an edit moves a listing within its neighbourhood)."""
    rng = np.random.default_rng(seed)
    n, d = vectors.shape
    k = int(n * share)
    n_add, n_edit = int(k * 0.4), int(k * 0.3)
    n_del = k - n_add - n_edit
    pick = rng.choice(n, size=n_edit + n_del, replace=False)
    edited = pick[:n_edit]  # the rest of `pick` is deleted: left out of day 1 below

    def near(rows: np.ndarray) -> np.ndarray:
        out = (vectors[rows] + 0.3 / np.sqrt(d) * rng.standard_normal((len(rows), d), dtype=np.float32)).astype(np.float32)
        faiss.normalize_L2(out)
        return out

    # as the incremental embed stage writes it: the rows embedded tonight (edited, new) first, then the
    # rows carried over unchanged
    same = np.setdiff1d(np.arange(n), pick)
    new_ids = np.array([f"new-{i:08d}" for i in range(n_add)], dtype=object)
    ids = np.concatenate([ids[edited], new_ids, ids[same]])
    vectors = np.concatenate([near(edited), near(rng.integers(0, n, size=n_add)), vectors[same]])
    hashes = np.array(["edited"] * n_edit + ["new"] * n_add + [""] * len(same), dtype=object)
    return ids, vectors, hashes, {"added": n_add, "edited": n_edit, "deleted": n_del}


@click.command()
@click.argument("dim", type=int)
@click.argument("n", type=int)
@click.option("--changed", default=0.01, show_default=True, help="Share of the catalog that changes overnight.")
@click.option("--shards", default=4, show_default=True, help="Index shards.")
@click.option("--memory-budget", default="512MiB", show_default=True, help="Budget for --index auto.")
@click.option("--queries", default=1000, show_default=True, help="Random day-1 rows added to the measured queries.")
@click.option("--work", default="bench-output/index-update", show_default=True, help="Scratch directory (deleted first).")
@click.option("--seed", default=0, show_default=True, help="Data and build seed.")
@click.option("--keep", is_flag=True, help="Keep the scratch directory (tables and indexes) for inspection.")
def main(dim, n, changed, shards, memory_budget, queries, work, seed, keep):
    """Run the benchmark and print a Markdown table."""
    shutil.rmtree(work, ignore_errors=True)
    paths = {name: os.path.join(work, name) for name in ("emb0", "emb1", "idx0", "idx1-update", "idx1-rebuild")}
    t = time.perf_counter()
    ids, vectors = generate(n, dim, seed)
    write_table(paths["emb0"], ids, vectors)
    ids1, vectors1, hashes1, counts = change(ids, vectors, changed, seed + 1)
    write_table(paths["emb1"], ids1, vectors1, content_hash=hashes1, fresh=counts["added"] + counts["edited"],
                previous=paths["emb0"])
    del ids, vectors
    print(f"generated and wrote day 0 and day 1 ({counts}) in {time.perf_counter() - t:.1f} s", flush=True)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(include_dashboard=False, log_to_driver=False)
    config = IndexBuildConfig(n_shards=shards, memory_budget_bytes=parse_bytes(memory_budget), seed=seed)
    build_index(paths["emb0"], paths["idx0"], config)

    t = time.perf_counter()
    updated = build_or_update(paths["emb1"], paths["idx1-update"], config, previous_uri=paths["idx0"])
    update_s = time.perf_counter() - t
    print(f"update: {update_s:.1f} s, {updated['mode']}: {updated['reason']} {updated['timings']}", flush=True)
    t = time.perf_counter()
    rebuilt = build_index(paths["emb1"], paths["idx1-rebuild"], config)
    rebuild_s = time.perf_counter() - t
    print(f"rebuild: {rebuild_s:.1f} s {rebuilt['timings']}", flush=True)

    rng = np.random.default_rng(seed + 2)
    touched = np.flatnonzero(hashes1 != "")
    rows = np.concatenate([touched, rng.choice(len(ids1), size=queries, replace=False)])
    q, q_ids = vectors1[rows], ids1[rows]
    truth = exact_neighbours_streamed(paths["emb1"], q, 11)
    recall = {}
    for name in ("idx1-update", "idx1-rebuild"):
        _, found = ShardedIndex.load(paths[name]).search(q, 11)
        recall[name] = (measure_recall(found[: len(touched)], truth[: len(touched)], exclude=q_ids[: len(touched)]),
                        measure_recall(found[len(touched):], truth[len(touched):], exclude=q_ids[len(touched):]))
    _, found = ShardedIndex.load(paths["idx1-update"]).search(vectors1, 10)
    present = set(ids1.tolist())
    stale = sum(1 for i in found.ravel().tolist() if i is not None and i not in present)

    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    table = [
        ("data", f"{n:,} x {dim} clustered, seed {seed}; day 1: {changed:.1%} changed = {counts}"),
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, FAISS threads {faiss.omp_get_max_threads()}"),
        ("index", f"`{rebuilt['spec']}` x {shards} shards, {rebuilt['search_params']} (update keeps {updated['search_params']})"),
        ("what the update stage did", f"{updated['mode']}: {updated['reason']}"),
        ("update (diff, read changed, shards, recall)", f"{update_s:.1f} s ({updated['timings']})"),
        ("rebuild (read, train, fill, tune, eval)", f"{rebuild_s:.1f} s ({rebuilt['timings']})"),
        ("update speed-up", f"{rebuild_s / update_s:.1f}x"),
        (f"recall@10 on the {len(touched):,} new and edited vectors: update / rebuild",
         f"{recall['idx1-update'][0]:.4f} / {recall['idx1-rebuild'][0]:.4f}"),
        (f"recall@10 on {queries:,} random rows: update / rebuild", f"{recall['idx1-update'][1]:.4f} / {recall['idx1-rebuild'][1]:.4f}"),
        ("recall@10 in the manifests: update (new vectors) / rebuild (held back)",
         f"{updated['recall_at_10']:.4f} / {rebuilt['recall_at_10']:.4f}"),
        ("deleted items returned by the updated index (every row's top-10)", f"{stale}"),
        ("peak RSS of this process (both tables generated, the rebuild's read, three indexes loaded)", f"{peak_rss_gib():.2f} GiB"),
    ]
    print("\n| measure | value |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value} |")
    if not keep:
        storage.remove(work)


if __name__ == "__main__":
    main()
