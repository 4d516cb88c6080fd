"""Does an incremental embed stay flat in memory as the catalog grows? Night 2 of the embed job (1% of
the titles edited) at several catalog sizes, for the code in this tree and for a reference tree, in one run.

    PYTHONPATH=. python bench/bench_embed_incremental.py 250000 1000000 --reference /tmp/ref --work /tmp/bei

`--reference` is a checkout of an earlier commit (`git worktree add /tmp/ref a29f478`: the previous
table's item_id -> content_hash dict built in the driver and sent to every Preprocess task); this tree
finds the unchanged rows by a join in Ray Data. For each size the catalog (title-only rows: decoding is not
what is measured) and night 1's embedding table (random unit vectors under the right content hashes and
model version, so night 2 sees 99% of the rows unchanged) are written once, then night 2 runs in a fresh
process per tree, `ray.init(num_cpus=2)`: its wall time, the driver's peak RSS (getrusage) and how much of
it was heap and how much the object store's shared pages (sampled from /proc/self/status every 0.1 s), and
the largest RSS of any Ray worker process (sampled from /proc every 0.2 s). Prints a Markdown table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time

import click

WORDS = [f"{a}{b}" for a in ("red", "blue", "wool", "silk", "slim", "long", "mini", "maxi") for b in
         ("shirt", "dress", "coat", "boot", "bag", "scarf", "hat", "belt", "sock", "top")]
CHANGED_SHARE = 0.01


def _write(n: int, work: str) -> None:
    """catalog.parquet (night 2's: 1% of titles edited), model/ (tiny, random init), night1/ (published)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from item_model import ItemModel, ItemProcessor, preset_config, read_model_version, save_model_dir, train_tokenizer
    from pipeline import storage
    from pipeline.catalog import content_hash
    from pipeline.embed import embedding_schema

    rng = random.Random(0)
    titles = [" ".join(rng.choices(WORDS, k=6)) for _ in range(n)]
    ids = [f"item-{i:09d}" for i in range(n)]
    tok = train_tokenizer(titles[:2000], vocab_size=300)
    torch.manual_seed(0)
    model = ItemModel(preset_config("tiny", tok)).eval()
    save_model_dir(model, ItemProcessor(tok, image_size=model.config.image_size, max_title_len=model.config.max_title_len),
                   os.path.join(work, "model"))
    version = read_model_version(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "night1"))
    vectors = np.random.default_rng(0).standard_normal((n, model.embedding_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    night1 = pa.table({
        "item_id": ids, "embedding": storage.embedding_array(vectors), "modalities": ["title"] * n,
        "content_hash": [content_hash(t, None) for t in titles], "model_version": [version] * n,
        "embedded_at": pa.array([dt.datetime.now(dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    }, schema=embedding_schema(model.embedding_dim))
    files = []
    for start in range(0, n, 250_000):
        files.append(f"part-{len(files):05d}.parquet")
        pq.write_table(night1.slice(start, 250_000), os.path.join(work, "night1", files[-1]),
                       **storage.parquet_options(night1.schema))
    manifest = {"kind": "embeddings", "files": files, "fresh_files": files, "model_version": version, "dim": model.embedding_dim,
                "rows_in": n, "embedded": n, "unchanged_skipped": 0, "rejected": 0}
    with open(os.path.join(work, "night1", "_manifest.json"), "w") as f:
        json.dump(manifest, f)
    for i in rng.sample(range(n), int(n * CHANGED_SHARE)):
        titles[i] += " v2"
    pq.write_table(pa.table({"item_id": ids, "title": titles, "image": pa.nulls(n, pa.binary())}),
                   os.path.join(work, "catalog.parquet"), row_group_size=50_000)


def _driver_rss_split(stop: threading.Event, peak: dict[str, float]) -> None:
    """This process's resident memory (GiB) at its highest, split as /proc/self/status does: RssAnon (the
    heap: Python and Arrow objects), RssFile (mapped files and libraries), RssShmem (shared memory: the Ray
    object store's pages the driver maps while it reads blocks)."""
    while not stop.wait(0.1):
        with open("/proc/self/status") as f:
            now = {k: int(v.split()[0]) / 2**20 for k, v in (line.split(":", 1) for line in f) if k.startswith("Rss")}
        if sum(now.values()) > sum(peak.values()):
            peak.update(now)


def _embed(work: str, out: str) -> dict:
    import ray

    from bench.bench_index_scale import _peak_worker_rss
    from pipeline.embed import EmbedOptions, run_embed

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    stop, peak = threading.Event(), [0.0]
    split = {"RssAnon": 0.0, "RssFile": 0.0, "RssShmem": 0.0}
    samplers = [threading.Thread(target=_peak_worker_rss, args=(stop, peak, {}), daemon=True),
                threading.Thread(target=_driver_rss_split, args=(stop, split), daemon=True)]
    for sampler in samplers:
        sampler.start()
    start = time.perf_counter()
    m = run_embed(os.path.join(work, "catalog.parquet"), os.path.join(work, "model"), os.path.join(work, out),
                  EmbedOptions(batch_size=1024, previous=os.path.join(work, "night1"), encode_threads=1))
    seconds = time.perf_counter() - start
    stop.set()
    for sampler in samplers:
        sampler.join()
    return {"seconds": seconds, "embedded": m["embedded"], "unchanged": m["unchanged_skipped"],
            "driver_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "worker_gib": peak[0],
            "driver_heap_gib": split["RssAnon"], "driver_shmem_gib": split["RssShmem"]}


@click.command()
@click.argument("sizes", type=int, nargs=-1, required=True)
@click.option("--reference", required=True, help="A checkout of the reference commit (a git worktree).")
@click.option("--work", default="bench-output/embed-incremental", show_default=True, help="Scratch directory (deleted first).")
@click.option("--step", type=click.Choice(["write", "embed"]), hidden=True)
@click.option("--out", hidden=True)
def main(sizes, reference, work, step, out):
    """Run the benchmark and print a Markdown table."""
    if step == "write":
        return _write(sizes[0], work)
    if step == "embed":
        return print(json.dumps(_embed(work, out)))
    shutil.rmtree(work, ignore_errors=True)
    trees = {"reference": os.path.abspath(reference), "this tree": os.getcwd()}
    work = os.path.abspath(work)
    rows = []
    for n in sizes:
        scratch = os.path.join(work, str(n))
        os.makedirs(scratch)
        here = [sys.executable, os.path.abspath(__file__), str(n), "--reference", reference, "--work", scratch]
        subprocess.run(here + ["--step", "write"], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        for name, tree in trees.items():
            # cwd too: Ray puts the driver's working directory first on its workers' sys.path
            done = subprocess.run(here + ["--step", "embed", "--out", name.replace(" ", "-")], check=True, cwd=tree,
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tree})
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{n:,} {name}: {figures}", file=sys.stderr, flush=True)
            rows.append((n, name, figures))
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the end")
    print("\n| catalog rows | code | embedded | unchanged | night 2 s | driver peak RSS GiB | of it heap / object-store pages | worker peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, name, f in rows:
        print(f"| {n:,} | {name} | {f['embedded']:,} | {f['unchanged']:,} | {f['seconds']:.1f} | {f['driver_gib']:.2f} | "
              f"{f['driver_heap_gib']:.2f} / {f['driver_shmem_gib']:.2f} | {f['worker_gib']:.2f} |")


if __name__ == "__main__":
    main()
