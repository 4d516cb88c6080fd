"""The duplicate-id pass over a catalog's ids: the hash shuffle (pipeline/id_shuffle.py) against the
bucketed pass it replaced (every task reads every id and keeps its bucket's), in the same run.

    PYTHONPATH=. python bench/bench_id_pass.py 2000000 8000000 --rows-per-part 500000 --work /tmp/bip

Each size's catalog is generated as 250k-row files of string ids (1% duplicated); both passes run with
`ID_BUCKET_ROWS` = --rows-per-part, so the number of parts grows with the catalog as it would at scale.
Prints a Markdown table: seconds, ids read, duplicates found (both must agree).
"""

from __future__ import annotations

import os
import shutil
import time

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import id_shuffle
from pipeline.catalog import duplicate_ids, id_as_string, id_bucket, open_dataset

FILE_ROWS = 250_000


def write_catalog(uri: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ids = np.array([f"sku-{i:010d}" for i in range(n)], dtype=object)
    dup = rng.choice(n, size=n // 100, replace=False)
    ids[dup] = ids[rng.choice(n, size=len(dup))]
    os.makedirs(uri)
    for f, start in enumerate(range(0, n, FILE_ROWS)):
        pq.write_table(pa.table({"item_id": ids[start:start + FILE_ROWS].tolist()}), f"{uri}/part-{f:05d}.parquet")


def bucketed_pass(uri: str, bucket: int, n_buckets: int) -> tuple[set[str], int]:
    """The replaced pass (main before 04a2e72): read every id, keep this bucket's, count them."""
    kept, read = [], 0
    for batch in open_dataset(uri).to_batches(columns=["item_id"]):
        ids = id_as_string(batch.column(0))
        read += len(ids)
        kept.append(ids.filter(pa.array(id_bucket(ids, n_buckets) == bucket)))
    counts = pc.value_counts(pa.chunked_array(kept, pa.string()).drop_null())
    return set(pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()), read


@click.command()
@click.argument("sizes", type=int, nargs=-1, required=True)
@click.option("--rows-per-part", default=500_000, show_default=True, help="ID_BUCKET_ROWS for both passes.")
@click.option("--work", default="bench-output/id-pass", show_default=True, help="Scratch directory (deleted first).")
def main(sizes, rows_per_part, work):
    shutil.rmtree(work, ignore_errors=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    id_shuffle.ID_BUCKET_ROWS = rows_per_part
    print(f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    rows = []
    for n in sizes:
        uri = os.path.join(work, f"cat-{n}")
        write_catalog(uri, n)
        parts = id_shuffle.n_parts(n)
        reduce = ray.remote(duplicate_ids).options(num_cpus=1)
        old = ray.remote(bucketed_pass).options(num_cpus=1)
        ray.get([reduce.remote(pa.table({"item_id": ["warm"]})) for _ in range(4)])  # workers started
        t = time.perf_counter()
        found = ray.get([old.remote(uri, b, parts) for b in range(parts)])
        old_s, old_dup = time.perf_counter() - t, set().union(*(d for d, _ in found))
        old_read = sum(r for _, r in found)
        t = time.perf_counter()
        split, total = id_shuffle.id_parts(uri, ["item_id"], "item_id")
        new_dup = set().union(*ray.get([reduce.remote(*p) for p in split]))
        new_s = time.perf_counter() - t
        assert new_dup == old_dup, "the two passes disagree"
        rows.append((n, parts, old_s, old_read, new_s, total, len(new_dup)))
        print(f"{n:,}: bucketed {old_s:.1f} s, shuffle {new_s:.1f} s", flush=True)
        shutil.rmtree(uri)
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| catalog ids | parts | bucketed pass s | ids read | shuffle s | ids read | duplicated ids | bucketed / shuffle |")
    print("|---|---|---|---|---|---|---|---|")
    for n, parts, old_s, old_read, new_s, total, dup in rows:
        print(f"| {n:,} | {parts} | {old_s:.1f} | {old_read:,} | {new_s:.1f} | {total:,} | {dup:,} | {old_s / new_s:.2f}x |")


if __name__ == "__main__":
    main()
